//! What a thread serving a block device's requests sets up for itself.

use std::io;

/// `PR_SET_IO_FLUSHER` (include/uapi/linux/prctl.h, Linux 5.6).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as one that writes back others' data: its
/// allocations do not start I/O, and it is not throttled as a writer of
/// dirty pages. Without it, memory reclaim in the thread that serves a
/// device could wait for writeback to that very device. Threads it
/// creates inherit the mark. Best effort: it needs `CAP_SYS_RESOURCE`.
pub fn mark_io_flusher() {
    // SAFETY: prctl with integer arguments only; it changes this thread's
    // flags and touches no memory of ours.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        log::debug!(
            "PR_SET_IO_FLUSHER: {}; allocations in this thread may wait for I/O",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PR_GET_IO_FLUSHER` (include/uapi/linux/prctl.h).
    const PR_GET_IO_FLUSHER: libc::c_int = 58;

    fn io_flusher() -> libc::c_int {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) }
    }

    #[test]
    fn the_mark_is_the_threads_and_its_childrens() {
        std::thread::spawn(|| {
            let before = io_flusher();
            mark_io_flusher();
            if before < 0 {
                return; // No CAP_SYS_RESOURCE here: nothing to see.
            }
            assert_eq!(io_flusher(), 1);
            assert_eq!(std::thread::spawn(io_flusher).join().unwrap(), 1);
        })
        .join()
        .unwrap();
        // Another thread's mark is not this one's.
        assert!(io_flusher() <= 0);
    }
}
