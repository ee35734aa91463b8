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
    if let Err(e) = set_io_flusher() {
        log::debug!("PR_SET_IO_FLUSHER: {e}; allocations in this thread may wait for I/O");
    }
}

fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; it changes this thread's
    // flags and touches no memory of ours.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `PR_GET_IO_FLUSHER` (include/uapi/linux/prctl.h).
    const PR_GET_IO_FLUSHER: libc::c_int = 58;

    /// Whether the calling thread is marked; EPERM without
    /// `CAP_SYS_RESOURCE`.
    fn io_flusher() -> io::Result<bool> {
        // SAFETY: prctl with integer arguments only.
        match unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) } {
            -1 => Err(io::Error::last_os_error()),
            marked => Ok(marked == 1),
        }
    }

    /// Says on the terminal, past the test harness's capture, that `test`
    /// did not run, and why.
    fn skipped(test: &str, why: &str) {
        // On a line of its own: the harness may be half way through one.
        let _ = writeln!(io::stderr(), "\nSKIPPED {test}: {why}");
    }

    #[test]
    fn the_kernel_takes_the_request_or_refuses_it_for_the_capability_only() {
        // Runs without CAP_SYS_RESOURCE too: a wrong option or argument is
        // EINVAL there, where a missing capability is EPERM.
        let result = std::thread::spawn(set_io_flusher).join().unwrap();
        match result {
            Ok(()) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        // Without it, marking is quiet: the thread serves on unmarked.
        std::thread::spawn(mark_io_flusher).join().unwrap();
    }

    #[test]
    fn the_mark_is_the_threads_and_its_childrens() {
        let marked = std::thread::spawn(|| -> io::Result<()> {
            // Seeing the mark needs the capability too.
            assert!(!io_flusher()?, "a new thread is not marked");
            mark_io_flusher();
            assert!(io_flusher().unwrap());
            assert!(std::thread::spawn(io_flusher).join().unwrap().unwrap());
            Ok(())
        })
        .join()
        .unwrap();
        match marked {
            // Another thread's mark is not this one's.
            Ok(()) => assert!(!io_flusher().unwrap()),
            Err(e) => skipped(
                "io_thread::tests::the_mark_is_the_threads_and_its_childrens",
                &format!("seeing the mark needs CAP_SYS_RESOURCE ({e})"),
            ),
        }
    }
}
