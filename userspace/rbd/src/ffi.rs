//! The part of librados' and librbd's C API (`<rados/librados.h>`,
//! `<rbd/librbd.h>`, Debian's ceph 16.2) this crate calls, declared by
//! hand, each function as the header declares it.
//!
//! librbd is loaded with dlopen(3) when the first `rbd:` device is opened
//! ([`load`]), not linked: it and what it pulls in (librados, Boost,
//! NSS, ...: tens of MiB mapped, several resident) would otherwise be
//! mapped into every fuse-blk daemon whatever it serves, and `fuse-blk`
//! would not start on a machine without Ceph's libraries. librados comes
//! in as librbd's dependency; dlsym(3) on librbd's handle finds its
//! functions too.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// `rados_t`, `rados_ioctx_t`, `rbd_image_t`, `rbd_completion_t`: opaque
/// pointers.
pub type RadosT = *mut c_void;
pub type IoctxT = *mut c_void;
pub type ImageT = *mut c_void;
pub type CompletionT = *mut c_void;

/// `rbd_callback_t`; never set here: completions are collected with
/// `rbd_poll_io_events`.
pub type Callback = Option<unsafe extern "C" fn(completion: CompletionT, arg: *mut c_void)>;

/// `RBD_MAX_BLOCK_NAME_SIZE`, `RBD_MAX_IMAGE_NAME_SIZE`.
const MAX_BLOCK_NAME_SIZE: usize = 24;
const MAX_IMAGE_NAME_SIZE: usize = 96;

/// `rbd_image_info_t`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; MAX_IMAGE_NAME_SIZE],
}

/// `LIBRADOS_OP_FLAG_FADVISE_FUA`: the write completes only once the OSD
/// has it, even where librbd's write-around cache would complete it
/// earlier.
pub const OP_FLAG_FADVISE_FUA: c_int = 0x80;

/// `EVENT_TYPE_EVENTFD`, for `rbd_set_image_notification`.
pub const EVENT_TYPE_EVENTFD: c_int = 2;

/// The shared object dlopen(3) asks for: the ABI's soname, so that only
/// the run-time package (Debian's librbd1) is needed.
const LIBRARY: &str = "librbd.so.1";

fuse_blk_dynlib::function_table! {
    /// librados' and librbd's functions, as loaded. Call through [`api`];
    /// each call is `unsafe`, with the C function's contract.
    pub struct Functions {
        fn rados_create2(cluster: *mut RadosT, cluster_name: *const c_char, name: *const c_char, flags: u64) -> c_int;
        fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
        fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_connect(cluster: RadosT) -> c_int;
        fn rados_shutdown(cluster: RadosT) -> ();
        fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut IoctxT) -> c_int;
        fn rados_ioctx_destroy(ioctx: IoctxT) -> ();
        fn rados_ioctx_set_namespace(ioctx: IoctxT, namespace: *const c_char) -> ();

        fn rbd_open(ioctx: IoctxT, name: *const c_char, image: *mut ImageT, snap_name: *const c_char) -> c_int;
        fn rbd_close(image: ImageT) -> c_int;
        fn rbd_stat(image: ImageT, info: *mut ImageInfo, infosize: usize) -> c_int;
        fn rbd_set_image_notification(image: ImageT, fd: c_int, kind: c_int) -> c_int;
        fn rbd_poll_io_events(image: ImageT, completions: *mut CompletionT, count: c_int) -> c_int;

        fn rbd_aio_create_completion(arg: *mut c_void, callback: Callback, completion: *mut CompletionT) -> c_int;
        fn rbd_aio_get_return_value(completion: CompletionT) -> isize;
        fn rbd_aio_get_arg(completion: CompletionT) -> *mut c_void;
        fn rbd_aio_release(completion: CompletionT) -> ();

        fn rbd_aio_read(image: ImageT, offset: u64, len: usize, buf: *mut c_char, completion: CompletionT) -> c_int;
        fn rbd_aio_write2(image: ImageT, offset: u64, len: usize, buf: *const c_char, completion: CompletionT, op_flags: c_int) -> c_int;
        fn rbd_aio_flush(image: ImageT, completion: CompletionT) -> c_int;
        fn rbd_aio_discard(image: ImageT, offset: u64, len: u64, completion: CompletionT) -> c_int;
        fn rbd_aio_write_zeroes(image: ImageT, offset: u64, len: usize, completion: CompletionT, zero_flags: c_int, op_flags: c_int) -> c_int;
    }
}

static FUNCTIONS: OnceLock<Result<Functions, String>> = OnceLock::new();

/// Loads librbd, once per process; later calls return the first outcome.
/// The error is one line naming the library and the package to install.
pub fn load() -> Result<&'static Functions, String> {
    FUNCTIONS
        .get_or_init(|| {
            let library = fuse_blk_dynlib::open(LIBRARY).map_err(|why| {
                format!("rbd: cannot load librbd ({why}): install librbd1 (Debian's package)")
            })?;
            // SAFETY: `library` is librbd (librados with it), whose
            // functions of these names have the C signatures declared above.
            unsafe { Functions::look_up(library) }.map_err(|missing| {
                format!("rbd: librbd has {missing}: Ceph 16 (pacific) or later is needed")
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The table, once [`load`] succeeded (every value of this crate that
/// calls it was made after a successful [`load`]).
pub fn api() -> &'static Functions {
    match FUNCTIONS.get() {
        Some(Ok(functions)) => functions,
        _ => panic!("a librbd function called before ffi::load succeeded"),
    }
}
