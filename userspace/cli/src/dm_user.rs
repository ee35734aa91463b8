//! `attach --transport dm-user BACKEND`: the backend's handler serves a
//! dm-user node as a dm-user daemon (compat/dm-user `channel.rs`, one
//! descriptor per queue). Where the kernel has dm-user's own target, the
//! node is that target's, made here with dmsetup, and the user gets
//! `/dev/mapper/NAME`. Elsewhere the bridge stands in, in this same
//! process: the node served through CUSE, and the bridge's fuse-blk
//! device (module or stock path), whose path the user gets.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_blk::stats::{Snapshot, Stats};
use fuse_blk::BlockDevice;
use fuse_blk_attach::{busy, AttachOptions, AttachedDevice, Ended};
use fuse_blk_dm_user::channel::{self, Server};
use fuse_blk_dm_user::target::{self, Target};
use fuse_blk_dm_user::{cuse, DmUser, Policy, SECTOR};
use parking_lot::Mutex;

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

/// The counters of the handler this process serves on a dm-user node: on
/// the bridge the process also runs the bridge's own session, whose
/// requests are the same ones again.
static SERVED: Mutex<Option<Arc<Stats>>> = Mutex::new(None);

/// The counters `stats` reports for this process, when it serves a
/// handler on a dm-user node.
pub fn snapshot() -> Option<Snapshot> {
    SERVED.lock().as_ref().map(|stats| stats.snapshot())
}

/// How a handler is set to serve.
pub struct Setup<'a> {
    pub name: &'a str,
    /// Descriptors open on the node, each served by a thread of its own.
    pub descriptors: u16,
    /// The bridge's fuse-blk device (used only where the bridge stands in).
    pub bridge_device: AttachOptions,
    /// The bridge's rule for requests while no daemon has the node open.
    pub bridge_policy: Policy,
}

/// A handler serving a dm-user node, and what made the node.
pub struct Serving {
    carrier: Carrier,
    server: JoinHandle<io::Result<()>>,
}

enum Carrier {
    Target(Arc<Target>),
    Bridge(Box<Bridged>),
}

/// The bridge's node and the fuse-blk device it serves.
struct Bridged {
    device: AttachedDevice,
    bridge: DmUser,
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
        carrier: Carrier::Target(target),
        server,
    })
}

fn on_bridge(handler: Arc<dyn BlockDevice>, setup: Setup<'_>) -> Result<Serving, String> {
    let geometry = handler.geometry();
    let bridge = DmUser::create(
        setup.name,
        geometry.size,
        geometry.logical_block_size,
        setup.bridge_policy,
    )
    .map_err(|e| format!("dm-user: {e}"))?;
    let descriptors = match channel::open_node(bridge.node(), setup.descriptors) {
        Ok(descriptors) => descriptors,
        Err(e) => {
            bridge.finish(Duration::ZERO);
            return Err(e.to_string());
        }
    };
    let server = match start_server(handler, descriptors) {
        Ok(server) => server,
        Err(e) => {
            bridge.finish(Duration::ZERO);
            return Err(e);
        }
    };
    // The server reads the node already: the kernel's partition scan of
    // the new device is answered.
    match fuse_blk_attach::attach(bridge.device(), &setup.bridge_device) {
        Ok(device) => Ok(Serving {
            carrier: Carrier::Bridge(Box::new(Bridged { device, bridge })),
            server,
        }),
        Err(e) => {
            // Ends the server's reads with ENOTBLK.
            bridge.finish(BRIDGE_GRACE);
            let _ = server.join();
            Err(e.to_string())
        }
    }
}

fn start_server(
    handler: Arc<dyn BlockDevice>,
    descriptors: Vec<std::fs::File>,
) -> Result<JoinHandle<io::Result<()>>, String> {
    let server = Server::new(handler, descriptors, MAX_MESSAGE).map_err(|e| e.to_string())?;
    *SERVED.lock() = Some(server.stats());
    std::thread::Builder::new()
        .name("dm-user".into())
        .spawn(move || server.serve())
        .map_err(|e| format!("starting the dm-user daemon's thread: {e}"))
}

impl Serving {
    /// `list`'s transport.
    pub fn transport(&self) -> &'static str {
        match self.carrier {
            Carrier::Target(_) => ON_TARGET,
            Carrier::Bridge(_) => ON_BRIDGE,
        }
    }

    /// The block device the user gets.
    pub fn device_path(&self) -> PathBuf {
        match &self.carrier {
            Carrier::Target(target) => target.device_path(),
            Carrier::Bridge(bridged) => bridged.device.device_path().to_owned(),
        }
    }

    /// The bridge's device, for what is recorded of it.
    pub fn bridge_device(&self) -> Option<&AttachedDevice> {
        match &self.carrier {
            Carrier::Target(_) => None,
            Carrier::Bridge(bridged) => Some(&bridged.device),
        }
    }

    pub fn detacher(&self) -> io::Result<Detacher> {
        Ok(match &self.carrier {
            Carrier::Target(target) => Detacher::Target(target.clone()),
            Carrier::Bridge(bridged) => Detacher::Bridge(bridged.device.detacher()?),
        })
    }

    /// Removes the device and ends the server, when the daemon cannot go
    /// on (nothing has used the device yet).
    pub fn abandon(self) {
        let Serving { carrier, server } = self;
        match carrier {
            Carrier::Target(target) => {
                if let Err(e) = target.remove() {
                    log::error!("dm-user: removing {}: {e}", target.name());
                }
            }
            Carrier::Bridge(bridged) => {
                let Bridged { device, bridge } = *bridged;
                drop(device);
                bridge.finish(BRIDGE_GRACE);
            }
        }
        let _ = join(server);
    }

    /// Serves until the target is removed or the bridge's device detached.
    pub fn wait(self) -> io::Result<Ended> {
        let Serving { carrier, server } = self;
        let ended = match carrier {
            Carrier::Target(target) => {
                let served = join(server);
                if served.is_err() {
                    // The daemon ends with the target still there: without
                    // it the target's I/O would fail.
                    if let Err(e) = target.remove() {
                        log::error!("dm-user: removing {}: {e}", target.name());
                    }
                }
                return served.map(|()| Ended::Detached);
            }
            Carrier::Bridge(bridged) => {
                let Bridged { device, bridge } = *bridged;
                let ended = device.wait();
                // The device is gone: the server's reads end with ENOTBLK.
                bridge.finish(BRIDGE_GRACE);
                ended
            }
        };
        join(server)?;
        ended
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
