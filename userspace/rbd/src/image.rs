//! A connection to a Ceph cluster with one RBD image open on it, owned
//! safely: closed in the right order when dropped.

use std::ffi::{c_int, CString};
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use crate::ffi::{self, ImageT, IoctxT, RadosT};
use crate::spec::Spec;

/// Who connects, as `rbd --id/--conf/--keyring` take it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The client's id (`admin` for `client.admin`); None: librados'
    /// default, `admin`.
    pub id: Option<String>,
    /// The configuration file; None: librados' search
    /// (`$CEPH_CONF`, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
    pub conf: Option<PathBuf>,
    /// The keyring; None: what the configuration names, else librados'
    /// defaults (/etc/ceph/ceph.client.ID.keyring, ...).
    pub keyring: Option<PathBuf>,
}

/// How long connecting may take: the monitors' answer to the
/// authentication and to every later monitor command. Without it an
/// unreachable cluster makes librados wait forever (client_mount_timeout
/// is 300 s by default, rados_mon_op_timeout none). OSD operations, which
/// carry the I/O, stay unbounded: librbd holds them while an OSD restarts.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the image is, from `rbd_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Size in bytes.
    pub size: u64,
    /// Bytes of the RADOS objects the image is striped over.
    pub object_size: u64,
}

/// An open image, with the cluster connection and pool context it lives
/// on. librbd's image calls are thread-safe: any thread may issue I/O.
pub struct Image {
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

// SAFETY: librados' and librbd's handles are not tied to a thread, and
// librbd serialises what needs it inside (ImageCtx's locks), so the
// asynchronous calls may come from any thread at once (librbd(3): the
// C API is what rbd-nbd and QEMU drive from several threads).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// `-errno` from a librados/librbd call as an io::Error of that errno
/// with `what` said.
fn os_error(rc: c_int, what: String) -> io::Error {
    let errno = -rc;
    let kind = io::Error::from_raw_os_error(errno).kind();
    let description = io::Error::from_raw_os_error(errno).to_string();
    // "Permission denied (os error 13)": the errno number is noise here.
    let description = description
        .split(" (os error")
        .next()
        .unwrap_or(&description)
        .to_owned();
    io::Error::new(kind, format!("{what}: {description}"))
}

fn c_string(text: &str, what: &str) -> io::Result<CString> {
    CString::new(text)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains NUL")))
}

impl Image {
    /// Connects to the cluster as `credentials` say and opens the image
    /// `spec` names. Every failure is one line naming the cause; nothing
    /// is left open. Never waits longer than about [`CONNECT_TIMEOUT`]
    /// for the monitors.
    pub fn open(spec: &Spec, credentials: &Credentials) -> io::Result<Image> {
        let api = ffi::load().map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
        let id = credentials.id.as_deref().unwrap_or("admin");
        let entity = if id.contains('.') {
            id.to_owned()
        } else {
            format!("client.{id}")
        };
        let entity_c = c_string(&entity, "the id")?;
        let mut cluster: RadosT = ptr::null_mut();
        // SAFETY: `cluster` is a valid out-pointer; the names are
        // NUL-terminated and outlive the call.
        let rc =
            unsafe { (api.rados_create2)(&mut cluster, c"ceph".as_ptr(), entity_c.as_ptr(), 0) };
        if rc < 0 {
            return Err(os_error(rc, format!("creating a Ceph client {entity}")));
        }
        // Owned from here: an early return shuts it down.
        let mut owned = Image {
            cluster,
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
        };
        owned.configure(credentials)?;
        // SAFETY: the cluster handle is live and configured.
        let rc = unsafe { (api.rados_connect)(owned.cluster) };
        if rc < 0 {
            let why = match -rc {
                libc::ETIMEDOUT => format!(
                    "no answer from the cluster's monitors within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ),
                libc::EACCES | libc::EPERM => {
                    format!("the cluster refused {entity}'s credentials")
                }
                libc::ENOENT => format!("no key for {entity} (give --rbd-keyring)"),
                _ => "connecting to the cluster".to_owned(),
            };
            return Err(os_error(rc, why));
        }
        let pool_c = c_string(&spec.pool, "the pool name")?;
        // SAFETY: the cluster is connected; `ioctx` is a valid
        // out-pointer; the name is NUL-terminated.
        let rc =
            unsafe { (api.rados_ioctx_create)(owned.cluster, pool_c.as_ptr(), &mut owned.ioctx) };
        if rc < 0 {
            owned.ioctx = ptr::null_mut();
            return Err(match -rc {
                libc::ENOENT => io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the pool {} does not exist", spec.pool),
                ),
                _ => os_error(rc, format!("opening the pool {}", spec.pool)),
            });
        }
        if !spec.namespace.is_empty() {
            let namespace_c = c_string(&spec.namespace, "the namespace")?;
            // SAFETY: the ioctx is live; the name is NUL-terminated.
            unsafe { (api.rados_ioctx_set_namespace)(owned.ioctx, namespace_c.as_ptr()) };
        }
        let image_c = c_string(&spec.image, "the image name")?;
        // SAFETY: the ioctx is live; `image` is a valid out-pointer; the
        // name is NUL-terminated; no snapshot (NULL): the image itself.
        let rc =
            unsafe { (api.rbd_open)(owned.ioctx, image_c.as_ptr(), &mut owned.image, ptr::null()) };
        if rc < 0 {
            owned.image = ptr::null_mut();
            let place = if spec.namespace.is_empty() {
                format!("pool {}", spec.pool)
            } else {
                format!("pool {} namespace {}", spec.pool, spec.namespace)
            };
            return Err(match -rc {
                libc::ENOENT => io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no image {} in {place}", spec.image),
                ),
                _ => os_error(rc, format!("opening the image {} in {place}", spec.image)),
            });
        }
        Ok(owned)
    }

    /// Reads the configuration and sets what fuse-blk needs of it, before
    /// connecting.
    fn configure(&mut self, credentials: &Credentials) -> io::Result<()> {
        let api = ffi::api();
        let conf = match &credentials.conf {
            Some(path) => Some(c_string(&path.to_string_lossy(), "the configuration path")?),
            None => None,
        };
        // SAFETY: the handle is live and not connected; the path is
        // NUL-terminated or NULL (librados' search).
        let rc = unsafe {
            (api.rados_conf_read_file)(
                self.cluster,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        if rc < 0 {
            return Err(match &credentials.conf {
                Some(path) => os_error(rc, format!("reading {}", path.display())),
                None => os_error(
                    rc,
                    "no Ceph configuration found (/etc/ceph/ceph.conf; give --rbd-conf)".to_owned(),
                ),
            });
        }
        let timeout = CONNECT_TIMEOUT.as_secs().to_string();
        let mut settings = vec![
            ("client_mount_timeout", timeout.as_str()),
            ("rados_mon_op_timeout", timeout.as_str()),
            // librados writes its complaints to stderr; `attach` says
            // what went wrong in one line of its own.
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),
            // No librbd cache: its default policy (writearound) completes a
            // write before the OSDs have it, and the daemon that serves next
            // (a handoff's successor, `attach --recover`) is another client
            // that reads from the OSDs: it read stale data under fio verify
            // in a handoff. The kernel's page cache is above the device.
            ("rbd_cache", "false"),
            // A discard must read back as zeros where it covers part of
            // an object too (the stock path's punched holes do).
            ("rbd_skip_partial_discard", "false"),
        ];
        let keyring;
        if let Some(path) = &credentials.keyring {
            if !path.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the keyring {} does not exist", path.display()),
                ));
            }
            keyring = path.to_string_lossy().into_owned();
            settings.push(("keyring", keyring.as_str()));
        }
        for (option, value) in settings {
            let option_c = c_string(option, "an option")?;
            let value_c = c_string(value, "an option's value")?;
            // SAFETY: the handle is live and not connected; both strings
            // are NUL-terminated.
            let rc =
                unsafe { (api.rados_conf_set)(self.cluster, option_c.as_ptr(), value_c.as_ptr()) };
            if rc < 0 {
                return Err(os_error(rc, format!("setting {option}")));
            }
        }
        Ok(())
    }

    /// The image's size and object size.
    pub fn info(&self) -> io::Result<Info> {
        let mut info = std::mem::MaybeUninit::<ffi::ImageInfo>::zeroed();
        // SAFETY: the image is open; `info` has room for the struct whose
        // size is passed.
        let rc = unsafe {
            (ffi::api().rbd_stat)(
                self.image,
                info.as_mut_ptr(),
                std::mem::size_of::<ffi::ImageInfo>(),
            )
        };
        if rc < 0 {
            return Err(os_error(rc, "reading the image's size".to_owned()));
        }
        // SAFETY: rbd_stat succeeded and filled it (and it was zeroed).
        let info = unsafe { info.assume_init() };
        Ok(Info {
            size: info.size,
            object_size: info.obj_size,
        })
    }

    /// The raw image handle, for the asynchronous calls.
    pub(crate) fn raw(&self) -> ImageT {
        self.image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let api = ffi::api();
        if !self.image.is_null() {
            // SAFETY: the image is open and no I/O is in flight on it
            // (the device waits for its completions before dropping it).
            let rc = unsafe { (api.rbd_close)(self.image) };
            if rc < 0 {
                log::warn!(
                    "rbd: closing the image: {}",
                    io::Error::from_raw_os_error(-rc)
                );
            }
        }
        if !self.ioctx.is_null() {
            // SAFETY: the ioctx is live and nothing uses it any more.
            unsafe { (api.rados_ioctx_destroy)(self.ioctx) };
        }
        // SAFETY: the cluster handle is live (created in `open`), and
        // nothing made on it is left.
        unsafe { (api.rados_shutdown)(self.cluster) };
    }
}
