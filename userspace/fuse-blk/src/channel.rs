//! Channels: where a session engine reads requests and writes replies.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;

use crate::reply::ReplySink;

/// A FUSE-style message channel: each `receive` yields one whole request and
/// each `send` takes one whole reply. The stock path's `/dev/fuse` fd and the
/// kernel module's `/dev/fuse-blk` channel both behave this way.
pub trait Channel: ReplySink + Send + Sync + 'static {
    /// Blocks for the next request and returns its length, or `None` once
    /// the channel has ended (the filesystem was unmounted or the device
    /// destroyed). A signal may end the wait with `ErrorKind::Interrupted`.
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Waits at most `timeout` for a request (or the channel's end) to be
    /// ready for `receive`; false if none came. A signal may end the wait
    /// as it ends `receive`'s. A channel that cannot wait so says true: its
    /// worker then blocks in `receive` and never counts itself idle.
    fn wait_ready(&self, timeout: Duration) -> io::Result<bool> {
        let _ = timeout;
        Ok(true)
    }

    /// Sends one reply gathered from `parts`.
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()>;
}

/// A channel over a character-device file descriptor with FUSE semantics.
#[derive(Debug)]
pub struct FdChannel {
    fd: OwnedFd,
}

impl FdChannel {
    pub fn new(fd: OwnedFd) -> FdChannel {
        FdChannel { fd }
    }
}

impl From<FdChannel> for OwnedFd {
    fn from(channel: FdChannel) -> OwnedFd {
        channel.fd
    }
}

impl AsFd for FdChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel for FdChannel {
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                // EOF: the peer of a socket-backed channel has gone.
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                // ENOENT: the request was interrupted before it was read.
                Err(Errno::EAGAIN | Errno::ENOENT) => continue,
                // A signal: the caller decides whether to go on (see
                // `Session::stop`).
                Err(Errno::EINTR) => return Err(io::ErrorKind::Interrupted.into()),
                Err(Errno::ENODEV) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn wait_ready(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // Longer waits than poll(2) takes are cut short: the caller only
        // learns it was not idle for that long.
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            // POLLERR or POLLHUP (the channel ended) count as ready too:
            // `receive` reports the end.
            Ok(ready) => Ok(ready > 0),
            Err(Errno::EINTR) => Err(io::ErrorKind::Interrupted.into()),
            Err(e) => Err(e.into()),
        }
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        let expected: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            match nix::sys::uio::writev(&self.fd, parts) {
                Ok(n) if n == expected => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short reply write: {n} of {expected} bytes"
                    )))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl ReplySink for FdChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        match self.send(parts) {
            Ok(()) => {}
            // The kernel forgot the request (interrupted, or the connection
            // was aborted): nobody waits for this reply.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {
                log::debug!("reply not delivered: {e}")
            }
            Err(e) => log::error!("failed to send reply: {e}"),
        }
    }
}
