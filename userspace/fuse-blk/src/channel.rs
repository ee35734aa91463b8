//! Channels: where a session engine reads requests and writes replies.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::reply::ReplySink;

/// A FUSE-style message channel: each `receive` yields one whole request and
/// each `send` takes one whole reply. The stock path's `/dev/fuse` fd and the
/// kernel module's `/dev/fuse-blk` channel both behave this way.
pub trait Channel: ReplySink + Send + Sync + 'static {
    /// Blocks for the next request and returns its length, or `None` once
    /// the channel has ended (the filesystem was unmounted or the device
    /// destroyed). A signal may end the wait with `ErrorKind::Interrupted`.
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// As `receive`, but a wait for the next request also ends, with
    /// `ErrorKind::Interrupted`, once `stop` is readable: how
    /// [`Session::stop`](crate::Session::stop) ends a worker's wait without
    /// a signal. The default cannot watch `stop` and only receives; a
    /// channel whose `receive` may wait for long provides this, or its
    /// workers cannot be stopped while they wait.
    fn receive_or_stop(&self, buf: &mut [u8], stop: BorrowedFd<'_>) -> io::Result<Option<usize>> {
        let _ = stop;
        self.receive(buf)
    }

    /// Waits at most `timeout` for a request (or the channel's end) to be
    /// ready for `receive`; false if none came. `stop` ends the wait as it
    /// ends `receive_or_stop`'s, and so may a signal. A channel that cannot
    /// wait so says true: its worker then blocks in `receive_or_stop` and
    /// never counts itself idle.
    fn wait_ready(&self, timeout: Duration, stop: BorrowedFd<'_>) -> io::Result<bool> {
        let _ = (timeout, stop);
        Ok(true)
    }

    /// Sends one reply gathered from `parts`.
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()>;
}

/// A channel over a character-device file descriptor with FUSE semantics.
///
/// Its reads do not block: a worker waits in poll(2), on the descriptor and
/// on the stop event of [`Channel::receive_or_stop`] together, since a
/// blocked read(2) would only end for a signal.
#[derive(Debug)]
pub struct FdChannel {
    fd: OwnedFd,
}

impl FdChannel {
    /// Puts `fd`'s open file in non-blocking mode (`O_NONBLOCK`), which
    /// every descriptor of that open file shares: give it a file of its own
    /// (a clone of a `/dev/fuse` connection, say), not one that another
    /// reader, perhaps in another process, reads expecting to block.
    pub fn new(fd: OwnedFd) -> FdChannel {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let nonblocking = fcntl(&fd, FcntlArg::F_GETFL).and_then(|flags| {
            let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
            fcntl(&fd, FcntlArg::F_SETFL(flags))
        });
        if let Err(e) = nonblocking {
            // Reads then block, and a worker waiting in one cannot be
            // stopped; everything else works.
            log::warn!("making a channel non-blocking: {e}");
        }
        FdChannel { fd }
    }

    /// Reads one message, waiting in poll(2) while none is there.
    fn read_message(
        &self,
        buf: &mut [u8],
        stop: Option<BorrowedFd<'_>>,
    ) -> io::Result<Option<usize>> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                // EOF: the peer of a socket-backed channel has gone.
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EAGAIN) => {
                    self.wait(PollFlags::POLLIN, None, stop)?;
                }
                // ENOENT: the request was interrupted before it was read.
                Err(Errno::ENOENT) => continue,
                // A signal: the caller decides whether to go on.
                Err(Errno::EINTR) => return Err(io::ErrorKind::Interrupted.into()),
                Err(Errno::ENODEV) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits at most `timeout` (`None`: for as long as it takes) for the
    /// descriptor to be ready for `events`; false if it was not. `stop`
    /// readable, or a signal, end the wait with `ErrorKind::Interrupted`.
    fn wait(
        &self,
        events: PollFlags,
        timeout: Option<Duration>,
        stop: Option<BorrowedFd<'_>>,
    ) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.fd.as_fd(), events)]
            .into_iter()
            .chain(stop.map(|stop| PollFd::new(stop, PollFlags::POLLIN)))
            .collect::<Vec<_>>();
        // Longer waits than poll(2) takes are cut short: the caller only
        // learns it was not idle for that long.
        let timeout = timeout.map_or(PollTimeout::NONE, |timeout| {
            PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)
        });
        match poll(&mut fds, timeout) {
            Ok(_) if fds[1..].iter().any(|stop| stop.any() == Some(true)) => {
                Err(io::ErrorKind::Interrupted.into())
            }
            // POLLERR or POLLHUP (the channel ended) count as ready too:
            // the read reports the end.
            Ok(_) => Ok(fds[0].any() == Some(true)),
            Err(Errno::EINTR) => Err(io::ErrorKind::Interrupted.into()),
            Err(e) => Err(e.into()),
        }
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
        self.read_message(buf, None)
    }

    fn receive_or_stop(&self, buf: &mut [u8], stop: BorrowedFd<'_>) -> io::Result<Option<usize>> {
        self.read_message(buf, Some(stop))
    }

    fn wait_ready(&self, timeout: Duration, stop: BorrowedFd<'_>) -> io::Result<bool> {
        self.wait(PollFlags::POLLIN, Some(timeout), Some(stop))
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
                // A full socket (the devices take replies at once): wait
                // for room, as a blocking write would.
                Err(Errno::EAGAIN) => match self.wait(PollFlags::POLLOUT, None, None) {
                    Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                    _ => continue,
                },
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
            // The fuse-blk module refuses the INIT reply of a channel that a
            // newer daemon's takeover retired first: this worker reads
            // FUSE_DESTROY next and ends; the newer daemon serves the queue.
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                log::info!("another daemon took this queue over first: {e}")
            }
            Err(e) => log::error!("failed to send reply: {e}"),
        }
    }
}
