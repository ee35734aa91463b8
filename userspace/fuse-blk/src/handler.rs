//! The user-facing API: what a block device is and what it is asked to do.

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::reply::{ReplyData, ReplyEmpty, ReplyWrite};

/// Which optional operations a device supports. The transports advertise
/// only these to the kernel, so a handler is never sent an operation it did
/// not ask for (the stock path is the exception noted on
/// [`BlockDevice::write_zeroes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// The device has a volatile write cache: `flush` makes written data
    /// durable. Without it, flushes are answered by the engine.
    pub flush: bool,
    /// Writes may carry force-unit-access (`fua` argument of `write`).
    pub fua: bool,
    /// `discard` is supported.
    pub discard: bool,
    /// `write_zeroes` is supported.
    pub write_zeroes: bool,
}

impl Features {
    /// Every optional operation.
    pub const ALL: Features = Features {
        flush: true,
        fua: true,
        discard: true,
        write_zeroes: true,
    };
}

/// The shape of a block device, fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes; a multiple of `logical_block_size`.
    pub size: u64,
    /// Smallest addressable unit: a power of two from 512 to 4096.
    pub logical_block_size: u32,
    /// Preferred unit for writes, a multiple of `logical_block_size`.
    pub physical_block_size: u32,
    /// Writes, discards and write-zeroes are refused by the kernel.
    pub read_only: bool,
    /// The optional operations the device supports.
    pub features: Features,
}

/// Why a [`Geometry`] cannot describe a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeometryError {
    /// The logical block size (given) is not a power of two from 512 to
    /// 4096.
    BadLogicalBlockSize(u32),
    /// The physical block size is not a power-of-two multiple of the
    /// logical one.
    BadPhysicalBlockSize {
        /// The physical block size given.
        physical: u32,
        /// The logical block size it must be a multiple of.
        logical: u32,
    },
    /// The size is not a whole number of logical blocks.
    SizeNotMultiple {
        /// The size given, in bytes.
        size: u64,
        /// The logical block size.
        block: u32,
    },
    /// The size is zero.
    Empty,
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeometryError::BadLogicalBlockSize(b) => {
                write!(f, "block size {b} is not a power of two between 512 and 4096")
            }
            GeometryError::BadPhysicalBlockSize { physical, logical } => write!(
                f,
                "physical block size {physical} is not a power-of-two multiple of the block size {logical}"
            ),
            GeometryError::SizeNotMultiple { size, block } => {
                write!(f, "size {size} is not a multiple of the block size {block}")
            }
            GeometryError::Empty => write!(f, "size is zero"),
        }
    }
}

impl std::error::Error for GeometryError {}

impl From<GeometryError> for std::io::Error {
    fn from(e: GeometryError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
    }
}

impl Geometry {
    /// A writable device with no optional features, physical block size
    /// equal to the logical one.
    pub fn new(size: u64, logical_block_size: u32) -> Geometry {
        Geometry {
            size,
            logical_block_size,
            physical_block_size: logical_block_size,
            read_only: false,
            features: Features::default(),
        }
    }

    /// Checks that this describes a block device the transports can make:
    /// see [`GeometryError`] for what may be wrong.
    pub fn validate(&self) -> Result<(), GeometryError> {
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
            return Err(GeometryError::BadLogicalBlockSize(lbs));
        }
        let pbs = self.physical_block_size;
        if !pbs.is_power_of_two() || pbs < lbs {
            return Err(GeometryError::BadPhysicalBlockSize {
                physical: pbs,
                logical: lbs,
            });
        }
        if self.size == 0 {
            return Err(GeometryError::Empty);
        }
        if self.size % u64::from(lbs) != 0 {
            return Err(GeometryError::SizeNotMultiple {
                size: self.size,
                block: lbs,
            });
        }
        Ok(())
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size / u64::from(self.logical_block_size)
    }
}

/// The identity of one request, handed to every operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    unique: u64,
    queue: u16,
}

impl Request {
    pub(crate) fn new(unique: u64, queue: u16) -> Request {
        Request { unique, queue }
    }

    /// The id the kernel gave the request; unique among requests in flight
    /// on one device.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Index of the queue (worker channel) the request arrived on.
    pub fn queue(&self) -> u16 {
        self.queue
    }
}

/// A block device served from userspace.
///
/// Offsets and lengths are in bytes, multiples of the logical block size,
/// and lie within the device: the engine checks this before calling. Each
/// operation receives a reply object that must be answered exactly once,
/// now or later from any thread; one dropped unanswered answers EIO.
/// Handlers are shared between worker threads and called concurrently.
pub trait BlockDevice: Send + Sync + 'static {
    /// The device's shape. Called once, before the first request; a later
    /// size comes through [`resize`](Self::resize) or is announced by the
    /// program that attached the device.
    fn geometry(&self) -> Geometry;

    /// Read `len` bytes at `offset`; answer with exactly `len` bytes.
    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData);

    /// Write `data` at `offset`. With `fua`, the data must be durable when
    /// the reply is sent (only when [`Features::fua`] is set).
    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite);

    /// Make every write answered so far durable.
    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        reply.ok();
    }

    /// The range's contents are no longer needed; reads of it may return
    /// old data or zeros afterwards.
    fn discard(&self, _req: &Request, _offset: u64, _len: u64, reply: ReplyEmpty) {
        reply.error(libc::EOPNOTSUPP);
    }

    /// Afterwards the range reads as zeros. With `may_unmap` the device may
    /// release the storage behind it (as a discard would).
    ///
    /// On the stock-kernel path the loop driver sends discards as
    /// punch-hole requests, which promise zeros; they arrive here with
    /// `may_unmap` set.
    fn write_zeroes(
        &self,
        _req: &Request,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(libc::EOPNOTSUPP);
    }

    /// The device is going away; no request follows.
    fn destroy(&self) {}

    /// Serve `size` bytes from now on (`fuse-blk resize`): the engine has
    /// checked that it is a non-zero multiple of the logical block size.
    /// It is called before the kernel sees the new size: when growing, the
    /// new end must read (as zeros) once it returns; when shrinking, the
    /// engine already refuses requests past the new end. An error leaves
    /// the device as it was. The default refuses: the device keeps its
    /// size.
    fn resize(&self, _size: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this backend cannot change its size",
        ))
    }

    /// Whether the io_uring transports may hand large reads (`write` false)
    /// or writes to helper threads, so that this device's work on one
    /// request overlaps the kernel's copies for the next on the queue's own
    /// thread, and large requests of one queue use more than one CPU. Worth
    /// it where a request costs system calls or waits (the default); a
    /// device whose large requests cost next to nothing says no and saves
    /// the hand-over.
    fn parallel_large_io(&self, _write: bool) -> bool {
        true
    }

    /// A file whose bytes are exactly this device's blocks, from offset 0,
    /// which a transport may have the kernel read and write itself instead
    /// of calling [`read`](Self::read) and [`write`](Self::write): the
    /// module's passthrough, or FUSE passthrough on the stock path. Flush,
    /// discard and write-zeroes keep coming here. The default, none, sends
    /// every request here.
    fn backing_file(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_validation() {
        assert!(Geometry::new(1 << 20, 512).validate().is_ok());
        assert!(Geometry::new(1 << 20, 4096).validate().is_ok());
        assert_eq!(
            Geometry::new(1000, 512).validate(),
            Err(GeometryError::SizeNotMultiple {
                size: 1000,
                block: 512
            })
        );
        assert_eq!(
            Geometry::new(1 << 20, 1000).validate(),
            Err(GeometryError::BadLogicalBlockSize(1000))
        );
        assert_eq!(
            Geometry::new(1 << 20, 8192).validate(),
            Err(GeometryError::BadLogicalBlockSize(8192))
        );
        assert_eq!(Geometry::new(0, 512).validate(), Err(GeometryError::Empty));
        let mut g = Geometry::new(1 << 20, 4096);
        g.physical_block_size = 512;
        assert!(g.validate().is_err());
    }
}
