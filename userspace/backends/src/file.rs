//! A device backed by an image file or by a real block device: the
//! "serve this disk image" case, and a pass-through for testing the
//! transports against real storage.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::bufs::zeros;

/// The block-device ioctls of `<linux/fs.h>`. Several are declared with
/// `_IO` although they pass a pointer (hence the `_bad` variants).
mod ioctl {
    // BLKGETSIZE64: _IOR(0x12, 114, size_t), the size in bytes as a u64.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET: _IO(0x12, 104), the logical sector size as an int.
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    // BLKPBSZGET: _IO(0x12, 123), the physical sector size as an unsigned int.
    nix::ioctl_read_bad!(blkpbszget, nix::request_code_none!(0x12, 123), libc::c_uint);
    // BLKDISCARD: _IO(0x12, 119), a [start, length] byte range.
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // BLKZEROOUT: _IO(0x12, 127), a [start, length] byte range.
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// What the path turned out to be; discard and zeroing differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Block,
}

/// One way of making a range of a regular file read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMethod {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: frees the storage.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: keeps the storage allocated, so later writes
    /// to the range cannot fail for lack of space.
    ZeroRange,
    /// Writing zero buffers: works everywhere, slowly.
    Write,
}

/// A block device whose blocks live in a regular file (a disk image) or in
/// a host block device, accessed with positional I/O so that worker threads
/// share one descriptor without locking.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    kind: Kind,
    /// Its size is the one it was opened with: `size` has the one now.
    geometry: Geometry,
    /// Bytes the device has now (see `resize`).
    size: AtomicU64,
    /// Cleared once `pwritev2(RWF_DSYNC)` turns out to be unavailable, so
    /// FUA writes stop trying it.
    dsync_writes: AtomicBool,
}

impl fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDevice")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// `path: message`, keeping the error's kind. The CLI prints these as they
/// are, so an OS error is spelled without Rust's "(os error N)" suffix.
fn path_error(path: &Path, e: &io::Error) -> io::Error {
    let message = match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    };
    io::Error::new(e.kind(), format!("{}: {message}", path.display()))
}

fn invalid(path: &Path, message: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {message}", path.display()),
    )
}

/// Accepts regular files and block devices, naming anything else.
fn classify(path: &Path, file_type: std::fs::FileType) -> io::Result<Kind> {
    if file_type.is_file() {
        return Ok(Kind::Regular);
    }
    if file_type.is_block_device() {
        return Ok(Kind::Block);
    }
    let what = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a named pipe"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    let kind = if file_type.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    Err(io::Error::new(
        kind,
        format!(
            "{}: is {what}, not an image file or a block device",
            path.display()
        ),
    ))
}

/// Whether an errno means "this kind of request is not supported here",
/// the cue to fall back to a more general method.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl FileDevice {
    /// Opens an image file or a block device as a device with blocks of
    /// `logical_block_size` bytes.
    ///
    /// Fails, with a message naming the path, when the path is missing,
    /// unreadable, not a regular file or block device, empty, or not a
    /// whole number of blocks; and for a block device whose own sector is
    /// larger than `logical_block_size` (a smaller block could not be
    /// written without a read-modify-write the kernel would not do).
    pub fn open(path: &Path, read_only: bool, logical_block_size: u32) -> io::Result<FileDevice> {
        // Classified before opening: opening a named pipe would block.
        let metadata = std::fs::metadata(path).map_err(|e| path_error(path, &e))?;
        classify(path, metadata.file_type())?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| path_error(path, &e))?;
        // And again after: the path may have been replaced in between.
        let metadata = file.metadata().map_err(|e| path_error(path, &e))?;
        let kind = classify(path, metadata.file_type())?;

        let (size, physical_block_size) = match kind {
            // Page-sized writes are what a file system caches and
            // allocates in, whatever block size the device claims.
            Kind::Regular => (metadata.len(), logical_block_size.max(4096)),
            Kind::Block => {
                let fd = file.as_raw_fd();
                let mut size = 0u64;
                // SAFETY: `fd` is open for the duration of the call and
                // BLKGETSIZE64 writes one u64 to the pointer, which points
                // to a live, writable u64.
                unsafe { ioctl::blkgetsize64(fd, &mut size) }
                    .map_err(|e| path_error(path, &e.into()))?;
                let mut sector: libc::c_int = 0;
                // SAFETY: as above; BLKSSZGET writes one int.
                unsafe { ioctl::blksszget(fd, &mut sector) }
                    .map_err(|e| path_error(path, &e.into()))?;
                let mut physical: libc::c_uint = 0;
                // SAFETY: as above; BLKPBSZGET writes one unsigned int.
                unsafe { ioctl::blkpbszget(fd, &mut physical) }
                    .map_err(|e| path_error(path, &e.into()))?;
                let sector = u32::try_from(sector).unwrap_or(0);
                if logical_block_size < sector {
                    return Err(invalid(
                        path,
                        format_args!(
                            "block size {logical_block_size} is smaller than the device's sector size {sector}"
                        ),
                    ));
                }
                (size, logical_block_size.max(physical))
            }
        };

        let geometry = Geometry {
            size,
            logical_block_size,
            physical_block_size,
            read_only,
            features: Features::ALL,
        };
        // Its messages ("size 1000 is not a multiple of the block size
        // 512", "size is zero", ...) read well after the path.
        geometry.validate().map_err(|e| invalid(path, e))?;
        Ok(FileDevice {
            file,
            path: path.to_owned(),
            kind,
            size: AtomicU64::new(geometry.size),
            geometry,
            dsync_writes: AtomicBool::new(true),
        })
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path is a block device (rather than an image file).
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::Block
    }

    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size.load(Ordering::Acquire))
    }

    /// Writes `data` at `offset` and makes it durable before returning.
    ///
    /// `pwritev2(RWF_DSYNC)` syncs only the range written (plus the device
    /// cache), where `fdatasync` would also write back every other dirty
    /// page of the file; kernels or file systems without it get the
    /// latter.
    fn write_durable(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.dsync_writes.load(Ordering::Relaxed) {
            match self.pwrite_dsync(offset, data) {
                Err(e) if unsupported(&e) => {
                    log::debug!(
                        "{}: pwritev2(RWF_DSYNC) unsupported: {e}",
                        self.path.display()
                    );
                    self.dsync_writes.store(false, Ordering::Relaxed);
                }
                result => return result,
            }
        }
        self.file.write_all_at(data, offset)?;
        self.file.sync_data()
    }

    fn pwrite_dsync(&self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let iov = IoSlice::new(data);
            // SAFETY: the descriptor is open while `self` lives; `IoSlice`
            // is ABI-compatible with `struct iovec` and describes `data`,
            // which is borrowed (so valid and unchanged) for the call; the
            // kernel only reads from it.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    (&raw const iov).cast::<libc::iovec>(),
                    1,
                    off_t(offset)?,
                    libc::RWF_DSYNC,
                )
            };
            match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => {
                    let n = n as usize;
                    data = &data[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Makes a range of a regular file read as zeros, trying `methods` in
    /// order and moving to the next only when the file system says the
    /// previous one is unsupported.
    fn zero_file_range(&self, offset: u64, len: u64, methods: &[ZeroMethod]) -> io::Result<()> {
        let mut last = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        for &method in methods {
            let result = match method {
                ZeroMethod::PunchHole => self.fallocate(
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ),
                ZeroMethod::ZeroRange => self.fallocate(
                    FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ),
                ZeroMethod::Write => self.write_zero_buffers(offset, len),
            };
            match result {
                Err(e) if unsupported(&e) => last = e,
                result => return result,
            }
        }
        Err(last)
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        Ok(fallocate(&self.file, mode, off_t(offset)?, off_t(len)?)?)
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = zeros();
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// BLKDISCARD or BLKZEROOUT on `[offset, offset + len)`.
    fn block_range_ioctl(&self, zero: bool, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        let fd = self.file.as_raw_fd();
        let result = if zero {
            // SAFETY: the descriptor is open while `self` lives; BLKZEROOUT
            // reads a [u64; 2] through the pointer, which points to one.
            unsafe { ioctl::blkzeroout(fd, &range) }
        } else {
            // SAFETY: as above, for BLKDISCARD.
            unsafe { ioctl::blkdiscard(fd, &range) }
        };
        result.map(drop).map_err(io::Error::from)
    }
}

impl BlockDevice for FileDevice {
    fn backing_file(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::Acquire),
            ..self.geometry
        }
    }

    /// An image file is truncated or extended (sparse: the new end reads
    /// as zeros); a block device's size is its own.
    fn resize(&self, size: u64) -> io::Result<()> {
        if self.kind == Kind::Block {
            return Err(invalid(
                &self.path,
                "is a block device: its size is its own (resize it, then attach it again)",
            ));
        }
        self.file
            .set_len(size)
            .map_err(|e| path_error(&self.path, &e))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        if !self.in_bounds(offset, u64::from(len)) {
            return reply.error(libc::EINVAL);
        }
        reply.fill(|buf| {
            self.file.read_exact_at(buf, offset).inspect_err(|e| {
                log::warn!("{}: read of {len} at {offset}: {e}", self.path.display())
            })
        });
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        // Past the end a regular file would silently grow.
        if !self.in_bounds(offset, data.len() as u64) {
            return reply.error(libc::ENOSPC);
        }
        let result = if fua {
            self.write_durable(offset, data)
        } else {
            self.file.write_all_at(data, offset)
        };
        if let Err(e) = &result {
            log::warn!(
                "{}: write of {} at {offset}: {e}",
                self.path.display(),
                data.len()
            );
        }
        reply.outcome(result);
    }

    /// `fdatasync`: on an image file it writes back the file's dirty pages,
    /// on a block device it also flushes the device's volatile cache.
    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        let result = self.file.sync_data();
        if let Err(e) = &result {
            log::warn!("{}: fdatasync: {e}", self.path.display());
        }
        reply.outcome(result);
    }

    /// Punches a hole (image file) or discards (block device). Where
    /// neither is supported the discard is answered as done: it is only a
    /// hint, and a device that keeps old data satisfies it.
    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        if !self.in_bounds(offset, len) {
            return reply.error(libc::EINVAL);
        }
        let result = match self.kind {
            Kind::Regular => self.zero_file_range(offset, len, &[ZeroMethod::PunchHole]),
            Kind::Block => self.block_range_ioctl(false, offset, len),
        };
        match result {
            Err(e) if unsupported(&e) => reply.ok(),
            result => reply.outcome(result),
        }
    }

    /// On an image file: a punched hole when the storage may go, a zeroed
    /// (still allocated) range when it must stay, each falling back to the
    /// other and finally to writing zeros, so the range always ends up
    /// reading as zeros. On a block device: BLKZEROOUT, which falls back to
    /// writing zeros inside the kernel.
    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        if !self.in_bounds(offset, len) {
            return reply.error(libc::EINVAL);
        }
        use ZeroMethod::*;
        let result = match (self.kind, may_unmap) {
            (Kind::Regular, true) => {
                self.zero_file_range(offset, len, &[PunchHole, ZeroRange, Write])
            }
            (Kind::Regular, false) => {
                self.zero_file_range(offset, len, &[ZeroRange, PunchHole, Write])
            }
            (Kind::Block, _) => self.block_range_ioctl(true, offset, len),
        };
        if let Err(e) = &result {
            log::warn!("{}: zeroing {len} at {offset}: {e}", self.path.display());
        }
        reply.outcome(result);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;
    use std::sync::Arc;

    use super::*;
    use crate::testutil::{pattern, Harness};

    const SIZE: u64 = 8 << 20;

    fn image(dir: &tempfile::TempDir, name: &str, size: u64) -> PathBuf {
        let path = dir.path().join(name);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    fn open_err(path: &Path, read_only: bool, block: u32) -> String {
        FileDevice::open(path, read_only, block)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn resizing_extends_or_truncates_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, "grow.img", 1 << 20);
        let dev = Arc::new(FileDevice::open(&path, false, 512).unwrap());
        let h = Harness::new(dev.clone());
        h.write(0, &[5; 4096], false).unwrap();
        h.resize(4 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        assert_eq!(dev.geometry().size, 4 << 20);
        h.write((4 << 20) - 4096, &[6; 4096], false).unwrap();
        assert_eq!(h.read(2 << 20, 4096).unwrap(), vec![0; 4096]);
        h.resize(1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert_eq!(h.read(0, 4096).unwrap(), vec![5; 4096]);
        assert_eq!(h.write(2 << 20, &[1; 512], false), Err(libc::ENOSPC));
    }

    #[test]
    fn geometry_of_an_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, "a.img", SIZE);
        let dev = FileDevice::open(&path, false, 512).unwrap();
        let g = dev.geometry();
        assert_eq!(g.size, SIZE);
        assert_eq!(g.logical_block_size, 512);
        assert_eq!(g.physical_block_size, 4096);
        assert!(!g.read_only);
        assert_eq!(
            g.features,
            Features {
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true
            }
        );
        assert!(!dev.is_block_device());
        assert_eq!(dev.path(), path);
        assert!(g.validate().is_ok());
    }

    #[test]
    fn round_trips_flush_and_fua() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, "a.img", SIZE);
        let h = Harness::new(Arc::new(FileDevice::open(&path, false, 512).unwrap()));
        let cases: &[(u64, usize, bool)] = &[
            (0, 512, false),
            (512, 4096, true),
            (65536 - 512, 1024, false),
            (1 << 20, 1 << 20, true),
            (SIZE - 512, 512, false),
        ];
        for (i, &(offset, len, fua)) in cases.iter().enumerate() {
            let data = pattern(i as u64, len);
            h.write(offset, &data, fua).unwrap();
            assert_eq!(h.read(offset, len as u32).unwrap(), data, "case {i}");
        }
        h.flush().unwrap();
        // The bytes are in the file itself, where the device put them.
        let file = File::open(&path).unwrap();
        for (i, &(offset, len, _)) in cases.iter().enumerate() {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset).unwrap();
            assert_eq!(buf, pattern(i as u64, len), "case {i} in the file");
        }
        // Unwritten parts read as zeros; the file did not grow.
        assert_eq!(h.read(8192, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    }

    #[test]
    fn fua_write_without_pwritev2_falls_back_to_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, "a.img", SIZE);
        let dev = FileDevice::open(&path, false, 4096).unwrap();
        dev.dsync_writes.store(false, Ordering::Relaxed);
        let dev = Arc::new(dev);
        let h = Harness::new(dev.clone());
        h.write(4096, &pattern(5, 8192), true).unwrap();
        assert_eq!(h.read(4096, 8192).unwrap(), pattern(5, 8192));
    }

    /// Whether the temporary directory's file system can punch holes; the
    /// hole tests check freed blocks only where it can.
    fn punch_supported(dir: &tempfile::TempDir) -> bool {
        let file = File::create(dir.path().join("probe")).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[1; 8192], 0).unwrap();
        fallocate(
            &file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            8192,
        )
        .is_ok()
    }

    fn filled(dir: &tempfile::TempDir) -> (PathBuf, Arc<FileDevice>, Harness, Vec<u8>) {
        let path = image(dir, "a.img", SIZE);
        let dev = Arc::new(FileDevice::open(&path, false, 4096).unwrap());
        let h = Harness::new(dev.clone());
        let data = pattern(11, 1 << 20);
        h.write(0, &data, false).unwrap();
        h.flush().unwrap();
        (path, dev, h, data)
    }

    fn expect_zeroed(h: &Harness, data: &[u8], start: usize, end: usize) {
        let mut expected = data.to_vec();
        expected[start..end].fill(0);
        assert_eq!(h.read(0, data.len() as u32).unwrap(), expected);
    }

    #[test]
    fn discard_punches_a_hole_that_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, h, data) = filled(&dir);
        let before = std::fs::metadata(&path).unwrap().blocks();
        h.discard(64 << 10, 256 << 10).unwrap();
        if punch_supported(&dir) {
            expect_zeroed(&h, &data, 64 << 10, 320 << 10);
            assert!(std::fs::metadata(&path).unwrap().blocks() < before);
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    }

    #[test]
    fn write_zeroes_reads_zeros_either_way() {
        for may_unmap in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (path, _, h, data) = filled(&dir);
            h.write_zeroes(4096, 512 << 10, may_unmap).unwrap();
            expect_zeroed(&h, &data, 4096, 4096 + (512 << 10));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
        }
    }

    #[test]
    fn every_zeroing_method_zeros() {
        use ZeroMethod::*;
        let dir = tempfile::tempdir().unwrap();
        let (_, dev, h, data) = filled(&dir);
        // Writing zeros always works; the fallocate modes either work or
        // say they are unsupported (and then zero nothing).
        for (i, method) in [Write, ZeroRange, PunchHole].into_iter().enumerate() {
            let offset = (i as u64 + 1) << 16;
            match dev.zero_file_range(offset, 1 << 16, &[method]) {
                Ok(()) => assert_eq!(
                    h.read(offset, 1 << 16).unwrap(),
                    vec![0; 1 << 16],
                    "{method:?}"
                ),
                Err(e) => assert!(method != Write && unsupported(&e), "{method:?}: {e}"),
            }
        }
        // Writing zeros over 3 MiB crosses the shared buffer's length.
        dev.zero_file_range(1 << 20, 3 << 20, &[Write]).unwrap();
        assert_eq!(h.read(1 << 20, 3 << 20).unwrap(), vec![0; 3 << 20]);
        assert_eq!(h.read(0, 1 << 16).unwrap(), data[..1 << 16]);
    }

    #[test]
    fn read_only_open_refuses_writes_via_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, "a.img", SIZE);
        std::fs::write(&path, pattern(2, 4096)).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let dev = FileDevice::open(&path, true, 4096).unwrap();
        assert!(dev.geometry().read_only);
        let h = Harness::new(Arc::new(dev));
        assert_eq!(h.write(0, &[0; 4096], false), Err(libc::EROFS));
        assert_eq!(h.discard(0, 4096), Err(libc::EROFS));
        assert_eq!(h.write_zeroes(0, 4096, false), Err(libc::EROFS));
        assert_eq!(h.read(0, 4096).unwrap(), pattern(2, 4096));
        h.flush().unwrap();
    }

    #[test]
    fn refuses_bad_paths_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();

        let missing = dir.path().join("missing.img");
        let e = FileDevice::open(&missing, false, 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            format!("{d}/missing.img: No such file or directory")
        );

        let e = FileDevice::open(dir.path(), false, 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::IsADirectory);
        assert_eq!(
            e.to_string(),
            format!("{d}: is a directory, not an image file or a block device")
        );
        assert_eq!(
            open_err(dir.path(), true, 512),
            format!("{d}: is a directory, not an image file or a block device")
        );

        assert_eq!(
            open_err(Path::new("/dev/null"), false, 512),
            "/dev/null: is a character device, not an image file or a block device"
        );

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            open_err(&fifo, true, 512),
            format!("{d}/fifo: is a named pipe, not an image file or a block device")
        );
    }

    #[test]
    fn refuses_bad_sizes_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let odd = image(&dir, "odd.img", 1000);
        assert_eq!(
            open_err(&odd, false, 512),
            format!("{d}/odd.img: size 1000 is not a multiple of the block size 512")
        );
        let half = image(&dir, "half.img", 6144);
        assert_eq!(
            open_err(&half, true, 4096),
            format!("{d}/half.img: size 6144 is not a multiple of the block size 4096")
        );
        assert!(FileDevice::open(&half, true, 512).is_ok());
        let empty = image(&dir, "empty.img", 0);
        assert_eq!(
            open_err(&empty, false, 512),
            format!("{d}/empty.img: size is zero")
        );
        let fine = image(&dir, "fine.img", SIZE);
        assert_eq!(
            open_err(&fine, false, 1000),
            format!("{d}/fine.img: block size 1000 is not a power of two between 512 and 4096")
        );
    }

    /// A loop device over a temporary image, detached when dropped.
    struct Loop {
        device: PathBuf,
    }

    impl Loop {
        /// None where loop devices cannot be set up (not root, no loop
        /// driver, no losetup): the block-device path is then untested.
        fn attach(image: &Path, sector: u32) -> Option<Loop> {
            let output = Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(image)
                .output()
                .ok()?;
            if !output.status.success() {
                eprintln!(
                    "skipping: losetup failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                return None;
            }
            let device = String::from_utf8(output.stdout).ok()?.trim().to_owned();
            Some(Loop {
                device: device.into(),
            })
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
    }

    #[test]
    fn block_device_round_trip_discard_and_zeroout() {
        let dir = tempfile::tempdir().unwrap();
        let backing = image(&dir, "loop.img", SIZE);
        let Some(lo) = Loop::attach(&backing, 512) else {
            return;
        };
        let dev = Arc::new(FileDevice::open(&lo.device, false, 512).unwrap());
        assert!(dev.is_block_device());
        let g = dev.geometry();
        assert_eq!(g.size, SIZE);
        assert_eq!(g.logical_block_size, 512);
        let h = Harness::new(dev);
        let data = pattern(4, 1 << 20);
        h.write(0, &data, false).unwrap();
        h.write(1 << 20, &data, true).unwrap();
        h.flush().unwrap();
        assert_eq!(h.read(0, 1 << 20).unwrap(), data);
        assert_eq!(h.read(1 << 20, 1 << 20).unwrap(), data);
        for may_unmap in [false, true] {
            h.write_zeroes(4096, 8192, may_unmap).unwrap();
            expect_zeroed(&h, &data, 4096, 4096 + 8192);
        }
        // A loop device discards by punching its backing file.
        h.discard(1 << 20, 1 << 19).unwrap();
        if punch_supported(&dir) {
            assert_eq!(h.read(1 << 20, 1 << 19).unwrap(), vec![0; 1 << 19]);
        }
        // Opened with a smaller block than its own sectors: refused.
        drop(h);
        let lo4k = Loop::attach(&image(&dir, "loop4k.img", SIZE), 4096).unwrap();
        assert_eq!(
            open_err(&lo4k.device, true, 512),
            format!(
                "{}: block size 512 is smaller than the device's sector size 4096",
                lo4k.device.display()
            )
        );
        let dev = FileDevice::open(&lo4k.device, true, 4096).unwrap();
        assert_eq!(dev.geometry().physical_block_size, 4096);
        assert!(dev.geometry().read_only);
    }
}
