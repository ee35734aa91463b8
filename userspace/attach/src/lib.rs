//! Attach a fuse-blk handler as a Linux block device in one call.
//!
//! A handler implements [`BlockDevice`] (re-exported here with the rest of
//! the `fuse-blk` handler API, so that this crate is the only one a daemon
//! needs). [`attach`] then serves it the way `fuse-blk attach` does: through
//! the fuse-blk kernel module (`/dev/fuseblkN`) when `/dev/fuse-blk` exists,
//! else on the stock kernel as a one-file FUSE filesystem with a loop device
//! on top (`/dev/loopN`). It returns once the block device exists, with an
//! [`AttachedDevice`] that names it, serves it until it is detached, and
//! detaches it when dropped.
//!
//! ```no_run
//! use std::sync::Arc;
//! use fuse_blk_attach::{AttachOptions, BlockDevice, Geometry, ReplyData, ReplyWrite, Request};
//!
//! struct Zeros;
//!
//! impl BlockDevice for Zeros {
//!     fn geometry(&self) -> Geometry {
//!         Geometry::new(1 << 30, 4096)
//!     }
//!     fn read(&self, _req: &Request, _offset: u64, _len: u32, reply: ReplyData) {
//!         reply.zeros();
//!     }
//!     fn write(&self, _req: &Request, _offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
//!         reply.ok();
//!     }
//! }
//!
//! fn main() -> std::io::Result<()> {
//!     let device = fuse_blk_attach::attach(Arc::new(Zeros), &AttachOptions::new("zeros"))?;
//!     println!("{}", device.device_path().display());
//!     device.serve_until_signal()?; // Ctrl-C detaches
//!     Ok(())
//! }
//! ```
//!
//! Attaching needs root (creating loop devices or module devices does).
//! The `examples/` directory of this crate has complete programs: `zeros`,
//! `ramdisk` and `overlay` (`cargo run --example overlay -- IMAGE`).

#![deny(missing_docs)]

pub mod busy;

/// The README's code, compiled by `cargo test` as doctests so that its
/// handler example cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

use std::fmt;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

pub use fuse_blk::*;
/// The kernel-module transport, for what [`attach`] does not cover
/// (taking over a running device, crash recovery).
pub use fuse_blk_kmod as kmod;
/// The stock-kernel transport (one-file FUSE filesystem + loop device), for
/// what [`attach`] does not cover (handing a device over to another daemon).
pub use fuse_blk_loop as stock;

use fuse_blk_kmod::{KmodDevice, KmodOptions};
use fuse_blk_loop::{StockDevice, StockOptions};

/// Which transport serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// The kernel module when `/dev/fuse-blk` exists, else the stock path.
    #[default]
    Auto,
    /// The fuse-blk kernel module: `/dev/fuseblkN`.
    Kmod,
    /// The stock kernel: a one-file FUSE filesystem with a loop device on
    /// top, `/dev/loopN`.
    Loop,
}

impl Transport {
    /// What [`Transport::Auto`] stands for on this machine now; the others
    /// stand for themselves.
    pub fn resolve(self) -> Transport {
        match self {
            Transport::Auto if fuse_blk_kmod::available() => Transport::Kmod,
            Transport::Auto => Transport::Loop,
            chosen => chosen,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Kmod => "kmod",
            Transport::Loop => "loop",
        })
    }
}

/// How [`attach`] sets a device up: `fuse-blk attach`'s options. Start from
/// [`AttachOptions::new`] and change the fields that matter; the defaults
/// are the command's.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AttachOptions {
    /// The device's name: the module's name for it (sysfs
    /// `fuse_blk/name`), `fuse-blk:NAME` as losetup's backing file on the
    /// stock path. 1 to 48 letters, digits, `-`, `_` or `.`, not starting
    /// with `.` or `-`.
    pub name: String,
    /// Which transport serves the device.
    pub transport: Transport,
    /// How requests reach the daemon: `Auto` is io_uring with the module
    /// where it offers it, and read(2)/write(2) on the stock path.
    pub io: IoMode,
    /// Let the kernel read and write [`BlockDevice::backing_file`] itself
    /// where it can (a handler without one is served as always).
    pub passthrough: bool,
    /// io_uring queues poll for the next request while requests come at
    /// most this far apart (see [`SessionConfig::ring_poll`]).
    pub ring_poll: Duration,
    /// Stock path: worker threads; `None` is one per CPU, 2 to 16.
    pub threads: Option<usize>,
    /// Stock path: where to mount the one-file filesystem; `None` makes a
    /// private directory under `/run` (the temporary directory where there
    /// is no `/run`), removed on detach.
    pub mountpoint: Option<PathBuf>,
    /// Module: hardware queues, each served by a thread of its own;
    /// `None` is one per CPU.
    pub queues: Option<u16>,
    /// Module: requests in flight per queue; `None` is the module
    /// transport's default (128).
    pub queue_depth: Option<u16>,
    /// Module: how long a request may take before it fails; `None` is 30 s.
    pub io_timeout_ms: Option<u32>,
    /// Module: how long requests wait for a new daemon if this one dies
    /// (`fuse-blk attach --recover` serves them); `None` fails them after
    /// one I/O timeout.
    pub recovery_timeout_ms: Option<u32>,
    /// Module: requests the dead daemon had taken fail instead of being
    /// reissued to the next one.
    pub fail_inflight: bool,
    /// Module: have the kernel read the partition table before [`attach`]
    /// returns (see `KmodOptions::scan_partitions`).
    pub scan_partitions: bool,
}

impl AttachOptions {
    /// `fuse-blk attach`'s defaults for a device called `name`.
    pub fn new(name: &str) -> AttachOptions {
        let kmod = KmodOptions::default();
        AttachOptions {
            name: name.to_owned(),
            transport: Transport::Auto,
            io: IoMode::Auto,
            passthrough: true,
            ring_poll: DEFAULT_RING_POLL,
            threads: None,
            mountpoint: None,
            queues: None,
            queue_depth: None,
            io_timeout_ms: None,
            recovery_timeout_ms: kmod.recovery_timeout_ms,
            fail_inflight: false,
            scan_partitions: true,
        }
    }

    fn kmod_options(&self) -> KmodOptions {
        let defaults = KmodOptions::default();
        KmodOptions {
            name: self.name.clone(),
            queues: self.queues.unwrap_or(defaults.queues),
            queue_depth: self.queue_depth.unwrap_or(defaults.queue_depth),
            io_timeout_ms: self.io_timeout_ms.unwrap_or(defaults.io_timeout_ms),
            recovery_timeout_ms: self.recovery_timeout_ms,
            fail_inflight: self.fail_inflight,
            io: self.io,
            passthrough: self.passthrough,
            ring_poll: self.ring_poll,
            scan_partitions: self.scan_partitions,
            ..defaults
        }
    }
}

/// Checks a device name: 1 to 48 letters, digits, `-`, `_` or `.`, not
/// starting with `.` or `-` (it becomes part of file and sysfs names).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 48 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        ))
    }
}

/// The stock path's worker threads when none are asked for: one per CPU,
/// at least 2 (a flush waits while another request is served) and at most
/// 16.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 16)
}

/// Serves `device` as a new block device and returns once the device
/// exists (its path in [`AttachedDevice::device_path`]). On error nothing
/// is left behind: no device, mount or directory.
///
/// The threads that serve the device block SIGINT, SIGTERM and SIGHUP, so
/// that these reach the program's own threads (see
/// [`AttachedDevice::serve_until_signal`]).
pub fn attach(device: Arc<dyn BlockDevice>, options: &AttachOptions) -> io::Result<AttachedDevice> {
    validate_name(&options.name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let transport = options.transport.resolve();
    if transport == Transport::Kmod && !fuse_blk_kmod::available() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the kmod transport needs the fuse_blk kernel module ({} is missing)",
                fuse_blk_kmod::CONTROL_PATH
            ),
        ));
    }
    let _blocked = BlockedDetachSignals::new()?;
    let served = match transport {
        Transport::Kmod => Served::Kmod(KmodDevice::create(device, &options.kmod_options())?),
        _ => Served::Stock(attach_stock(device, options)?),
    };
    Ok(AttachedDevice::from_served(served))
}

fn attach_stock(device: Arc<dyn BlockDevice>, options: &AttachOptions) -> io::Result<StockDevice> {
    let (mountpoint, made_here) = match &options.mountpoint {
        Some(dir) => (dir.clone(), false),
        None => (private_mountpoint(&options.name)?, true),
    };
    let stock_options = StockOptions {
        mountpoint: mountpoint.clone(),
        name: options.name.clone(),
        threads: options.threads.unwrap_or_else(default_threads),
        io: options.io,
        passthrough: options.passthrough,
        ring_poll: options.ring_poll,
    };
    StockDevice::attach(device, &stock_options).inspect_err(|_| {
        // StockDevice removes only a directory it made itself.
        if made_here {
            let _ = std::fs::remove_dir(&mountpoint);
        }
    })
}

/// A fresh directory (mode 0700) to mount a device's filesystem on, made
/// here so that nobody else's directory is mounted over.
fn private_mountpoint(name: &str) -> io::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let run = Path::new("/run");
    let base = if run.is_dir() {
        run.to_owned()
    } else {
        std::env::temp_dir()
    };
    loop {
        let dir = base.join(format!(
            "fuse-blk.{name}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
}

/// The signals that detach a device in `fuse-blk attach --foreground` and
/// [`AttachedDevice::serve_until_signal`].
fn detach_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the detach signals in this thread while alive, so that the
/// threads it starts inherit the block; restores the mask it found.
struct BlockedDetachSignals {
    previous: SigSet,
}

impl BlockedDetachSignals {
    fn new() -> io::Result<BlockedDetachSignals> {
        let mut previous = SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            SigmaskHow::SIG_BLOCK,
            Some(&detach_signals()),
            Some(&mut previous),
        )?;
        Ok(BlockedDetachSignals { previous })
    }
}

impl Drop for BlockedDetachSignals {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.previous), None);
    }
}

/// The device as one of the two transports serves it.
enum Served {
    Stock(StockDevice),
    Kmod(KmodDevice),
}

/// Why an [`AttachedDevice`] stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The device is gone.
    Detached,
    /// Another daemon serves the device now (`fuse-blk handoff`, or a
    /// module device taken over); it lives on.
    HandedOver,
}

/// A block device this process serves. Dropping it tears the device down
/// at once, without waiting for whoever still uses it;
/// [`wait`](AttachedDevice::wait) serves until someone detaches it,
/// [`detach`](AttachedDevice::detach) and
/// [`serve_until_signal`](AttachedDevice::serve_until_signal) detach it
/// cleanly.
pub struct AttachedDevice {
    served: Served,
    device_path: PathBuf,
}

impl From<StockDevice> for AttachedDevice {
    /// A stock-path device set up (or resumed) with `fuse-blk-loop` itself.
    fn from(stock: StockDevice) -> AttachedDevice {
        AttachedDevice::from_served(Served::Stock(stock))
    }
}

impl From<KmodDevice> for AttachedDevice {
    /// A module device set up (or resumed) with `fuse-blk-kmod` itself.
    fn from(kmod: KmodDevice) -> AttachedDevice {
        AttachedDevice::from_served(Served::Kmod(kmod))
    }
}

impl AttachedDevice {
    fn from_served(served: Served) -> AttachedDevice {
        let device_path = match &served {
            Served::Stock(stock) => stock.device_path().to_owned(),
            Served::Kmod(kmod) => kmod.device_path(),
        };
        AttachedDevice {
            served,
            device_path,
        }
    }

    /// The block device, e.g. `/dev/loop3` or `/dev/fuseblk0`.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// Which transport serves it: [`Transport::Kmod`] or [`Transport::Loop`].
    pub fn transport(&self) -> Transport {
        match self.served {
            Served::Stock(_) => Transport::Loop,
            Served::Kmod(_) => Transport::Kmod,
        }
    }

    /// The module's number for the device (`N` of `/dev/fuseblkN`), by
    /// which a successor daemon finds it; `None` on the stock path.
    pub fn dev_id(&self) -> Option<u32> {
        match &self.served {
            Served::Stock(_) => None,
            Served::Kmod(kmod) => Some(kmod.dev_id()),
        }
    }

    /// Whether the kernel reads and writes the handler's backing file
    /// itself (see [`AttachOptions::passthrough`]).
    pub fn passthrough(&self) -> bool {
        match &self.served {
            Served::Stock(stock) => stock.passthrough(),
            Served::Kmod(kmod) => kmod.passthrough(),
        }
    }

    /// Whether requests come over io_uring (else read(2)/write(2)): what
    /// [`IoMode::Auto`] chose.
    pub fn io_uring(&self) -> bool {
        match &self.served {
            Served::Stock(stock) => stock.io_uring(),
            Served::Kmod(kmod) => kmod.io_uring(),
        }
    }

    /// A handle that detaches the device from any thread, e.g. a signal
    /// handler's or a control socket's, while another one [`wait`]s.
    ///
    /// [`wait`]: AttachedDevice::wait
    pub fn detacher(&self) -> io::Result<Detacher> {
        Ok(Detacher {
            kind: match &self.served {
                Served::Stock(stock) => DetacherKind::Stock(stock.detacher()),
                Served::Kmod(kmod) => DetacherKind::Kmod(kmod.destroyer()?),
            },
            device_path: self.device_path.clone(),
        })
    }

    /// A handle that changes the device's size from any thread: see
    /// [`Resizer`].
    pub fn resizer(&self) -> io::Result<Resizer> {
        Ok(Resizer {
            kind: match &self.served {
                Served::Stock(stock) => ResizerKind::Stock(stock.detacher()),
                Served::Kmod(kmod) => ResizerKind::Kmod(kmod.resizer()?),
            },
            device_path: self.device_path.clone(),
        })
    }

    /// Serves until the device is detached (a [`Detacher`], `fuse-blk
    /// detach`) or handed over to another daemon; says which.
    pub fn wait(self) -> io::Result<Ended> {
        let AttachedDevice { served, .. } = self;
        match served {
            Served::Stock(stock) => stock.wait().map(|ended| match ended {
                fuse_blk_loop::Ended::Detached => Ended::Detached,
                fuse_blk_loop::Ended::HandedOver => Ended::HandedOver,
            }),
            Served::Kmod(kmod) => kmod.wait().map(|ended| match ended {
                fuse_blk_kmod::Ended::Destroyed => Ended::Detached,
                fuse_blk_kmod::Ended::HandedOver => Ended::HandedOver,
            }),
        }
    }

    /// Flushes and detaches the device now and waits until it is gone;
    /// refuses (and keeps serving) while the device is mounted or held
    /// exclusively.
    pub fn detach(self) -> io::Result<()> {
        self.detacher()?.detach()?;
        self.wait().map(drop)
    }

    /// Serves until SIGINT (Ctrl-C), SIGTERM or SIGHUP, then detaches the
    /// device as soon as nothing uses it any more (as `fuse-blk attach
    /// --foreground` does), or until the device is detached otherwise.
    /// Signals blocked in the calling thread and the threads it started
    /// before are not seen.
    pub fn serve_until_signal(self) -> io::Result<Ended> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let stop_listening = signals.handle();
        let detacher = self.detacher()?;
        let listener = std::thread::Builder::new()
            .name("fuse-blk-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    log::info!(
                        "signal {signal}: detaching {} once nothing uses it",
                        detacher.device_path().display()
                    );
                    match detacher.detach_when_unused() {
                        Ok(()) => return,
                        Err(e) => {
                            log::error!("detaching {}: {e}", detacher.device_path().display())
                        }
                    }
                }
            })?;
        let ended = self.wait();
        stop_listening.close();
        let _ = listener.join();
        ended
    }
}

/// Changes the size of an [`AttachedDevice`] while it serves (online
/// resize), from any thread, one change at a time:
/// [`resize`](Resizer::resize) asks the handler
/// ([`BlockDevice::resize`]) and then shows the new size to the kernel;
/// [`announce`](Resizer::announce) is for a handler whose size changed by
/// itself. Either way the kernel sends a change uevent, and a file system
/// on the device can then be grown (`resize2fs`, `xfs_growfs`).
#[derive(Clone)]
pub struct Resizer {
    kind: ResizerKind,
    device_path: PathBuf,
}

#[derive(Clone)]
enum ResizerKind {
    Stock(fuse_blk_loop::Detacher),
    Kmod(fuse_blk_kmod::Resizer),
}

impl Resizer {
    /// The size the device has now, in bytes.
    pub fn size(&self) -> u64 {
        match &self.kind {
            ResizerKind::Stock(stock) => stock.size(),
            ResizerKind::Kmod(kmod) => kmod.size(),
        }
    }

    /// Has the handler serve `size` bytes (a non-zero multiple of the
    /// logical block size) and the device show them. Shrinking a device
    /// that is mounted or held exclusively is refused ([`busy::in_use`]):
    /// the end of its file system could be cut off, and no file system
    /// here can be shrunk while mounted.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        if size < self.size() && busy::in_use(&self.device_path) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use (mounted?); shrinking it could cut off its file system, so unmount it first",
                    self.device_path.display()
                ),
            ));
        }
        match &self.kind {
            ResizerKind::Stock(stock) => stock.resize(size),
            ResizerKind::Kmod(kmod) => kmod.resize(size),
        }
    }

    /// The handler serves `size` bytes now (it grew or was grown by the
    /// program that attached it): the device shows them.
    pub fn announce(&self, size: u64) -> io::Result<()> {
        match &self.kind {
            ResizerKind::Stock(stock) => stock.announce_size(size),
            ResizerKind::Kmod(kmod) => kmod.announce(size),
        }
    }
}

/// Detaches an [`AttachedDevice`] from any thread.
#[derive(Clone)]
pub struct Detacher {
    kind: DetacherKind,
    device_path: PathBuf,
}

#[derive(Clone)]
enum DetacherKind {
    Stock(fuse_blk_loop::Detacher),
    Kmod(fuse_blk_kmod::Destroyer),
}

impl Detacher {
    /// The block device this detaches.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// The stock path's own handle, which can also hand the device's FUSE
    /// connection over to another daemon; `None` for a module device.
    pub fn stock(&self) -> Option<&fuse_blk_loop::Detacher> {
        match &self.kind {
            DetacherKind::Stock(detacher) => Some(detacher),
            DetacherKind::Kmod(_) => None,
        }
    }

    /// Flushes and detaches the device; refuses while it is mounted or
    /// held exclusively ([`busy::in_use`]), and then nothing changes.
    pub fn detach(&self) -> io::Result<()> {
        if busy::in_use(&self.device_path) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use (mounted?); unmount it first",
                    self.device_path.display()
                ),
            ));
        }
        self.detach_when_unused()
    }

    /// Detaches the device once nothing uses it any more: the device keeps
    /// being served until then, so nothing written to it is lost. On the
    /// stock path this returns at once (the loop driver unbinds the device
    /// at its last close); with the module it waits.
    pub fn detach_when_unused(&self) -> io::Result<()> {
        match &self.kind {
            DetacherKind::Stock(detacher) => detacher.detach(),
            DetacherKind::Kmod(destroyer) => {
                if busy::in_use(&self.device_path) {
                    log::info!(
                        "{} is in use; detaching once it is not",
                        self.device_path.display()
                    );
                    while busy::in_use(&self.device_path) {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                flush(&self.device_path);
                destroyer.destroy()
            }
        }
    }
}

/// Writes back what the kernel caches for `device` and flushes the handler.
fn flush(device: &Path) {
    if let Err(e) = std::fs::File::open(device).and_then(|f| f.sync_all()) {
        log::warn!("flushing {}: {e}", device.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_made() {
        struct Empty;
        impl BlockDevice for Empty {
            fn geometry(&self) -> Geometry {
                Geometry::new(1 << 20, 512)
            }
            fn read(&self, _: &Request, _: u64, _: u32, reply: ReplyData) {
                reply.error(libc::EIO);
            }
            fn write(&self, _: &Request, _: u64, _: &[u8], _: bool, reply: ReplyWrite) {
                reply.error(libc::EIO);
            }
        }
        for bad in ["", "a/b", "-x", ".hidden", &"n".repeat(49), "sp ace"] {
            let error = attach(Arc::new(Empty), &AttachOptions::new(bad))
                .err()
                .expect("a bad name is refused");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(error.to_string().starts_with("invalid name"), "{error}");
        }
        for good in ["zeros", "a.b_c-1", &"n".repeat(48)] {
            assert_eq!(validate_name(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn a_bad_geometry_is_refused_and_leaves_nothing() {
        struct Odd;
        impl BlockDevice for Odd {
            fn geometry(&self) -> Geometry {
                Geometry::new(1000, 512)
            }
            fn read(&self, _: &Request, _: u64, _: u32, reply: ReplyData) {
                reply.error(libc::EIO);
            }
            fn write(&self, _: &Request, _: u64, _: &[u8], _: bool, reply: ReplyWrite) {
                reply.error(libc::EIO);
            }
        }
        let error = attach(Arc::new(Odd), &AttachOptions::new("odd"))
            .err()
            .expect("a size that is not a multiple of the block size");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            error.to_string(),
            "size 1000 is not a multiple of the block size 512"
        );
        // The stock path's mount point, made before the handler is asked,
        // is gone again.
        let ours = format!("fuse-blk.odd.{}.", std::process::id());
        let left: Vec<String> = std::fs::read_dir("/run")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&ours))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "left in /run");
    }

    #[test]
    fn auto_resolves_to_a_transport() {
        let resolved = Transport::Auto.resolve();
        assert_eq!(
            resolved,
            if fuse_blk_kmod::available() {
                Transport::Kmod
            } else {
                Transport::Loop
            }
        );
        assert_eq!(Transport::Loop.resolve(), Transport::Loop);
        assert_eq!(Transport::Kmod.resolve(), Transport::Kmod);
    }
}
