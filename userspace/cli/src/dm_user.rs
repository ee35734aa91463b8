//! `attach --transport dm-user BACKEND`: the backend's handler serves a
//! dm-user node as a dm-user daemon (compat/dm-user `channel.rs`, one
//! descriptor per queue). Where the kernel has dm-user's own target, the
//! node is that target's, made here with dmsetup, and the user gets
//! `/dev/mapper/NAME`. Elsewhere the bridge stands in: this daemon serves
//! the node through CUSE and the bridge's fuse-blk device (module or stock
//! path), whose path the user gets; the handler serves the node from a
//! child process (see [`on_bridge`] for why not a thread).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_blk::BlockDevice;
use fuse_blk_attach::{busy, AttachOptions, AttachedDevice, Ended};
use fuse_blk_dm_user::channel::{self, Server};
use fuse_blk_dm_user::target::{self, Target};
use fuse_blk_dm_user::{cuse, DmUser, Policy, SECTOR};

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
}

/// A handler serving a dm-user node, and what made the node.
pub struct Serving {
    carrier: Carrier,
}

enum Carrier {
    Target {
        target: Arc<Target>,
        server: JoinHandle<io::Result<()>>,
    },
    Bridge(Box<Bridged>),
}

/// The bridge's node, the fuse-blk device it serves, and the child that
/// serves the node with the handler.
struct Bridged {
    device: AttachedDevice,
    bridge: DmUser,
    child: Child,
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
    let target = Arc::new(Target::create(setup.name, geometry.size).map_err(|e| e.to_string())?);
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
    let server = start_server(handler, descriptors).map_err(undo)?;
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
        carrier: Carrier::Target { target, server },
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
        setup.bridge_policy,
    )
    .map_err(|e| format!("dm-user: {e}"))?;
    let mut child = match start_child(bridge.node(), &setup.attach_args) {
        Ok(child) => child,
        Err(e) => {
            bridge.finish(Duration::ZERO);
            return Err(e);
        }
    };
    // The child reads the node already: the kernel's partition scan of
    // the new device is answered.
    match fuse_blk_attach::attach(bridge.device(), &setup.bridge_device) {
        Ok(device) => Ok(Serving {
            carrier: Carrier::Bridge(Box::new(Bridged {
                device,
                bridge,
                child,
            })),
        }),
        Err(e) => {
            // Ends the child's reads with ENOTBLK.
            bridge.finish(BRIDGE_GRACE);
            let _ = child.wait();
            Err(e.to_string())
        }
    }
}

/// Starts this program again as the bridge's child, serving `node`, and
/// waits until it has its descriptors open (or has failed).
fn start_child(node: &Path, attach_args: &[OsString]) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
    let args = attach_args
        .iter()
        .filter(|arg| !arg.to_string_lossy().starts_with("--ready-fd"));
    // Its stderr is this daemon's (the log); its signal mask too, which
    // blocks the signals that detach: the daemon ends it through the
    // bridge, after the device is gone.
    let mut child = Command::new(exe)
        .args(args)
        .arg(SERVE_NODE_OPTION)
        .arg(node)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the dm-user daemon: {e}"))?;
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
pub fn serve_as_child(
    node: &Path,
    backend: &crate::backend::Backend,
    block_size: u32,
    descriptors: u16,
) -> Result<(), String> {
    let ready = || -> Result<Server, String> {
        let handler = backend.open(false, block_size).map_err(|e| e.to_string())?;
        let files = channel::open_node(node, descriptors).map_err(|e| e.to_string())?;
        Server::new(handler, files, MAX_MESSAGE).map_err(|e| e.to_string())
    };
    let mut stdout = io::stdout();
    match ready() {
        Ok(server) => {
            let _ = writeln!(stdout, "ok").and_then(|()| stdout.flush());
            server.serve().map_err(|e| format!("dm-user daemon: {e}"))
        }
        Err(e) => {
            let _ = writeln!(stdout, "error {e}").and_then(|()| stdout.flush());
            Err(e)
        }
    }
}

fn start_server(
    handler: Arc<dyn BlockDevice>,
    descriptors: Vec<std::fs::File>,
) -> Result<JoinHandle<io::Result<()>>, String> {
    let server = Server::new(handler, descriptors, MAX_MESSAGE).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("dm-user".into())
        .spawn(move || server.serve())
        .map_err(|e| format!("starting the dm-user daemon's thread: {e}"))
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
            Carrier::Target { target, .. } => Detacher::Target(target.clone()),
            Carrier::Bridge(bridged) => Detacher::Bridge(bridged.device.detacher()?),
        })
    }

    /// Removes the device and ends the server, when the daemon cannot go
    /// on (nothing has used the device yet).
    pub fn abandon(self) {
        match self.carrier {
            Carrier::Target { target, server } => {
                if let Err(e) = target.remove() {
                    log::error!("dm-user: removing {}: {e}", target.name());
                }
                let _ = join(server);
            }
            Carrier::Bridge(bridged) => {
                let Bridged {
                    device,
                    bridge,
                    mut child,
                } = *bridged;
                drop(device);
                bridge.finish(BRIDGE_GRACE);
                let _ = child.wait();
            }
        }
    }

    /// Serves until the target is removed or the bridge's device detached.
    pub fn wait(self) -> io::Result<Ended> {
        match self.carrier {
            Carrier::Target { target, server } => {
                let served = join(server);
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
                    mut child,
                } = *bridged;
                let ended = device.wait();
                // The device is gone: the child's reads end with ENOTBLK.
                bridge.finish(BRIDGE_GRACE);
                match child.wait() {
                    Ok(status) if !status.success() => {
                        log::warn!("dm-user: the daemon serving the node exited ({status})")
                    }
                    Err(e) => log::warn!("dm-user: waiting for the daemon serving the node: {e}"),
                    Ok(_) => {}
                }
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
    Target(Arc<Target>),
    Bridge(fuse_blk_attach::Detacher),
}

impl Detacher {
    /// Flushes and removes the device; refuses while it is mounted or held
    /// exclusively.
    pub fn detach(&self) -> io::Result<()> {
        match self {
            Detacher::Bridge(detacher) => detacher.detach(),
            Detacher::Target(target) => {
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
            Detacher::Bridge(detacher) => detacher.detach_when_unused(),
            Detacher::Target(target) => {
                while busy::in_use(&target.device_path()) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                remove_target(target)
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
