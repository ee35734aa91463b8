//! What `attach` serves: one of the backends of `fuse-blk-backends`,
//! `dm-user:NAME:SIZE`, a block device whose requests go to a dm-user
//! daemon on `/dev/dm-user/NAME` (compat/dm-user), or an NBD URI, an
//! export of an NBD server (userspace/nbd), `qcow2:PATH`, a qcow2
//! image (userspace/qcow2), or `rbd:POOL/IMAGE`, a Ceph RBD image
//! (userspace/rbd).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuse_blk::BlockDevice;
use fuse_blk_backends::{format_size, parse_size, BackendSpec};
use fuse_blk_dm_user::{DmUser, Policy};
use fuse_blk_nbd::{NbdDevice, ReconnectPolicy};
use parking_lot::Mutex;

use crate::AttachArgs;

pub enum Backend {
    Spec(BackendSpec),
    DmUser {
        name: String,
        size: u64,
        policy: Policy,
    },
    Nbd {
        uri: String,
        reconnect: ReconnectPolicy,
        /// Connections when the server allows several.
        connections: Option<usize>,
        /// Commands in flight per connection (the queue depth).
        max_in_flight: Option<usize>,
    },
    Qcow2 {
        path: PathBuf,
        options: fuse_blk_qcow2::Options,
    },
    Rbd {
        spec: fuse_blk_rbd::Spec,
        credentials: fuse_blk_rbd::Credentials,
    },
}

/// The dm-user node this process serves, ended by [`finish`].
static DM_USER: Mutex<Option<DmUser>> = Mutex::new(None);

/// The NBD device this process serves, whose connection state the
/// control socket's `status` reports.
static NBD: Mutex<Option<Arc<NbdDevice>>> = Mutex::new(None);

/// The RBD device this process serves, whose object size and requests
/// held by librbd the control socket's `status` reports.
static RBD: Mutex<Option<Arc<fuse_blk_rbd::RbdDevice>>> = Mutex::new(None);

/// How long a daemon has to close the node after its reads failed with
/// ENOTBLK before the node goes regardless.
const DM_USER_GRACE: Duration = Duration::from_secs(3);

impl Backend {
    pub fn parse(text: &str, args: &AttachArgs) -> Result<Backend, String> {
        if args.qcow2_compress && !text.starts_with("qcow2:") {
            return Err(format!(
                "{text}: --qcow2-compress is for qcow2: images only"
            ));
        }
        if fuse_blk_nbd::uri::is_nbd_uri(text) {
            fuse_blk_nbd::uri::check(text).map_err(|e| e.to_string())?;
            let default = ReconnectPolicy::default();
            let reconnect = ReconnectPolicy {
                timeout: Duration::from_millis(args.reconnect_timeout_ms.unwrap_or(30_000).into()),
                command_timeout: args
                    .command_timeout_ms
                    .map_or(default.command_timeout, |ms| {
                        Duration::from_millis(ms.into())
                    }),
                ..default
            };
            return Ok(Backend::Nbd {
                uri: text.to_owned(),
                reconnect,
                connections: args.queues.map(usize::from).or(args.threads()),
                max_in_flight: args.queue_depth.map(usize::from),
            });
        }
        if fuse_blk_rbd::spec::is_rbd_spec(text) {
            return Ok(Backend::Rbd {
                spec: fuse_blk_rbd::Spec::parse(text)?,
                credentials: fuse_blk_rbd::Credentials {
                    id: args.rbd_id.clone(),
                    conf: args.rbd_conf.clone(),
                    keyring: args.rbd_keyring.clone(),
                },
            });
        }
        if let Some(path) = text.strip_prefix("qcow2:") {
            if path.is_empty() {
                return Err("qcow2: needs a path".into());
            }
            let mut options = fuse_blk_qcow2::Options::default();
            if let Some(bytes) = args.qcow2_l2_cache {
                options.l2_cache_bytes = bytes;
            }
            if let Some(bytes) = args.qcow2_refcount_cache {
                options.refcount_cache_bytes = bytes;
            }
            options.compress_writes = args.qcow2_compress;
            if args.recover.is_some() {
                // A handoff's successor starts while the old daemon still
                // holds the image: its requests wait for the old one to
                // close it (as long as `handoff` waits for it to exit).
                options.wait_for_lock = Some(Duration::from_secs(60));
            }
            return Ok(Backend::Qcow2 {
                path: path.into(),
                options,
            });
        }
        let Some(rest) = text.strip_prefix("dm-user:") else {
            return text.parse().map(Backend::Spec).map_err(|e| format!("{e}"));
        };
        let (name, size) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{text}: dm-user takes dm-user:NAME:SIZE"))?;
        crate::state::validate_name(name)?;
        let size = parse_size(size).map_err(|e| format!("{text}: {e}"))?;
        if args.recover.is_some() {
            return Err(format!(
                "{text}: a dm-user device cannot be recovered by another daemon yet"
            ));
        }
        let policy = Policy {
            fail_inflight: args.fail_inflight,
            no_daemon_timeout: Duration::from_millis(
                args.recovery_timeout_ms.unwrap_or(30_000).into(),
            ),
        };
        Ok(Backend::DmUser {
            name: name.to_owned(),
            size,
            policy,
        })
    }

    /// The device's name when `--name` is not given: a dm-user device is
    /// known by its node's name.
    pub fn default_name(&self) -> Option<String> {
        match self {
            Backend::DmUser { name, .. } => Some(name.clone()),
            Backend::Spec(_)
            | Backend::Nbd { .. }
            | Backend::Qcow2 { .. }
            | Backend::Rbd { .. } => None,
        }
    }

    /// Whether requests wait for a program outside this one (a dm-user
    /// daemon that may not have opened the node yet): then nothing in
    /// `attach` may read the device, the kernel's partition scan included.
    pub fn waits_for_a_daemon(&self) -> bool {
        matches!(self, Backend::DmUser { .. })
    }

    pub fn open(&self, read_only: bool, block_size: u32) -> io::Result<Arc<dyn BlockDevice>> {
        match self {
            Backend::Spec(spec) => spec.open(read_only, block_size),
            Backend::Qcow2 { path, options } => Ok(Arc::new(fuse_blk_qcow2::Qcow2Device::open(
                path, read_only, block_size, options,
            )?)),
            Backend::Rbd { spec, credentials } => {
                let device = Arc::new(fuse_blk_rbd::RbdDevice::open(
                    spec,
                    credentials,
                    read_only,
                    block_size,
                )?);
                *RBD.lock() = Some(device.clone());
                Ok(device)
            }
            Backend::Nbd {
                uri,
                reconnect,
                connections,
                max_in_flight,
            } => {
                let mut options = fuse_blk_nbd::Options::new(read_only, block_size);
                options.reconnect = *reconnect;
                if let Some(connections) = connections {
                    options.connections = *connections;
                }
                if let Some(max_in_flight) = max_in_flight {
                    options.max_in_flight = *max_in_flight;
                }
                let device = Arc::new(NbdDevice::connect(uri, &options)?);
                *NBD.lock() = Some(device.clone());
                Ok(device)
            }
            Backend::DmUser { name, size, policy } => {
                // Read-only: the block device refuses writes, which never
                // reach the node's daemon.
                let dm_user = DmUser::create(name, *size, block_size, read_only, *policy)
                    .map_err(|e| io::Error::new(e.kind(), format!("dm-user: {e}")))?;
                log::info!("dm-user: {} serves the device", dm_user.node().display());
                let device = dm_user.device();
                *DM_USER.lock() = Some(dm_user);
                Ok(device)
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Spec(spec) => spec.fmt(f),
            Backend::Nbd { uri, .. } => f.write_str(uri),
            Backend::Qcow2 { path, .. } => write!(f, "qcow2:{}", path.display()),
            Backend::Rbd { spec, .. } => spec.fmt(f),
            Backend::DmUser { name, size, .. } => {
                write!(f, "dm-user:{name}:{}", format_size(*size))
            }
        }
    }
}

/// Ends the dm-user node of this process, if any: its daemons' reads fail
/// with ENOTBLK, and the node goes once they have closed it.
pub fn finish() {
    let dm_user = DM_USER.lock().take();
    if let Some(dm_user) = dm_user {
        dm_user.finish(DM_USER_GRACE);
    }
}

/// How many times this process's connections to its NBD server were made
/// again, each reissuing the commands that waited for it (`stats`); None
/// when it serves no NBD export.
pub fn reconnections() -> Option<u64> {
    NBD.lock().as_ref().map(|device| device.reconnections())
}

/// The state of this process's connection to its NBD server
/// (`connected`, `reconnecting for 2.1s`, `down for 40.0s`), or of its
/// RBD image (`4 MiB objects, 3 in flight`); None when it serves neither.
pub fn connection_status() -> Option<String> {
    let nbd = NBD
        .lock()
        .as_ref()
        .map(|device| device.status().to_string());
    nbd.or_else(|| RBD.lock().as_ref().map(|device| device.status()))
}
