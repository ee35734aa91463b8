//! One connection slot to the server that survives the connection, with
//! many commands in flight on it.
//!
//! Each link has a thread of its own that drives its libnbd handle with
//! libnbd's asynchronous calls: handler threads hand it [`Job`]s and
//! return, the thread issues their NBD commands (up to a cap), polls the
//! socket, and answers each job's reply when the server has answered all
//! of its commands. A command whose connection broke, or that the server
//! did not answer within the command timeout, is issued again on the next
//! connection; the link reconnects with backoff, and only once it has
//! been without a connection for the reconnect timeout do the waiting
//! jobs fail, with EIO; from then on each fails at once unless a
//! reconnection attempt is under way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_blk::{ReplyData, ReplyEmpty, ReplyWrite};
use parking_lot::Mutex;

use crate::buffer::{Buffer, Spare};
use crate::handle::{Error, Export, Handle};

/// How a link waits for the server to come back, and how long it gives a
/// command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// How long requests wait after the connection broke; after that they
    /// fail with EIO (0: after one reconnection attempt).
    pub timeout: Duration,
    /// The wait before the second attempt (the first is at once); it
    /// doubles after every failed attempt, up to `max_delay`.
    pub first_delay: Duration,
    /// The longest wait between two attempts.
    pub max_delay: Duration,
    /// A command the server has not answered within this counts as a
    /// broken connection: the link drops it, reconnects and issues the
    /// command again, as the kernel's nbd client does. It also bounds a
    /// reconnection's handshake. Zero: no limit on commands (handshakes
    /// then get [`HANDSHAKE_LIMIT`]).
    pub command_timeout: Duration,
}

/// How long a handshake may take when commands have no timeout.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            timeout: Duration::from_secs(30),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            command_timeout: Duration::from_secs(30),
        }
    }
}

impl ReconnectPolicy {
    fn handshake_limit(&self) -> Duration {
        if self.command_timeout.is_zero() {
            HANDSHAKE_LIMIT
        } else {
            self.command_timeout
        }
    }
}

/// A link's state, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// Connected, or not connected yet and never needed.
    Connected,
    /// The connection broke `for_` ago; requests wait.
    Reconnecting {
        /// Time since the connection broke.
        for_: Duration,
    },
    /// The connection broke `for_` ago, longer than the timeout: requests
    /// fail with EIO until an attempt succeeds.
    Down {
        /// Time since the connection broke.
        for_: Duration,
    },
}

/// `connected`, `reconnecting for 2.1s`, `down for 40.0s`: what `list`
/// shows.
impl std::fmt::Display for LinkStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkStatus::Connected => f.write_str("connected"),
            LinkStatus::Reconnecting { for_ } => {
                write!(f, "reconnecting for {:.1}s", for_.as_secs_f64())
            }
            LinkStatus::Down { for_ } => write!(f, "down for {:.1}s", for_.as_secs_f64()),
        }
    }
}

/// What a reconnection must find for requests to be reissued on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations {
    /// The export as first seen: its size must not change, nor may a
    /// capability the device advertised go away.
    pub export: Export,
    /// The device writes (so the export must stay writable).
    pub writable: bool,
    /// Several connections serve the device, which is only safe while the
    /// server advertises multi-conn.
    pub multi_conn: bool,
}

impl Expectations {
    /// Why `export` cannot stand in for the expected one, if it cannot.
    pub fn mismatch(&self, export: &Export) -> Option<String> {
        let expected = &self.export;
        if export.size != expected.size {
            return Some(format!(
                "the export's size changed from {} to {} bytes",
                expected.size, export.size
            ));
        }
        if self.writable && export.read_only {
            return Some("the export became read-only".to_owned());
        }
        if self.multi_conn && !export.can_multi_conn {
            return Some("the server no longer allows several connections (multi-conn)".to_owned());
        }
        let lost = [
            (expected.can_flush && !export.can_flush, "flush"),
            (expected.can_fua && !export.can_fua, "FUA"),
            (expected.can_trim && !export.can_trim, "trim"),
            (expected.can_zero && !export.can_zero, "write-zeroes"),
        ];
        lost.iter()
            .find(|(gone, _)| *gone)
            .map(|(_, what)| format!("the server no longer supports {what}"))
    }
}

/// What a job asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write {
        /// With NBD_CMD_FLAG_FUA: durable before the reply.
        fua: bool,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    Zero {
        /// With NBD_CMD_FLAG_NO_HOLE: the range stays allocated.
        no_hole: bool,
    },
}

/// The reply a job answers when it is done.
pub enum Reply {
    /// A read's: the data, or the error.
    Data(ReplyData),
    /// A write's.
    Write(ReplyWrite),
    /// A flush's, trim's or write-zeroes'.
    Empty(ReplyEmpty),
}

/// The commands of a job: `[offset, offset + len)` in pieces of at most
/// `max` bytes each, in order (computed, not listed: a job allocates
/// nothing on the handler's thread but its buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    offset: u64,
    len: u64,
    max: u64,
    count: usize,
}

impl Pieces {
    /// `[offset, offset + len)` in pieces of at most `max` (not 0)
    /// bytes; none when `len` is 0.
    pub fn new(offset: u64, len: u64, max: u64) -> Pieces {
        assert!(max > 0, "pieces of no bytes");
        Pieces {
            offset,
            len,
            max,
            count: len.div_ceil(max) as usize,
        }
    }

    /// One command about no range: a flush.
    pub fn one_without_range() -> Pieces {
        Pieces {
            offset: 0,
            len: 0,
            max: 1,
            count: 1,
        }
    }

    /// How many commands.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is no command at all.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `(offset, length)` of piece `index`, and its offset from the first
    /// piece's.
    fn get(&self, index: usize) -> (u64, u64, u64) {
        let from_start = index as u64 * self.max;
        let length = self.max.min(self.len - from_start.min(self.len));
        (self.offset + from_start, length, from_start)
    }
}

/// One handler call: one NBD command per piece (a read or write larger
/// than the server takes is split), answered once all are done.
pub struct Job {
    kind: Kind,
    pieces: Pieces,
    /// Reads and writes: the data of the whole job, from the first
    /// piece's offset. libnbd writes a read's into it.
    buffer: Buffer,
    /// Bytes of data a read answers.
    data_len: usize,
    reply: Reply,
    /// Pieces not answered yet.
    remaining: usize,
    /// The first error the server answered.
    error: Option<i32>,
}

impl Job {
    /// A read of `pieces` into `buffer` (from [`Link::buffer`], with room
    /// for them all).
    pub fn read(pieces: Pieces, buffer: Buffer, reply: ReplyData) -> Job {
        let data_len = pieces.len() as usize;
        assert!(
            data_len <= buffer.capacity(),
            "a read larger than its buffer"
        );
        Job::new(Kind::Read, pieces, buffer, data_len, Reply::Data(reply))
    }

    /// A write of the data in `data` (filled with [`Buffer::fill_from`])
    /// in `pieces`, which cover it.
    pub fn write(pieces: Pieces, data: Buffer, fua: bool, reply: ReplyWrite) -> Job {
        assert!(
            pieces.len() <= data.capacity() as u64,
            "a write larger than its buffer"
        );
        Job::new(Kind::Write { fua }, pieces, data, 0, Reply::Write(reply))
    }

    /// A flush, trim or write-zeroes.
    pub fn range(kind: Kind, pieces: Pieces, reply: ReplyEmpty) -> Job {
        Job::new(kind, pieces, Buffer::empty(), 0, Reply::Empty(reply))
    }

    fn new(kind: Kind, pieces: Pieces, buffer: Buffer, data_len: usize, reply: Reply) -> Job {
        let remaining = pieces.count();
        Job {
            kind,
            pieces,
            buffer,
            data_len,
            reply,
            remaining,
            error: None,
        }
    }

    /// Answers the reply: the data or success, or the first error; gives
    /// the buffer back, for another job.
    fn answer(self) -> Buffer {
        match (self.reply, self.error) {
            (Reply::Data(reply), None) => {
                // SAFETY: every piece of the read was answered, so no
                // command is left to write the buffer.
                reply.data(unsafe { self.buffer.bytes(self.data_len) });
            }
            (Reply::Data(reply), Some(errno)) => reply.error(errno),
            (Reply::Write(reply), None) => reply.ok(),
            (Reply::Write(reply), Some(errno)) => reply.error(errno),
            (Reply::Empty(reply), None) => reply.ok(),
            (Reply::Empty(reply), Some(errno)) => reply.error(errno),
        }
        self.buffer
    }
}

/// How long a link is idle before it gives its spare buffers back, and
/// the allocator what was freed (an idle daemon stays small).
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// What the link's thread shows the rest of the device.
#[derive(Default)]
struct Status {
    /// Connections made so far.
    generation: u64,
    /// Since when the link has had no connection, once it had one.
    outage_since: Option<Instant>,
}

/// What handler threads and the link's thread share.
struct Shared {
    /// Jobs handed over and not taken by the thread yet; `None` once the
    /// link shut down.
    incoming: Mutex<Option<Vec<Job>>>,
    /// An eventfd that wakes the thread from poll(2).
    wake: OwnedFd,
    status: Mutex<Status>,
    /// Buffers of answered jobs, for the next ones.
    spare: Mutex<Spare>,
}

impl Shared {
    /// Keeps a job's buffer for another job, while there is room.
    fn recycle(&self, buffer: Buffer) {
        if buffer.capacity() > 0 {
            self.spare.lock().put(buffer);
        }
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: the eventfd is open for the life of `self`; the buffer
        // is the 8 bytes an eventfd write takes. A full counter (EAGAIN)
        // already wakes the reader.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// One connection to the server that reconnects when it breaks, driven
/// by a thread of its own with many commands in flight; jobs sent to it
/// wait out an outage and are reissued, up to the policy's timeout.
pub struct Link {
    shared: Arc<Shared>,
    timeout: Duration,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// A link that starts on `handle` (or, without one, connects when
    /// first used), with at most `max_in_flight` commands on the
    /// connection at once, and its thread.
    pub fn new(
        uri: &str,
        index: usize,
        policy: ReconnectPolicy,
        expectations: Expectations,
        max_in_flight: usize,
        handle: Option<Handle>,
    ) -> io::Result<Link> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let generation = u64::from(handle.is_some());
        let shared = Arc::new(Shared {
            incoming: Mutex::new(Some(Vec::new())),
            wake,
            status: Mutex::new(Status {
                generation,
                outage_since: None,
            }),
            spare: Mutex::new(Spare::default()),
        });
        let worker = Worker {
            uri: uri.to_owned(),
            index,
            policy,
            expectations,
            max_in_flight: max_in_flight.max(1),
            shared: shared.clone(),
            handle,
            connecting_since: None,
            broken: None,
            generation,
            outage: None,
            jobs: HashMap::new(),
            next_job: 0,
            queued: VecDeque::new(),
            in_flight: BTreeMap::new(),
            release_due: None,
            served_since_release: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("nbd-link-{index}"))
            .spawn(move || worker.run())?;
        Ok(Link {
            shared,
            timeout: policy.timeout,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A buffer with room for `len` bytes, for a job's data: a spare one
    /// when there is one. Fails only when no memory can be mapped.
    pub fn buffer(&self, len: usize) -> io::Result<Buffer> {
        if let Some(buffer) = self.shared.spare.lock().take(len) {
            return Ok(buffer);
        }
        Buffer::with_capacity(len)
    }

    /// Hands `job` to the link's thread, which answers it; after
    /// [`shutdown`](Self::shutdown) it is answered EIO at once.
    pub fn submit(&self, job: Job) {
        let mut incoming = self.shared.incoming.lock();
        match incoming.as_mut() {
            Some(jobs) => {
                let was_empty = jobs.is_empty();
                jobs.push(job);
                drop(incoming);
                // A non-empty list means a wake is already pending.
                if was_empty {
                    self.shared.wake();
                }
            }
            None => {
                drop(incoming);
                let mut job = job;
                job.error = Some(libc::EIO);
                drop(job.answer());
            }
        }
    }

    /// Whether the connection is up, and how long it has been down.
    pub fn status(&self) -> LinkStatus {
        let status = self.shared.status.lock();
        match status.outage_since {
            Some(since) if status.generation > 0 => {
                let for_ = since.elapsed();
                if for_ >= self.timeout {
                    LinkStatus::Down { for_ }
                } else {
                    LinkStatus::Reconnecting { for_ }
                }
            }
            _ => LinkStatus::Connected,
        }
    }

    /// How many times the link connected again after losing its
    /// connection (its first connection not counted).
    pub fn reconnections(&self) -> u64 {
        self.shared.status.lock().generation.saturating_sub(1)
    }

    /// Ends the connection politely, if there is one, without waiting
    /// for the server, answers EIO to what is left, and ends the thread.
    pub fn shutdown(&self) {
        let left = self.shared.incoming.lock().take();
        self.shared.wake();
        for mut job in left.into_iter().flatten() {
            job.error = Some(libc::EIO);
            drop(job.answer());
        }
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                log::error!("an NBD link's thread panicked");
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Outage {
    since: Instant,
    next_attempt: Instant,
    /// The wait after the next failed attempt.
    delay: Duration,
    last_error: Option<String>,
    /// Whether the timeout's expiry has been logged.
    expiry_logged: bool,
}

impl Outage {
    /// An outage from `since`, with its first attempt due at once.
    fn new(since: Instant, first_delay: Duration) -> Outage {
        Outage {
            since,
            next_attempt: since,
            delay: first_delay,
            last_error: None,
            expiry_logged: false,
        }
    }
}

/// A command on the connection.
struct InFlight {
    job: u64,
    piece: usize,
    issued: Instant,
}

/// The link's thread: the only one that calls libnbd on its handles.
struct Worker {
    uri: String,
    /// Which link of the device, for the log.
    index: usize,
    policy: ReconnectPolicy,
    expectations: Expectations,
    max_in_flight: usize,
    shared: Arc<Shared>,
    /// The connection, or the attempt at one under way.
    handle: Option<Handle>,
    /// Set while `handle` is still in its handshake.
    connecting_since: Option<Instant>,
    /// Why the handle failed, when a call on it said so.
    broken: Option<String>,
    generation: u64,
    /// Set while there is no connection, once one was needed.
    outage: Option<Outage>,
    jobs: HashMap<u64, Job>,
    next_job: u64,
    /// `(job, piece)` to issue, in order.
    queued: VecDeque<(u64, usize)>,
    /// By cookie: libnbd numbers commands in the order they are issued,
    /// so the first is the oldest.
    in_flight: BTreeMap<u64, InFlight>,
    /// When the spare buffers go, if the link stays idle till then.
    release_due: Option<Instant>,
    /// Jobs came since the last release: their bookkeeping (libnbd's
    /// commands, this thread's maps) went through the allocator.
    served_since_release: bool,
}

impl Worker {
    fn run(mut self) {
        // The list handler threads push to and the one emptied here trade
        // places, each keeping its capacity: a handler thread grows it
        // only past the longest list so far, and its arena sees nothing.
        let mut drained = Vec::new();
        loop {
            match self.shared.incoming.lock().as_mut() {
                Some(jobs) => std::mem::swap(jobs, &mut drained),
                None => break,
            }
            for job in drained.drain(..) {
                self.accept(job);
            }
            self.step();
            self.wait();
        }
        self.finish();
    }

    fn accept(&mut self, job: Job) {
        self.release_due = None;
        self.served_since_release = true;
        if job.pieces.is_empty() {
            let buffer = job.answer();
            return self.shared.recycle(buffer);
        }
        let id = self.next_job;
        self.next_job += 1;
        self.queued
            .extend((0..job.pieces.count()).map(|piece| (id, piece)));
        self.jobs.insert(id, job);
    }

    /// Everything that can be done without waiting: notice a broken
    /// connection, finish a handshake, collect answers, issue commands,
    /// expire what waited too long, start a reconnection attempt.
    fn step(&mut self) {
        let now = Instant::now();
        if let Some(handle) = &self.handle {
            if handle.is_dead() {
                let reason = self
                    .broken
                    .take()
                    .unwrap_or_else(|| "the connection closed".to_owned());
                self.drop_connection(&reason);
            } else if let Some(started) = self.connecting_since {
                if handle.is_ready() {
                    self.handshake_done();
                } else if now >= started + self.policy.handshake_limit() {
                    let reason = format!(
                        "no answer to the handshake within {:.1?}",
                        self.policy.handshake_limit()
                    );
                    self.drop_connection(&reason);
                }
            }
        }
        if self.connecting_since.is_none() && self.handle.is_some() {
            self.collect();
        }
        if self.connecting_since.is_none() && self.handle.is_some() {
            self.issue();
        }
        if !self.policy.command_timeout.is_zero() && self.connecting_since.is_none() {
            let oldest = self.in_flight.values().next().map(|c| c.issued);
            if oldest.is_some_and(|issued| now >= issued + self.policy.command_timeout) {
                let reason = format!(
                    "the server did not answer a command within {:.1?}",
                    self.policy.command_timeout
                );
                self.drop_connection(&reason);
            }
        }
        if self.handle.is_none() {
            self.reconnect(now);
        }
        self.release_when_idle(now);
    }

    /// Once idle for [`RELEASE_AFTER`] after serving jobs, drops the
    /// spare buffers (mappings: unmapped at once) and has the allocator
    /// give back the free memory inside every thread's arena (jobs and
    /// their lists are allocated on the handler threads).
    fn release_when_idle(&mut self, now: Instant) {
        if !self.jobs.is_empty() {
            self.release_due = None;
            return;
        }
        match self.release_due {
            None if self.served_since_release || !self.shared.spare.lock().is_empty() => {
                self.release_due = Some(now + RELEASE_AFTER);
            }
            Some(due) if now >= due => {
                self.release_due = None;
                self.served_since_release = false;
                // Unmapped outside the lock, which handler threads take.
                let spare = std::mem::take(&mut *self.shared.spare.lock());
                drop(spare);
                // SAFETY: malloc_trim has no preconditions; it only
                // returns free memory to the system.
                unsafe { libc::malloc_trim(0) };
            }
            _ => {}
        }
    }

    /// Starts an attempt if one is due (while jobs wait, or in the
    /// background once the link had a connection), and fails the waiting
    /// jobs once the outage outlasted the timeout with no attempt under
    /// way.
    fn reconnect(&mut self, now: Instant) {
        if self.jobs.is_empty() && self.generation == 0 {
            return;
        }
        let first_delay = self.policy.first_delay;
        let outage = self
            .outage
            .get_or_insert_with(|| Outage::new(now, first_delay));
        if now >= outage.next_attempt {
            self.start_attempt();
            if self.handle.is_some() {
                return;
            }
        }
        let Some(outage) = self.outage.as_mut() else {
            return;
        };
        if self.jobs.is_empty() || now < outage.since + self.policy.timeout {
            return;
        }
        if !outage.expiry_logged {
            outage.expiry_logged = true;
            log::error!(
                "{}: no connection for {:.1?} (last attempt: {}); requests fail with EIO until the server is back",
                self.uri,
                self.policy.timeout,
                outage.last_error.as_deref().unwrap_or("none yet")
            );
        }
        self.fail_all(libc::EIO);
    }

    fn start_attempt(&mut self) {
        match Handle::start_connect(&self.uri) {
            Ok(handle) => {
                self.handle = Some(handle);
                self.connecting_since = Some(Instant::now());
                self.broken = None;
                // A unix socket may be connected, even negotiated, at once.
                if self.handle.as_ref().is_some_and(Handle::is_ready) {
                    self.handshake_done();
                }
            }
            Err(e) => self.attempt_failed(&e.message),
        }
    }

    fn attempt_failed(&mut self, message: &str) {
        log::debug!("{}: reconnection attempt: {message}", self.uri);
        let now = Instant::now();
        let first_delay = self.policy.first_delay;
        let outage = self
            .outage
            .get_or_insert_with(|| Outage::new(now, first_delay));
        outage.next_attempt = now + outage.delay;
        outage.delay = (outage.delay * 2).min(self.policy.max_delay);
        outage.last_error = Some(message.to_owned());
    }

    /// The handshake of an attempt finished: the connection counts if
    /// the export is still the one the device serves.
    fn handshake_done(&mut self) {
        let Some(handle) = &self.handle else { return };
        let refused = match handle.export() {
            Ok(export) => self.expectations.mismatch(&export),
            Err(e) => Some(e.message),
        };
        self.connecting_since = None;
        if let Some(reason) = refused {
            self.handle = None;
            return self.attempt_failed(&reason);
        }
        if self.generation > 0 {
            log::warn!(
                "{}: reconnected (link {}) after {:.1?}",
                self.uri,
                self.index,
                self.outage
                    .as_ref()
                    .map_or(Duration::ZERO, |o| o.since.elapsed())
            );
        }
        self.generation += 1;
        self.outage = None;
        let mut status = self.shared.status.lock();
        status.generation = self.generation;
        status.outage_since = None;
    }

    /// The connection broke, or is given up: its commands go back to the
    /// front of the queue, oldest first, to be issued on the next one.
    fn drop_connection(&mut self, reason: &str) {
        // Closed before any buffer is handed to another connection: a
        // closed handle writes into none.
        let Some(handle) = self.handle.take() else {
            return;
        };
        drop(handle);
        if self.connecting_since.take().is_some() {
            return self.attempt_failed(reason);
        }
        log::warn!(
            "{}: connection lost (link {}): {reason}; reconnecting, requests wait up to {:.1?}",
            self.uri,
            self.index,
            self.policy.timeout
        );
        let in_flight = std::mem::take(&mut self.in_flight);
        for command in in_flight.into_values().rev() {
            self.queued.push_front((command.job, command.piece));
        }
        let now = Instant::now();
        self.outage = Some(Outage::new(now, self.policy.first_delay));
        self.shared.status.lock().outage_since = Some(now);
    }

    /// Retires the commands the server answered.
    fn collect(&mut self) {
        let Some(handle) = &self.handle else { return };
        let mut shutting_down = None;
        while let Some((cookie, result)) = handle.next_completed() {
            let Some(command) = self.in_flight.remove(&cookie) else {
                continue;
            };
            match result {
                // nbdkit's answer while it stops: the command is to be
                // issued again, on the next connection.
                Err(e) if e.errno == libc::ESHUTDOWN => {
                    self.queued.push_front((command.job, command.piece));
                    shutting_down = Some(e);
                }
                Err(e) => {
                    log::debug!("{}: the server answered {}: {e}", self.uri, e.errno);
                    complete(&self.shared, &mut self.jobs, command.job, Some(e.errno));
                }
                Ok(()) => complete(&self.shared, &mut self.jobs, command.job, None),
            }
        }
        if let Some(e) = shutting_down {
            self.drop_connection(&e.message);
        }
    }

    /// Issues queued commands, up to the cap.
    fn issue(&mut self) {
        let Some(handle) = &self.handle else { return };
        let mut lost: Option<Error> = None;
        while self.in_flight.len() < self.max_in_flight {
            let Some((id, piece)) = self.queued.pop_front() else {
                break;
            };
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let (offset, len, at) = job.pieces.get(piece);
            let at = at as usize;
            let issued = match job.kind {
                // SAFETY: `at + len` lies within the buffer's capacity
                // (the job's pieces cover its data), which is neither
                // read nor moved until the command is retired or its
                // handle closed: the job stays in `jobs` until all its
                // pieces are answered, and its buffer never grows.
                Kind::Read => unsafe {
                    handle.aio_pread(job.buffer.as_mut_ptr().add(at), len as usize, offset)
                },
                // SAFETY: as for reads; the data is not changed while the
                // job lives.
                Kind::Write { fua } => unsafe {
                    handle.aio_pwrite(job.buffer.as_mut_ptr().add(at), len as usize, offset, fua)
                },
                Kind::Flush => handle.aio_flush(),
                Kind::Trim => handle.aio_trim(len, offset),
                Kind::Zero { no_hole } => handle.aio_zero(len, offset, no_hole),
            };
            match issued {
                Ok(cookie) => {
                    let issued = Instant::now();
                    self.in_flight.insert(
                        cookie,
                        InFlight {
                            job: id,
                            piece,
                            issued,
                        },
                    );
                }
                Err(e) if e.errno == libc::ESHUTDOWN || !handle.is_connected() => {
                    self.queued.push_front((id, piece));
                    lost = Some(e);
                    break;
                }
                // Refused by libnbd itself (a range the export does not
                // have, say): the caller's error.
                Err(e) => complete(&self.shared, &mut self.jobs, id, Some(e.errno)),
            }
        }
        if let Some(e) = lost {
            self.drop_connection(&e.message);
        }
    }

    /// Answers every job EIO.
    fn fail_all(&mut self, errno: i32) {
        self.queued.clear();
        self.in_flight.clear();
        for (_, mut job) in self.jobs.drain() {
            job.error = Some(errno);
            drop(job.answer());
        }
    }

    /// Sleeps in poll(2) until the socket is ready as libnbd wants, a job
    /// arrives, or something is due; then tells libnbd what the socket
    /// can do.
    fn wait(&mut self) {
        let now = Instant::now();
        let mut due: Option<Instant> = None;
        let mut at = |when: Instant| due = Some(due.map_or(when, |d| d.min(when)));
        if let Some(started) = self.connecting_since {
            at(started + self.policy.handshake_limit());
        } else if !self.policy.command_timeout.is_zero() {
            if let Some(oldest) = self.in_flight.values().next() {
                at(oldest.issued + self.policy.command_timeout);
            }
        }
        if let Some(release) = self.release_due {
            at(release);
        }
        if self.handle.is_none() {
            if let Some(outage) = &self.outage {
                at(outage.next_attempt);
                if !self.jobs.is_empty() {
                    at(outage.since + self.policy.timeout);
                }
            }
        }
        let timeout_ms = due.map_or(-1, |due| {
            let left = due.saturating_duration_since(now);
            // Rounded up, so it does not wake just before it is due.
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });

        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        let mut direction = (false, false);
        if let Some(handle) = &self.handle {
            if let Ok(fd) = handle.fd() {
                direction = handle.direction();
                fds[1].fd = fd;
                fds[1].events = if direction.0 { libc::POLLIN } else { 0 }
                    | if direction.1 { libc::POLLOUT } else { 0 };
            }
        }
        // SAFETY: `fds` is an array of two pollfds that outlives the call;
        // a negative fd is ignored.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                log::error!("{}: poll: {error}", self.uri);
            }
            return;
        }
        if fds[0].revents != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads the eventfd's 8-byte counter into `count`,
            // which outlives the call; EAGAIN (already read) is harmless.
            unsafe { libc::read(self.shared.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        }
        let revents = fds[1].revents;
        let Some(handle) = &self.handle else { return };
        let failed = libc::POLLHUP | libc::POLLERR;
        let mut result = Ok(());
        if direction.0 && revents & (libc::POLLIN | failed) != 0 {
            result = handle.notify_read();
        }
        if result.is_ok() && direction.1 && revents & (libc::POLLOUT | failed) != 0 {
            result = handle.notify_write();
        }
        if let Err(e) = result {
            self.broken = Some(e.message);
        }
    }

    /// The link shut down: asks the server to end the connection,
    /// without waiting, and answers EIO to what is left.
    fn finish(&mut self) {
        if let Some(handle) = self.handle.take() {
            if self.connecting_since.is_none() && handle.is_connected() {
                if let Err(e) = handle.disconnect() {
                    log::debug!("{}: disconnect: {e}", self.uri);
                }
            }
        }
        self.fail_all(libc::EIO);
    }
}

/// One piece of job `id` was answered (`error` None: it succeeded); the
/// job is answered when it was the last.
fn complete(shared: &Shared, jobs: &mut HashMap<u64, Job>, id: u64, error: Option<i32>) {
    let Some(job) = jobs.get_mut(&id) else { return };
    job.remaining -= 1;
    if job.error.is_none() {
        job.error = error;
    }
    if job.remaining == 0 {
        if let Some(job) = jobs.remove(&id) {
            shared.recycle(job.answer());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(pieces: Pieces) -> Vec<(u64, u64, u64)> {
        (0..pieces.count()).map(|index| pieces.get(index)).collect()
    }

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(
            all(Pieces::new(4096, 10 << 20, 4 << 20)),
            [
                (4096, 4 << 20, 0),
                (4096 + (4 << 20), 4 << 20, 4 << 20),
                (4096 + (8 << 20), 2 << 20, 8 << 20)
            ]
        );
        assert_eq!(all(Pieces::new(0, 512, 4096)), [(0, 512, 0)]);
        assert_eq!(all(Pieces::new(8192, 8192, 4096)).len(), 2);
        assert!(Pieces::new(0, 0, 4096).is_empty());
        assert_eq!(all(Pieces::one_without_range()), [(0, 0, 0)]);
    }
}
