//! Whether a block device is in use, whatever serves it (a loop device on
//! the stock path, `/dev/fuseblkN` with the module): what decides when a
//! device may be detached.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// Whether something holds `device` exclusively: a mounted file system,
/// swap, a device-mapper or md table, a mounted partition of it, or a
/// program that opened it with `O_EXCL`. The kernel tells by refusing an
/// `O_EXCL` open of it with `EBUSY`, which also covers mounts in other
/// mount namespaces (that `/proc/self/mountinfo` does not list) and holders
/// that are not stacked devices (that `/sys/block/*/holders` does not
/// list). Plain opens, such as a daemon's or `dd`'s, do not count. The
/// probe holds the device for the length of one open: a mount racing it
/// may fail with `EBUSY` then, as it would against any exclusive opener.
///
/// Some claims last only a moment and are not use: a program binding a
/// loop device claims its candidate while it checks that the candidate is
/// free, even one that is bound already (LOOP_CONFIGURE without `O_EXCL`).
/// So a device counts as held only if it stays held for a few tries.
pub fn in_use(device: &Path) -> bool {
    const TRIES: u32 = 5;
    const APART: Duration = Duration::from_millis(20);
    for attempt in 1..=TRIES {
        if !held_now(device) {
            return false;
        }
        if attempt < TRIES {
            std::thread::sleep(APART);
        }
    }
    true
}

fn held_now(device: &Path) -> bool {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::{Mutex, MutexGuard};

    use fuse_blk_loop::{LoopDevice, LoopOptions};

    /// Held by every test's scratch device for its whole life. Binding a
    /// loop device briefly claims the candidate device exclusively
    /// (LOOP_CONFIGURE's `bd_prepare_to_claim`), even one that another test
    /// has already bound and that the attempt then gives up with `EBUSY`;
    /// a probe of that other test's device at that moment rightly says
    /// "in use". Seen in CI: two tests asked LOOP_CTL_GET_FREE at once.
    static ONE_SCRATCH_DEVICE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// A loop device over a sparse file of its own, unbound when dropped.
    struct ScratchDevice {
        device: Option<LoopDevice>,
        image: PathBuf,
        _alone: MutexGuard<'static, ()>,
    }

    impl ScratchDevice {
        fn new(test: &str) -> ScratchDevice {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            assert!(root, "this test binds a loop device and must run as root");
            // A test that failed while holding the lock poisons it; the
            // devices are still apart.
            let alone = ONE_SCRATCH_DEVICE_AT_A_TIME
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let image = std::env::temp_dir()
                .join(format!("fuse-blk-busy-{test}-{}.img", std::process::id()));
            let file = File::create(&image).expect("image");
            file.set_len(64 << 20).expect("image size");
            let device = LoopDevice::attach(
                file.as_fd(),
                &format!("busy-{test}"),
                LoopOptions {
                    block_size: 4096,
                    read_only: false,
                    direct_io: false,
                },
            )
            .expect("binding a loop device");
            ScratchDevice {
                device: Some(device),
                image,
                _alone: alone,
            }
        }

        fn path(&self) -> &Path {
            self.device.as_ref().expect("bound").path()
        }
    }

    impl Drop for ScratchDevice {
        fn drop(&mut self) {
            if let Some(device) = self.device.take() {
                let _ = device.detach();
            }
            let _ = std::fs::remove_file(&self.image);
        }
    }

    fn exclusive_open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
    }

    #[test]
    fn a_device_is_in_use_while_held_exclusively_and_not_while_merely_open() {
        let scratch = ScratchDevice::new("held");
        let path = scratch.path();
        assert!(!in_use(path), "a fresh device");
        let plain = File::open(path).expect("plain open");
        assert!(!in_use(path), "open without O_EXCL");
        let held = exclusive_open(path).expect("exclusive open");
        assert!(in_use(path), "held with O_EXCL");
        drop(held);
        assert!(!in_use(path), "released");
        drop(plain);
        // The probe itself leaves the device free for the next one.
        exclusive_open(path).expect("exclusive open after the probes");
    }

    #[test]
    fn a_mounted_device_is_in_use() {
        let scratch = ScratchDevice::new("mounted");
        let path = scratch.path();
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(path)
            .status()
            .expect("running mkfs.ext4");
        assert!(mkfs.success(), "mkfs.ext4 {}", path.display());
        let mnt = std::env::temp_dir().join(format!("fuse-blk-busy-mnt-{}", std::process::id()));
        std::fs::create_dir_all(&mnt).expect("mount point");
        nix::mount::mount(
            Some(path),
            &mnt,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting ext4");
        let mounted = in_use(path);
        nix::mount::umount(&mnt).expect("unmounting");
        let _ = std::fs::remove_dir(&mnt);
        assert!(mounted, "mounted");
        assert!(!in_use(path), "unmounted");
    }

    #[test]
    fn what_is_not_there_is_not_in_use() {
        assert!(!in_use(Path::new("/dev/nonexistent-fuse-blk-device")));
    }
}
