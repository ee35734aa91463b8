//! A process that loads libnbd for a connection without TLS, while it has
//! one thread, leaves GnuTLS uninitialised (0.8 MiB less resident in an
//! idle daemon), does not leave GNUTLS_NO_IMPLICIT_INIT in its
//! environment, and refuses a TLS URI afterwards in one line rather than
//! failing inside GnuTLS. Without the test harness: its threads would make
//! the load keep GnuTLS's initialisation.

use std::ffi::{c_int, c_void};

use fuse_blk_nbd::handle::Handle;

/// GnuTLS's GNUTLS_E_LIB_IN_ERROR_STATE: what its calls return before
/// `gnutls_global_init`.
const GNUTLS_E_LIB_IN_ERROR_STATE: c_int = -402;

/// What `gnutls_rnd` returns in this process, from the GnuTLS libnbd
/// loaded (never loading one of its own).
fn gnutls_rnd_result() -> c_int {
    // SAFETY: RTLD_NOLOAD only looks the library up among those loaded.
    let library = unsafe {
        libc::dlopen(
            c"libgnutls.so.30".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD,
        )
    };
    assert!(!library.is_null(), "libnbd did not load libgnutls.so.30");
    // SAFETY: `library` is a live handle from dlopen.
    let symbol = unsafe { libc::dlsym(library, c"gnutls_rnd".as_ptr()) };
    assert!(!symbol.is_null(), "libgnutls has no gnutls_rnd");
    // SAFETY: gnutls_rnd is `int gnutls_rnd(gnutls_rnd_level_t, void *, size_t)`.
    let gnutls_rnd: unsafe extern "C" fn(c_int, *mut c_void, usize) -> c_int =
        unsafe { std::mem::transmute(symbol) };
    let mut buffer = [0u8; 16];
    // SAFETY: level 0 is GNUTLS_RND_NONCE; the buffer holds 16 bytes.
    unsafe { gnutls_rnd(0, buffer.as_mut_ptr().cast(), buffer.len()) }
}

fn main() {
    let threads = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Threads:").map(|n| n.trim().to_owned()))
        .unwrap();
    assert_eq!(threads, "1", "the test must start with one thread");
    assert!(
        std::env::var_os("GNUTLS_NO_IMPLICIT_INIT").is_none(),
        "GNUTLS_NO_IMPLICIT_INIT is set in the test's environment: the check would mean nothing"
    );
    // No server: the load is what counts, the connection fails.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let plain = Handle::connect(&format!("nbd+unix:///?socket={}", socket.display()));
    assert!(plain.is_err(), "connected to a socket nobody listens on");
    assert_eq!(
        gnutls_rnd_result(),
        GNUTLS_E_LIB_IN_ERROR_STATE,
        "GnuTLS was initialised for a connection without TLS"
    );
    assert!(
        std::env::var_os("GNUTLS_NO_IMPLICIT_INIT").is_none(),
        "GNUTLS_NO_IMPLICIT_INIT left in the environment"
    );
    let tls = Handle::connect(&format!("nbds+unix:///?socket={}", socket.display()));
    let message = tls
        .err()
        .expect("a TLS URI accepted without GnuTLS")
        .to_string();
    assert!(
        message.contains("TLS asked for in a process that loaded libnbd without TLS"),
        "{message}"
    );
    println!("gnutls_init: 3 passed, 0 failed");
}
