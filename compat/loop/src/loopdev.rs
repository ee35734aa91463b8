//! Loop devices (`drivers/block/loop.c`) configured through their ioctls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CONTROL: &str = "/dev/loop-control";

/// The loop ioctls of `<linux/loop.h>`. The header gives plain numbers,
/// which are `_IO(0x4C, nr)` (no direction, no size) although
/// LOOP_CONFIGURE passes a pointer: hence the `_bad` macros, which take
/// the number as it is.
mod ioctl {
    use super::LoopConfig;

    pub const LOOP_CLR_FD: libc::c_ulong = nix::request_code_none!(0x4C, 0x01);
    pub const LOOP_SET_CAPACITY: libc::c_ulong = nix::request_code_none!(0x4C, 0x07);
    pub const LOOP_CONFIGURE: libc::c_ulong = nix::request_code_none!(0x4C, 0x0A);
    pub const LOOP_CTL_GET_FREE: libc::c_ulong = nix::request_code_none!(0x4C, 0x82);

    // No argument.
    nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);
    // No argument: the device takes its backing file's size again.
    nix::ioctl_none_bad!(loop_set_capacity, LOOP_SET_CAPACITY);
    // A `struct loop_config`.
    nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
    // On /dev/loop-control, no argument; returns the index of a free device.
    nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
}

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How to set up a loop device over a backing file.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// The loop device's logical block size in bytes.
    pub block_size: u32,
    /// The loop device refuses writes.
    pub read_only: bool,
    /// Bypass the page cache on the backing file, so that data is cached
    /// once (above the loop device), not twice.
    pub direct_io: bool,
}

/// A bound loop device. Dropping it leaves the binding in place; call
/// [`LoopDevice::detach`] to undo it.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    file: File,
}

fn ioctl_error(what: &str, e: nix::errno::Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {}", e.desc()))
}

impl LoopDevice {
    /// Binds a free loop device to `backing`.
    pub fn attach(
        backing: BorrowedFd<'_>,
        name: &str,
        options: LoopOptions,
    ) -> io::Result<LoopDevice> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(|e| io::Error::new(e.kind(), format!("{LOOP_CONTROL}: {e}")))?;
        // Another process may take the free device between GET_FREE and
        // CONFIGURE (EBUSY): ask again.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an
            // index; the fd is a valid open loop-control file.
            let index = unsafe { ioctl::loop_ctl_get_free(control.as_raw_fd()) }
                .map_err(|e| ioctl_error("LOOP_CTL_GET_FREE", e))?;
            let path = PathBuf::from(format!("/dev/loop{index}"));
            let file = OpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let mut config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: options.block_size,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: 0,
                    lo_file_name: [0; LO_NAME_SIZE],
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; LO_KEY_SIZE],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            if options.read_only {
                config.info.lo_flags |= LO_FLAGS_READ_ONLY;
            }
            if options.direct_io {
                config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
            }
            // Shown by losetup(8) as the backing file.
            let label = format!("fuse-blk:{name}");
            let n = label.len().min(LO_NAME_SIZE - 1);
            config.info.lo_file_name[..n].copy_from_slice(&label.as_bytes()[..n]);
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
            // `LoopConfig` mirrors field for field; it lives across the call.
            match unsafe { ioctl::loop_configure(file.as_raw_fd(), &config) } {
                Ok(_) => return Ok(LoopDevice { path, file }),
                Err(nix::errno::Errno::EBUSY) => {}
                Err(e) => {
                    return Err(ioctl_error(
                        &format!("LOOP_CONFIGURE on {}", path.display()),
                        e,
                    ))
                }
            }
        }
        Err(io::Error::other("no free loop device could be bound"))
    }

    /// A loop device bound earlier (by a predecessor daemon).
    pub fn open(path: &Path) -> io::Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(LoopDevice {
            path: path.to_owned(),
            file,
        })
    }

    /// The block device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's name in /sys/block ("loop3").
    pub fn name(&self) -> &str {
        self.path.file_name().and_then(|n| n.to_str()).unwrap_or("")
    }

    /// Whether the kernel really bypasses the backing file's page cache.
    pub fn direct_io_active(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/{}/loop/dio", self.name()))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Has the device take its backing file's size again (its capacity,
    /// with a change uevent).
    pub fn set_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is an open
        // loop device.
        unsafe { ioctl::loop_set_capacity(self.file.as_raw_fd()) }
            .map_err(|e| ioctl_error(&format!("{}: LOOP_SET_CAPACITY", self.path.display()), e))?;
        Ok(())
    }

    /// Writes back what the device caches and flushes the backing file.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Unbinds the device. If others still have it open, the kernel defers
    /// the unbinding to their last close.
    pub fn detach(self) -> io::Result<()> {
        clear(&self.file, &self.path)
    }
}

fn clear(file: &File, path: &Path) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is an open loop device.
    match unsafe { ioctl::loop_clr_fd(file.as_raw_fd()) } {
        Ok(_) => Ok(()),
        // ENXIO: not bound (any more).
        Err(nix::errno::Errno::ENXIO) => Ok(()),
        Err(e) => Err(ioctl_error(&format!("{}: LOOP_CLR_FD", path.display()), e)),
    }
}

/// Unbinds a loop device by path, for cleaning up after a daemon that died.
pub fn detach_path(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    clear(&file, path)
}

/// The backing file of a loop device as the kernel reports it, if bound.
pub fn backing_file(loop_name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{loop_name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(ioctl::LOOP_CLR_FD, 0x4C01);
        assert_eq!(ioctl::LOOP_CONFIGURE, 0x4C0A);
        assert_eq!(ioctl::LOOP_SET_CAPACITY, 0x4C07);
        assert_eq!(ioctl::LOOP_CTL_GET_FREE, 0x4C82);
    }

    #[test]
    fn structures_match_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
