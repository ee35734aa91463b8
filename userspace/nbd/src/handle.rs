//! A safe owner of one libnbd handle: one connection to an NBD server.

use std::ffi::{c_int, CStr, CString};
use std::fmt;
use std::ptr::NonNull;

use crate::ffi;

/// A failed libnbd call: its message (which names the call, e.g.
/// `nbd_connect_uri: connect: Connection refused`) and errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub errno: i32,
    pub message: String,
}

impl Error {
    /// The calling thread's last libnbd error. libnbd keeps it per thread,
    /// so it must be read right after the failing call, on its thread.
    fn last() -> Error {
        // SAFETY: nbd_get_error returns NULL or a NUL-terminated string
        // owned by libnbd that stays valid until this thread's next libnbd
        // call; it is copied before any other call.
        let message = unsafe {
            let text = ffi::nbd_get_error();
            if text.is_null() {
                "unknown libnbd error".to_owned()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            }
        };
        // SAFETY: reads this thread's errno slot in libnbd; no arguments.
        let errno = unsafe { ffi::nbd_get_errno() };
        Error {
            // An error without an errno (a protocol violation, say) still
            // fails the request: EIO is what a block device says then.
            errno: if errno > 0 { errno } else { libc::EIO },
            message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// What the server told us about the export in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Export {
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_multi_conn: bool,
    /// Block size constraints (NBD_INFO_BLOCK_SIZE); 0 where the server
    /// gave none.
    pub minimum_block: u32,
    pub preferred_block: u32,
    pub maximum_block: u32,
}

/// One connection to an NBD server. libnbd handles are thread-safe: every
/// call takes the handle's lock, so threads sharing one handle have their
/// synchronous calls served one at a time.
pub struct Handle {
    raw: NonNull<ffi::nbd_handle>,
}

// SAFETY: a libnbd handle is not tied to the thread that created it, and
// every libnbd call on it takes the handle's own mutex (libnbd(3),
// "Multithreading"), so it may be used and closed from any thread.
unsafe impl Send for Handle {}
// SAFETY: as above: concurrent calls on one handle are serialised by
// libnbd itself.
unsafe impl Sync for Handle {}

/// -1 is how every libnbd call used here fails.
fn check(rc: c_int) -> Result<c_int, Error> {
    if rc == -1 {
        Err(Error::last())
    } else {
        Ok(rc)
    }
}

fn check64(rc: i64) -> Result<i64, Error> {
    if rc == -1 {
        Err(Error::last())
    } else {
        Ok(rc)
    }
}

impl Handle {
    /// Connects to the export an NBD URI names (`nbd://`, `nbd+unix://`,
    /// `nbds://`... as libnbd parses them) and completes the handshake.
    pub fn connect(uri: &str) -> Result<Handle, Error> {
        let c_uri = CString::new(uri).map_err(|_| Error {
            errno: libc::EINVAL,
            message: "the URI contains a NUL byte".to_owned(),
        })?;
        ffi::load().map_err(|message| Error {
            errno: libc::ENOENT,
            message,
        })?;
        // SAFETY: libnbd is loaded; nbd_create takes no arguments and
        // returns a new handle or NULL.
        let raw = NonNull::new(unsafe { ffi::nbd_create() }).ok_or_else(Error::last)?;
        // Owned from here on, so every early return closes it.
        let handle = Handle { raw };
        // The URI is the user's own argument: files it names for TLS
        // (tls-psk-file, tls-certificates) are theirs to name. libnbd
        // refuses them by default for URIs from untrusted sources.
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_set_uri_allow_local_file(handle.raw.as_ptr(), true) })?;
        // SAFETY: the handle is live and `c_uri` a NUL-terminated string
        // that outlives the call (libnbd copies what it keeps).
        check(unsafe { ffi::nbd_connect_uri(handle.raw.as_ptr(), c_uri.as_ptr()) })?;
        Ok(handle)
    }

    fn flag(&self, call: unsafe fn(*mut ffi::nbd_handle) -> c_int) -> Result<bool, Error> {
        // SAFETY: the handle is live; `call` is one of libnbd's
        // nbd_is_*/nbd_can_* queries, which only read the handle.
        check(unsafe { call(self.raw.as_ptr()) }).map(|value| value != 0)
    }

    fn block_size(&self, which: c_int) -> Result<u32, Error> {
        // SAFETY: the handle is live; `which` is one of LIBNBD_SIZE_*.
        let size = check64(unsafe { ffi::nbd_get_block_size(self.raw.as_ptr(), which) })?;
        Ok(u32::try_from(size).unwrap_or(0))
    }

    /// The export's size, flags and block size constraints.
    pub fn export(&self) -> Result<Export, Error> {
        // SAFETY: the handle is live and connected.
        let size = check64(unsafe { ffi::nbd_get_size(self.raw.as_ptr()) })?;
        Ok(Export {
            size: size as u64,
            read_only: self.flag(ffi::nbd_is_read_only)?,
            can_flush: self.flag(ffi::nbd_can_flush)?,
            can_fua: self.flag(ffi::nbd_can_fua)?,
            can_trim: self.flag(ffi::nbd_can_trim)?,
            can_zero: self.flag(ffi::nbd_can_zero)?,
            can_multi_conn: self.flag(ffi::nbd_can_multi_conn)?,
            minimum_block: self.block_size(ffi::LIBNBD_SIZE_MINIMUM)?,
            preferred_block: self.block_size(ffi::LIBNBD_SIZE_PREFERRED)?,
            maximum_block: self.block_size(ffi::LIBNBD_SIZE_MAXIMUM)?,
        })
    }

    /// Whether the connection still carries commands: after a failed
    /// command, true means the server answered it with an error, false
    /// that the connection broke (the handle is dead or closed).
    pub fn is_connected(&self) -> bool {
        // SAFETY: the handle is live; these only read its state.
        unsafe {
            ffi::nbd_aio_is_ready(self.raw.as_ptr()) == 1
                || ffi::nbd_aio_is_processing(self.raw.as_ptr()) == 1
        }
    }

    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        // SAFETY: the handle is live; `buf` is valid for writes of its
        // length for the whole (synchronous) call.
        check(unsafe {
            ffi::nbd_pread(
                self.raw.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset,
                0,
            )
        })
        .map(drop)
    }

    pub fn pwrite(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        let flags = if fua { ffi::LIBNBD_CMD_FLAG_FUA } else { 0 };
        // SAFETY: the handle is live; `data` is valid for reads of its
        // length for the whole (synchronous) call.
        check(unsafe {
            ffi::nbd_pwrite(
                self.raw.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
                offset,
                flags,
            )
        })
        .map(drop)
    }

    pub fn flush(&self) -> Result<(), Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_flush(self.raw.as_ptr(), 0) }).map(drop)
    }

    pub fn trim(&self, count: u64, offset: u64) -> Result<(), Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_trim(self.raw.as_ptr(), count, offset, 0) }).map(drop)
    }

    /// NBD_CMD_WRITE_ZEROES; with `no_hole` the server must keep the
    /// range allocated.
    pub fn zero(&self, count: u64, offset: u64, no_hole: bool) -> Result<(), Error> {
        let flags = if no_hole {
            ffi::LIBNBD_CMD_FLAG_NO_HOLE
        } else {
            0
        };
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_zero(self.raw.as_ptr(), count, offset, flags) }).map(drop)
    }

    /// Asks the server to end the connection (NBD_CMD_DISC), so it does
    /// not log an abrupt disconnect, without waiting for it: a server that
    /// stopped answering must not hold up a detach (`nbd_shutdown` would
    /// wait for the server to close).
    pub fn disconnect(&self) -> Result<(), Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_aio_disconnect(self.raw.as_ptr(), 0) }).map(drop)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and this is its only owner, so no
        // call on it runs now or later.
        unsafe { ffi::nbd_close(self.raw.as_ptr()) };
    }
}
