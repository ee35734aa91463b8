//! The part of libnbd's C API (`<libnbd.h>`, Debian's libnbd 1.14) this
//! crate calls, declared by hand: only these functions, each as the header
//! declares it; Debian's 1.14 (bookworm) has them all.
//!
//! libnbd is loaded with dlopen(3) when the first NBD connection is made
//! ([`load`]), not linked: linked, it and what it pulls in (GnuTLS,
//! libxml2, ICU: several MiB resident) would be mapped into every fuse-blk
//! daemon, whatever it serves, and `fuse-blk` would not start at all on a
//! machine without libnbd.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// `struct nbd_handle`, opaque: only ever behind a pointer.
#[repr(C)]
pub struct nbd_handle {
    _private: [u8; 0],
}

pub const LIBNBD_CMD_FLAG_FUA: u32 = 0x01;
pub const LIBNBD_CMD_FLAG_NO_HOLE: u32 = 0x02;

pub const LIBNBD_AIO_DIRECTION_READ: u32 = 1;
pub const LIBNBD_AIO_DIRECTION_WRITE: u32 = 2;

/// `nbd_completion_callback`, passed by value to the `nbd_aio_*` commands.
/// Always passed empty here: completions are collected with
/// `nbd_aio_peek_command_completed`, so no C callback into Rust is needed.
#[repr(C)]
pub struct nbd_completion_callback {
    pub callback: Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

impl nbd_completion_callback {
    /// `LIBNBD_NULL_COMPLETION`.
    pub const NONE: nbd_completion_callback = nbd_completion_callback {
        callback: None,
        user_data: std::ptr::null_mut(),
        free: None,
    };
}

pub const LIBNBD_SIZE_MINIMUM: c_int = 0;
pub const LIBNBD_SIZE_PREFERRED: c_int = 1;
pub const LIBNBD_SIZE_MAXIMUM: c_int = 2;

/// The shared object dlopen(3) asks for: the ABI's soname, so that only
/// the run-time package (Debian's libnbd0) is needed.
const LIBRARY: &str = "libnbd.so.0";

/// Declares the functions: a table of pointers filled at [`load`]
/// (fuse-blk-dynlib), and for each function a wrapper of the same name and
/// signature that calls through the table.
macro_rules! libnbd {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty; )*) => {
        fuse_blk_dynlib::function_table! {
            /// libnbd's functions, as loaded.
            struct Api {
                $( fn $name($($arg: $ty),*) -> $ret; )*
            }
        }

        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// As the C function's; [`load`] must have succeeded.
            pub unsafe fn $name($($arg: $ty),*) -> $ret {
                // SAFETY: the caller keeps the C function's contract.
                unsafe { (loaded().$name)($($arg),*) }
            }
        )*
    };
}

libnbd! {
    fn nbd_create() -> *mut nbd_handle;
    fn nbd_close(h: *mut nbd_handle) -> ();
    /// The calling thread's last error message; valid until its next
    /// libnbd call.
    fn nbd_get_error() -> *const c_char;
    /// The calling thread's last errno, 0 if the error had none.
    fn nbd_get_errno() -> c_int;

    fn nbd_set_uri_allow_local_file(h: *mut nbd_handle, allow: bool) -> c_int;
    fn nbd_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int;
    fn nbd_aio_disconnect(h: *mut nbd_handle, flags: u32) -> c_int;
    fn nbd_aio_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int;
    fn nbd_set_pread_initialize(h: *mut nbd_handle, request: bool) -> c_int;

    fn nbd_get_size(h: *mut nbd_handle) -> i64;
    fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;
    fn nbd_is_read_only(h: *mut nbd_handle) -> c_int;
    fn nbd_can_flush(h: *mut nbd_handle) -> c_int;
    fn nbd_can_fua(h: *mut nbd_handle) -> c_int;
    fn nbd_can_trim(h: *mut nbd_handle) -> c_int;
    fn nbd_can_zero(h: *mut nbd_handle) -> c_int;
    fn nbd_can_multi_conn(h: *mut nbd_handle) -> c_int;

    fn nbd_aio_is_ready(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_is_processing(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_is_dead(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_is_closed(h: *mut nbd_handle) -> c_int;

    fn nbd_aio_get_fd(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_get_direction(h: *mut nbd_handle) -> u32;
    fn nbd_aio_notify_read(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_notify_write(h: *mut nbd_handle) -> c_int;
    fn nbd_aio_peek_command_completed(h: *mut nbd_handle) -> i64;
    fn nbd_aio_command_completed(h: *mut nbd_handle, cookie: u64) -> c_int;

    fn nbd_aio_pread(h: *mut nbd_handle, buf: *mut c_void, count: usize, offset: u64, completion: nbd_completion_callback, flags: u32) -> i64;
    fn nbd_aio_pwrite(h: *mut nbd_handle, buf: *const c_void, count: usize, offset: u64, completion: nbd_completion_callback, flags: u32) -> i64;
    fn nbd_aio_flush(h: *mut nbd_handle, completion: nbd_completion_callback, flags: u32) -> i64;
    fn nbd_aio_trim(h: *mut nbd_handle, count: u64, offset: u64, completion: nbd_completion_callback, flags: u32) -> i64;
    fn nbd_aio_zero(h: *mut nbd_handle, count: u64, offset: u64, completion: nbd_completion_callback, flags: u32) -> i64;

}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// Whether libnbd was loaded with GnuTLS left uninitialised (see [`load`]):
/// then no connection of this process may ask for TLS.
static TLS_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// GnuTLS's variable: set when GnuTLS is loaded, its initialisation at
/// load time is skipped (`gnutls_global_init` is then the caller's job).
const GNUTLS_NO_IMPLICIT_INIT: &str = "GNUTLS_NO_IMPLICIT_INIT";

/// Loads libnbd, once per process; later calls return the first outcome.
/// The error is one line naming the library and the package to install.
///
/// `tls`: whether the connection about to be made asks for TLS. When it
/// does not, and this is the process's only thread, GnuTLS (which libnbd
/// is linked with) is loaded without its initialisation: that is 0.8 MiB
/// resident in an idle daemon (its tables and the system priorities it
/// reads), for a connection that never calls it. A process that loaded
/// libnbd so cannot make TLS connections later ([`tls_unavailable`]); a
/// daemon serves one URI, so its first connection decides.
pub fn load(tls: bool) -> Result<(), String> {
    API.get_or_init(|| {
        // setenv(3) races with any other thread reading the environment
        // (getenv in C code does not take Rust's lock), so only while
        // there is none; and never over a value the user set.
        let skip_init =
            !tls && std::env::var_os(GNUTLS_NO_IMPLICIT_INIT).is_none() && only_thread();
        if skip_init {
            std::env::set_var(GNUTLS_NO_IMPLICIT_INIT, "1");
        }
        let library = fuse_blk_dynlib::open(LIBRARY);
        if skip_init {
            // Read by GnuTLS's initialiser only, which has run: children
            // of this process do not inherit it.
            std::env::remove_var(GNUTLS_NO_IMPLICIT_INIT);
            TLS_UNAVAILABLE.store(library.is_ok(), Ordering::Relaxed);
        }
        let library = library.map_err(|why| {
            format!("nbd: cannot load libnbd ({why}): install libnbd0 (Debian's package)")
        })?;
        // SAFETY: `library` is libnbd, whose functions of these names
        // have the C signatures declared above.
        unsafe { Api::look_up(library) }
            .map_err(|missing| format!("libnbd has {missing}: version 1.14 or later is needed"))
    })
    .as_ref()
    .map(|_| ())
    .map_err(Clone::clone)
}

/// Whether libnbd was loaded in this process without GnuTLS's
/// initialisation, so that a TLS connection would fail inside GnuTLS.
pub fn tls_unavailable() -> bool {
    TLS_UNAVAILABLE.load(Ordering::Relaxed)
}

/// Whether the calling thread is the process's only one (`Threads:` in
/// /proc/self/status); false when that cannot be read.
fn only_thread() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .map(|count| count.trim() == "1")
        })
        .unwrap_or(false)
}

fn loaded() -> &'static Api {
    match API.get() {
        Some(Ok(api)) => api,
        _ => panic!("a libnbd function called before ffi::load succeeded"),
    }
}
