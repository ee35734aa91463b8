//! A safe owner of one libnbd handle: one connection to an NBD server.

use std::ffi::{c_int, CStr, CString};
use std::fmt;
use std::ptr::NonNull;

use crate::ffi;

/// A failed libnbd call: its message (which names the call, e.g.
/// `nbd_connect_uri: connect: Connection refused`) and errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The errno a request fails with; EIO where libnbd gave none.
    pub errno: i32,
    /// libnbd's message, naming the call that failed.
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
    /// Size in bytes.
    pub size: u64,
    /// The server refuses writes.
    pub read_only: bool,
    /// The server takes NBD_CMD_FLUSH (it has a write cache).
    pub can_flush: bool,
    /// The server takes NBD_CMD_FLAG_FUA on writes.
    pub can_fua: bool,
    /// The server takes NBD_CMD_TRIM.
    pub can_trim: bool,
    /// The server takes NBD_CMD_WRITE_ZEROES.
    pub can_zero: bool,
    /// Several connections to the export see one another's writes
    /// (NBD_FLAG_CAN_MULTI_CONN).
    pub can_multi_conn: bool,
    /// Block size constraints (NBD_INFO_BLOCK_SIZE); 0 where the server
    /// gave none.
    pub minimum_block: u32,
    /// Size in bytes the server serves best, a multiple of
    /// `minimum_block`.
    pub preferred_block: u32,
    /// Largest command payload the server takes, in bytes.
    pub maximum_block: u32,
}

/// One connection to an NBD server. libnbd handles are thread-safe (every
/// call takes the handle's lock); a link's thread alone drives its handle.
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
    /// A new handle for a connection to `uri`, not connected, set up as
    /// every connection here is.
    fn create(uri: &str) -> Result<Handle, Error> {
        let tls = crate::uri::asks_for_tls(uri);
        ffi::load(tls).map_err(|message| Error {
            errno: libc::ENOENT,
            message,
        })?;
        if tls && ffi::tls_unavailable() {
            return Err(Error {
                errno: libc::EPROTONOSUPPORT,
                message:
                    "TLS asked for in a process that loaded libnbd without TLS (for an earlier URI)"
                        .to_owned(),
            });
        }
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
        // Read buffers are only looked at once a read succeeded, which
        // fills them: zeroing them first (libnbd's default, against
        // leaking old memory to a buggy server's caller) is a wasted pass.
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_set_pread_initialize(handle.raw.as_ptr(), false) })?;
        Ok(handle)
    }

    /// Connects to the export an NBD URI names (`nbd://`, `nbd+unix://`,
    /// `nbds://`... as libnbd parses them) and completes the handshake.
    pub fn connect(uri: &str) -> Result<Handle, Error> {
        let c_uri = CString::new(uri).map_err(|_| Error {
            errno: libc::EINVAL,
            message: "the URI contains a NUL byte".to_owned(),
        })?;
        let handle = Handle::create(uri)?;
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

    /// A handle that starts connecting to `uri` without waiting: the
    /// handshake goes on as the caller drives the handle
    /// ([`fd`](Self::fd), [`direction`](Self::direction),
    /// [`notify_read`](Self::notify_read)...) until
    /// [`is_ready`](Self::is_ready), or fails ([`is_dead`](Self::is_dead)).
    pub fn start_connect(uri: &str) -> Result<Handle, Error> {
        let c_uri = CString::new(uri).map_err(|_| Error {
            errno: libc::EINVAL,
            message: "the URI contains a NUL byte".to_owned(),
        })?;
        let handle = Handle::create(uri)?;
        // SAFETY: as in `connect`; the asynchronous variant only starts
        // the connection.
        check(unsafe { ffi::nbd_aio_connect_uri(handle.raw.as_ptr(), c_uri.as_ptr()) })?;
        Ok(handle)
    }

    /// The handshake is done: commands may be issued.
    pub fn is_ready(&self) -> bool {
        // SAFETY: the handle is live; this only reads its state.
        unsafe { ffi::nbd_aio_is_ready(self.raw.as_ptr()) == 1 }
    }

    /// The connection is gone: it broke, failed, or was closed.
    pub fn is_dead(&self) -> bool {
        // SAFETY: the handle is live; these only read its state.
        unsafe {
            ffi::nbd_aio_is_dead(self.raw.as_ptr()) == 1
                || ffi::nbd_aio_is_closed(self.raw.as_ptr()) == 1
        }
    }

    /// The socket to poll, once connecting has begun.
    pub fn fd(&self) -> Result<c_int, Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_aio_get_fd(self.raw.as_ptr()) })
    }

    /// What to wait for on [`fd`](Self::fd): `(read, write)`.
    pub fn direction(&self) -> (bool, bool) {
        // SAFETY: the handle is live; this only reads its state.
        let direction = unsafe { ffi::nbd_aio_get_direction(self.raw.as_ptr()) };
        (
            direction & ffi::LIBNBD_AIO_DIRECTION_READ != 0,
            direction & ffi::LIBNBD_AIO_DIRECTION_WRITE != 0,
        )
    }

    /// The socket is readable: libnbd reads what it can and moves on.
    pub fn notify_read(&self) -> Result<(), Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_aio_notify_read(self.raw.as_ptr()) }).map(drop)
    }

    /// The socket is writable: libnbd sends what it has queued.
    pub fn notify_write(&self) -> Result<(), Error> {
        // SAFETY: the handle is live.
        check(unsafe { ffi::nbd_aio_notify_write(self.raw.as_ptr()) }).map(drop)
    }

    /// A command that completed and is not retired yet, retired now, with
    /// its outcome: `Some((cookie, Ok or the server's error))`, None when
    /// none is waiting.
    pub fn next_completed(&self) -> Option<(u64, Result<(), Error>)> {
        // SAFETY: the handle is live.
        let cookie = unsafe { ffi::nbd_aio_peek_command_completed(self.raw.as_ptr()) };
        // 0: commands in flight, none done; -1: none in flight at all.
        let cookie = u64::try_from(cookie).ok().filter(|&c| c > 0)?;
        // SAFETY: the handle is live; `cookie` names a completed command,
        // which this retires (its buffer is no longer libnbd's).
        let rc = unsafe { ffi::nbd_aio_command_completed(self.raw.as_ptr(), cookie) };
        Some((cookie, check(rc).map(drop)))
    }

    /// Issues NBD_CMD_READ into `buf` and returns its cookie.
    ///
    /// # Safety
    /// `buf` must stay valid for writes of `len` bytes, and not be read
    /// or moved, until the command is retired
    /// ([`next_completed`](Self::next_completed) returned it) or the
    /// handle is dropped.
    pub unsafe fn aio_pread(&self, buf: *mut u8, len: usize, offset: u64) -> Result<u64, Error> {
        // SAFETY: the handle is live; `buf`'s lifetime is the caller's
        // promise.
        check64(unsafe {
            ffi::nbd_aio_pread(
                self.raw.as_ptr(),
                buf.cast(),
                len,
                offset,
                ffi::nbd_completion_callback::NONE,
                0,
            )
        })
        .map(|cookie| cookie as u64)
    }

    /// Issues NBD_CMD_WRITE of `len` bytes at `data` and returns its
    /// cookie.
    ///
    /// # Safety
    /// `data` must stay valid for reads of `len` bytes, unchanged, until
    /// the command is retired or the handle is dropped.
    pub unsafe fn aio_pwrite(
        &self,
        data: *const u8,
        len: usize,
        offset: u64,
        fua: bool,
    ) -> Result<u64, Error> {
        let flags = if fua { ffi::LIBNBD_CMD_FLAG_FUA } else { 0 };
        // SAFETY: the handle is live; `data`'s lifetime is the caller's
        // promise.
        check64(unsafe {
            ffi::nbd_aio_pwrite(
                self.raw.as_ptr(),
                data.cast(),
                len,
                offset,
                ffi::nbd_completion_callback::NONE,
                flags,
            )
        })
        .map(|cookie| cookie as u64)
    }

    /// Issues NBD_CMD_FLUSH and returns its cookie.
    pub fn aio_flush(&self) -> Result<u64, Error> {
        // SAFETY: the handle is live; the command has no buffer.
        check64(unsafe {
            ffi::nbd_aio_flush(self.raw.as_ptr(), ffi::nbd_completion_callback::NONE, 0)
        })
        .map(|cookie| cookie as u64)
    }

    /// Issues NBD_CMD_TRIM of `count` bytes at `offset` and returns its
    /// cookie.
    pub fn aio_trim(&self, count: u64, offset: u64) -> Result<u64, Error> {
        // SAFETY: the handle is live; the command has no buffer.
        check64(unsafe {
            ffi::nbd_aio_trim(
                self.raw.as_ptr(),
                count,
                offset,
                ffi::nbd_completion_callback::NONE,
                0,
            )
        })
        .map(|cookie| cookie as u64)
    }

    /// NBD_CMD_WRITE_ZEROES; with `no_hole` the server must keep the
    /// range allocated.
    pub fn aio_zero(&self, count: u64, offset: u64, no_hole: bool) -> Result<u64, Error> {
        let flags = if no_hole {
            ffi::LIBNBD_CMD_FLAG_NO_HOLE
        } else {
            0
        };
        // SAFETY: the handle is live; the command has no buffer.
        check64(unsafe {
            ffi::nbd_aio_zero(
                self.raw.as_ptr(),
                count,
                offset,
                ffi::nbd_completion_callback::NONE,
                flags,
            )
        })
        .map(|cookie| cookie as u64)
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
