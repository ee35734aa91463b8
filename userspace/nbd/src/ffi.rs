//! The part of libnbd's C API (`<libnbd.h>`, Debian's libnbd 1.14) this
//! crate calls, declared by hand: only these functions, each as the header
//! declares it; Debian's 1.14 (bookworm) has them all.

use std::ffi::{c_char, c_int};

/// `struct nbd_handle`, opaque: only ever behind a pointer.
#[repr(C)]
pub struct nbd_handle {
    _private: [u8; 0],
}

pub const LIBNBD_CMD_FLAG_FUA: u32 = 0x01;
pub const LIBNBD_CMD_FLAG_NO_HOLE: u32 = 0x02;

pub const LIBNBD_SIZE_MINIMUM: c_int = 0;
pub const LIBNBD_SIZE_PREFERRED: c_int = 1;
pub const LIBNBD_SIZE_MAXIMUM: c_int = 2;

#[link(name = "nbd")]
extern "C" {
    pub fn nbd_create() -> *mut nbd_handle;
    pub fn nbd_close(h: *mut nbd_handle);
    /// The calling thread's last error message; valid until its next
    /// libnbd call.
    pub fn nbd_get_error() -> *const c_char;
    /// The calling thread's last errno, 0 if the error had none.
    pub fn nbd_get_errno() -> c_int;

    pub fn nbd_set_uri_allow_local_file(h: *mut nbd_handle, allow: bool) -> c_int;
    pub fn nbd_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int;
    pub fn nbd_aio_disconnect(h: *mut nbd_handle, flags: u32) -> c_int;

    pub fn nbd_get_size(h: *mut nbd_handle) -> i64;
    pub fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;
    pub fn nbd_is_read_only(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_flush(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_fua(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_trim(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_zero(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_multi_conn(h: *mut nbd_handle) -> c_int;

    pub fn nbd_aio_is_ready(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_is_processing(h: *mut nbd_handle) -> c_int;

    pub fn nbd_pread(
        h: *mut nbd_handle,
        buf: *mut libc::c_void,
        count: usize,
        offset: u64,
        flags: u32,
    ) -> c_int;
    pub fn nbd_pwrite(
        h: *mut nbd_handle,
        buf: *const libc::c_void,
        count: usize,
        offset: u64,
        flags: u32,
    ) -> c_int;
    pub fn nbd_flush(h: *mut nbd_handle, flags: u32) -> c_int;
    pub fn nbd_trim(h: *mut nbd_handle, count: u64, offset: u64, flags: u32) -> c_int;
    pub fn nbd_zero(h: *mut nbd_handle, count: u64, offset: u64, flags: u32) -> c_int;
}
