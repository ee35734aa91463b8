//! Mounting the one-file filesystem without fusermount: as root, mount(2)
//! takes an open /dev/fuse descriptor directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

const FUSE_DEVICE: &str = "/dev/fuse";

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`, although the kernel
/// reads the u32 (the descriptor to clone) rather than writing it.
const FUSE_DEV_IOC_CLONE: libc::c_ulong =
    nix::request_code_read!(229, 0, std::mem::size_of::<u32>());
nix::ioctl_write_ptr_bad!(
    /// FUSE_DEV_IOC_CLONE on a fresh `/dev/fuse` descriptor: makes it a
    /// second channel of the connection whose descriptor it is given.
    fuse_dev_ioc_clone,
    FUSE_DEV_IOC_CLONE,
    u32
);

/// A FUSE mount of ours. Dropping it unmounts (lazily, as a last resort).
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    mounted: bool,
}

fn open_fuse_device() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(FUSE_DEVICE)
        .map_err(|e| io::Error::new(e.kind(), format!("{FUSE_DEVICE}: {e}")))
}

impl FuseMount {
    /// Mounts a new FUSE connection at `mountpoint` and returns the mount
    /// with the connection's channel fd.
    pub fn mount(mountpoint: &Path, source: &str) -> io::Result<(FuseMount, OwnedFd)> {
        let device = open_fuse_device()?;
        let options = format!(
            "fd={},rootmode={:o},user_id=0,group_id=0",
            device.as_raw_fd(),
            libc::S_IFDIR
        );
        mount(
            Some(source),
            mountpoint,
            Some("fuse.fuse-blk"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME,
            Some(options.as_str()),
        )
        .map_err(|e| io::Error::other(format!("mounting FUSE at {}: {e}", mountpoint.display())))?;
        Ok((
            FuseMount {
                mountpoint: mountpoint.to_owned(),
                mounted: true,
            },
            device.into(),
        ))
    }

    /// A mount made by a predecessor daemon, now ours to unmount.
    pub fn adopt(mountpoint: &Path) -> FuseMount {
        FuseMount {
            mountpoint: mountpoint.to_owned(),
            mounted: true,
        }
    }

    /// Leaves the filesystem mounted: another process serves it now.
    pub fn forget(mut self) {
        self.mounted = false;
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts; the connection ends and the session's reads fail ENODEV.
    pub fn unmount(mut self) -> io::Result<()> {
        self.mounted = false;
        unmount(&self.mountpoint)
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.mountpoint, MntFlags::MNT_DETACH) {
                log::warn!("lazy unmount of {}: {e}", self.mountpoint.display());
            }
        }
    }
}

/// Unmounts `mountpoint`, falling back to a lazy unmount if it stays busy.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    for _ in 0..50 {
        match umount2(mountpoint, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(io::Error::other(format!(
                    "unmounting {}: {e}",
                    mountpoint.display()
                )))
            }
        }
    }
    umount2(mountpoint, MntFlags::MNT_DETACH)
        .map_err(|e| io::Error::other(format!("unmounting {}: {e}", mountpoint.display())))
}

/// A second channel to the same connection, so that each worker thread
/// reads on a descriptor of its own.
pub fn clone_channel(session_fd: &OwnedFd) -> io::Result<OwnedFd> {
    let clone = open_fuse_device()?;
    let source = session_fd.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the fd to clone) from the
    // pointer, which points at a live local.
    unsafe { fuse_dev_ioc_clone(clone.as_raw_fd(), &source) }.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("FUSE_DEV_IOC_CLONE: {}", e.desc()),
        )
    })?;
    Ok(clone.into())
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(own), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        // A dead FUSE mount answers ENOTCONN to stat: still mounted.
        return std::fs::symlink_metadata(path)
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::ENOTCONN);
    };
    own.dev() != parent.dev()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(FUSE_DEV_IOC_CLONE, 0x8004_e500);
    }
}
