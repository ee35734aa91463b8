//! Channels: where a session engine reads requests and writes replies.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::event::Event;
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
    /// `ErrorKind::Interrupted`, once `stop` is set (its descriptor
    /// readable): how [`Session::stop`](crate::Session::stop) ends a
    /// worker's wait without a signal. The default cannot watch `stop` and
    /// only receives; a channel whose `receive` may wait for long provides
    /// this, or its workers cannot be stopped while they wait.
    fn receive_or_stop(&self, buf: &mut [u8], stop: &Stop) -> io::Result<Option<usize>> {
        let _ = stop;
        self.receive(buf)
    }

    /// Waits at most `timeout` for a request (or the channel's end) to be
    /// ready for `receive`; false if none came. `stop` ends the wait as it
    /// ends `receive_or_stop`'s, and so may a signal. A channel that cannot
    /// wait so says true: its worker then blocks in `receive_or_stop` and
    /// never counts itself idle.
    fn wait_ready(&self, timeout: Duration, stop: &Stop) -> io::Result<bool> {
        let _ = (timeout, stop);
        Ok(true)
    }

    /// As `receive_or_stop`, but gives up with `ErrorKind::TimedOut` once
    /// no request has come for `idle`: how a worker holding large buffers
    /// learns it may give them back. A request another worker of the
    /// channel reads first does not end the wait. The default waits with
    /// [`wait_ready`](Channel::wait_ready) and then receives, which blocks
    /// if another worker took the request meanwhile; [`FdChannel`] bounds
    /// the whole wait.
    fn receive_or_idle(
        &self,
        buf: &mut [u8],
        stop: &Stop,
        idle: Duration,
    ) -> io::Result<Option<usize>> {
        if self.wait_ready(idle, stop)? {
            self.receive_or_stop(buf, stop)
        } else {
            Err(io::ErrorKind::TimedOut.into())
        }
    }

    /// Sends one reply gathered from `parts`.
    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()>;
}

/// What ends a worker's wait for its next request without a signal: an
/// eventfd, readable once set ([`Session::stop`](crate::Session::stop)
/// sets every waiting worker's) and from then on.
#[derive(Debug)]
pub struct Stop {
    event: Event,
    /// Tells stops apart where descriptor numbers cannot: a channel that
    /// keeps a stop registered with the kernel between waits
    /// ([`FdChannel::new_shared`]) must notice a new stop even if it has
    /// the number of an old one, since closing that took its registration
    /// with it.
    id: u64,
}

impl Stop {
    /// A stop not set yet.
    pub fn new() -> io::Result<Stop> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Ok(Stop {
            event: Event::new()?,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Ends the wait of whoever waits with this stop, now or later.
    pub fn set(&self) {
        self.event.set();
    }
}

impl AsFd for Stop {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }
}

/// A channel over a character-device file descriptor with FUSE semantics.
///
/// Its reads do not block: a worker waits in poll(2) or epoll, on the
/// descriptor and on the [`Stop`] of [`Channel::receive_or_stop`] together,
/// since a blocked read(2) would only end for a signal.
#[derive(Debug)]
pub struct FdChannel {
    fd: OwnedFd,
    /// Whether a worker waits in an epoll instance where the descriptor is
    /// `EPOLLEXCLUSIVE` ([`FdChannel::new_shared`]) rather than in poll(2);
    /// cleared if epoll cannot watch the descriptor.
    exclusive: AtomicBool,
    /// That epoll instance, for the stop it was last waited with.
    waiter: parking_lot::Mutex<Option<Arc<Waiter>>>,
}

impl FdChannel {
    /// Puts `fd`'s open file in non-blocking mode (`O_NONBLOCK`), which
    /// every descriptor of that open file shares: give it a file of its own
    /// (a clone of a `/dev/fuse` connection, say), not one that another
    /// reader, perhaps in another process, reads expecting to block.
    ///
    /// A worker waits for requests in poll(2), which keeps the kernel's
    /// wait queue of the descriptor free while the worker is not waiting
    /// (the fuse-blk module wakes a queue only while someone waits there).
    pub fn new(fd: OwnedFd) -> FdChannel {
        Self::with_wait(fd, false)
    }

    /// As [`FdChannel::new`], for one of several descriptors whose reads
    /// take requests from one queue (clones of one `/dev/fuse` connection,
    /// each with a worker of its own): a request then wakes one idle
    /// worker, not all of them.
    ///
    /// Every such descriptor sleeps on the queue's one wait queue, and the
    /// kernel wakes every poll(2) there for each request (only blocking
    /// reads wait exclusively): all idle workers would wake, one would read
    /// the request and the others go back to sleep. So a worker waits in
    /// an epoll instance of its own instead, holding the descriptor with
    /// `EPOLLEXCLUSIVE` (a request wakes only the first instance that has a
    /// waiter) and its stop without (which wakes it alone anyway). The
    /// instance stays registered on the wait queue between waits, and the
    /// kernel calls into it at each request even while its worker is busy.
    pub fn new_shared(fd: OwnedFd) -> FdChannel {
        Self::with_wait(fd, true)
    }

    fn with_wait(fd: OwnedFd, exclusive: bool) -> FdChannel {
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
        FdChannel {
            fd,
            exclusive: AtomicBool::new(exclusive),
            waiter: parking_lot::Mutex::new(None),
        }
    }

    /// Reads one message, waiting in poll(2) while none is there.
    /// Reads the next message, waiting for one; with `idle`, for no longer
    /// than that in all (then `ErrorKind::TimedOut`), however many times
    /// another reader takes a message first.
    fn read_message(
        &self,
        buf: &mut [u8],
        stop: Option<&Stop>,
        idle: Option<Duration>,
    ) -> io::Result<Option<usize>> {
        let deadline = idle.map(|idle| Instant::now() + idle);
        loop {
            match nix::unistd::read(&self.fd, buf) {
                // EOF: the peer of a socket-backed channel has gone.
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EAGAIN) => {
                    let left = deadline.map(|end| end.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) || !self.wait_readable(left, stop)? {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
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

    /// Waits at most `timeout` (`None`: for as long as it takes) for a
    /// request or the channel's end; false if neither came. `stop` set, or
    /// a signal, end the wait with `ErrorKind::Interrupted`.
    fn wait_readable(&self, timeout: Option<Duration>, stop: Option<&Stop>) -> io::Result<bool> {
        if self.exclusive.load(Ordering::Relaxed) {
            match self.waiter(stop) {
                Ok(waiter) => return waiter.wait(timeout),
                Err(e) => {
                    log::warn!(
                        "a channel cannot be waited for in epoll ({e}): \
                         every idle worker of its queue wakes for a request"
                    );
                    self.exclusive.store(false, Ordering::Relaxed);
                }
            }
        }
        self.wait(PollFlags::POLLIN, timeout, stop)
    }

    /// The epoll instance to wait in with `stop`: the last one, or a new
    /// one if that was made for another stop (whose registration, once it
    /// is closed, has gone).
    fn waiter(&self, stop: Option<&Stop>) -> io::Result<Arc<Waiter>> {
        let mut waiter = self.waiter.lock();
        let stop_id = stop.map(|stop| stop.id);
        match &*waiter {
            Some(current) if current.stop_id == stop_id => Ok(Arc::clone(current)),
            _ => {
                let new = Arc::new(Waiter::new(self.fd.as_fd(), stop)?);
                *waiter = Some(Arc::clone(&new));
                Ok(new)
            }
        }
    }

    /// Waits in poll(2) at most `timeout` (`None`: for as long as it takes)
    /// for the descriptor to be ready for `events`; false if it was not.
    /// `stop` set, or a signal, end the wait with `ErrorKind::Interrupted`.
    fn wait(
        &self,
        events: PollFlags,
        timeout: Option<Duration>,
        stop: Option<&Stop>,
    ) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.fd.as_fd(), events)]
            .into_iter()
            .chain(stop.map(|stop| PollFd::new(stop.as_fd(), PollFlags::POLLIN)))
            .collect::<Vec<_>>();
        match poll(&mut fds, poll_timeout(timeout)) {
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

/// Longer waits than poll(2) and epoll_wait(2) take are cut short: the
/// caller only learns it was not idle for that long.
fn poll_timeout(timeout: Option<Duration>) -> PollTimeout {
    timeout.map_or(PollTimeout::NONE, |timeout| {
        PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)
    })
}

/// An epoll instance holding a channel's descriptor (`EPOLLEXCLUSIVE`) and
/// the stop it is waited with, if any (see [`FdChannel::new_shared`]).
#[derive(Debug)]
struct Waiter {
    epoll: Epoll,
    stop_id: Option<u64>,
}

/// `data` of the stop's events; the channel's are 0.
const STOP_EVENT: u64 = 1;

impl Waiter {
    fn new(channel: BorrowedFd<'_>, stop: Option<&Stop>) -> io::Result<Waiter> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let exclusive = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, 0);
        match epoll.add(channel, exclusive) {
            // Before Linux 4.5: every waiter wakes, as in poll(2).
            Err(Errno::EINVAL) => epoll.add(channel, EpollEvent::new(EpollFlags::EPOLLIN, 0))?,
            other => other?,
        }
        if let Some(stop) = stop {
            epoll.add(stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP_EVENT))?;
        }
        Ok(Waiter {
            epoll,
            stop_id: stop.map(|stop| stop.id),
        })
    }

    /// As [`FdChannel::wait`] for reading.
    fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut events = [EpollEvent::empty(); 2];
        match self.epoll.wait(&mut events, poll_timeout(timeout)) {
            Ok(n) if events[..n].iter().any(|e| e.data() == STOP_EVENT) => {
                Err(io::ErrorKind::Interrupted.into())
            }
            // EPOLLERR or EPOLLHUP (the channel ended) count as ready too,
            // as in `FdChannel::wait`.
            Ok(n) => Ok(n > 0),
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
        self.read_message(buf, None, None)
    }

    fn receive_or_stop(&self, buf: &mut [u8], stop: &Stop) -> io::Result<Option<usize>> {
        self.read_message(buf, Some(stop), None)
    }

    fn receive_or_idle(
        &self,
        buf: &mut [u8],
        stop: &Stop,
        idle: Duration,
    ) -> io::Result<Option<usize>> {
        self.read_message(buf, Some(stop), Some(idle))
    }

    fn wait_ready(&self, timeout: Duration, stop: &Stop) -> io::Result<bool> {
        self.wait_readable(Some(timeout), Some(stop))
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
