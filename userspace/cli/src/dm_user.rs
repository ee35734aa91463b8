//! `attach --transport dm-user BACKEND`: the backend's handler serves a
//! dm-user node as a dm-user daemon (compat/dm-user `channel.rs`, one
//! descriptor per queue). Where the kernel has dm-user's own target, the
//! node is that target's, made here with dmsetup, and the user gets
//! `/dev/mapper/NAME`. Elsewhere the bridge stands in: this daemon serves
//! the node through CUSE and the bridge's fuse-blk device (module or stock
//! path), whose path the user gets; the handler serves the node from a
//! child process (see [`on_bridge`] for why not a thread), started again
//! when it dies and replaced by `handoff`.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_blk::BlockDevice;
use fuse_blk_attach::{busy, AttachOptions, AttachedDevice, Ended};
use fuse_blk_dm_user::channel::{self, Server, Stopper};
use fuse_blk_dm_user::target::{self, Target};
use fuse_blk_dm_user::{cuse, DmUser, Policy, SECTOR};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};

/// `list`'s transport for a device on dm-user's own target.
pub const ON_TARGET: &str = "dm-user";
/// `list`'s transport for a device on the bridge.
pub const ON_BRIDGE: &str = "dm-user+bridge";

/// The largest message served; larger ones are answered ERROR. dm-user
/// sends a bio whole, and a device-mapper device without devices below
/// takes bios of up to 1.25 MiB unless its `max_sectors_kb` is raised.
/// Each descriptor's buffer is this large, mapped and touched as used.
const MAX_MESSAGE: u32 = 4 << 20;

/// How long the node stays for a daemon to close it when the bridge ends.
const BRIDGE_GRACE: Duration = Duration::from_secs(3);

/// The option that makes `attach` the bridge's child: it serves the
/// backend on the node named, and says `ok` (or `error MESSAGE`) on
/// stdout once its descriptors are open.
pub const SERVE_NODE_OPTION: &str = "--serve-dm-user-node";

/// The control command that replaces the bridge's child by one started
/// from the program named after it (`handoff-child EXE`).
pub const HANDOFF_CHILD: &str = "handoff-child";

/// The control command with which the successor of a daemon on dm-user's
/// target, serving the node already, has the daemon stop serving it.
pub const RETIRE: &str = "retire-dm-user";

/// How often the bridge looks whether its child is still there.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// The wait before the first new child after one died, doubled for each
/// further one up to [`LAST_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const LAST_BACKOFF: Duration = Duration::from_secs(2);
/// A child that served this long died of something other than the way it
/// starts: the next one is started after [`FIRST_BACKOFF`] again.
const STEADY: Duration = Duration::from_secs(10);
/// Children in a row that died before serving, after which no more are
/// started (requests then fail after `--recovery-timeout-ms`).
const GIVE_UP_AFTER: u32 = 5;
/// How long a child being replaced has to answer what it read and exit
/// after SIGTERM before it is killed (its descriptors' messages are queued
/// again either way).
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// What wakes a worker of a child being replaced out of read(2) (SIGTERM
/// stays blocked in every thread, received by one of its own).
const WAKE_SIGNAL: Signal = Signal::SIGUSR1;

/// How a handler is set to serve.
pub struct Setup<'a> {
    pub name: &'a str,
    /// Descriptors open on the node, each served by a thread of its own.
    pub descriptors: u16,
    /// The bridge's fuse-blk device (used only where the bridge stands in).
    pub bridge_device: AttachOptions,
    /// The bridge's rule for requests while no daemon has the node open.
    pub bridge_policy: Policy,
    /// This daemon's own `attach` arguments, which its child on the bridge
    /// is started with.
    pub attach_args: Vec<OsString>,
    /// Whether the handler's contents live in its process (`mem:`): on the
    /// bridge a new child would serve an empty device, so none is started
    /// after a death, and `handoff` is refused.
    pub contents_in_process: bool,
}

/// A handler serving a dm-user node, and what made the node.
pub struct Serving {
    carrier: Carrier,
}

enum Carrier {
    Target {
        target: Arc<Target>,
        server: JoinHandle<io::Result<()>>,
        retiring: Retiring,
        /// Served after another daemon (handoff, recovery): the target is
        /// not this process's to remove when it cannot go on.
        taken_over: bool,
    },
    Bridge(Box<Bridged>),
}

/// Stops this daemon's server on dm-user's target once a successor serves
/// the node (handoff): its workers stop reading, answer what they read,
/// and the daemon ends without removing the target.
#[derive(Clone)]
pub struct Retiring {
    stopper: Stopper,
    handed_over: Arc<AtomicBool>,
}

impl Retiring {
    fn retire(&self) -> Result<(), String> {
        if self.handed_over.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        log::info!(
            "dm-user: another daemon serves the node: answering what was read, then exiting"
        );
        let stopper = self.stopper.clone();
        std::thread::Builder::new()
            .name("dm-user-stop".into())
            .spawn(move || loop {
                stopper.stop(WAKE_SIGNAL);
                std::thread::sleep(Duration::from_millis(20));
            })
            .map(drop)
            .map_err(|e| format!("starting the thread that stops the server: {e}"))
    }

    fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }
}

/// The bridge's node, the fuse-blk device it serves, and the children
/// that serve the node with the handler.
struct Bridged {
    device: AttachedDevice,
    bridge: DmUser,
    children: Arc<Children>,
    supervisor: JoinHandle<()>,
}

/// The bridge's child serving the node, and what starts another: the
/// supervisor thread when it dies, `handoff` to replace it.
pub struct Children {
    node: PathBuf,
    attach_args: Vec<OsString>,
    contents_in_process: bool,
    state: Mutex<ChildState>,
    /// Wakes the supervisor: the device is ending, or a handoff replaced
    /// the child.
    wake: Condvar,
    /// The device is detached: no child is started any more.
    ending: AtomicBool,
}

struct ChildState {
    /// None while a new one is waited for (after a death).
    current: Option<Child>,
    started: Instant,
    /// The program children are started from: this one's, or the one a
    /// handoff named (an upgraded fuse-blk).
    exe: PathBuf,
}

/// Starts serving `handler` on a new dm-user node; nothing is left behind
/// on error, which is one line.
pub fn start(handler: Arc<dyn BlockDevice>, setup: Setup<'_>) -> Result<Serving, String> {
    if target::available() {
        return on_target(handler, &setup);
    }
    if !Path::new(cuse::CUSE_PATH).exists() {
        return Err(format!(
            "--transport dm-user needs dm-user's device-mapper target (module dm-user) or, for the bridge, the cuse kernel module (modprobe cuse): this kernel has neither ({} and /sys/module/dm_user are missing)",
            cuse::CUSE_PATH
        ));
    }
    on_bridge(handler, setup)
}

fn on_target(handler: Arc<dyn BlockDevice>, setup: &Setup<'_>) -> Result<Serving, String> {
    let geometry = handler.geometry();
    if u64::from(geometry.logical_block_size) != SECTOR {
        return Err(format!(
            "dm-user's target sends requests in 512-byte sectors: --block-size {} is not offered on it",
            geometry.logical_block_size
        ));
    }
    let target = Arc::new(
        Target::create(setup.name, geometry.size, geometry.read_only).map_err(|e| e.to_string())?,
    );
    let undo = |e: String| {
        let _ = target.remove();
        e
    };
    // The descriptors are open before the table is live: whatever reads
    // the new device first (udev's probe) finds a daemon, instead of
    // waiting dm-user's 4 s for one and failing.
    let node = target.node();
    let descriptors = channel::open_node(&node, setup.descriptors)
        .map_err(|e| e.to_string())
        .map_err(undo)?;
    let (server, retiring) = start_server(handler, descriptors).map_err(undo)?;
    if let Err(e) = target.resume() {
        // Removing it ends the server's reads with ENOTBLK.
        let message = undo(e.to_string());
        let _ = server.join();
        return Err(message);
    }
    log::info!(
        "dm-user: {} served on {}",
        target.device_path().display(),
        node.display()
    );
    Ok(Serving {
        carrier: Carrier::Target {
            target,
            server,
            retiring,
            taken_over: false,
        },
    })
}

/// `handoff` (or `attach --recover` after a crash) of a device on dm-user's
/// target: serves the target's node with `handler`, beside the daemon that
/// serves it now, which is then asked to stop ([`RETIRE`]). dm-user lets
/// any number of descriptors be open; what a closing one held would fail,
/// so the old daemon answers everything it read before it closes.
pub fn take_over(
    name: &str,
    handler: Arc<dyn BlockDevice>,
    descriptors: u16,
) -> Result<Serving, String> {
    let target = Arc::new(Target::existing(name));
    let files = channel::open_node(&target.node(), descriptors).map_err(|e| e.to_string())?;
    let (server, retiring) = start_server(handler, files)?;
    log::info!(
        "dm-user: {} served by pid {}",
        target.node().display(),
        std::process::id()
    );
    Ok(Serving {
        carrier: Carrier::Target {
            target,
            server,
            retiring,
            taken_over: true,
        },
    })
}

/// The bridge: this process serves the node through CUSE, and a child
/// process serves the node with the handler. Not a thread of this process:
/// a thread's read of the node is a request to this process's own CUSE
/// server, and once that server has taken it (a read parked until a
/// message comes), the kernel waits for its answer uninterruptibly, even
/// on SIGKILL; the descriptor of /dev/cuse whose closing would end the
/// wait is closed only once every thread has exited. A `kill -9` of the
/// daemon would leave it stuck for ever, holding node and device. In a
/// child, the daemon's death closes /dev/cuse and the child's reads fail;
/// the child's death interrupts its reads (FUSE_INTERRUPT) and the bridge
/// queues what it held again.
fn on_bridge(handler: Arc<dyn BlockDevice>, setup: Setup<'_>) -> Result<Serving, String> {
    let geometry = handler.geometry();
    // The child opens the backend itself (an image is locked while open).
    drop(handler);
    let bridge = DmUser::create(
        setup.name,
        geometry.size,
        geometry.logical_block_size,
        geometry.read_only,
        setup.bridge_policy,
    )
    .map_err(|e| format!("dm-user: {e}"))?;
    // Found now: once an upgrade replaced the program, this process's own
    // path names the deleted one.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            bridge.finish(Duration::ZERO);
            return Err(format!("finding myself: {e}"));
        }
    };
    let child = match start_child(&exe, bridge.node(), &setup.attach_args) {
        Ok(child) => child,
        Err(e) => {
            bridge.finish(Duration::ZERO);
            return Err(e);
        }
    };
    let children = Arc::new(Children {
        node: bridge.node().to_owned(),
        attach_args: setup.attach_args,
        contents_in_process: setup.contents_in_process,
        state: Mutex::new(ChildState {
            current: Some(child),
            started: Instant::now(),
            exe,
        }),
        wake: Condvar::new(),
        ending: AtomicBool::new(false),
    });
    // The child reads the node already: the kernel's partition scan of
    // the new device is answered.
    let device = match fuse_blk_attach::attach(bridge.device(), &setup.bridge_device) {
        Ok(device) => device,
        Err(e) => {
            end_children(&children, bridge, None);
            return Err(e.to_string());
        }
    };
    let watched = children.clone();
    match std::thread::Builder::new()
        .name("dm-user-child".into())
        .spawn(move || supervise(&watched))
    {
        Ok(supervisor) => Ok(Serving {
            carrier: Carrier::Bridge(Box::new(Bridged {
                device,
                bridge,
                children,
                supervisor,
            })),
        }),
        Err(e) => {
            drop(device);
            end_children(&children, bridge, None);
            Err(format!(
                "starting the thread watching the dm-user daemon: {e}"
            ))
        }
    }
}

/// Ends the bridge once its device is gone: no more children are started,
/// the children's reads end with ENOTBLK, and they exit.
fn end_children(children: &Children, bridge: DmUser, supervisor: Option<JoinHandle<()>>) {
    children.ending.store(true, Ordering::Release);
    children.wake.notify_all();
    bridge.finish(BRIDGE_GRACE);
    if let Some(supervisor) = supervisor {
        let _ = supervisor.join();
    }
    let child = children.state.lock().current.take();
    match child.map(|mut child| child.wait()) {
        Some(Ok(status)) if !status.success() => {
            log::warn!("dm-user: the daemon serving the node exited ({status})")
        }
        Some(Err(e)) => log::warn!("dm-user: waiting for the daemon serving the node: {e}"),
        _ => {}
    }
}

/// The supervisor thread: when the child dies while the device is
/// attached, starts another, after a wait that doubles for each death in a
/// row (what the dead one held is queued again by the bridge, for the next
/// one). Gives up after [`GIVE_UP_AFTER`] children in a row that died
/// before serving; a handoff may still start one.
fn supervise(children: &Children) {
    let mut backoff = FIRST_BACKOFF;
    let mut state = children.state.lock();
    loop {
        let (pid, status) = loop {
            if children.ending() {
                return;
            }
            if let Some(child) = state.current.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => break (child.id(), status.to_string()),
                    Ok(None) => {}
                    Err(e) => break (child.id(), format!("waiting for it failed: {e}")),
                }
            }
            children.wake.wait_for(&mut state, WATCH_INTERVAL);
        };
        state.current = None;
        let node = children.node.display();
        if children.contents_in_process {
            log::error!(
                "dm-user: the daemon serving {node} (pid {pid}) exited ({status}); the device's contents were in it: no other is started, requests fail after --recovery-timeout-ms"
            );
            while !children.ending() {
                children.wake.wait_for(&mut state, WATCH_INTERVAL);
            }
            return;
        }
        if state.started.elapsed() >= STEADY {
            backoff = FIRST_BACKOFF;
        }
        log::warn!(
            "dm-user: the daemon serving {node} (pid {pid}) exited ({status}); starting another in {backoff:?}"
        );
        let mut failures = 0;
        while state.current.is_none() {
            let deadline = Instant::now() + backoff;
            while !children.ending() && state.current.is_none() && Instant::now() < deadline {
                children.wake.wait_until(&mut state, deadline);
            }
            if children.ending() {
                return;
            }
            if state.current.is_some() {
                // A handoff started one meanwhile.
                break;
            }
            backoff = (backoff * 2).min(LAST_BACKOFF);
            match start_child(&state.exe, &children.node, &children.attach_args) {
                Ok(child) => {
                    log::info!("dm-user: pid {} serves {node} now", child.id());
                    state.current = Some(child);
                    state.started = Instant::now();
                }
                Err(e) => {
                    failures += 1;
                    log::error!("dm-user: starting another daemon for {node}: {e}");
                    if failures >= GIVE_UP_AFTER {
                        log::error!(
                            "dm-user: {failures} daemons in a row ended before serving {node}: no more are started; requests fail after --recovery-timeout-ms (fuse-blk handoff starts one)"
                        );
                        while !children.ending() && state.current.is_none() {
                            children.wake.wait_for(&mut state, WATCH_INTERVAL);
                        }
                    }
                }
            }
        }
    }
}

impl Children {
    fn ending(&self) -> bool {
        self.ending.load(Ordering::Acquire)
    }

    /// Starts a child from `exe` and, once it serves, ends the one it
    /// replaces gracefully: SIGTERM, on which it stops reading, answers
    /// what it read and exits; killed if it has not within
    /// [`RETIRE_TIMEOUT`] (the bridge queues again what its descriptors
    /// held, so even that loses nothing).
    fn hand_over(&self, exe: &Path) -> Result<(), String> {
        if self.contents_in_process {
            return Err(
                "a mem: device's contents live in its dm-user daemon and cannot be handed over"
                    .into(),
            );
        }
        let mut state = self.state.lock();
        if self.ending() {
            return Err("the device is being detached".into());
        }
        let child = start_child(exe, &self.node, &self.attach_args)?;
        log::info!(
            "dm-user: handoff: pid {} ({}) serves {}",
            child.id(),
            exe.display(),
            self.node.display()
        );
        let old = state.current.replace(child);
        state.exe = exe.to_owned();
        state.started = Instant::now();
        drop(state);
        self.wake.notify_all();
        if let Some(old) = old {
            retire(old);
        }
        Ok(())
    }
}

/// Ends a replaced child: SIGTERM, then SIGKILL after [`RETIRE_TIMEOUT`].
fn retire(mut child: Child) {
    let pid = child.id();
    // Not reaped yet, so the pid is still this child's.
    if let Err(e) = signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
        log::warn!("dm-user: SIGTERM to the replaced daemon (pid {pid}): {e}");
    }
    let deadline = Instant::now() + RETIRE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                log::warn!("dm-user: the replaced daemon (pid {pid}) exited ({status})");
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                log::warn!(
                    "dm-user: the replaced daemon (pid {pid}) did not exit within {RETIRE_TIMEOUT:?} of SIGTERM: killed"
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Err(e) => {
                log::warn!("dm-user: waiting for the replaced daemon (pid {pid}): {e}");
                return;
            }
        }
    }
}

/// Starts `exe` (this program, or the one a handoff named) as the bridge's
/// child, serving `node`, and waits until it has its descriptors open (or
/// has failed).
fn start_child(exe: &Path, node: &Path, attach_args: &[OsString]) -> Result<Child, String> {
    let args = attach_args
        .iter()
        .filter(|arg| !arg.to_string_lossy().starts_with("--ready-fd"));
    // Its stderr is this daemon's (the log); its signal mask too, which
    // blocks the signals that detach: the daemon ends it through the
    // bridge, after the device is gone (SIGTERM, which a child takes as
    // the end of its turn, is received by a thread of its own).
    let mut child = Command::new(exe)
        .args(args)
        .arg(SERVE_NODE_OPTION)
        .arg(node)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the dm-user daemon {}: {e}", exe.display()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let _ = BufReader::new(stdout).read_line(&mut line);
    match line.trim_end() {
        "ok" => Ok(child),
        said => {
            let _ = child.kill();
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(match said.strip_prefix("error ") {
                Some(message) => message.to_owned(),
                None => format!("the dm-user daemon exited ({status}) before serving"),
            })
        }
    }
}

/// The bridge's child: serves `backend` on `node` until the bridge ends
/// (ENOTBLK), having said `ok` on stdout once its descriptors were open.
/// SIGTERM (from a handoff that replaces it) makes it stop reading, answer
/// what it read, and exit 0.
pub fn serve_as_child(
    node: &Path,
    backend: &crate::backend::Backend,
    read_only: bool,
    block_size: u32,
    descriptors: u16,
) -> Result<(), String> {
    let ready = || -> Result<Server, String> {
        // Before any thread exists, so that every thread inherits the mask.
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        term.thread_block()
            .map_err(|e| format!("blocking SIGTERM: {e}"))?;
        let handler = backend
            .open(read_only, block_size)
            .map_err(|e| e.to_string())?;
        let files = channel::open_node(node, descriptors).map_err(|e| e.to_string())?;
        let server = Server::new(handler, files, MAX_MESSAGE).map_err(|e| e.to_string())?;
        stop_on_sigterm(term, server.stopper())?;
        Ok(server)
    };
    let mut stdout = io::stdout();
    match ready() {
        Ok(server) => {
            let _ = writeln!(stdout, "ok").and_then(|()| stdout.flush());
            server.serve().map_err(|e| format!("dm-user daemon: {e}"))?;
            log::debug!("dm-user: pid {} ends", std::process::id());
            Ok(())
        }
        Err(e) => {
            let _ = writeln!(stdout, "error {e}").and_then(|()| stdout.flush());
            Err(e)
        }
    }
}

/// Installs the handler of [`WAKE_SIGNAL`], without SA_RESTART: the signal
/// ends a read(2) of the node with EINTR.
fn install_wake_handler() -> Result<(), String> {
    extern "C" fn woken(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(woken),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, which is async-signal-safe.
    unsafe { signal::sigaction(WAKE_SIGNAL, &action) }
        .map(drop)
        .map_err(|e| format!("installing the {WAKE_SIGNAL} handler: {e}"))
}

/// A thread that waits for SIGTERM (blocked in every thread) and then
/// stops the server, again and again until the process exits: a worker
/// that was about to read when it was woken notices at the next round.
fn stop_on_sigterm(term: SigSet, stopper: Stopper) -> Result<(), String> {
    install_wake_handler()?;
    std::thread::Builder::new()
        .name("dm-user-stop".into())
        .spawn(move || {
            if term.wait().is_err() {
                return;
            }
            log::info!(
                "dm-user: pid {}: SIGTERM: answering what was read, then exiting",
                std::process::id()
            );
            loop {
                stopper.stop(WAKE_SIGNAL);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .map(drop)
        .map_err(|e| format!("starting the signal thread: {e}"))
}

fn start_server(
    handler: Arc<dyn BlockDevice>,
    descriptors: Vec<std::fs::File>,
) -> Result<(JoinHandle<io::Result<()>>, Retiring), String> {
    install_wake_handler()?;
    let server = Server::new(handler, descriptors, MAX_MESSAGE).map_err(|e| e.to_string())?;
    let retiring = Retiring {
        stopper: server.stopper(),
        handed_over: Arc::new(AtomicBool::new(false)),
    };
    let thread = std::thread::Builder::new()
        .name("dm-user".into())
        .spawn(move || server.serve())
        .map_err(|e| format!("starting the dm-user daemon's thread: {e}"))?;
    Ok((thread, retiring))
}

impl Serving {
    /// `list`'s transport.
    pub fn transport(&self) -> &'static str {
        match self.carrier {
            Carrier::Target { .. } => ON_TARGET,
            Carrier::Bridge(_) => ON_BRIDGE,
        }
    }

    /// The block device the user gets.
    pub fn device_path(&self) -> PathBuf {
        match &self.carrier {
            Carrier::Target { target, .. } => target.device_path(),
            Carrier::Bridge(bridged) => bridged.device.device_path().to_owned(),
        }
    }

    /// The bridge's device, for what is recorded of it.
    pub fn bridge_device(&self) -> Option<&AttachedDevice> {
        match &self.carrier {
            Carrier::Target { .. } => None,
            Carrier::Bridge(bridged) => Some(&bridged.device),
        }
    }

    pub fn detacher(&self) -> io::Result<Detacher> {
        Ok(match &self.carrier {
            Carrier::Target {
                target, retiring, ..
            } => Detacher::Target {
                target: target.clone(),
                retiring: retiring.clone(),
            },
            Carrier::Bridge(bridged) => Detacher::Bridge {
                device: bridged.device.detacher()?,
                children: bridged.children.clone(),
            },
        })
    }

    /// Removes the device and ends the server, when the daemon cannot go
    /// on (nothing has used the device yet).
    pub fn abandon(self) {
        match self.carrier {
            Carrier::Target {
                target,
                server,
                retiring,
                taken_over,
            } => {
                if taken_over {
                    // The target stays for the next daemon.
                    let _ = retiring.retire();
                } else if let Err(e) = target.remove() {
                    log::error!("dm-user: removing {}: {e}", target.name());
                }
                let _ = join(server);
            }
            Carrier::Bridge(bridged) => {
                let Bridged {
                    device,
                    bridge,
                    children,
                    supervisor,
                } = *bridged;
                drop(device);
                end_children(&children, bridge, Some(supervisor));
            }
        }
    }

    /// Serves until the target is removed or the bridge's device detached.
    pub fn wait(self) -> io::Result<Ended> {
        match self.carrier {
            Carrier::Target {
                target,
                server,
                retiring,
                ..
            } => {
                let served = join(server);
                if retiring.handed_over() {
                    return served.map(|()| Ended::HandedOver);
                }
                if served.is_err() {
                    // The daemon ends with the target still there: without
                    // it the target's I/O would fail.
                    if let Err(e) = target.remove() {
                        log::error!("dm-user: removing {}: {e}", target.name());
                    }
                }
                served.map(|()| Ended::Detached)
            }
            Carrier::Bridge(bridged) => {
                let Bridged {
                    device,
                    bridge,
                    children,
                    supervisor,
                } = *bridged;
                let ended = device.wait();
                // The device is gone: the child's reads end with ENOTBLK.
                end_children(&children, bridge, Some(supervisor));
                ended
            }
        }
    }
}

fn join(server: JoinHandle<io::Result<()>>) -> io::Result<()> {
    server
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the dm-user daemon's thread panicked")))
}

/// Detaches a device served on a dm-user node, from any thread.
#[derive(Clone)]
pub enum Detacher {
    Target {
        target: Arc<Target>,
        retiring: Retiring,
    },
    Bridge {
        device: fuse_blk_attach::Detacher,
        children: Arc<Children>,
    },
}

impl Detacher {
    /// Flushes and removes the device; refuses while it is mounted or held
    /// exclusively.
    pub fn detach(&self) -> io::Result<()> {
        match self {
            Detacher::Bridge { device, .. } => device.detach(),
            Detacher::Target { target, .. } => {
                let device = target.device_path();
                if busy::in_use(&device) {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "{} is in use (mounted?); unmount it first",
                            device.display()
                        ),
                    ));
                }
                remove_target(target)
            }
        }
    }

    /// Removes the device once nothing holds it any more.
    pub fn detach_when_unused(&self) -> io::Result<()> {
        match self {
            Detacher::Bridge { device, .. } => device.detach_when_unused(),
            Detacher::Target { target, .. } => {
                while busy::in_use(&target.device_path()) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                remove_target(target)
            }
        }
    }
}

impl Detacher {
    /// `handoff`: on the bridge, the child serving the node is replaced by
    /// one started from `exe` (the `handoff` command's program, an upgraded
    /// fuse-blk); the bridge, which stands in for dm-user's target, stays.
    pub fn hand_over_child(&self, exe: &Path) -> Result<(), String> {
        match self {
            Detacher::Bridge { children, .. } => children.hand_over(exe),
            Detacher::Target { .. } => Err(
                "a device on dm-user's own target is handed over by a new daemon (fuse-blk handoff)"
                    .into(),
            ),
        }
    }

    /// [`RETIRE`]: a successor serves the node of this device on dm-user's
    /// target; this daemon stops serving it and exits.
    pub fn retire(&self) -> Result<(), String> {
        match self {
            Detacher::Target { retiring, .. } => retiring.retire(),
            Detacher::Bridge { .. } => {
                Err("a device on the dm-user bridge hands over its child (handoff-child)".into())
            }
        }
    }
}

/// Writes back what the kernel caches for the target, flushes the handler
/// and removes the target; the server then ends on ENOTBLK.
fn remove_target(target: &Target) -> io::Result<()> {
    let device = target.device_path();
    // Opened read-only: closing a descriptor opened for writing has udev
    // probe the device again, which would hold it open as it is removed.
    if let Err(e) = std::fs::File::open(&device).and_then(|f| f.sync_all()) {
        log::warn!("flushing {}: {e}", device.display());
    }
    target.remove()
}

/// Removes what the dead daemon of a device on dm-user's target left: the
/// target (its I/O fails without a daemon).
pub fn remove_left_target(name: &str) {
    if let Err(e) = Target::existing(name).remove() {
        log::warn!("{e}");
    }
}

/// `fuse-blk handoff` of a device on the bridge: asks its daemon to
/// replace the child serving the node with one running this program, so
/// that an upgraded fuse-blk takes over the handler. The daemon answers
/// once the new child serves and the old one has ended.
pub fn hand_over(dir: &crate::state::DeviceDir, name: &str) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("handoff needs root".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
    let exe = exe
        .to_str()
        .ok_or_else(|| format!("{}: not a UTF-8 path", exe.display()))?;
    crate::daemon::request(dir, &format!("{HANDOFF_CHILD} {exe}"))
        .map_err(|e| format!("{name}: {e}"))
}
