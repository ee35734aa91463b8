//! A fuse-blk block device that serves a qcow2 image, as `qemu-img create
//! -f qcow2` makes them (versions 2 and 3, clusters of 512 bytes to 2 MiB,
//! any refcount width), with:
//!
//! - backing files (raw or qcow2, chains of them), opened read-only and
//!   never written: unallocated clusters read from them, writes allocate
//!   in the image, copying the rest of a partly written cluster;
//! - compressed clusters (deflate, or zstd for `compression_type=zstd`),
//!   read; a partial write into one allocates a normal cluster;
//! - compressed writes, on request ([`Options::compress_writes`]): whole
//!   clusters written into unallocated, zero or compressed ones are stored
//!   compressed when that saves a sector, packed as qemu packs them, so
//!   that qemu reads them (deflate with qemu's 4 KiB window, or zstd);
//! - internal snapshots, left intact: clusters shared with them (refcount
//!   above 1, no COPIED flag) are copied before being written;
//! - discard and write-zeroes as zero clusters (version 3) or deallocation,
//!   and flushes that write metadata back in crash-safe order (see
//!   [`image`]'s documentation);
//! - dirty images (lazy refcounts left stale by a crash): served as they
//!   are read-only, their refcounts rebuilt before they are written.
//!
//! Refused with a one-line error: encryption, external data files,
//! extended L2 entries, unknown incompatible features, images marked
//! corrupt.
//!
//! ```no_run
//! use fuse_blk::BlockDevice;
//! use fuse_blk_qcow2::{Options, Qcow2Device};
//!
//! let device = Qcow2Device::open("disk.qcow2".as_ref(), false, 512, &Options::default())?;
//! assert_eq!(device.geometry().logical_block_size, 512);
//! # Ok::<(), std::io::Error>(())
//! ```

#![deny(missing_docs)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};

mod backing;
mod cache;
mod compressed;
pub mod header;
pub mod image;
mod rebuild;
mod refcount;
#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

pub use image::Image;

/// Tunables of an opened image (each layer of a backing chain has its own
/// caches of this size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Bytes of L2 tables kept in memory (at least two tables are). One
    /// byte of L2 table maps `cluster_size / 8` bytes of guest data: the
    /// default 4 MiB maps 32 GiB with 64 KiB clusters.
    pub l2_cache_bytes: usize,
    /// Bytes of refcount blocks kept in memory (at least two blocks).
    pub refcount_cache_bytes: usize,
    /// What to do when another process holds the image's lock at open:
    /// `None` refuses the open (after 2 s of retries). `Some(wait)` is for
    /// a daemon taking over from one that still serves the image (`attach
    /// --recover`, `handoff`): the device opens at once with the size
    /// from the header, and its requests wait until the lock is free (the
    /// old daemon flushes and exits once its last request is answered),
    /// then the image is opened and its metadata read as the old daemon
    /// left it. No later than `wait` after the open, requests fail with
    /// EIO. So two processes never write the image's metadata at once.
    pub wait_for_lock: Option<Duration>,
    /// Store whole clusters compressed, as qemu does for `qemu-img convert
    /// -c` or `qemu-io -c "write -c"`: a write covering a guest cluster
    /// entirely (or the image's end in its last cluster) into one that is
    /// unallocated, zero or compressed is compressed with the image's
    /// compression type (deflate with a 4 KiB window, or zstd), and stored
    /// so when that saves at least one 512-byte sector; partial writes,
    /// and writes into normal clusters, are stored as they are. Off by
    /// default; nothing for a read-only image.
    pub compress_writes: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            l2_cache_bytes: 4 << 20,
            refcount_cache_bytes: 1 << 20,
            wait_for_lock: None,
            compress_writes: false,
        }
    }
}

/// An error for metadata found inconsistent while serving a request: the
/// request fails with EIO, the reason goes to the log.
pub(crate) fn corrupt(message: fmt::Arguments<'_>) -> io::Error {
    log::error!("{message}");
    io::Error::from_raw_os_error(libc::EIO)
}

/// Reads exactly `buf.len()` bytes; a file ending first is EIO (metadata
/// that should be there is not).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ends before {} bytes at {offset:#x}", buf.len()),
            )
        } else {
            e
        }
    })
}

/// An OS error's description without Rust's "(os error N)" suffix, for
/// messages shown as they are.
pub(crate) fn path_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        // SAFETY: strerror returns a pointer to a static or thread-local
        // NUL-terminated string, copied out before anything else runs.
        Some(code) => unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) }
            .to_string_lossy()
            .into_owned(),
        None => e.to_string(),
    }
}

/// Byte-range locks as qemu takes them on its images (open file
/// description locks, all shared): byte `100 + p` while holding permission
/// `p`, byte `200 + p` while not letting others hold it. Taking the same
/// ones makes qemu (`qemu-img`, `qemu-io`, a VM) refuse an image a daemon
/// writes, or a base it reads from, and lets the daemon see qemu's.
mod qemu_lock {
    pub const PERM_BASE: i64 = 100;
    pub const SHARED_BASE: i64 = 200;
    pub const CONSISTENT_READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const RESIZE: i64 = 3;
}

/// `fcntl(F_OFD_*)` on one byte: `Ok(true)` when a lock of `kind` could be
/// taken (for `F_OFD_GETLK`) or was (for `F_OFD_SETLK`).
fn ofd_lock(file: &File, command: libc::c_int, kind: libc::c_short, byte: i64) -> io::Result<bool> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    // SAFETY: fcntl on a descriptor borrowed for the call, with a pointer
    // to a live flock it may read and (F_OFD_GETLK) write.
    if unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(command != libc::F_OFD_GETLK || lock.l_type == libc::F_UNLCK as libc::c_short)
}

/// Locks an image as qemu would: a writer holds read, write and resize
/// permissions and shares none of write and resize; a reader (a base, a
/// read-only attach) holds read and shares no write or resize either, so
/// that its data cannot change under it. Refused while another process
/// (qemu or another daemon) holds or forbids what this one needs.
///
/// The locks belong to the open file, which a child being forked by any
/// thread of this process shares until it execs (the descriptor is
/// close-on-exec), so a refusal is retried for 2 s before it counts. A
/// file system without such locks is used unlocked, as qemu does.
pub(crate) fn lock_file(file: &File, path: &Path, writable: bool) -> io::Result<()> {
    lock_file_until(file, path, writable, Instant::now() + FORK_LOCK_WAIT)
}

/// How long a lock refusal is retried, for a forking thread's child to
/// exec (see [`lock_file`]).
const FORK_LOCK_WAIT: Duration = Duration::from_secs(2);

/// [`lock_file`], retrying until `deadline`.
pub(crate) fn lock_file_until(
    file: &File,
    path: &Path,
    writable: bool,
    deadline: Instant,
) -> io::Result<()> {
    use qemu_lock::*;
    let held: &[i64] = if writable {
        &[CONSISTENT_READ, WRITE, RESIZE]
    } else {
        &[CONSISTENT_READ]
    };
    let unshared = [WRITE, RESIZE];
    let busy = || {
        io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{}: in use by another process (locked)", path.display()),
        )
    };
    let take = || -> io::Result<bool> {
        for &p in held {
            if !ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK as _, PERM_BASE + p)? {
                return Ok(false);
            }
        }
        for &p in &unshared {
            if !ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK as _, SHARED_BASE + p)? {
                return Ok(false);
            }
        }
        // Nobody forbids what is held, nobody holds what is forbidden.
        for &p in held {
            if !ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK as _, SHARED_BASE + p)? {
                return Ok(false);
            }
        }
        for &p in &unshared {
            if !ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK as _, PERM_BASE + p)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    loop {
        match take() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(false) => return Err(busy()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)
                ) =>
            {
                log::warn!(
                    "{}: not locked ({}): the file system has no byte-range locks",
                    path.display(),
                    path_error(&e)
                );
                return Ok(());
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: locking: {}", path.display(), path_error(&e)),
                ))
            }
        }
    }
}

/// A qcow2 image served as a block device.
pub struct Qcow2Device {
    /// Set at open, or for a device opened while another process held the
    /// image ([`Options::wait_for_lock`]), by the first request that finds
    /// the lock free.
    image: OnceLock<Image>,
    /// How to open the image while it is not: `Some` until it is open or
    /// the wait is over.
    pending: Mutex<Option<PendingOpen>>,
    path: PathBuf,
    /// Its size is the one at open: `size` has the one now.
    geometry: Geometry,
    size: AtomicU64,
}

/// An open waiting for another process to let go of the image.
struct PendingOpen {
    read_only: bool,
    options: Options,
    deadline: Instant,
}

impl fmt::Debug for Qcow2Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Device")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("open", &self.image.get().is_some())
            .finish()
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Qcow2Device {
    /// Opens the image at `path` (and its backing chain) as a device with
    /// blocks of `logical_block_size` bytes. Errors are one line that names
    /// the file at fault.
    pub fn open(
        path: &Path,
        read_only: bool,
        logical_block_size: u32,
        options: &Options,
    ) -> io::Result<Qcow2Device> {
        let (image, size) = match Image::open(path, read_only, options) {
            Ok(image) => {
                let size = image.size();
                (Some(image), size)
            }
            Err(e)
                if e.kind() == io::ErrorKind::ResourceBusy && options.wait_for_lock.is_some() =>
            {
                log::info!("{e}: requests wait until it is free");
                (None, unlocked_size(path)?)
            }
            Err(e) => return Err(e),
        };
        let geometry = Geometry {
            size,
            logical_block_size,
            physical_block_size: logical_block_size.max(4096),
            read_only,
            features: if read_only {
                Features::default()
            } else {
                Features::ALL
            },
        };
        geometry.validate().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {e}", path.display()),
            )
        })?;
        let pending = match &image {
            Some(_) => None,
            None => Some(PendingOpen {
                read_only,
                options: *options,
                deadline: Instant::now() + options.wait_for_lock.unwrap_or_default(),
            }),
        };
        Ok(Qcow2Device {
            image: image.map(OnceLock::from).unwrap_or_default(),
            pending: Mutex::new(pending),
            path: path.to_owned(),
            size: AtomicU64::new(geometry.size),
            geometry,
        })
    }

    /// The image, opened now if it was locked by another process at
    /// [`open`](Self::open) (see [`Options::wait_for_lock`]): waits for
    /// the lock until the deadline; an error (logged) once it passed.
    pub fn image(&self) -> io::Result<&Image> {
        if let Some(image) = self.image.get() {
            return Ok(image);
        }
        // One request opens; the others wait for it here.
        let mut pending = self.pending.lock();
        if let Some(image) = self.image.get() {
            return Ok(image);
        }
        let Some(open) = pending.as_ref() else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let result = loop {
            match Image::open_until(&self.path, open.read_only, &open.options, open.deadline) {
                Err(e)
                    if e.kind() == io::ErrorKind::ResourceBusy
                        && Instant::now() < open.deadline =>
                {
                    continue
                }
                result => break result,
            }
        };
        *pending = None;
        match result {
            Ok(image) => {
                let size = self.size.load(Ordering::Acquire);
                if image.size() != size {
                    log::error!(
                        "{}: {} bytes now, {size} when the device was opened",
                        self.path.display(),
                        image.size(),
                    );
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                log::info!("{}: opened, its lock free", self.path.display());
                Ok(self.image.get_or_init(|| image))
            }
            Err(e) => {
                log::error!("{e}: its requests fail");
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }
}

/// The guest size in an image's header, read without taking its lock
/// (which another process holds): the size a device opened before the
/// image ([`Options::wait_for_lock`]) announces.
fn unlocked_size(path: &Path) -> io::Result<u64> {
    let in_path =
        |e: io::Error| io::Error::new(e.kind(), format!("{}: {}", path.display(), path_error(&e)));
    let file = File::open(path).map_err(in_path)?;
    let file_len = file.metadata().map_err(in_path)?.len();
    let mut first = vec![0u8; (2 << 20).min(file_len) as usize];
    read_exact_at(&file, &mut first, 0).map_err(in_path)?;
    let header = header::Header::parse(&first, file_len).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(header.size)
}

impl BlockDevice for Qcow2Device {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::Acquire),
            ..self.geometry
        }
    }

    /// Grows the image (see [`Image::grow`]); shrinking is refused.
    fn resize(&self, size: u64) -> io::Result<()> {
        self.image()?.grow(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read(&self, _req: &Request, offset: u64, _len: u32, reply: ReplyData) {
        reply.fill(|buf| self.image()?.read(offset, buf));
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        let result = self.image().and_then(|image| {
            image.write(offset, data)?;
            if fua {
                image.flush()?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        reply.outcome(self.image().and_then(Image::flush));
    }

    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        reply.outcome(self.image().and_then(|image| image.discard(offset, len)));
    }

    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        reply.outcome(
            self.image()
                .and_then(|image| image.write_zeroes(offset, len, may_unmap)),
        );
    }

    fn destroy(&self) {
        // An image never opened (its lock never came free) has nothing to
        // flush. A daemon handing the device over ends here: the image is
        // left as a close leaves it, for its successor.
        if let Some(image) = self.image.get() {
            if let Err(e) = image.close() {
                log::error!("{}: flushing: {e}", image.path().display());
            }
        }
    }
}
