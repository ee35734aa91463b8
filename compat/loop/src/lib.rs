//! fuse-blk on a stock kernel, without the fuse-blk module.
//!
//! The handler is mounted as a one-file FUSE filesystem (the
//! [`OneFileNamespace`]) at a private mount point, and a loop device with
//! direct I/O is bound to that file. Block requests then travel
//! `loop -> FUSE file (O_DIRECT) -> /dev/fuse -> session engine -> handler`:
//! reads and writes as FUSE_READ/FUSE_WRITE, flushes as FUSE_FSYNC, discard
//! and write-zeroes as FUSE_FALLOCATE, exactly the messages the kernel
//! module sends, so one handler serves both paths.
//!
//! Lifetimes: a [`StockDevice`] owns the mount, the loop binding and the
//! worker threads. [`Detacher::detach`] (from any thread, e.g. a signal
//! or control-socket handler) unbinds the loop device, waits for the loop
//! driver to close the file, and unmounts; the workers then read ENODEV and
//! [`StockDevice::wait`] returns.

#![deny(missing_docs)]

pub mod loopdev;
pub mod mount;
pub mod namespace;
pub mod passthrough;
pub mod uring;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_blk::proto::abi::{init_flags, init_flags2};
use fuse_blk::{BlockDevice, Channel, FdChannel, IoMode, Session, SessionConfig};
use parking_lot::Mutex;

pub use loopdev::{LoopDevice, LoopOptions};
pub use mount::FuseMount;
pub use namespace::OneFileNamespace;
use passthrough::Backing;

/// How to attach a device on the stock path.
#[derive(Debug, Clone)]
pub struct StockOptions {
    /// Private directory to mount the one-file filesystem on; created if
    /// missing, removed on detach.
    pub mountpoint: PathBuf,
    /// Name of the device (shown by losetup as `fuse-blk:NAME`).
    pub name: String,
    /// Worker threads, each reading its own cloned /dev/fuse descriptor.
    pub threads: usize,
    /// How requests reach the workers.
    pub io: IoMode,
    /// Let the kernel read and write the device's backing file itself
    /// where it offers FUSE passthrough (see [`passthrough`]); devices
    /// without one are served as always.
    pub passthrough: bool,
    /// FUSE over io_uring: poll for the next request while requests come
    /// at most this far apart (see [`SessionConfig::ring_poll`]).
    pub ring_poll: Duration,
}

/// The session configuration of the stock path: asynchronous direct I/O
/// gives the daemon the loop driver's queue depth, and a punched hole must
/// read back as zeros (file semantics).
pub fn session_config() -> SessionConfig {
    let defaults = SessionConfig::default();
    SessionConfig {
        init_flags: defaults.init_flags | init_flags::ASYNC_DIO,
        punch_hole_zeroes: true,
        ..defaults
    }
}

struct Shared {
    loop_device: Mutex<Option<LoopDevice>>,
    mount: Mutex<Option<FuseMount>>,
    namespace: Arc<OneFileNamespace>,
    session: Arc<Session>,
    /// The connection's first descriptor, handed to a successor daemon.
    /// No worker reads it: a channel makes its open file non-blocking,
    /// which a predecessor or successor sharing it may not expect.
    primary: OwnedFd,
    /// Another daemon serves the connection now: leave mount and loop be.
    handed_over: AtomicBool,
    /// The device file, as the loop device opened it.
    file: PathBuf,
}

/// Why a [`StockDevice`] stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The device was detached: the loop device is gone, the file unmounted.
    Detached,
    /// Another daemon took the FUSE connection over.
    HandedOver,
}

/// What a daemon passes its successor: the FUSE connection (sent with
/// SCM_RIGHTS) and the number of open handles of the device file (the
/// loop driver's), which detaching waits for.
#[derive(Debug)]
pub struct Handover {
    /// The FUSE connection's `/dev/fuse` descriptor, serving the device
    /// file.
    pub fuse_fd: OwnedFd,
    /// Open handles of the device file the loop driver holds.
    pub open_files: u64,
    /// The passthrough registration the device file's opens name, which
    /// the successor's must name too.
    pub backing_id: Option<i32>,
}

/// A block device served on the stock path.
pub struct StockDevice {
    shared: Arc<Shared>,
    device_path: PathBuf,
    mountpoint: PathBuf,
    workers: Option<JoinHandle<io::Result<()>>>,
    /// FUSE over io_uring: one thread per kernel queue.
    ring_workers: Vec<JoinHandle<io::Result<()>>>,
}

/// Entries per FUSE io_uring queue: the loop device's depth spread over the
/// queues, and at least a few.
const RING_DEPTH: u16 = 64;

/// A handle that detaches a [`StockDevice`] from another thread.
#[derive(Clone)]
pub struct Detacher {
    shared: Arc<Shared>,
    device_path: PathBuf,
}

/// The file name of the device inside the mount.
const FILE_NAME: &str = "device";

impl StockDevice {
    /// Mounts `device`, starts the workers and binds a loop device. On
    /// error everything done so far is undone.
    pub fn attach(device: Arc<dyn BlockDevice>, options: &StockOptions) -> io::Result<StockDevice> {
        // `auto` stays read/write here: a connection served over io_uring
        // cannot be handed over (see compat/README.md).
        let uring = options.io == IoMode::Uring;
        if uring && !uring::enabled() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                uring::unavailable_reason(),
            ));
        }
        let mut config = SessionConfig {
            ring_poll: options.ring_poll,
            ..session_config()
        };
        if uring {
            config.init_flags |= init_flags::INIT_EXT;
            config.init_flags2 |= init_flags2::OVER_IO_URING;
        }
        let backing_file = match device.backing_file().filter(|_| options.passthrough) {
            Some(file) => {
                config.init_flags |= init_flags::INIT_EXT;
                config.init_flags2 |= init_flags2::PASSTHROUGH;
                Some(file.try_clone_to_owned()?)
            }
            None => None,
        };
        let session = Session::new(device, config)?;
        let geometry = session.geometry();
        let namespace = Arc::new(OneFileNamespace::new(FILE_NAME, geometry));
        let session = Arc::new(session.with_namespace(namespace.clone()));

        let mountpoint = options.mountpoint.clone();
        let created_dir = create_private_dir(&mountpoint)?;
        let undo_dir = |e: io::Error| {
            if created_dir {
                let _ = std::fs::remove_dir(&mountpoint);
            }
            e
        };
        let (mount, fd) = FuseMount::mount(&mountpoint, &format!("fuse-blk:{}", options.name))
            .map_err(undo_dir)?;
        // From here on, dropping `mount` unmounts, which ends the workers.
        let (primary, channels) = match open_channels(fd, options.threads.max(1)) {
            Ok(channels) => channels,
            Err(e) => {
                drop(mount);
                return Err(undo_dir(e));
            }
        };
        if let Some(file) = backing_file {
            let fuse = match primary.as_fd().try_clone_to_owned() {
                Ok(fuse) => fuse,
                Err(e) => {
                    drop(mount);
                    return Err(undo_dir(e));
                }
            };
            namespace.set_passthrough(Backing::Wanted { fuse, file });
        }
        let workers = spawn_session(&session, channels)?;
        let shared = Arc::new(Shared {
            loop_device: Mutex::new(None),
            mount: Mutex::new(Some(mount)),
            namespace,
            session,
            primary,
            handed_over: AtomicBool::new(false),
            file: mountpoint.join(FILE_NAME),
        });
        let mut stock = StockDevice {
            shared,
            device_path: PathBuf::new(),
            mountpoint: mountpoint.clone(),
            workers: Some(workers),
            ring_workers: Vec::new(),
        };
        // Once FUSE_INIT grants io_uring, the kernel holds every request
        // until each queue has ring entries: the rings start now, before
        // the loop device opens the file.
        if uring {
            if let Err(e) = stock.start_rings() {
                drop(stock);
                return Err(undo_dir(e));
            }
        }
        match bind_loop(&mountpoint.join(FILE_NAME), &options.name, &geometry) {
            Ok(loop_device) => {
                stock.device_path = loop_device.path().to_owned();
                *stock.shared.loop_device.lock() = Some(loop_device);
                let granted = stock.shared.session.granted_flags2().unwrap_or(0);
                if uring && granted & init_flags2::OVER_IO_URING == 0 {
                    drop(stock);
                    return Err(undo_dir(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the kernel did not offer FUSE over io_uring in FUSE_INIT",
                    )));
                }
                Ok(stock)
            }
            Err(e) => {
                // Dropping `stock` unmounts and joins the workers.
                drop(stock);
                Err(undo_dir(e))
            }
        }
    }

    /// Whether the kernel reads and writes the device's backing file
    /// itself (FUSE passthrough; see [`StockOptions::passthrough`]).
    pub fn passthrough(&self) -> bool {
        self.shared.namespace.backing_id().is_some()
    }

    /// Whether requests come over FUSE's io_uring queues (else read/write
    /// on the connection's descriptors).
    pub fn io_uring(&self) -> bool {
        !self.ring_workers.is_empty()
    }

    /// The block device, e.g. `/dev/loop3`.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// Where the one-file filesystem is mounted (private to this daemon).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A handle that detaches the device from another thread.
    pub fn detacher(&self) -> Detacher {
        Detacher {
            shared: self.shared.clone(),
            device_path: self.device_path.clone(),
        }
    }

    /// Serves a device whose previous daemon handed its FUSE connection
    /// over (see [`Detacher::hand_over`]): the loop device and the mount
    /// stay as they are; this process serves the connection from now on.
    pub fn resume(
        device: Arc<dyn BlockDevice>,
        handover: Handover,
        device_path: &Path,
        mountpoint: &Path,
        threads: usize,
    ) -> io::Result<StockDevice> {
        let session = Session::new(device, session_config())?;
        let namespace = Arc::new(OneFileNamespace::new(FILE_NAME, session.geometry()));
        namespace.set_open_files(handover.open_files);
        namespace.set_passthrough(match handover.backing_id {
            Some(id) => Backing::Registered(id),
            None => Backing::Off,
        });
        let session = Arc::new(session.with_namespace(namespace.clone()));
        let loop_device = LoopDevice::open(device_path)?;
        let (primary, channels) = open_channels(handover.fuse_fd, threads.max(1))?;
        let workers = spawn_session(&session, channels)?;
        Ok(StockDevice {
            shared: Arc::new(Shared {
                loop_device: Mutex::new(Some(loop_device)),
                mount: Mutex::new(Some(FuseMount::adopt(mountpoint))),
                namespace,
                session,
                primary,
                handed_over: AtomicBool::new(false),
                file: mountpoint.join(FILE_NAME),
            }),
            device_path: device_path.to_owned(),
            mountpoint: mountpoint.to_owned(),
            workers: Some(workers),
            ring_workers: Vec::new(),
        })
    }

    /// Blocks until the device has been detached (or its FUSE connection
    /// aborted), then removes whatever is left of it; or until it was
    /// handed over to another daemon, which then owns all of it.
    pub fn wait(mut self) -> io::Result<Ended> {
        let result = self.join_workers();
        self.cleanup();
        let ended = if self.shared.handed_over.load(Ordering::Acquire) {
            Ended::HandedOver
        } else {
            Ended::Detached
        };
        result.map(|()| ended)
    }

    fn join_workers(&mut self) -> io::Result<()> {
        let mut result = match self.workers.take() {
            Some(workers) => workers
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("session thread panicked"))),
            None => Ok(()),
        };
        for ring in self.ring_workers.drain(..) {
            let outcome = ring
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("io_uring thread panicked")));
            result = result.and(outcome);
        }
        result
    }

    /// Starts one ring thread per kernel queue; each registers its entries
    /// once FUSE_INIT has granted io_uring, and ends at once if it did not.
    fn start_rings(&mut self) -> io::Result<()> {
        let session = &self.shared.session;
        for qid in 0..uring::queues()? {
            let fd = self.shared.primary.as_fd().try_clone_to_owned()?;
            let session = session.clone();
            self.ring_workers.push(
                std::thread::Builder::new()
                    .name(format!("fuse-blk-ring{qid}"))
                    .spawn(move || uring::serve_queue(&session, qid, fd, RING_DEPTH))?,
            );
        }
        Ok(())
    }

    /// Undoes whatever is still in place, unless another daemon serves the
    /// device now; idempotent.
    fn cleanup(&mut self) {
        if self.shared.handed_over.load(Ordering::Acquire) {
            if let Some(mount) = self.shared.mount.lock().take() {
                mount.forget();
            }
            self.shared.loop_device.lock().take();
            return;
        }
        if let Some(loop_device) = self.shared.loop_device.lock().take() {
            if let Err(e) = loop_device.detach() {
                log::warn!("{e}");
            }
        }
        if let Some(mount) = self.shared.mount.lock().take() {
            if let Err(e) = mount.unmount() {
                log::warn!("{e}");
            }
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

impl Drop for StockDevice {
    fn drop(&mut self) {
        if self.workers.is_some() {
            self.cleanup();
            let _ = self.join_workers();
        }
    }
}

impl Detacher {
    /// The loop device, e.g. `/dev/loop3`.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// The FUSE connection for a successor daemon. Until [`retire`] this
    /// process keeps serving too.
    ///
    /// [`retire`]: Detacher::retire
    pub fn hand_over(&self) -> io::Result<Handover> {
        let granted = self.shared.session.granted_flags2().unwrap_or(0);
        if granted & init_flags2::OVER_IO_URING != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a FUSE connection served over io_uring cannot be handed over (its ring belongs to the connection)",
            ));
        }
        Ok(Handover {
            fuse_fd: self.shared.primary.as_fd().try_clone_to_owned()?,
            open_files: self.shared.namespace.open_files(),
            backing_id: self.shared.namespace.backing_id(),
        })
    }

    /// Stops serving after [`hand_over`](Detacher::hand_over): each worker
    /// answers the request it holds and leaves; requests not yet read wait
    /// in the kernel for the successor. [`StockDevice::wait`] then returns
    /// [`Ended::HandedOver`] and leaves the mount and the loop device alone.
    pub fn retire(&self) {
        self.shared.handed_over.store(true, Ordering::Release);
        while self.shared.session.workers_waiting() > 0 {
            self.shared.session.stop();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Has the handler serve `size` bytes and the loop device show them,
    /// in the order [`Session::resize`] gives.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        self.shared
            .session
            .resize(size, |size| self.show_size(size))
    }

    /// The handler serves `size` bytes now: the loop device shows them.
    pub fn announce_size(&self, size: u64) -> io::Result<()> {
        self.shared
            .session
            .announce_size(size, |size| self.show_size(size))
    }

    /// The size the device has now.
    pub fn size(&self) -> u64 {
        self.shared.session.size()
    }

    /// Gives the FUSE file its new size and has the loop device take it.
    /// The kernel forgets the file's cached attributes, and the size it
    /// has is checked through `lseek(SEEK_END)`, which answers the inode's
    /// size (a stat answers the daemon's reply, which the kernel does not
    /// apply when a write raced it: FUSE's attr_version), asking again
    /// until the inode has it; only then LOOP_SET_CAPACITY (the loop driver
    /// of 6.x takes the inode's size, that of newer kernels a stat's, and
    /// a read past the inode's size would fail).
    fn show_size(&self, size: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        self.shared.namespace.set_size(size);
        let notification = fuse_blk::proto::reply::encode_inval_attributes(namespace::FILE_ID);
        let fuse = std::fs::File::from(self.shared.primary.try_clone()?);
        let in_file =
            |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", self.shared.file.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            (&fuse).write_all(&notification).map_err(|e| {
                io::Error::new(e.kind(), format!("telling the kernel the new size: {e}"))
            })?;
            let seen = std::fs::File::open(&self.shared.file)
                .and_then(|mut file| file.seek(SeekFrom::End(0)))
                .map_err(in_file)?;
            if seen == size {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the kernel still sees {seen} bytes in {} 10 s after the resize to {size}",
                    self.shared.file.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match &*self.shared.loop_device.lock() {
            Some(loop_device) => loop_device.set_capacity(),
            None => Err(io::Error::other("the device is being detached")),
        }
    }

    /// Flushes, unbinds the loop device and unmounts. A device still in
    /// use (mounted, held) is unbound by the loop driver at its last close
    /// and the daemon serves until then, so nothing written is lost;
    /// whether to detach a busy device at all is the caller's choice.
    pub fn detach(&self) -> io::Result<()> {
        let mut loop_slot = self.shared.loop_device.lock();
        if let Some(loop_device) = loop_slot.take() {
            if let Err(e) = loop_device.flush() {
                log::warn!("flushing {}: {e}", self.device_path.display());
            }
            loop_device.detach()?;
        }
        drop(loop_slot);
        // The loop driver closes the file when its last opener goes; only
        // then may the filesystem be unmounted without failing its I/O.
        while !self.shared.namespace.wait_closed(Duration::from_secs(10)) {
            log::info!(
                "{} is still open; waiting for its last user to close it",
                self.device_path.display()
            );
        }
        if let Some(mount) = self.shared.mount.lock().take() {
            let connection = self.connection_id();
            mount.unmount()?;
            self.end_lingering_connection(connection);
        }
        Ok(())
    }

    /// The FUSE connection's number (its directory under
    /// /sys/fs/fuse/connections): the minor of the mount's device.
    fn connection_id(&self) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        let root = self.shared.file.parent()?;
        let dev = std::fs::metadata(root).ok()?.dev();
        (nix::sys::stat::major(dev) == 0).then(|| nix::sys::stat::minor(dev) as u32)
    }

    /// Ends the workers once the file system is unmounted here. Normally
    /// the unmount ends the connection and they read ENODEV. But a copy of
    /// the mount in another mount namespace (a process started meanwhile
    /// with one of its own: `unshare -m`, a service with PrivateTmp=)
    /// keeps the connection alive, and nothing would ever end them. The
    /// device is gone by now, so nothing is lost: read/write workers are
    /// stopped, and the connection is aborted where fusectl is mounted
    /// (which also ends io_uring queues).
    fn end_lingering_connection(&self, connection: Option<u32>) {
        let session = &self.shared.session;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while session.workers_waiting() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if session.workers_waiting() == 0 {
            return;
        }
        log::info!(
            "{}: the FUSE connection outlives the unmount (a copy of the mount in another mount namespace); ending it",
            self.device_path.display()
        );
        if let Some(id) = connection {
            let abort = format!("/sys/fs/fuse/connections/{id}/abort");
            let _ = std::fs::write(abort, "1");
        }
        while session.workers_waiting() > 0 {
            session.stop();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Creates `dir` (mode 0700) if it does not exist; returns whether it did.
fn create_private_dir(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
}

/// The connection's first descriptor (kept to hand over) and the channels.
type Channels = (OwnedFd, Vec<Arc<dyn Channel>>);

/// Channels for `threads` workers, each a clone of the connection with an
/// open file of its own (see [`FdChannel::new`]); the clones read from the
/// connection's one queue, so a request wakes one idle worker of them
/// ([`FdChannel::new_shared`]).
fn open_channels(fd: OwnedFd, threads: usize) -> io::Result<Channels> {
    let channels = (0..threads)
        .map(|_| {
            let clone = mount::clone_channel(&fd)?;
            Ok(Arc::new(FdChannel::new_shared(clone)) as Arc<dyn Channel>)
        })
        .collect::<io::Result<_>>()?;
    Ok((fd, channels))
}

fn spawn_session(
    session: &Arc<Session>,
    channels: Vec<Arc<dyn Channel>>,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let session = session.clone();
    std::thread::Builder::new()
        .name("fuse-blk-session".into())
        .spawn(move || session.serve(channels))
}

fn bind_loop(file: &Path, name: &str, geometry: &fuse_blk::Geometry) -> io::Result<LoopDevice> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!geometry.read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", file.display())))?;
    let loop_device = LoopDevice::attach(
        backing.as_fd(),
        name,
        LoopOptions {
            block_size: geometry.logical_block_size,
            read_only: geometry.read_only,
            direct_io: true,
        },
    )?;
    if !loop_device.direct_io_active() {
        log::warn!(
            "{}: the kernel refused direct I/O on the FUSE file; data is cached twice",
            loop_device.path().display()
        );
    }
    Ok(loop_device)
}
