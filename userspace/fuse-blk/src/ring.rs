//! The io_uring request loop shared by the transports that deliver FUSE
//! requests into ring entries: the kernel module's io_uring channels
//! (`FUSE_BLK_URING_*`) and FUSE over io_uring on a stock kernel. What
//! differs between them, the commands and where a request and its reply sit
//! in an entry's buffers, is a [`Wire`].
//!
//! Each entry has a header buffer and a payload buffer in two mappings of
//! the worker's own. Each completion with result 0 means the entry holds a
//! request: the worker dispatches it to the engine, the handler's reply is
//! written into the entry's buffers (READ data straight into the payload
//! buffer, see [`ReplySink::send_filled`], or left where the handler keeps
//! it for the commit to name, see [`ReplySink::send_gathered`]) and the
//! entry's index is queued;
//! the worker then submits a commit-and-fetch for every queued entry with
//! one `io_uring_enter`, which also waits for the next completions. In
//! steady state that is one system call per batch of requests.
//!
//! Replies normally come from inside the dispatch, on the worker thread. A
//! handler that keeps a reply and answers from another thread queues the
//! entry the same way and wakes the worker through an eventfd it always has
//! a read outstanding on. The worker ends when every entry's command has
//! ended (the device or connection is gone, or the ring is cancelled).
//!
//! Large reads and writes go to a queue's helper threads instead (see
//! `helpers`), and a worker about to sleep may poll first (see `poller`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use std::io::IoSlice;

use fuse_blk_proto::abi::{opcode, InHeader, OutHeader, WriteOut};
use fuse_blk_proto::reply::{error_header, success_header};
use io_uring::{cqueue, opcode as op, squeue, types, IoUring};
use zerocopy::FromBytes;

use crate::event::Event;
use crate::io_thread;
use crate::mapping::Mapping;
use crate::reply::{self, Extent, ReplySink, MAX_REPLY_PARTS};
use crate::session::{Session, IDLE_TICK};

mod helpers;
mod poller;

use helpers::Helpers;
use poller::Poller;

/// Bytes of a request's header and argument at most (what is copied out of
/// an entry before the reply is written over it).
pub const MAX_HEAD: usize = 256;

/// How a ring's commands name the descriptor they go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Slot 0 of the ring's registered files: the kernel looks the file up
    /// once, not at every command (an `fget`/`fput` pair each).
    Registered,
    /// The descriptor itself, where registering it failed.
    Fd(RawFd),
}

/// What one kind of ring entry looks like: its commands and where a
/// request and its reply sit in its buffers. What a transport offers
/// besides, and may differ from one kernel to the next, is given to
/// [`serve`] instead ([`ReadSources`]).
pub trait Wire: Send + Sync + 'static {
    /// The submission queue entry its commands need.
    type Sqe: squeue::EntryMarker;
    /// Bytes of an entry's header buffer.
    const HEADER_SIZE: usize;
    /// A READ answered with a header alone reads as zeros.
    const ZEROS_REPLY: bool;

    /// The descriptor the commands go to.
    fn fd(&self) -> RawFd;
    /// The command, sent to `target`, that registers `entry`, whose buffers
    /// `iovecs` points at (header, payload).
    fn fetch(&self, target: Target, entry: u16, iovecs: *const libc::iovec) -> Self::Sqe;
    /// The command, sent to `target`, that commits the reply in `entry` and
    /// waits for its next request; `commit_id` is what [`Wire::request`]
    /// returned for it. `header` is the entry's header buffer, the reply's
    /// `fuse_out_header` at its start (and its body after that unless
    /// [`Wire::body_in_payload`]): the wire adds there whatever else its
    /// kernel reads of a reply (FUSE over io_uring: the size of the body in
    /// the payload buffer). With `read_data`, a READ reply's data is there
    /// instead of in the payload buffer (only as the [`ReadSources`]
    /// given to [`serve`] allow).
    fn commit(
        &self,
        target: Target,
        entry: u16,
        commit_id: u64,
        header: &mut [u8],
        read_data: Option<ReadSource>,
    ) -> Self::Sqe;
    /// Copies the request in `header` (an entry's header buffer) into `head`
    /// as `fuse_in_header` followed by its argument; returns the bytes of it
    /// that are in the payload buffer and the request's commit id.
    fn request(&self, header: &[u8], head: &mut [u8; MAX_HEAD]) -> (usize, u64);
    /// Whether what follows a reply's `fuse_out_header` goes into the
    /// payload buffer (else after the header in the header buffer).
    fn body_in_payload(&self, opcode: u32) -> bool;
    /// Whether a completion result means the entry is over (rather than an
    /// error worth logging).
    fn ended(&self, errno: i32) -> bool;
}

/// How a commit may name a READ reply's data other than in the entry's
/// payload buffer: what the transport offers, which for the module depends
/// on its ABI version. Neither (the default): the data is copied into the
/// payload buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadSources {
    /// At one address ([`ReadSource::Addr`]).
    pub addr: bool,
    /// Gathered from iovecs ([`ReadSource::Iovecs`]); only used with `addr`.
    pub iovecs: bool,
}

/// Where a commit's READ data is, when not in the entry's payload buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// All of it at this address.
    Addr(u64),
    /// Gathered from `count` `struct iovec` at `iovecs`.
    Iovecs {
        /// Address of the first `struct iovec`.
        iovecs: u64,
        /// How many there are.
        count: u32,
    },
}

/// `user_data` of the eventfd read and of the idle tick; entries use their
/// index.
const WAKE_TAG: u64 = u64::MAX;
const TICK_TAG: u64 = u64::MAX - 1;

/// Moves the idle tick's completion behind every other of a batch. By the
/// time a batch is reaped, the kernel has already copied the WRITE data of
/// each request in it into that entry's payload buffer; were the tick
/// handled before the request's completion, the worker would still count
/// itself idle and give those pages back, and the handler would then read
/// zeros in place of the data (seen in the guest: a verifying fio run lost
/// the first writes after a pause of about a second).
fn ticks_last(reaped: &mut [(u64, i32)]) {
    // Stable: the other completions keep their order.
    reaped.sort_by_key(|&(tag, _)| tag == TICK_TAG);
}

/// Every entry's buffers, shared by the worker and the replies' sinks.
struct Buffers<W> {
    wire: W,
    headers: Mapping,
    payloads: Mapping,
    max_io: usize,
    read_sources: ReadSources,
    /// Entries queued for COMMIT_AND_FETCH.
    committed: parking_lot::Mutex<Vec<u16>>,
    wake: Event,
    worker: ThreadId,
}

// Threads share the raw buffers under the entry protocol: an entry's
// buffers are written by the kernel only while its command is held, and by
// userspace only between that command's completion and the next commit,
// by the one party that holds the entry's reply.

impl<W: Wire> Buffers<W> {
    fn header(&self, entry: u16) -> *mut u8 {
        // SAFETY: entry < depth, so the offset lies within `headers`.
        unsafe {
            self.headers
                .as_ptr()
                .add(usize::from(entry) * W::HEADER_SIZE)
        }
    }

    fn payload(&self, entry: u16) -> *mut u8 {
        // SAFETY: entry < depth, so the offset lies within `payloads`.
        unsafe { self.payloads.as_ptr().add(usize::from(entry) * self.max_io) }
    }

    /// Queues `entry` for its COMMIT_AND_FETCH; wakes the worker unless the
    /// reply came from it.
    fn commit(&self, entry: u16) {
        self.committed.lock().push(entry);
        if std::thread::current().id() != self.worker {
            self.wake.set();
        }
    }
}

/// Where the reply to the request in one entry goes; one per entry, made
/// once.
struct EntrySink<W> {
    buffers: Arc<Buffers<W>>,
    entry: u16,
    /// Opcode of the request in the entry, set before it is dispatched:
    /// READ data goes to the payload buffer, what follows any other reply's
    /// header to the header buffer.
    opcode: AtomicU32,
    /// `COMMIT_NOW`, or whether a helper's handler call is still running
    /// (`IN_HELPER`) and has replied (`REPLIED_IN_HELPER`).
    commit: AtomicU8,
    /// Where the READ data of the reply is, when not in the payload buffer
    /// (see [`ReplySink::send_gathered`]); taken by the worker as it commits.
    read_data: parking_lot::Mutex<Option<ReadData>>,
    /// The body of a reply to a WRITE on a wire that wants it in the
    /// payload buffer (FUSE over io_uring: `fuse_write_out` over the first
    /// bytes of the data). The handler may still be reading that data, and
    /// a reply can come before it is done: the body waits here, and the
    /// worker copies it in as it commits (see [`EntrySink::prepare_commit`]).
    staged: parking_lot::Mutex<Staged>,
}

/// A reply body waiting for its entry's commit.
#[derive(Debug, Default)]
struct Staged {
    bytes: [u8; STAGED_MAX],
    len: usize,
}

/// The largest body a WRITE's reply has.
const STAGED_MAX: usize = std::mem::size_of::<WriteOut>();

/// Whether a request's handler borrows the entry's payload buffer for its
/// call (a WRITE's data; the rest of any other request is copied out).
fn borrows_payload(opcode: u32) -> bool {
    opcode == opcode::WRITE
}

/// READ data a reply left in the handler's memory: where it is, and what
/// that points into, kept until the kernel has read it (the entry's next
/// completion).
struct ReadData {
    at: ReadAt,
    _mapping: Arc<Mapping>,
}

/// Where a [`ReadData`] is: one address, or the iovecs kept here.
enum ReadAt {
    Addr(u64),
    Iovecs(Iovecs),
}

struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs only describe memory (the mapping and the zero
// region) for the kernel to read; nothing dereferences them here, so they
// may be held and dropped on any thread.
unsafe impl Send for Iovecs {}

impl ReadData {
    /// What a commit says of it.
    fn source(&self) -> ReadSource {
        match &self.at {
            ReadAt::Addr(addr) => ReadSource::Addr(*addr),
            ReadAt::Iovecs(Iovecs(iovecs)) => ReadSource::Iovecs {
                iovecs: iovecs.as_ptr() as u64,
                count: iovecs.len() as u32,
            },
        }
    }
}

const COMMIT_NOW: u8 = 0;
const IN_HELPER: u8 = 1;
const REPLIED_IN_HELPER: u8 = 2;

impl<W: Wire> EntrySink<W> {
    fn opcode(&self) -> u32 {
        // Set by the worker before the dispatch that hands out the reply.
        self.opcode.load(Ordering::Acquire)
    }

    /// The reply is in the entry's buffers: commits it, or leaves that to
    /// the helper running the handler, once the handler returns.
    fn replied(&self) {
        let deferred = self
            .commit
            .compare_exchange(
                IN_HELPER,
                REPLIED_IN_HELPER,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if !deferred {
            self.buffers.commit(self.entry);
        }
    }

    /// Readies the entry for its commit and returns the READ data the
    /// commit names, if any. Called by the worker as it commits, which is
    /// after the handler of the entry's request has returned: the worker
    /// commits only between dispatches, and a helper queues its entry only
    /// once its handler call is over (see [`help`]). So a body staged for
    /// the payload buffer can go there now, over data nobody borrows.
    fn prepare_commit(&self) -> Option<ReadData> {
        let mut staged = self.staged.lock();
        if staged.len > 0 {
            // SAFETY: the entry's payload buffer, which userspace owns
            // until this commit and no handler reads any more (see above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    staged.bytes.as_ptr(),
                    self.buffers.payload(self.entry),
                    staged.len,
                )
            };
            staged.len = 0;
        }
        self.read_data.lock().take()
    }

    fn write_header(&self, header: OutHeader) {
        // SAFETY: the header buffer of an entry this reply owns (see
        // `Buffers`); `OutHeader` is 16 plain bytes, within the 128.
        unsafe {
            self.buffers
                .header(self.entry)
                .cast::<OutHeader>()
                .write_unaligned(header)
        };
    }
}

impl<W: Wire> ReplySink for EntrySink<W> {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let Some(header) = parts
            .first()
            .and_then(|h| OutHeader::read_from_bytes(h).ok())
        else {
            log::error!("reply without its header; not sent");
            return;
        };
        let body = &parts[1..];
        let len: usize = body.iter().map(|p| p.len()).sum();
        let wire = &self.buffers.wire;
        let opcode = self.opcode();
        let mut staged = None;
        let (dest, room) = if !wire.body_in_payload(opcode) {
            let header_len = std::mem::size_of::<OutHeader>();
            // SAFETY: within the entry's header buffer.
            let args = unsafe { self.buffers.header(self.entry).add(header_len) };
            (args, W::HEADER_SIZE - header_len)
        } else if borrows_payload(opcode) {
            let staged = staged.insert(self.staged.lock());
            (staged.bytes.as_mut_ptr(), STAGED_MAX)
        } else {
            (self.buffers.payload(self.entry), self.buffers.max_io)
        };
        if len > room {
            log::error!("a reply body of {len} bytes does not fit its ring entry; answering EIO");
            self.write_header(error_header(header.unique, libc::EIO));
        } else {
            self.write_header(header);
            let mut at = dest;
            for part in body {
                // SAFETY: `dest` is this reply's (the entry's buffers, see
                // `Buffers`, or `staged`, locked) and the parts fit `room`.
                unsafe {
                    std::ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                    at = at.add(part.len());
                }
            }
            if let Some(staged) = &mut staged {
                staged.len = len;
            }
        }
        drop(staged);
        self.replied();
    }

    fn send_zeros_reply(&self, unique: u64) -> bool {
        if !W::ZEROS_REPLY {
            return false;
        }
        self.write_header(success_header(unique, 0));
        self.replied();
        true
    }

    unsafe fn send_gathered(
        &self,
        unique: u64,
        mapping: &Arc<Mapping>,
        extents: &[Extent],
        len: usize,
    ) {
        let sources = self.buffers.read_sources;
        let named = sources.addr && self.opcode() == opcode::READ && len <= self.buffers.max_io;
        let read_data = match extents {
            [Extent::Mapped { offset, .. }] if named => Some(ReadData {
                // SAFETY: within the mapping (checked by the caller).
                at: ReadAt::Addr(unsafe { mapping.as_ptr().add(*offset) } as u64),
                _mapping: Arc::clone(mapping),
            }),
            _ if named && sources.iovecs => {
                let mut iovecs = Vec::with_capacity(extents.len());
                // SAFETY: passed on from the caller; the kernel reads the
                // pieces while the mapping is kept alive (`ReadData`).
                let complete = unsafe {
                    reply::gather(mapping, extents, MAX_REPLY_PARTS, |piece| {
                        iovecs.push(libc::iovec {
                            iov_base: piece.as_ptr().cast_mut().cast(),
                            iov_len: piece.len(),
                        })
                    })
                };
                complete.then(|| ReadData {
                    at: ReadAt::Iovecs(Iovecs(iovecs)),
                    _mapping: Arc::clone(mapping),
                })
            }
            _ => None,
        };
        let Some(read_data) = read_data else {
            return self.send_filled(unique, len, &mut |buf| {
                // SAFETY: passed on from the caller.
                unsafe { reply::copy_extents(mapping, extents, buf) };
                Ok(())
            });
        };
        self.write_header(success_header(unique, len));
        *self.read_data.lock() = Some(read_data);
        self.replied();
    }

    fn send_filled(
        &self,
        unique: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), i32>,
    ) {
        let header = if self.opcode() != opcode::READ || len > self.buffers.max_io {
            log::error!("a filled reply of {len} bytes does not fit its ring entry; answering EIO");
            error_header(unique, libc::EIO)
        } else {
            // SAFETY: the payload buffer of an entry this reply owns; no
            // other reference to it is live (the request was a READ).
            let buf =
                unsafe { std::slice::from_raw_parts_mut(self.buffers.payload(self.entry), len) };
            match fill(buf) {
                Ok(()) => success_header(unique, len),
                Err(errno) => error_header(unique, errno),
            }
        };
        self.write_header(header);
        self.replied();
    }
}

/// Serves `queue` with a ring of `depth` entries of `wire`'s kind whose
/// payload buffers hold `max_io` bytes, until every entry has ended. Its
/// commits name READ data outside the payload buffer as far as
/// `read_sources` allows.
pub fn serve<W: Wire>(
    session: &Session,
    queue: u16,
    wire: W,
    depth: u16,
    max_io: usize,
    read_sources: ReadSources,
) -> io::Result<()> {
    // Helpers inherit it.
    io_thread::mark_io_flusher();
    let wake = Event::new()?;
    let buffers = Arc::new(Buffers {
        wire,
        headers: Mapping::new(usize::from(depth) * W::HEADER_SIZE)?,
        payloads: Mapping::new(usize::from(depth) * max_io)?,
        max_io,
        read_sources,
        committed: parking_lot::Mutex::new(Vec::with_capacity(usize::from(depth))),
        wake,
        worker: std::thread::current().id(),
    });
    helpers::with_helpers(session, queue, |helpers| {
        let poll = session.config().ring_poll;
        let mut worker = Worker::new(session, queue, buffers, depth, poll, helpers)?;
        // Dropping the worker (and with it the helpers' queue) ends the
        // helpers.
        worker.run()
    })
}

struct Worker<'a, W: Wire> {
    session: &'a Session,
    queue: u16,
    buffers: Arc<Buffers<W>>,
    ring: IoUring<W::Sqe, cqueue::Entry>,
    /// How the commands name the wire's descriptor.
    target: Target,
    /// Commit ids of the requests in the entries.
    commit_ids: Vec<u64>,
    depth: u16,
    /// The iovecs FETCH points at, per entry: header, payload.
    iovecs: Vec<[libc::iovec; 2]>,
    sinks: Vec<Arc<EntrySink<W>>>,
    /// Per entry, the READ data its last commit named, until the entry's
    /// next completion says the kernel has taken it.
    committed_data: Vec<Option<ReadData>>,
    /// Entries taken from [`Buffers::committed`], reused.
    committing: Vec<u16>,
    /// Completions of one wait, reused.
    reaped: Vec<(u64, i32)>,
    /// Entries whose command has not ended.
    live: usize,
    /// Entries holding a request userspace has not committed yet.
    with_user: usize,
    /// Payload pages were touched since they were last released.
    dirty: bool,
    /// Requests seen since the last tick.
    busy: bool,
    tick: types::Timespec,
    wake_buf: [u8; 8],
    poller: Poller,
    /// Where large requests go, if anywhere.
    helpers: Option<Helpers<W>>,
}

impl<'a, W: Wire> Worker<'a, W> {
    fn new(
        session: &'a Session,
        queue: u16,
        buffers: Arc<Buffers<W>>,
        depth: u16,
        poll: Duration,
        helpers: Option<Helpers<W>>,
    ) -> io::Result<Worker<'a, W>> {
        let entries = (u32::from(depth) + 1).next_power_of_two();
        // Task work (the kernel's deliveries) runs when this thread asks for
        // completions, not by interrupting its handlers.
        let ring = IoUring::<W::Sqe, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            // Shows pending deliveries in the ring's memory, for polling.
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::<W::Sqe, cqueue::Entry>::builder().build(entries))?;
        let fd = buffers.wire.fd();
        let target = match ring.submitter().register_files(&[fd]) {
            Ok(()) => Target::Registered,
            Err(e) => {
                log::debug!("queue {queue}: commands name the descriptor ({e})");
                Target::Fd(fd)
            }
        };
        let iovecs = (0..depth)
            .map(|entry| {
                [
                    libc::iovec {
                        iov_base: buffers.header(entry).cast(),
                        iov_len: W::HEADER_SIZE,
                    },
                    libc::iovec {
                        iov_base: buffers.payload(entry).cast(),
                        iov_len: buffers.max_io,
                    },
                ]
            })
            .collect();
        let sinks = (0..depth)
            .map(|entry| {
                Arc::new(EntrySink {
                    buffers: Arc::clone(&buffers),
                    entry,
                    opcode: AtomicU32::new(0),
                    commit: AtomicU8::new(COMMIT_NOW),
                    read_data: parking_lot::Mutex::new(None),
                    staged: parking_lot::Mutex::default(),
                })
            })
            .collect();
        Ok(Worker {
            session,
            queue,
            buffers,
            commit_ids: vec![0; usize::from(depth)],
            ring,
            target,
            depth,
            iovecs,
            sinks,
            committed_data: (0..depth).map(|_| None).collect(),
            committing: Vec::with_capacity(usize::from(depth)),
            reaped: Vec::with_capacity(usize::from(depth) + 2),
            live: 0,
            with_user: 0,
            dirty: false,
            busy: false,
            tick: types::Timespec::from(IDLE_TICK),
            wake_buf: [0; 8],
            poller: Poller::new(poll),
            helpers,
        })
    }

    fn push(&mut self, sqe: W::Sqe) -> io::Result<()> {
        loop {
            // SAFETY: what the SQE points at (the entry's iovecs and
            // buffers, the eventfd buffer) lives in `self` for as long as
            // the ring does.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            // Full: the ring has room for every entry plus the eventfd read,
            // so this only passes on what is queued.
            self.ring.submit()?;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let read = op::Read::new(
            types::Fd(self.buffers.wake.as_fd().as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(WAKE_TAG);
        self.push(read.into())
    }

    /// Arms the idle tick (see [`IDLE_TICK`]): a timeout in the ring rather
    /// than on each wait, so no timer is armed per request.
    fn arm_tick(&mut self) -> io::Result<()> {
        let timeout = op::Timeout::new(&self.tick).build().user_data(TICK_TAG);
        self.push(timeout.into())
    }

    /// A tick without requests: nothing is in flight, so no reference into
    /// the payload buffers is live and their pages can go. Called after
    /// every other completion of its batch (see [`ticks_last`]).
    fn ticked(&mut self) -> io::Result<()> {
        if !self.busy && self.dirty && self.with_user == 0 {
            // SAFETY: no entry is with userspace (`with_user` is 0), so no
            // reply refers into the payloads, and the kernel copies into
            // them only in this thread's `io_uring_enter`, not now.
            unsafe {
                self.buffers
                    .payloads
                    .release(0, self.buffers.payloads.len())
            };
            self.dirty = false;
        }
        self.busy = false;
        if self.live > 0 {
            self.arm_tick()?;
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        for entry in 0..self.depth {
            let iovecs = self.iovecs[usize::from(entry)].as_ptr();
            let mut fetch = self.buffers.wire.fetch(self.target, entry, iovecs);
            squeue::EntryMarker::set_user_data(&mut fetch, u64::from(entry));
            self.push(fetch)?;
            self.live += 1;
        }
        self.arm_wake()?;
        self.arm_tick()?;
        while self.live > 0 {
            let waited = self.wait()?;
            let mut reaped = std::mem::take(&mut self.reaped);
            reaped.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            ticks_last(&mut reaped);
            let mut requests = 0;
            for &(tag, result) in &reaped {
                if tag == WAKE_TAG {
                    self.arm_wake()?;
                } else if tag == TICK_TAG {
                    self.ticked()?;
                } else if self.completed(tag as u16, result) {
                    requests += 1;
                }
            }
            self.poller.waited(waited, requests);
            reaped.clear();
            self.reaped = reaped;
            let mut committed = std::mem::take(&mut self.committing);
            std::mem::swap(&mut committed, &mut *self.buffers.committed.lock());
            for &entry in &committed {
                self.with_user -= 1;
                let commit_id = self.commit_ids[usize::from(entry)];
                let read_data = self.sinks[usize::from(entry)].prepare_commit();
                let source = read_data.as_ref().map(ReadData::source);
                self.committed_data[usize::from(entry)] = read_data;
                // SAFETY: the entry's header buffer. Its reply is written
                // and its handler has returned (see `prepare_commit`), so
                // nothing else refers to it until the kernel takes it at
                // this commit.
                let header = unsafe {
                    std::slice::from_raw_parts_mut(self.buffers.header(entry), W::HEADER_SIZE)
                };
                let mut commit =
                    self.buffers
                        .wire
                        .commit(self.target, entry, commit_id, header, source);
                squeue::EntryMarker::set_user_data(&mut commit, u64::from(entry));
                self.push(commit)?;
            }
            committed.clear();
            self.committing = committed;
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion,
    /// polling first if the [`Poller`] says so. Returns how long it took.
    fn wait(&mut self) -> io::Result<Duration> {
        let start = Instant::now();
        self.poll_then_wait(start)?;
        Ok(start.elapsed())
    }

    fn poll_then_wait(&mut self, start: Instant) -> io::Result<()> {
        if let Some(poll) = self.poller.poll_for() {
            self.ring.submit()?;
            // Deliveries wait as task work until an enter asks for events;
            // the TASKRUN flag says there is some.
            while self.ring.completion().is_empty() && !self.ring.submission().taskrun() {
                if start.elapsed() >= poll {
                    break;
                }
                // Each turn gives the CPU to whoever else wants it (on a
                // small machine, the very tasks submitting the requests):
                // the spin only uses time nobody else would. Measured in
                // the guest (2 CPUs, two fio jobs at depth 32): 4 KiB reads
                // +11 % to +74 % over a plain spin in 4 of 4 rounds, depth 1
                // unchanged.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            if !self.ring.completion().is_empty() {
                return Ok(());
            }
        }
        match self.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Handles an entry's completion; returns whether it brought a request.
    fn completed(&mut self, entry: u16, result: i32) -> bool {
        if entry >= self.depth {
            log::error!("queue {}: completion for unknown entry {entry}", self.queue);
            return false;
        }
        // The commit that named it has run: the kernel is done with it.
        self.committed_data[usize::from(entry)] = None;
        match -result {
            0 => {
                self.dispatch(entry);
                return true;
            }
            errno if self.buffers.wire.ended(errno) => self.live -= 1,
            errno => {
                log::error!(
                    "queue {}: ring entry {entry} ended: {}",
                    self.queue,
                    io::Error::from_raw_os_error(errno)
                );
                self.live -= 1;
            }
        }
        false
    }

    fn dispatch(&mut self, entry: u16) {
        self.with_user += 1;
        self.dirty = true;
        self.busy = true;
        // The request's header and argument are copied out: the reply is
        // written over them while the request is being handled.
        let mut head_copy = [0u8; MAX_HEAD];
        // SAFETY: the kernel filled the entry's header buffer before the
        // completion; userspace owns the entry until its commit.
        let header =
            unsafe { std::slice::from_raw_parts(self.buffers.header(entry), W::HEADER_SIZE) };
        let (in_payload, commit_id) = self.buffers.wire.request(header, &mut head_copy);
        self.commit_ids[usize::from(entry)] = commit_id;
        let (in_header, _) =
            InHeader::read_from_prefix(&head_copy).expect("MAX_HEAD holds fuse_in_header");
        let (len, opcode) = (in_header.len as usize, in_header.opcode);
        let in_payload = in_payload.min(self.buffers.max_io);
        // SAFETY: within the entry's payload buffer, which userspace owns
        // until the commit. Only a WRITE's data is borrowed while the
        // request is handled, and nothing writes the payload buffer until
        // its handler has returned (a reply body bound there waits in
        // `EntrySink::staged`); any other request's bytes are copied out.
        let payload =
            unsafe { std::slice::from_raw_parts(self.buffers.payload(entry), in_payload) };
        let joined;
        let (head, payload): (&[u8], &[u8]) = if borrows_payload(opcode) || in_payload == 0 {
            (&head_copy[..], payload)
        } else {
            // A name or the like: one contiguous message.
            let fixed = len.saturating_sub(in_payload).min(MAX_HEAD);
            joined = [&head_copy[..fixed], payload].concat();
            (&joined[..], &[][..])
        };
        let sink = &self.sinks[usize::from(entry)];
        sink.opcode.store(opcode, Ordering::Release);
        let handed = self
            .helpers
            .as_ref()
            .is_some_and(|helpers| helpers.take(sink, opcode, &head_copy, payload.len()));
        if !handed {
            self.session
                .dispatch_split(self.queue, head, payload, sink.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wire that puts every reply body in the payload buffer as FUSE
    /// over io_uring does (`fuse`, else only READ data, as the module
    /// does); nothing is ever submitted.
    #[derive(Default)]
    struct FakeWire {
        fuse: bool,
    }

    impl Wire for FakeWire {
        type Sqe = squeue::Entry;
        const HEADER_SIZE: usize = 128;
        const ZEROS_REPLY: bool = true;

        fn fd(&self) -> RawFd {
            -1
        }
        fn fetch(&self, _: Target, _: u16, _: *const libc::iovec) -> squeue::Entry {
            op::Nop::new().build()
        }
        fn commit(
            &self,
            _: Target,
            _: u16,
            _: u64,
            _: &mut [u8],
            _: Option<ReadSource>,
        ) -> squeue::Entry {
            op::Nop::new().build()
        }
        fn request(&self, _: &[u8], _: &mut [u8; MAX_HEAD]) -> (usize, u64) {
            (0, 0)
        }
        fn body_in_payload(&self, opcode: u32) -> bool {
            self.fuse || opcode == opcode::READ
        }
        fn ended(&self, _: i32) -> bool {
            true
        }
    }

    /// Entry 0 of a one-entry ring on `wire` served with `read_sources`,
    /// holding a request of `opcode`.
    fn entry(wire: FakeWire, read_sources: ReadSources, opcode: u32) -> EntrySink<FakeWire> {
        let buffers = Buffers {
            wire,
            headers: Mapping::new(FakeWire::HEADER_SIZE).unwrap(),
            payloads: Mapping::new(8192).unwrap(),
            max_io: 8192,
            read_sources,
            committed: parking_lot::Mutex::new(Vec::new()),
            wake: Event::new().unwrap(),
            worker: std::thread::current().id(),
        };
        EntrySink {
            buffers: Arc::new(buffers),
            entry: 0,
            opcode: AtomicU32::new(opcode),
            commit: AtomicU8::new(COMMIT_NOW),
            read_data: parking_lot::Mutex::new(None),
            staged: parking_lot::Mutex::default(),
        }
    }

    #[test]
    fn gathered_reads_are_named_by_address_by_iovecs_or_copied_as_the_wire_allows() {
        let mapping = Arc::new(Mapping::new(8192).unwrap());
        // SAFETY: a fresh mapping of this test's own.
        unsafe { mapping.as_ptr().write_bytes(7, 8192) };
        let base = mapping.as_ptr() as u64;
        let one = [Extent::Mapped {
            offset: 4096,
            len: 512,
        }];
        let mixed = [
            Extent::Mapped {
                offset: 100,
                len: 8,
            },
            Extent::Zeros { len: 8 },
        ];
        let sent = |read_sources: ReadSources, extents: &[Extent]| {
            let sink = entry(FakeWire::default(), read_sources, opcode::READ);
            let len = extents.iter().map(Extent::len).sum();
            // SAFETY: nothing else uses the mapping.
            unsafe { sink.send_gathered(9, &mapping, extents, len) };
            // SAFETY: the entry's header buffer, just written.
            let header = unsafe { sink.buffers.header(0).cast::<OutHeader>().read_unaligned() };
            assert_eq!(
                (header.unique, header.error, header.len as usize),
                (9, 0, 16 + len)
            );
            assert_eq!(*sink.buffers.committed.lock(), [0]);
            let source = sink.read_data.lock().as_ref().map(ReadData::source);
            // SAFETY: the payload buffer, which nothing else uses now.
            let payload =
                unsafe { std::slice::from_raw_parts(sink.buffers.payload(0), len) }.to_vec();
            (sink, source, payload)
        };

        let both = ReadSources {
            addr: true,
            iovecs: true,
        };
        let (_, source, _) = sent(both, &one);
        assert_eq!(source, Some(ReadSource::Addr(base + 4096)));

        // The iovecs live with the entry (`_sink`) until its next commit.
        let (_sink, source, _) = sent(both, &mixed);
        let Some(ReadSource::Iovecs { iovecs, count }) = source else {
            panic!("not gathered: {source:?}");
        };
        // SAFETY: `count` iovecs the entry keeps.
        let iovecs =
            unsafe { std::slice::from_raw_parts(iovecs as *const libc::iovec, count as usize) };
        assert_eq!(iovecs.len(), 2);
        assert_eq!(
            (iovecs[0].iov_base as u64, iovecs[0].iov_len),
            (base + 100, 8)
        );
        // SAFETY: 8 bytes of the zero region, readable for good.
        let zeros = unsafe { std::slice::from_raw_parts(iovecs[1].iov_base as *const u8, 8) };
        assert_eq!((zeros, iovecs[1].iov_len), (&[0u8; 8][..], 8));

        // A module without iovecs (ABI 4): assembled in the payload buffer.
        let (_, source, payload) = sent(
            ReadSources {
                addr: true,
                iovecs: false,
            },
            &mixed,
        );
        assert_eq!(source, None);
        assert_eq!(payload, [7, 7, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
        // No address at all (FUSE over io_uring): the same.
        let (_, source, payload) = sent(ReadSources::default(), &one);
        assert_eq!(source, None);
        assert_eq!(payload, [7; 512]);
    }

    /// A device whose `write` answers first and only then stores the data,
    /// as a handler that replies early (or from another thread) may.
    #[derive(Default)]
    struct ReplyFirst {
        stored: parking_lot::Mutex<Vec<u8>>,
    }

    impl crate::BlockDevice for ReplyFirst {
        fn geometry(&self) -> crate::Geometry {
            crate::Geometry::new(1 << 20, 512)
        }
        fn read(&self, _: &crate::Request, _: u64, _: u32, reply: crate::ReplyData) {
            reply.error(libc::EIO);
        }
        fn write(
            &self,
            _: &crate::Request,
            _: u64,
            data: &[u8],
            _: bool,
            reply: crate::ReplyWrite,
        ) {
            reply.ok();
            *self.stored.lock() = data.to_vec();
        }
    }

    #[test]
    fn a_write_reply_in_the_payload_buffer_waits_until_the_handler_is_done_with_the_data() {
        use zerocopy::IntoBytes;
        let sink = Arc::new(entry(
            FakeWire { fuse: true },
            ReadSources::default(),
            opcode::WRITE,
        ));
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 + 1).collect();
        // SAFETY: the entry's payload buffer, 8192 bytes nothing else uses.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), sink.buffers.payload(0), 4096) };
        let head = [
            crate::proto::abi::InHeader {
                len: (std::mem::size_of::<InHeader>()
                    + std::mem::size_of::<crate::proto::abi::WriteIn>()
                    + data.len()) as u32,
                opcode: opcode::WRITE,
                unique: 5,
                nodeid: 2,
                ..Default::default()
            }
            .as_bytes(),
            crate::proto::abi::WriteIn {
                size: 4096,
                ..Default::default()
            }
            .as_bytes(),
        ]
        .concat();
        let device = Arc::new(ReplyFirst::default());
        let session = Session::new(device.clone(), Default::default()).unwrap();
        {
            // SAFETY: as in `Worker::dispatch`: the data, borrowed for the
            // handler's call only.
            let payload = unsafe { std::slice::from_raw_parts(sink.buffers.payload(0), 4096) };
            assert!(session.dispatch_split(0, &head, payload, sink.clone()));
        }
        assert!(
            *device.stored.lock() == data,
            "the reply overwrote the data"
        );
        // SAFETY: the entry's header buffer, written by the reply.
        let header = unsafe { sink.buffers.header(0).cast::<OutHeader>().read_unaligned() };
        assert_eq!((header.unique, header.error, header.len), (5, 0, 24));
        assert_eq!(*sink.buffers.committed.lock(), [0]);
        // The worker's commit puts `fuse_write_out` where FUSE reads it.
        assert!(sink.prepare_commit().is_none());
        // SAFETY: the entry's payload buffer, which nothing else uses now.
        let body = unsafe { std::slice::from_raw_parts(sink.buffers.payload(0), 8) };
        assert_eq!(
            body,
            WriteOut {
                size: 4096,
                padding: 0
            }
            .as_bytes()
        );
    }

    #[test]
    fn the_idle_tick_is_handled_after_the_requests_of_its_batch() {
        let mut batch = vec![(TICK_TAG, 0), (3, 0), (WAKE_TAG, 8), (5, -4)];
        ticks_last(&mut batch);
        assert_eq!(batch, vec![(3, 0), (WAKE_TAG, 8), (5, -4), (TICK_TAG, 0)]);
        let mut alone = vec![(TICK_TAG, -62)];
        ticks_last(&mut alone);
        assert_eq!(alone, vec![(TICK_TAG, -62)]);
    }
}
