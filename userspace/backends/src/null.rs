//! A device that stores nothing, for measuring the transport: every request
//! costs only its round trip through the kernel and the engine.

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};

/// Reads return zeros, writes are dropped, everything else succeeds at
/// once. All optional operations are advertised, so a benchmark exercises
/// flushes, FUA writes, discards and zeroing through the whole path rather
/// than having the kernel or the engine short-circuit them.
pub struct NullDevice {
    size: u64,
    logical_block_size: u32,
    read_only: bool,
}

impl NullDevice {
    /// A device of `size` bytes; the geometry is checked by the session (or
    /// by `BackendSpec::open`), not here.
    pub fn new(size: u64, logical_block_size: u32) -> NullDevice {
        NullDevice {
            size,
            logical_block_size,
            read_only: false,
        }
    }

    /// Marks the device read-only in its geometry.
    pub fn with_read_only(mut self, read_only: bool) -> NullDevice {
        self.read_only = read_only;
        self
    }
}

impl BlockDevice for NullDevice {
    /// Its large requests cost nothing here: handing them to helper
    /// threads would only add a wake-up.
    fn parallel_large_io(&self, _write: bool) -> bool {
        false
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            read_only: self.read_only,
            features: Features::ALL,
            ..Geometry::new(self.size, self.logical_block_size)
        }
    }

    /// Answered from one shared buffer of zeros: a benchmark should measure
    /// the transport, not an allocation and memset per request.
    fn read(&self, _req: &Request, _offset: u64, _len: u32, reply: ReplyData) {
        reply.zeros();
    }

    fn write(&self, _req: &Request, _offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
        reply.ok();
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        reply.ok();
    }

    fn discard(&self, _req: &Request, _offset: u64, _len: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn write_zeroes(
        &self,
        _req: &Request,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fuse_blk::{Session, SessionConfig};

    use super::*;
    use crate::bufs::ZEROS_LEN;
    use crate::testutil::{pattern, Harness};

    #[test]
    fn reads_zeros_and_drops_writes() {
        let h = Harness::new(Arc::new(NullDevice::new(1 << 30, 4096)));
        assert_eq!(h.read(0, 4096).unwrap(), vec![0; 4096]);
        h.write(4096, &pattern(1, 8192), false).unwrap();
        h.write(4096, &pattern(1, 8192), true).unwrap();
        assert_eq!(h.read(4096, 8192).unwrap(), vec![0; 8192]);
        h.flush().unwrap();
        h.discard(0, 1 << 20).unwrap();
        h.write_zeroes(0, 1 << 20, false).unwrap();
        h.write_zeroes(0, 1 << 20, true).unwrap();
    }

    #[test]
    fn all_features_advertised() {
        let g = NullDevice::new(1 << 20, 512).geometry();
        assert_eq!(g.size, 1 << 20);
        assert_eq!(g.logical_block_size, 512);
        assert_eq!(
            g.features,
            Features {
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true
            }
        );
    }

    #[test]
    fn reads_larger_than_the_zero_buffer() {
        // The engine's largest request is configurable; a read bigger than
        // the shared buffer is gathered from several slices of it.
        let h = Harness::new(Arc::new(NullDevice::new(1 << 30, 4096)));
        let len = 3 * ZEROS_LEN + 4096;
        assert_eq!(h.read(0, len as u32).unwrap(), vec![0; len]);
        assert_eq!(h.read(0, ZEROS_LEN as u32).unwrap(), vec![0; ZEROS_LEN]);
    }

    #[test]
    fn read_only_in_geometry() {
        let device = Arc::new(NullDevice::new(1 << 20, 4096).with_read_only(true));
        let session = Session::new(device, SessionConfig::default()).unwrap();
        assert!(session.geometry().read_only);
    }
}
