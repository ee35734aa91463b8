//! io_uring channels (`FUSE_BLK_URING_*`, ABI 2): a queue's requests
//! arrive as completions of commands held in the kernel, and each reply is
//! sent by the command that also waits for the entry's next request.
//!
//! A queue's worker answers FUSE_INIT over read/write, then registers one
//! ring entry per tag: a header buffer (`URING_HEADER_SIZE` bytes) and a
//! payload buffer (`max_io_bytes`) in two mappings of its own. Each
//! completion with result 0 means the entry holds a request: the worker
//! dispatches it to the engine, the handler's reply is written into the
//! entry's buffers (READ data straight into the payload buffer, see
//! [`ReplySink::send_filled`]) and the entry's index is queued; the worker
//! then submits a COMMIT_AND_FETCH for every queued entry with one
//! `io_uring_enter`, which also waits for the next completions. In steady
//! state that is one system call per batch of requests, none per request.
//!
//! Replies normally come from inside the dispatch, on the worker thread. A
//! handler that keeps a reply and answers from another thread queues the
//! entry the same way and wakes the worker through an eventfd it always has
//! a read outstanding on.
//!
//! The worker ends when every entry's command has ended: `ENODEV` when the
//! device is destroyed or a newer daemon took the queue over, `ECANCELED`
//! when the ring goes away.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use fuse_blk::proto::abi::{opcode, InHeader, OutHeader, WriteIn};
use fuse_blk::proto::reply::{error_header, success_header};
use fuse_blk::{Channel, FdChannel, ReplySink, Session};
use io_uring::{opcode as op, squeue, types, IoUring};
use std::io::IoSlice;

use crate::uapi;

/// `user_data` of the eventfd read and of the idle tick; entries use their
/// index.
const WAKE_TAG: u64 = u64::MAX;
const TICK_TAG: u64 = u64::MAX - 1;

/// A worker that saw no request for a whole tick gives the pages of its
/// payload buffers back (the idle daemon stays small). A timeout in the
/// ring rather than on each wait: no timer is armed per request.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Whether the running kernel and module offer io_uring channels.
pub fn supported(features: &uapi::Features) -> bool {
    features.features & uapi::F_URING != 0 && IoUring::<squeue::Entry>::new(2).is_ok()
}

/// An anonymous private mapping: pages cost nothing until touched, and
/// `release` gives them back.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            len,
        })
    }

    /// Drops the contents: the pages read as zeros again and stop counting
    /// towards the resident set.
    fn release(&self) {
        // SAFETY: the range is this mapping; its owner only calls this when
        // no reference into it is live (no entry is with userspace).
        unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing refers to it any
        // more (the buffers' owner, `Buffers`, is being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Every entry's buffers, shared by the worker and the replies' sinks.
struct Buffers {
    headers: Mapping,
    payloads: Mapping,
    max_io: usize,
    /// Entries queued for COMMIT_AND_FETCH.
    committed: parking_lot::Mutex<Vec<u16>>,
    wake: OwnedFd,
    worker: ThreadId,
}

// SAFETY: the raw buffers are shared under the entry protocol: an entry's
// buffers are written by the kernel only while its command is held, and by
// userspace only between that command's completion and the next commit,
// by the one party that holds the entry's reply.
unsafe impl Send for Buffers {}
// SAFETY: as for Send.
unsafe impl Sync for Buffers {}

impl Buffers {
    fn header(&self, entry: u16) -> *mut u8 {
        // SAFETY: entry < depth, so the offset lies within `headers`.
        unsafe {
            self.headers
                .ptr
                .as_ptr()
                .add(usize::from(entry) * uapi::URING_HEADER_SIZE)
        }
    }

    fn payload(&self, entry: u16) -> *mut u8 {
        // SAFETY: entry < depth, so the offset lies within `payloads`.
        unsafe {
            self.payloads
                .ptr
                .as_ptr()
                .add(usize::from(entry) * self.max_io)
        }
    }

    /// Queues `entry` for its COMMIT_AND_FETCH; wakes the worker unless the
    /// reply came from it.
    fn commit(&self, entry: u16) {
        self.committed.lock().push(entry);
        if std::thread::current().id() != self.worker {
            let one = 1u64.to_ne_bytes();
            if let Err(e) = nix::unistd::write(&self.wake, &one) {
                log::error!("waking the io_uring worker: {e}");
            }
        }
    }
}

/// Where the reply to the request in one entry goes; one per entry, made
/// once.
struct EntrySink {
    buffers: Arc<Buffers>,
    entry: u16,
    /// Opcode of the request in the entry, set before it is dispatched:
    /// READ data goes to the payload buffer, what follows any other reply's
    /// header to the header buffer.
    opcode: AtomicU32,
}

impl EntrySink {
    fn opcode(&self) -> u32 {
        // Set by the worker before the dispatch that hands out the reply.
        self.opcode.load(Ordering::Acquire)
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

impl ReplySink for EntrySink {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let header_len = std::mem::size_of::<OutHeader>();
        let (dest, room) = if self.opcode() == opcode::READ {
            (self.buffers.payload(self.entry), self.buffers.max_io)
        } else {
            // SAFETY: within the entry's header buffer.
            let args = unsafe { self.buffers.header(self.entry).add(header_len) };
            (args, uapi::URING_HEADER_SIZE - header_len)
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let Some(first) = parts.first().filter(|p| p.len() == header_len) else {
            log::error!("reply without its header; not sent");
            return;
        };
        if total - header_len > room {
            log::error!("reply of {total} bytes does not fit its ring entry; answering EIO");
            let unique = u64::from_ne_bytes(first[8..16].try_into().expect("8 bytes"));
            self.write_header(error_header(unique, libc::EIO));
        } else {
            // SAFETY: the entry's buffers are this reply's (see `Buffers`);
            // the header is 16 bytes and the rest was checked to fit `room`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    first.as_ptr(),
                    self.buffers.header(self.entry),
                    header_len,
                );
                let mut at = dest;
                for part in &parts[1..] {
                    std::ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                    at = at.add(part.len());
                }
            }
        }
        self.buffers.commit(self.entry);
    }

    fn send_zeros_reply(&self, unique: u64) -> bool {
        // ABI 2: a READ answered without data reads as zeros.
        self.write_header(success_header(unique, 0));
        self.buffers.commit(self.entry);
        true
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
        self.buffers.commit(self.entry);
    }
}

/// Serves `queue` of a device through `channel` with an io_uring of
/// `depth` entries, until the device is destroyed or taken over.
pub fn serve_queue(
    session: &Session,
    queue: u16,
    channel: Arc<FdChannel>,
    depth: u16,
) -> io::Result<()> {
    if !answer_init(session, queue, &channel)? {
        return Ok(());
    }
    let max_io = session.config().max_write as usize;
    // SAFETY: eventfd has no memory-safety preconditions.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if wake < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    let wake = unsafe { OwnedFd::from_raw_fd(wake) };
    let buffers = Arc::new(Buffers {
        headers: Mapping::new(usize::from(depth) * uapi::URING_HEADER_SIZE)?,
        payloads: Mapping::new(usize::from(depth) * max_io)?,
        max_io,
        committed: parking_lot::Mutex::new(Vec::with_capacity(usize::from(depth))),
        wake,
        worker: std::thread::current().id(),
    });
    let mut worker = Worker::new(session, queue, channel, buffers, depth)?;
    worker.run()
}

/// Reads and answers FUSE_INIT, the first message of a new channel; false
/// if the channel ended instead.
fn answer_init(session: &Session, queue: u16, channel: &Arc<FdChannel>) -> io::Result<bool> {
    let mut buf = vec![0u8; session.config().buffer_size()];
    let channel: Arc<dyn Channel> = channel.clone();
    loop {
        match channel.receive(&mut buf) {
            Ok(Some(len)) => return Ok(session.dispatch(queue, &buf[..len], &channel)),
            Ok(None) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

struct Worker<'a> {
    session: &'a Session,
    queue: u16,
    channel: Arc<FdChannel>,
    buffers: Arc<Buffers>,
    ring: IoUring,
    depth: u16,
    /// The iovecs FETCH points at, per entry: header, payload.
    iovecs: Vec<[libc::iovec; 2]>,
    sinks: Vec<Arc<EntrySink>>,
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
}

impl<'a> Worker<'a> {
    fn new(
        session: &'a Session,
        queue: u16,
        channel: Arc<FdChannel>,
        buffers: Arc<Buffers>,
        depth: u16,
    ) -> io::Result<Worker<'a>> {
        let entries = (u32::from(depth) + 1).next_power_of_two();
        // Task work (the kernel's deliveries) runs when this thread asks for
        // completions, not by interrupting its handlers.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let iovecs = (0..depth)
            .map(|entry| {
                [
                    libc::iovec {
                        iov_base: buffers.header(entry).cast(),
                        iov_len: uapi::URING_HEADER_SIZE,
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
                })
            })
            .collect();
        Ok(Worker {
            session,
            queue,
            channel,
            buffers,
            ring,
            depth,
            iovecs,
            sinks,
            reaped: Vec::with_capacity(usize::from(depth) + 2),
            live: 0,
            with_user: 0,
            dirty: false,
            busy: false,
            tick: types::Timespec::from(IDLE_TICK),
            wake_buf: [0; 8],
        })
    }

    fn command(&self, cmd_op: u32, entry: u16) -> squeue::Entry {
        let cmd = uapi::UringCmd {
            entry,
            ..uapi::UringCmd::default()
        };
        let mut sqe = op::UringCmd16::new(types::Fd(self.channel.as_fd().as_raw_fd()), cmd_op)
            .cmd(cmd.to_bytes());
        if cmd_op == uapi::URING_FETCH {
            sqe = sqe.addr(Some(self.iovecs[usize::from(entry)].as_ptr() as u64));
        }
        sqe.build().user_data(u64::from(entry))
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
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
            types::Fd(self.buffers.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            self.wake_buf.len() as u32,
        )
        .build()
        .user_data(WAKE_TAG);
        self.push(read)
    }

    fn arm_tick(&mut self) -> io::Result<()> {
        let timeout = op::Timeout::new(&self.tick).build().user_data(TICK_TAG);
        self.push(timeout)
    }

    /// A tick without requests: nothing is in flight, so no reference into
    /// the payload buffers is live and their pages can go.
    fn ticked(&mut self) -> io::Result<()> {
        if !self.busy && self.dirty && self.with_user == 0 {
            self.buffers.payloads.release();
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
            let fetch = self.command(uapi::URING_FETCH, entry);
            self.push(fetch)?;
            self.live += 1;
        }
        self.arm_wake()?;
        self.arm_tick()?;
        while self.live > 0 {
            self.wait()?;
            let mut reaped = std::mem::take(&mut self.reaped);
            reaped.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            for &(tag, result) in &reaped {
                if tag == WAKE_TAG {
                    self.arm_wake()?;
                } else if tag == TICK_TAG {
                    self.ticked()?;
                } else {
                    self.completed(tag as u16, result);
                }
            }
            reaped.clear();
            self.reaped = reaped;
            let committed = std::mem::take(&mut *self.buffers.committed.lock());
            for entry in committed {
                self.with_user -= 1;
                let commit = self.command(uapi::URING_COMMIT_AND_FETCH, entry);
                self.push(commit)?;
            }
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion.
    fn wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            other => other.map(drop),
        }
    }

    fn completed(&mut self, entry: u16, result: i32) {
        if entry >= self.depth {
            log::error!("queue {}: completion for unknown entry {entry}", self.queue);
            return;
        }
        match -result {
            0 => self.dispatch(entry),
            libc::ENODEV | libc::ECANCELED => self.live -= 1,
            errno => {
                log::error!(
                    "queue {}: ring entry {entry} ended: {}",
                    self.queue,
                    io::Error::from_raw_os_error(errno)
                );
                self.live -= 1;
            }
        }
    }

    fn dispatch(&mut self, entry: u16) {
        self.with_user += 1;
        self.dirty = true;
        self.busy = true;
        // The request's header and argument are copied out: the reply is
        // written over them while the request is being handled.
        let mut head = [0u8; uapi::URING_HEADER_SIZE];
        // SAFETY: the kernel filled the entry's header buffer before the
        // completion; userspace owns the entry until its commit.
        unsafe {
            std::ptr::copy_nonoverlapping(self.buffers.header(entry), head.as_mut_ptr(), head.len())
        };
        // fuse_in_header: len, then opcode.
        let len = u32::from_ne_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        let opcode = u32::from_ne_bytes(head[4..8].try_into().expect("4 bytes"));
        // Only a WRITE has data in the payload buffer; no other request
        // borrows it, since a READ's reply is written there.
        let data_len = if opcode == opcode::WRITE {
            len.saturating_sub(std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>())
                .min(self.buffers.max_io)
        } else {
            0
        };
        // SAFETY: within the entry's payload buffer, which userspace owns
        // until the commit; the reply to a WRITE writes only the header
        // buffer, so nothing writes this while it is borrowed.
        let payload = unsafe { std::slice::from_raw_parts(self.buffers.payload(entry), data_len) };
        let sink = &self.sinks[usize::from(entry)];
        sink.opcode.store(opcode, Ordering::Release);
        self.session
            .dispatch_split(self.queue, &head, payload, sink.clone());
    }
}
