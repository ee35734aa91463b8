//! The kernel-module transport of fuse-blk.
//!
//! With the `fuse_blk` module loaded, `/dev/fuse-blk` creates blk-mq devices
//! (`/dev/fuseblkN`). Every hardware queue gets a channel of its own (an fd
//! of `/dev/fuse-blk` attached to that queue), served by one worker thread
//! of the session engine: the same engine, handler and FUSE messages as the
//! stock path, without the loop device and FUSE file in between.

#![deny(missing_docs)]

pub mod ring;
pub mod uapi;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_blk::{BlockDevice, Channel, FdChannel, Geometry, IoMode, Session, SessionConfig};
use nix::errno::Errno;

/// The module's control device.
pub const CONTROL_PATH: &str = "/dev/fuse-blk";

/// Whether the module serves `/dev/fuse-blk`. The node may exist while the
/// module is not loaded (a static node, made at boot for the module's
/// "devname:" alias): opening it then loads the module, or fails with
/// ENODEV where this kernel has none.
pub fn available() -> bool {
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(CONTROL_PATH);
    match opened {
        Ok(_) => true,
        // A user not allowed to open it is told so by the attach itself.
        Err(e) => !matches!(
            e.raw_os_error(),
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO)
        ),
    }
}

/// Whether this process runs as root (an unprivileged device's creator
/// does not).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn errno_context(what: &str, e: nix::errno::Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {}", e.desc()))
}

/// An open `/dev/fuse-blk`: the control interface.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens `/dev/fuse-blk` (whose first open loads the module); the error
    /// names the path.
    pub fn open() -> io::Result<Control> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)
            .map_err(|e| io::Error::new(e.kind(), format!("{CONTROL_PATH}: {e}")))?;
        Ok(Control { file })
    }

    /// The loaded module's ABI version and the feature flags it knows
    /// (FUSE_BLK_IOC_GET_FEATURES).
    pub fn features(&self) -> io::Result<uapi::Features> {
        let mut features = uapi::Features::default();
        // SAFETY: the ioctl writes one `struct fuse_blk_features`, which
        // `uapi::Features` mirrors, into a live local.
        unsafe { uapi::get_features(self.file.as_raw_fd(), &mut features) }
            .map_err(|e| errno_context("FUSE_BLK_IOC_GET_FEATURES", e))?;
        Ok(features)
    }

    /// Creates a device; returns the params as the driver granted them
    /// (with `dev_id` filled in).
    pub fn create(&self, params: &uapi::Params) -> io::Result<uapi::Params> {
        self.try_create(params).map_err(|e| match e {
            // What a user without CAP_SYS_ADMIN meets.
            Errno::EPERM => io::Error::new(
                io::ErrorKind::PermissionDenied,
                "permission denied: creating a device needs CAP_SYS_ADMIN, or the fuse_blk module with unprivileged devices on (/sys/module/fuse_blk/parameters/unprivileged)",
            ),
            Errno::EDQUOT => io::Error::new(
                io::ErrorKind::QuotaExceeded,
                format!(
                    "this user has as many devices as the module allows ({}, /sys/module/fuse_blk/parameters/max_devices_per_user)",
                    std::fs::read_to_string("/sys/module/fuse_blk/parameters/max_devices_per_user")
                        .map(|n| n.trim().to_owned())
                        .unwrap_or_else(|_| "?".into())
                ),
            ),
            e => errno_context("FUSE_BLK_IOC_CREATE", e),
        })
    }

    /// [`Control::create`] with the bare errno, for callers that act on it.
    pub fn try_create(&self, params: &uapi::Params) -> nix::Result<uapi::Params> {
        let mut params = *params;
        // SAFETY: the ioctl reads and writes one `struct fuse_blk_params`,
        // which `uapi::Params` mirrors, in a live local.
        unsafe { uapi::create(self.file.as_raw_fd(), &mut params) }?;
        Ok(params)
    }

    /// Destroys device `dev_id` (FUSE_BLK_IOC_DESTROY): its channels read
    /// FUSE_DESTROY and `/dev/fuseblkN` goes away.
    pub fn destroy(&self, dev_id: u32) -> io::Result<()> {
        // SAFETY: the ioctl reads one u32 from a live local.
        unsafe { uapi::destroy(self.file.as_raw_fd(), &dev_id) }
            .map_err(|e| errno_context(&format!("destroying fuseblk{dev_id}"), e))?;
        Ok(())
    }

    /// Sets the size of device `dev_id` (FUSE_BLK_IOC_RESIZE); its daemon
    /// must serve that size already when growing.
    pub fn resize(&self, dev_id: u32, size: u64) -> io::Result<()> {
        if self.features()?.features & uapi::F_RESIZE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the loaded fuse_blk module cannot resize devices (it predates ABI 7); load this version's",
            ));
        }
        let arg = uapi::Resize {
            dev_id,
            size,
            ..uapi::Resize::default()
        };
        // SAFETY: the ioctl reads one `struct fuse_blk_resize`, which
        // `uapi::Resize` mirrors, from a live local.
        unsafe { uapi::resize(self.file.as_raw_fd(), &arg) }
            .map_err(|e| errno_context(&format!("resizing fuseblk{dev_id}"), e))?;
        Ok(())
    }

    /// The state, channels and parameters of device `dev_id`
    /// (FUSE_BLK_IOC_GET_INFO); ENODEV if there is none.
    pub fn info(&self, dev_id: u32) -> io::Result<uapi::Info> {
        let mut info = uapi::Info {
            dev_id,
            ..uapi::Info::default()
        };
        // SAFETY: the ioctl reads and writes one `struct fuse_blk_info`,
        // which `uapi::Info` mirrors, in a live local.
        unsafe { uapi::get_info(self.file.as_raw_fd(), &mut info) }
            .map_err(|e| errno_context(&format!("fuseblk{dev_id}"), e))?;
        Ok(info)
    }
}

/// Opens a channel to queue `queue` of device `dev_id`. With `takeover`,
/// the queue may already have a channel: once this one has answered
/// FUSE_INIT it takes every new request and the older one is retired.
pub fn attach_channel(dev_id: u32, queue: u16, takeover: bool) -> io::Result<FdChannel> {
    attach_fd(dev_id, queue, takeover).map(FdChannel::new)
}

/// The descriptor of a channel to queue `queue` of device `dev_id`, as
/// the driver made it: blocking, for a caller that reads and writes it
/// itself ([`FdChannel::new`] makes it non-blocking to serve it).
pub fn attach_fd(dev_id: u32, queue: u16, takeover: bool) -> io::Result<OwnedFd> {
    let control = Control::open()?;
    let arg = uapi::Attach {
        dev_id,
        queue,
        flags: if takeover { uapi::ATTACH_TAKEOVER } else { 0 },
        ..uapi::Attach::default()
    };
    // SAFETY: the ioctl reads one `struct fuse_blk_attach`, which
    // `uapi::Attach` mirrors, from a live local.
    unsafe { uapi::attach(control.file.as_raw_fd(), &arg) }
        .map_err(|e| errno_context(&format!("attaching to queue {queue} of fuseblk{dev_id}"), e))?;
    Ok(OwnedFd::from(control.file))
}

/// How to create a device beyond what its geometry says.
#[derive(Debug, Clone)]
pub struct KmodOptions {
    /// Name shown in sysfs; cut to 31 bytes.
    pub name: String,
    /// Hardware queues, each served by one channel and thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
    /// Per-request timeout.
    pub io_timeout_ms: u32,
    /// With `Some`, requests wait this long for a new daemon when the
    /// serving one is gone (0: they fail at once); with `None`, one I/O
    /// timeout.
    pub recovery_timeout_ms: Option<u32>,
    /// Requests the dead daemon had taken fail instead of being reissued.
    pub fail_inflight: bool,
    /// How each queue's channel moves requests.
    pub io: IoMode,
    /// Let the driver read and write the handler's backing file itself
    /// ([`BlockDevice::backing_file`]) where the module offers it; the
    /// daemon then sees only flushes, discards and write-zeroes.
    pub passthrough: bool,
    /// io_uring channels: poll for the next request while requests come
    /// at most this far apart (see [`SessionConfig::ring_poll`]).
    pub ring_poll: Duration,
    /// Open the device once before [`KmodDevice::create`] returns, so that
    /// the kernel has read its partition table (and made its partitions'
    /// nodes) by then. A handler that cannot answer until something outside
    /// it is ready (a dm-user node waiting for its daemon) says no: the
    /// kernel then reads the table at the device's first open, whoever
    /// makes it (udev, usually), and `create` does not wait for that.
    pub scan_partitions: bool,
}

impl Default for KmodOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        KmodOptions {
            name: String::new(),
            queues: cpus.clamp(1, usize::from(uapi::MAX_QUEUES)) as u16,
            queue_depth: 128,
            max_io_bytes: 1 << 20,
            io_timeout_ms: 30_000,
            recovery_timeout_ms: Some(30_000),
            fail_inflight: false,
            io: IoMode::Auto,
            passthrough: true,
            ring_poll: fuse_blk::DEFAULT_RING_POLL,
            scan_partitions: true,
        }
    }
}

/// The driver's params for a handler's geometry.
pub fn params_for(geometry: &Geometry, options: &KmodOptions) -> uapi::Params {
    let features = &geometry.features;
    let flag = |on: bool, bit: u64| if on { bit } else { 0 };
    let mut params = uapi::Params {
        size: geometry.size,
        logical_block_size: geometry.logical_block_size,
        physical_block_size: geometry.physical_block_size,
        max_io_bytes: options.max_io_bytes,
        nr_queues: options.queues,
        queue_depth: options.queue_depth,
        features: flag(features.flush, uapi::F_FLUSH)
            | flag(features.fua, uapi::F_FUA)
            | flag(features.discard, uapi::F_DISCARD)
            | flag(features.write_zeroes, uapi::F_WRITE_ZEROES)
            | flag(geometry.read_only, uapi::F_READ_ONLY)
            | flag(options.recovery_timeout_ms.is_some(), uapi::F_RECOVERY)
            | flag(options.fail_inflight, uapi::F_FAIL_INFLIGHT),
        io_timeout_ms: options.io_timeout_ms,
        recovery_timeout_ms: options.recovery_timeout_ms.unwrap_or(0),
        ..uapi::Params::default()
    };
    let name = options.name.as_bytes();
    let n = name.len().min(uapi::NAME_LEN - 1);
    params.name[..n].copy_from_slice(&name[..n]);
    params
}

/// Creates a device whose reads and writes the driver serves from
/// `backing` itself. A module without passthrough, or one that refuses the
/// file (another kind of file, or one on a fuse-blk device), gets a plain
/// device instead, with a log line: the daemon then serves every request.
fn create_with_backing(
    control: &Control,
    wanted: &uapi::Params,
    backing: BorrowedFd<'_>,
) -> io::Result<uapi::Params> {
    if control.features()?.features & uapi::F_PASSTHROUGH == 0 {
        log::info!("the fuse_blk module has no passthrough (ABI 3): reads and writes go through the daemon");
        return control.create(wanted);
    }
    let with_backing = uapi::Params {
        features: wanted.features | uapi::F_PASSTHROUGH,
        backing_fd: backing.as_raw_fd(),
        ..*wanted
    };
    match control.try_create(&with_backing) {
        Ok(params) => Ok(params),
        // A device of an unprivileged user has no passthrough: the
        // driver would use the file with its own rights.
        Err(e)
            if matches!(e, Errno::EINVAL | Errno::ELOOP | Errno::EBADF)
                || (e == Errno::EPERM && !is_root()) =>
        {
            log::info!(
                "passthrough refused ({}): reads and writes go through the daemon",
                e.desc()
            );
            control.create(wanted)
        }
        Err(e) => Err(errno_context("FUSE_BLK_IOC_CREATE", e)),
    }
}

/// The session configuration of the kernel-module path: requests as large
/// as the device allows; a punched hole is a discard.
pub fn session_config(max_io_bytes: u32, ring_poll: Duration) -> SessionConfig {
    SessionConfig {
        max_write: max_io_bytes,
        ring_poll,
        ..SessionConfig::default()
    }
}

/// A device of the kernel module served by this process.
pub struct KmodDevice {
    dev_id: u32,
    control: Control,
    /// The driver reads and writes the backing file itself.
    passthrough: bool,
    /// The channels are served over io_uring.
    io_uring: bool,
    workers: Option<JoinHandle<io::Result<()>>>,
    /// The engine serving the queues, once they are started.
    session: Option<Arc<Session>>,
    /// Created by this process: destroyed if dropped before serving ends.
    owned: bool,
    /// `wait` saw the serving end.
    waited: bool,
}

/// Why a [`KmodDevice`] stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The device was destroyed (or is being).
    Destroyed,
    /// Another daemon took the device over; it lives on.
    HandedOver,
}

impl KmodDevice {
    /// Creates `/dev/fuseblkN` for `device` and starts serving its queues.
    /// On error the device is destroyed again.
    pub fn create(device: Arc<dyn BlockDevice>, options: &KmodOptions) -> io::Result<KmodDevice> {
        let session = Session::new(
            device.clone(),
            session_config(options.max_io_bytes, options.ring_poll),
        )?;
        let control = Control::open()?;
        let wanted = params_for(&session.geometry(), options);
        let params = match device.backing_file() {
            Some(backing) if options.passthrough => {
                create_with_backing(&control, &wanted, backing)?
            }
            _ => control.create(&wanted)?,
        };
        let mut kmod = KmodDevice {
            dev_id: params.dev_id,
            control,
            passthrough: params.features & uapi::F_PASSTHROUGH != 0,
            io_uring: false,
            workers: None,
            session: None,
            owned: true,
            waited: false,
        };
        kmod.start(session, &params, false, options.io)?;
        kmod.wait_live()?;
        if options.scan_partitions {
            kmod.scan_partitions()?;
        }
        Ok(kmod)
    }

    /// Serves an existing device: after its daemon crashed (its requests
    /// waited and are reissued here), or to take it over from a running
    /// daemon, whose channels then read FUSE_DESTROY once this one's are
    /// up. The handler's geometry must match the device's. On error the
    /// device is left as it was. `io` and `ring_poll` are as in
    /// [`KmodOptions`].
    pub fn resume(
        device: Arc<dyn BlockDevice>,
        dev_id: u32,
        io: IoMode,
        ring_poll: Duration,
    ) -> io::Result<KmodDevice> {
        let control = Control::open()?;
        let params = control.info(dev_id)?.params;
        let session = Session::new(device, session_config(params.max_io_bytes, ring_poll))?;
        let geometry = session.geometry();
        if geometry.size != params.size || geometry.logical_block_size != params.logical_block_size
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fuseblk{dev_id} has {} bytes in blocks of {}; the backend has {} bytes in blocks of {}",
                    params.size, params.logical_block_size, geometry.size, geometry.logical_block_size
                ),
            ));
        }
        let mut kmod = KmodDevice {
            dev_id,
            control,
            passthrough: params.features & uapi::F_PASSTHROUGH != 0,
            io_uring: false,
            workers: None,
            session: None,
            owned: false,
            waited: false,
        };
        kmod.start(session, &params, true, io)?;
        kmod.wait_live()?;
        kmod.scan_partitions()?;
        Ok(kmod)
    }

    fn start(
        &mut self,
        session: Session,
        params: &uapi::Params,
        takeover: bool,
        io: IoMode,
    ) -> io::Result<()> {
        let features = self.control.features()?;
        let uring = match io {
            IoMode::ReadWrite => false,
            IoMode::Auto => ring::supported(&features),
            IoMode::Uring => {
                if let Some(reason) = ring::unsupported_reason(&features) {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, reason));
                }
                true
            }
        };
        self.io_uring = uring;
        let mut channels = Vec::with_capacity(usize::from(params.nr_queues));
        for queue in 0..params.nr_queues {
            channels.push(Arc::new(attach_channel(self.dev_id, queue, takeover)?));
        }
        let session = Arc::new(session);
        self.session = Some(session.clone());
        let depth = params.queue_depth;
        let read_sources = ring::read_sources_offered(&features);
        let serve = move || {
            if uring {
                session.serve_with(channels.len() as u16, move |session, queue| {
                    let channel = channels[usize::from(queue)].clone();
                    ring::serve_queue(session, queue, channel, depth, read_sources)
                })
            } else {
                session.serve(
                    channels
                        .into_iter()
                        .map(|c| c as Arc<dyn Channel>)
                        .collect(),
                )
            }
        };
        self.workers = Some(
            std::thread::Builder::new()
                .name(format!("fuseblk{}", self.dev_id))
                .spawn(serve)?,
        );
        Ok(())
    }

    /// N of `/dev/fuseblkN`.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Whether the driver reads and writes the backing file itself.
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// Whether the channels are served over io_uring (else read/write):
    /// what [`IoMode::Auto`] chose.
    pub fn io_uring(&self) -> bool {
        self.io_uring
    }

    /// `/dev/fuseblkN`.
    pub fn device_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/fuseblk{}", self.dev_id))
    }

    /// A handle that changes the device's size from another thread.
    pub fn resizer(&self) -> io::Result<Resizer> {
        Ok(Resizer {
            session: self
                .session
                .clone()
                .ok_or_else(|| io::Error::other("the device is not served yet"))?,
            control: Arc::new(Control::open()?),
            dev_id: self.dev_id,
        })
    }

    /// A handle that destroys the device from another thread.
    pub fn destroyer(&self) -> io::Result<Destroyer> {
        Ok(Destroyer {
            control: Arc::new(Control::open()?),
            dev_id: self.dev_id,
        })
    }

    /// Blocks until this process no longer serves the device: it was
    /// destroyed, or another daemon took it over. Returns which.
    pub fn wait(mut self) -> io::Result<Ended> {
        let result = match self.workers.take() {
            Some(workers) => workers
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("session thread panicked"))),
            None => Ok(()),
        };
        self.waited = true;
        let ended = match self.control.info(self.dev_id) {
            Ok(info) if info.state != uapi::STATE_DEAD => Ended::HandedOver,
            _ => Ended::Destroyed,
        };
        result.map(|()| ended)
    }

    /// Waits until every queue's worker has answered FUSE_INIT (the driver
    /// then publishes the capacity).
    fn wait_live(&self) -> io::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let info = self.control.info(self.dev_id)?;
            if info.state == uapi::STATE_LIVE {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "fuseblk{}: the queues did not come up within 30 s",
                        self.dev_id
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Opens the device once, which has the kernel read its partition
    /// table (the module marks it for a scan at the next open once the
    /// device is sized, see GD_NEED_PART_SCAN in fuse_blk.c).
    fn scan_partitions(&self) -> io::Result<()> {
        let path = self.device_path();
        if !is_root() {
            // An unprivileged user's device is root's until udev gives it
            // to the user (the project's rules): udev's open scans then.
            self.wait_given_to_user(&path);
            return Ok(());
        }
        File::open(&path)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Waits (up to 10 s) until this user may read and write `path`, so
    /// that the path `attach` prints can be used at once; says why not if
    /// it stays root's.
    fn wait_given_to_user(&self, path: &std::path::Path) {
        use nix::unistd::{access, AccessFlags};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while access(path, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
            if std::time::Instant::now() > deadline {
                log::warn!(
                    "{}: still not this user's after 10 s: are fuse-blk's udev rules (61-fuse-blk.rules) installed?",
                    path.display()
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for KmodDevice {
    /// A device this process created and did not see to its end (setup
    /// failed half way, or it is dropped while served) is destroyed; its
    /// workers then read FUSE_DESTROY and end. A resumed device is left
    /// alone: when this process exits, its channels close and the requests
    /// they held are requeued for the next daemon.
    fn drop(&mut self) {
        if self.owned && !self.waited {
            if let Err(e) = self.control.destroy(self.dev_id) {
                if e.raw_os_error() != Some(libc::ENODEV) {
                    log::warn!("{e}");
                }
            }
            if let Some(workers) = self.workers.take() {
                let _ = workers.join();
            }
        }
    }
}

/// Changes a served device's size: the handler's and the module's, in the
/// order [`Session::resize`] gives.
#[derive(Clone)]
pub struct Resizer {
    session: Arc<Session>,
    control: Arc<Control>,
    dev_id: u32,
}

impl Resizer {
    /// Has the handler serve `size` bytes and the device show them.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        self.session
            .resize(size, |size| self.control.resize(self.dev_id, size))
    }

    /// The handler serves `size` bytes now: the device shows them.
    pub fn announce(&self, size: u64) -> io::Result<()> {
        self.session
            .announce_size(size, |size| self.control.resize(self.dev_id, size))
    }

    /// The size the device has now.
    pub fn size(&self) -> u64 {
        self.session.size()
    }
}

/// Destroys a device: its queues' channels read FUSE_DESTROY, the workers
/// end, and [`KmodDevice::wait`] returns.
#[derive(Clone)]
pub struct Destroyer {
    control: Arc<Control>,
    dev_id: u32,
}

impl Destroyer {
    /// Destroys the device; a device that is gone already is no error.
    pub fn destroy(&self) -> io::Result<()> {
        match self.control.destroy(self.dev_id) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }
}
