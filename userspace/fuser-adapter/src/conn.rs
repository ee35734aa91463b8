//! The client end of the socket pair: sending requests to the in-process
//! fuser session and routing its replies back to the fuse-blk reply objects
//! waiting for them.
//!
//! Every request in flight has an entry in the pending map, keyed by its
//! unique. The caller registers the entry, sends the message and returns;
//! the reader thread answers the entry when the reply comes back. Nothing
//! here waits for a reply except the explicit synchronous calls used to set
//! the connection up and tear it down.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fuse_blk::{ReplyData, ReplyEmpty, ReplyWrite};
use fuse_blk_proto::abi::{opcode, FallocateIn, FsyncIn, OutHeader, WriteOut};
use fuse_blk_proto::client::{encode_request, parse_reply, read_struct};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};
use parking_lot::{Condvar, Mutex};
use zerocopy::{FromBytes, IntoBytes};

/// What the reply to one message must look like, and how its errors map
/// to what the block layer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A READ chunk: exactly this many bytes; a short read is EIO.
    Data(usize),
    /// A WRITE chunk: `fuse_write_out.size` must be this; less is EIO.
    Written(u32),
    /// An FSYNC. A filesystem without fsync answers ENOSYS, which the
    /// kernel takes as "nothing to sync" (it stops sending FSYNC); so do we.
    Fsync,
    /// A FALLOCATE: ENOSYS and EOPNOTSUPP both mean "not supported".
    Fallocate,
    /// Anything (setup and teardown calls): payload handed back as is.
    Any,
}

impl Expect {
    fn check(self, result: Result<&[u8], i32>) -> Result<&[u8], i32> {
        match (self, result) {
            (Expect::Fsync, Err(libc::ENOSYS)) => {
                log::debug!("the filesystem does not implement fsync; treating it as done");
                Ok(&[])
            }
            (Expect::Fallocate, Err(libc::ENOSYS | libc::EOPNOTSUPP)) => Err(libc::EOPNOTSUPP),
            (_, Err(errno)) => Err(errno),
            (Expect::Data(len), Ok(payload)) if payload.len() != len => {
                log::error!(
                    "short read from the filesystem: {} of {len} bytes; answering EIO",
                    payload.len()
                );
                Err(libc::EIO)
            }
            (Expect::Written(len), Ok(payload)) => match read_struct::<WriteOut>(payload) {
                Some(out) if out.size == len => Ok(payload),
                Some(out) => {
                    log::error!(
                        "short write to the filesystem: {} of {len} bytes; answering EIO",
                        out.size
                    );
                    Err(libc::EIO)
                }
                None => {
                    log::error!("malformed WRITE reply of {} bytes", payload.len());
                    Err(libc::EIO)
                }
            },
            (_, Ok(payload)) => Ok(payload),
        }
    }
}

/// A fuse-blk reply that can be answered with success or an errno.
pub(crate) trait Answer: Send + 'static {
    fn ok(self);
    fn error(self, errno: i32);
}

impl Answer for ReplyWrite {
    fn ok(self) {
        ReplyWrite::ok(self)
    }
    fn error(self, errno: i32) {
        ReplyWrite::error(self, errno)
    }
}

impl Answer for ReplyEmpty {
    fn ok(self) {
        ReplyEmpty::ok(self)
    }
    fn error(self, errno: i32) {
        ReplyEmpty::error(self, errno)
    }
}

/// A message to send once the current one has succeeded (the FSYNC after a
/// FUA write).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsyncAfter {
    pub nodeid: u64,
    pub arg: FsyncIn,
}

/// A request split into several messages (or followed by an FSYNC): the
/// reply is answered once every part has come back, with the first error
/// any part met.
pub(crate) struct Aggregate<R: Answer> {
    state: Mutex<AggregateState<R>>,
}

struct AggregateState<R> {
    reply: Option<R>,
    remaining: usize,
    error: Option<i32>,
    then: Option<FsyncAfter>,
}

impl<R: Answer> Aggregate<R> {
    pub(crate) fn new(reply: R, parts: usize, then: Option<FsyncAfter>) -> Arc<Self> {
        Arc::new(Aggregate {
            state: Mutex::new(AggregateState {
                reply: Some(reply),
                remaining: parts,
                error: None,
                then,
            }),
        })
    }
}

impl Aggregate<ReplyWrite> {
    fn part_done(self: &Arc<Self>, conn: &Arc<Conn>, result: Result<(), i32>) {
        let mut state = self.state.lock();
        if let Err(errno) = result {
            state.error.get_or_insert(errno);
        }
        state.remaining -= 1;
        if state.remaining > 0 {
            return;
        }
        if state.error.is_none() {
            if let Some(then) = state.then.take() {
                state.remaining = 1;
                drop(state);
                conn.submit_followup(
                    opcode::FSYNC,
                    then.nodeid,
                    &[then.arg.as_bytes()],
                    Pending::new(Expect::Fsync, Target::Write(Arc::clone(self))),
                );
                return;
            }
        }
        let reply = state.reply.take();
        let error = state.error;
        drop(state);
        answer(reply, error);
    }
}

fn answer<R: Answer>(reply: Option<R>, error: Option<i32>) {
    if let Some(reply) = reply {
        match error {
            None => reply.ok(),
            Some(errno) => reply.error(errno),
        }
    }
}

/// A read split into several READ messages, gathered into one buffer.
pub(crate) struct ReadAggregate {
    state: Mutex<ReadState>,
}

struct ReadState {
    reply: Option<ReplyData>,
    buf: Vec<u8>,
    remaining: usize,
    error: Option<i32>,
}

impl ReadAggregate {
    pub(crate) fn new(reply: ReplyData, len: usize, parts: usize) -> Arc<Self> {
        Arc::new(ReadAggregate {
            state: Mutex::new(ReadState {
                reply: Some(reply),
                buf: vec![0; len],
                remaining: parts,
                error: None,
            }),
        })
    }

    fn part_done(&self, start: usize, result: Result<&[u8], i32>) {
        let mut state = self.state.lock();
        match result {
            Ok(payload) if state.error.is_none() => {
                // `Expect::Data` checked the length against this part's.
                state.buf[start..start + payload.len()].copy_from_slice(payload);
            }
            Ok(_) => {}
            Err(errno) => {
                state.error.get_or_insert(errno);
            }
        }
        state.remaining -= 1;
        if state.remaining > 0 {
            return;
        }
        let reply = state.reply.take();
        let buf = std::mem::take(&mut state.buf);
        let error = state.error;
        drop(state);
        if let Some(reply) = reply {
            match error {
                None => reply.data(&buf),
                Some(errno) => reply.error(errno),
            }
        }
    }
}

/// Who is told when a message's reply comes back.
pub(crate) enum Target {
    /// A whole read in one message.
    Read(ReplyData),
    /// One part of a split read, landing at `start` in the buffer.
    ReadPart {
        aggregate: Arc<ReadAggregate>,
        start: usize,
    },
    /// One part of a write (or the FSYNC after a FUA write).
    Write(Arc<Aggregate<ReplyWrite>>),
    /// FSYNC or FALLOCATE; `fallback` is tried when the filesystem does not
    /// support the first FALLOCATE mode.
    Empty {
        reply: ReplyEmpty,
        fallback: Option<(u64, FallocateIn)>,
    },
    /// A synchronous call waiting on a channel.
    Call(mpsc::Sender<Result<Vec<u8>, i32>>),
}

/// One message in flight.
pub(crate) struct Pending {
    expect: Expect,
    target: Target,
}

impl Pending {
    pub(crate) fn new(expect: Expect, target: Target) -> Pending {
        Pending { expect, target }
    }

    /// Answers the request with the reply (or the failure) of its message.
    /// Called exactly once per message, never with the pending lock held.
    fn complete(self, conn: &Arc<Conn>, result: Result<&[u8], i32>) {
        let result = self.expect.check(result);
        match self.target {
            Target::Read(reply) => match result {
                Ok(payload) => reply.data(payload),
                Err(errno) => reply.error(errno),
            },
            Target::ReadPart { aggregate, start } => aggregate.part_done(start, result),
            Target::Write(aggregate) => aggregate.part_done(conn, result.map(drop)),
            Target::Empty { reply, fallback } => match (result, fallback) {
                (Ok(_), _) => reply.ok(),
                (Err(libc::EOPNOTSUPP), Some((nodeid, arg))) => conn.submit_followup(
                    opcode::FALLOCATE,
                    nodeid,
                    &[arg.as_bytes()],
                    Pending::new(
                        Expect::Fallocate,
                        Target::Empty {
                            reply,
                            fallback: None,
                        },
                    ),
                ),
                (Err(errno), _) => reply.error(errno),
            },
            Target::Call(sender) => {
                // The caller may have given up waiting; nobody to tell then.
                let _ = sender.send(result.map(<[u8]>::to_vec));
            }
        }
    }
}

struct PendingState {
    map: HashMap<u64, Pending>,
    /// The session has gone: nothing more will be answered.
    closed: bool,
}

/// Why a synchronous call did not return a payload.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The filesystem answered this errno.
    Errno(i32),
    /// No answer in time; the filesystem may be stuck.
    TimedOut,
    /// The connection failed (I/O error, malformed reply, session gone).
    Io(io::Error),
}

impl CallError {
    pub(crate) fn into_io(self, what: &str) -> io::Error {
        match self {
            CallError::Errno(errno) => {
                let e = io::Error::from_raw_os_error(errno);
                io::Error::new(e.kind(), format!("{what}: {e}"))
            }
            CallError::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: the filesystem did not answer"),
            ),
            CallError::Io(e) => io::Error::new(e.kind(), format!("{what}: {e}")),
        }
    }
}

/// A message queued for the follow-up thread, with its unique.
type Followup = (u64, Vec<u8>);

/// The adapter's end of the socket pair and the requests in flight on it.
pub(crate) struct Conn {
    sock: OwnedFd,
    next_unique: AtomicU64,
    state: Mutex<PendingState>,
    idle: Condvar,
    followups: Mutex<Option<mpsc::Sender<Followup>>>,
}

impl Conn {
    pub(crate) fn new(sock: OwnedFd) -> Arc<Conn> {
        Arc::new(Conn {
            sock,
            next_unique: AtomicU64::new(1),
            state: Mutex::new(PendingState {
                map: HashMap::new(),
                closed: false,
            }),
            idle: Condvar::new(),
            followups: Mutex::new(None),
        })
    }

    pub(crate) fn sock(&self) -> &OwnedFd {
        &self.sock
    }

    fn unique(&self) -> u64 {
        self.next_unique.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one whole message. On a SOCK_SEQPACKET socket one `send` is one
    /// message, so concurrent senders never interleave.
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            match socket::send(self.sock.as_raw_fd(), msg, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) if n == msg.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short send: {n} of {} bytes",
                        msg.len()
                    )))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one message into `buf`; `None` at end of stream. A message
    /// larger than `buf` is reported with its full length (it was cut).
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match socket::recv(self.sock.as_raw_fd(), buf, MsgFlags::MSG_TRUNC) {
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Registers `pending` and sends its message. Whatever happens, the
    /// pending entry is completed exactly once: by its reply, or at once
    /// with an error if the message cannot be sent.
    pub(crate) fn submit(self: &Arc<Self>, op: u32, nodeid: u64, args: &[&[u8]], pending: Pending) {
        let Some(unique) = self.register(pending) else {
            return;
        };
        let msg = encode_request(op, unique, nodeid, args);
        if let Err(e) = self.send(&msg) {
            log::error!("failed to send request {unique} (opcode {op}): {e}");
            self.fail(unique, libc::EIO);
        }
    }

    /// Like [`submit`](Self::submit), from the reader thread: the message is
    /// handed to the follow-up thread, so that the reader never blocks on a
    /// full socket (the session could be blocked writing to us).
    fn submit_followup(self: &Arc<Self>, op: u32, nodeid: u64, args: &[&[u8]], pending: Pending) {
        let Some(unique) = self.register(pending) else {
            return;
        };
        let msg = encode_request(op, unique, nodeid, args);
        let sent = match &*self.followups.lock() {
            Some(sender) => sender.send((unique, msg)).is_ok(),
            None => false,
        };
        if !sent {
            self.fail(unique, libc::ENOTCONN);
        }
    }

    /// Adds `pending` to the map under a fresh unique, or completes it with
    /// ENOTCONN when the session has gone.
    fn register(self: &Arc<Self>, pending: Pending) -> Option<u64> {
        let unique = self.unique();
        let mut state = self.state.lock();
        if state.closed {
            drop(state);
            pending.complete(self, Err(libc::ENOTCONN));
            return None;
        }
        state.map.insert(unique, pending);
        Some(unique)
    }

    fn take(&self, unique: u64) -> Option<Pending> {
        let mut state = self.state.lock();
        let pending = state.map.remove(&unique);
        if state.map.is_empty() {
            self.idle.notify_all();
        }
        pending
    }

    fn fail(self: &Arc<Self>, unique: u64, errno: i32) {
        if let Some(pending) = self.take(unique) {
            pending.complete(self, Err(errno));
        }
    }

    /// Marks the session gone and answers everything in flight with EIO.
    fn close(self: &Arc<Self>) {
        let drained: Vec<Pending> = {
            let mut state = self.state.lock();
            state.closed = true;
            let drained = state.map.drain().map(|(_, p)| p).collect();
            self.idle.notify_all();
            drained
        };
        if !drained.is_empty() {
            log::warn!(
                "fuser session gone with {} requests in flight; answering EIO",
                drained.len()
            );
        }
        for pending in drained {
            pending.complete(self, Err(libc::EIO));
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Waits until no request is in flight (or the session has gone);
    /// false if `deadline` passed first.
    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        let mut state = self.state.lock();
        while !state.map.is_empty() && !state.closed {
            if self.idle.wait_until(&mut state, deadline).timed_out() {
                return state.map.is_empty() || state.closed;
            }
        }
        true
    }

    /// A synchronous call while the reader thread runs.
    pub(crate) fn call(
        self: &Arc<Self>,
        op: u32,
        nodeid: u64,
        args: &[&[u8]],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let (sender, receiver) = mpsc::channel();
        let unique = self.unique();
        {
            let mut state = self.state.lock();
            if state.closed {
                return Err(CallError::Errno(libc::ENOTCONN));
            }
            state
                .map
                .insert(unique, Pending::new(Expect::Any, Target::Call(sender)));
        }
        let msg = encode_request(op, unique, nodeid, args);
        if let Err(e) = self.send(&msg) {
            self.take(unique);
            return Err(CallError::Io(e));
        }
        match receiver.recv_timeout(timeout) {
            Ok(result) => result.map_err(CallError::Errno),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.take(unique);
                Err(CallError::TimedOut)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Errno(libc::EIO)),
        }
    }

    /// A synchronous call before the reader thread exists: sends, then
    /// reads replies on this thread until its own arrives. The socket's
    /// receive timeout bounds the wait.
    pub(crate) fn call_direct(
        &self,
        op: u32,
        nodeid: u64,
        args: &[&[u8]],
    ) -> Result<Vec<u8>, CallError> {
        let unique = self.unique();
        self.send(&encode_request(op, unique, nodeid, args))
            .map_err(CallError::Io)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    return Err(CallError::Io(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the fuser session ended",
                    )))
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) => {
                    return Err(CallError::TimedOut)
                }
                Err(e) => return Err(CallError::Io(e)),
            };
            if n > buf.len() {
                return Err(CallError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply of {n} bytes is too large"),
                )));
            }
            let reply = parse_reply(&buf[..n])
                .map_err(|e| CallError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if reply.unique != unique {
                log::debug!("ignoring message for {} during setup", reply.unique);
                continue;
            }
            return match reply.result {
                Ok(payload) => Ok(payload.to_vec()),
                Err(errno) => Err(CallError::Errno(errno)),
            };
        }
    }

    /// Ends the connection: both threads of it and the session see end of
    /// stream.
    pub(crate) fn shutdown(&self) {
        if let Err(e) = socket::shutdown(self.sock.as_raw_fd(), Shutdown::Both) {
            log::debug!("socket shutdown: {e}");
        }
    }

    /// Installs the follow-up queue and returns its receiving end.
    pub(crate) fn start_followups(&self) -> mpsc::Receiver<Followup> {
        let (sender, receiver) = mpsc::channel();
        *self.followups.lock() = Some(sender);
        receiver
    }

    /// Closes the follow-up queue so that its thread ends.
    pub(crate) fn stop_followups(&self) {
        self.followups.lock().take();
    }

    /// The follow-up thread: sends what the reader thread queued.
    pub(crate) fn run_followups(self: Arc<Self>, queue: mpsc::Receiver<Followup>) {
        for (unique, msg) in queue {
            if let Err(e) = self.send(&msg) {
                log::error!("failed to send follow-up request {unique}: {e}");
                self.fail(unique, libc::EIO);
            }
        }
    }

    /// The reader thread: answers each reply's pending entry until the
    /// session goes away, then answers everything still in flight EIO.
    pub(crate) fn run_reader(self: Arc<Self>, buf_size: usize) {
        let mut buf = vec![0u8; buf_size];
        loop {
            let n = match self.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    log::error!("receiving from the fuser session failed: {e}");
                    break;
                }
            };
            let Ok((header, _)) = OutHeader::read_from_prefix(&buf[..n.min(buf.len())]) else {
                log::error!("message of {n} bytes from the fuser session is too short");
                continue;
            };
            if header.unique == 0 {
                log::debug!("ignoring notification {} from the filesystem", header.error);
                continue;
            }
            let Some(pending) = self.take(header.unique) else {
                log::warn!("reply to unknown request {}", header.unique);
                continue;
            };
            if n > buf.len() {
                log::error!("reply to {} of {n} bytes is too large", header.unique);
                pending.complete(&self, Err(libc::EIO));
                continue;
            }
            match parse_reply(&buf[..n]) {
                Ok(reply) => pending.complete(&self, reply.result),
                Err(e) => {
                    log::error!("malformed reply to {}: {e}", header.unique);
                    pending.complete(&self, Err(libc::EIO));
                }
            }
        }
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_blk_proto::abi::InHeader;
    use fuse_blk_proto::reply::{encode_reply, error_header};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    /// A connection whose other end the test plays by hand.
    fn pair() -> (Arc<Conn>, OwnedFd, std::thread::JoinHandle<()>) {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let conn = Conn::new(ours);
        let reader = {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || conn.run_reader(4096))
        };
        (conn, theirs, reader)
    }

    /// Reads one request on the peer end and returns its header.
    fn next_request(peer: &OwnedFd) -> InHeader {
        let mut buf = vec![0u8; 4096];
        let n = socket::recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        InHeader::read_from_prefix(&buf[..n]).unwrap().0
    }

    fn reply(peer: &OwnedFd, msg: &[u8]) {
        socket::send(peer.as_raw_fd(), msg, MsgFlags::empty()).unwrap();
    }

    fn call_in_thread(conn: &Arc<Conn>) -> std::thread::JoinHandle<Result<Vec<u8>, CallError>> {
        let conn = Arc::clone(conn);
        std::thread::spawn(move || conn.call(opcode::GETATTR, 1, &[], Duration::from_secs(20)))
    }

    #[test]
    fn seqpacket_recv_reports_cut_messages() {
        let (ours, peer) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let conn = Conn::new(ours);
        reply(&peer, &[7u8; 100]);
        let mut small = [0u8; 10];
        assert_eq!(conn.recv(&mut small).unwrap(), Some(100));
        drop(peer);
        assert_eq!(conn.recv(&mut small).unwrap(), None);
    }

    #[test]
    fn replies_reach_their_caller_and_strays_are_ignored() {
        let (conn, peer, _reader) = pair();
        let call = call_in_thread(&conn);
        let header = next_request(&peer);
        assert_eq!(header.opcode, opcode::GETATTR);
        // A notification and a reply to nobody first: ignored.
        reply(&peer, error_header(0, 1).as_bytes());
        reply(&peer, &encode_reply(header.unique + 1000, &[b"x"]));
        reply(&peer, &encode_reply(header.unique, &[b"payload"]));
        assert_eq!(call.join().unwrap().unwrap(), b"payload");
        assert!(!conn.is_closed());
    }

    #[test]
    fn oversized_or_malformed_replies_are_eio() {
        let (conn, peer, _reader) = pair();
        let call = call_in_thread(&conn);
        let header = next_request(&peer);
        reply(&peer, &encode_reply(header.unique, &[&[0u8; 8192]]));
        assert!(matches!(
            call.join().unwrap(),
            Err(CallError::Errno(libc::EIO))
        ));

        let call = call_in_thread(&conn);
        let header = next_request(&peer);
        let mut bad = encode_reply(header.unique, &[b"abc"]);
        bad[0] += 1; // header length disagrees with the message
        reply(&peer, &bad);
        assert!(matches!(
            call.join().unwrap(),
            Err(CallError::Errno(libc::EIO))
        ));
    }

    #[test]
    fn peer_death_fails_pending_and_later_calls() {
        let (conn, peer, reader) = pair();
        let call = call_in_thread(&conn);
        next_request(&peer);
        drop(peer);
        assert!(matches!(
            call.join().unwrap(),
            Err(CallError::Errno(libc::EIO))
        ));
        reader.join().unwrap();
        assert!(conn.is_closed());
        assert!(conn.wait_idle(Instant::now()));
        assert!(matches!(
            conn.call(opcode::GETATTR, 1, &[], Duration::from_secs(1)),
            Err(CallError::Errno(libc::ENOTCONN))
        ));
    }

    #[test]
    fn expectations() {
        assert_eq!(Expect::Data(3).check(Ok(b"abc")), Ok(&b"abc"[..]));
        assert_eq!(Expect::Data(4).check(Ok(b"abc")), Err(libc::EIO));
        let out = WriteOut {
            size: 4096,
            padding: 0,
        };
        assert!(Expect::Written(4096).check(Ok(out.as_bytes())).is_ok());
        assert_eq!(
            Expect::Written(8192).check(Ok(out.as_bytes())),
            Err(libc::EIO)
        );
        assert_eq!(Expect::Written(8192).check(Ok(&[1, 2])), Err(libc::EIO));
        assert_eq!(Expect::Fsync.check(Err(libc::ENOSYS)), Ok(&[][..]));
        assert_eq!(Expect::Fsync.check(Err(libc::EIO)), Err(libc::EIO));
        assert_eq!(
            Expect::Fallocate.check(Err(libc::ENOSYS)),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(
            Expect::Fallocate.check(Err(libc::ENOSPC)),
            Err(libc::ENOSPC)
        );
    }
}
