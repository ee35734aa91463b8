//! FUSE passthrough (Linux 6.9+, `fs/fuse/passthrough.c`) for devices that
//! have a backing file ([`BlockDevice::backing_file`], the `file:`
//! backend): the reply to the device file's OPEN names that file, and the
//! kernel then reads and writes it itself. The loop driver's reads and
//! writes never reach the daemon; flush, discard and write-zeroes still do.
//!
//! The file is registered with the connection once
//! (`FUSE_DEV_IOC_BACKING_OPEN`, which needs CAP_SYS_ADMIN and a FUSE_INIT
//! that granted passthrough, so it happens at the first OPEN). Every later
//! open of the file must name the same registration, as the kernel refuses
//! to mix passthrough and ordinary opens of one inode; a successor daemon
//! therefore inherits the id (see [`Handover`](crate::Handover)) rather
//! than registering its own file. The kernel holds its own reference to the
//! file: passthrough I/O goes on while the daemon is stopped, and the file
//! stays open until the FUSE connection ends.
//!
//! [`BlockDevice::backing_file`]: fuse_blk::BlockDevice::backing_file

use std::os::fd::{AsRawFd, OwnedFd};

use parking_lot::Mutex;

/// `struct fuse_backing_map`.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

// FUSE_DEV_IOC_BACKING_OPEN: _IOW(229, 1, struct fuse_backing_map); returns
// the backing id.
nix::ioctl_write_ptr!(
    /// FUSE_DEV_IOC_BACKING_OPEN: registers a backing file with the
    /// connection; returns its backing id.
    backing_open,
    229,
    1,
    BackingMap
);

/// Whether the device file's opens pass through, and to what.
pub enum Backing {
    /// Every request goes to the daemon.
    Off,
    /// Pass through from the first open on, if the kernel allows it: the
    /// connection's descriptor and the file to register.
    Wanted {
        /// The FUSE connection's descriptor, the ioctl's target.
        fuse: OwnedFd,
        /// The backing file, open as the device needs it.
        file: OwnedFd,
    },
    /// Registered with the connection under this id.
    Registered(i32),
}

/// The passthrough state of one device file.
pub struct Passthrough {
    state: Mutex<Backing>,
}

impl Passthrough {
    /// Starts in `backing`'s state.
    pub fn new(backing: Backing) -> Passthrough {
        Passthrough {
            state: Mutex::new(backing),
        }
    }

    /// Replaces the state, for the opens from now on.
    pub fn set(&self, backing: Backing) {
        *self.state.lock() = backing;
    }

    /// The backing id an open of the device file names, registering the
    /// file first if this is the first open; `None`: no passthrough.
    pub fn backing_id(&self) -> Option<i32> {
        let mut state = self.state.lock();
        if let Backing::Wanted { fuse, file } = &*state {
            let map = BackingMap {
                fd: file.as_raw_fd(),
                flags: 0,
                padding: 0,
            };
            // SAFETY: `fuse` is an open FUSE device descriptor and `map` a
            // live struct fuse_backing_map, which the ioctl only reads.
            let registered = unsafe { backing_open(fuse.as_raw_fd(), &map) };
            *state = match registered {
                Ok(id) if id > 0 => {
                    log::info!(
                        "FUSE passthrough: the kernel reads and writes the backing file itself"
                    );
                    Backing::Registered(id)
                }
                Ok(id) => {
                    log::warn!("FUSE passthrough: the kernel answered backing id {id}; not used");
                    Backing::Off
                }
                Err(e) => {
                    // EPERM: FUSE_INIT did not grant it (or no CAP_SYS_ADMIN);
                    // ELOOP: the file sits on a stacking file system.
                    log::info!("FUSE passthrough unavailable ({e}); reads and writes go through the daemon");
                    Backing::Off
                }
            };
        }
        match *state {
            Backing::Registered(id) => Some(id),
            _ => None,
        }
    }
}
