//! An eventfd one thread sets to wake another, which waits for it to become
//! readable (poll(2), or a read in an io_uring).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

#[derive(Debug)]
pub(crate) struct Event(OwnedFd);

impl Event {
    /// A blocking eventfd: a read of it in an io_uring waits for it to be
    /// set, where a non-blocking one would complete at once with EAGAIN.
    pub(crate) fn new() -> io::Result<Event> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned by nothing else.
        Ok(Event(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes it readable (until a read takes the count).
    pub(crate) fn set(&self) {
        let one = 1u64.to_ne_bytes();
        if let Err(e) = nix::unistd::write(&self.0, &one) {
            log::error!("setting an eventfd: {e}");
        }
    }
}

impl AsFd for Event {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
