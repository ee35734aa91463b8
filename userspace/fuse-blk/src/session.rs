//! The session engine: reads requests from channels, dispatches them to a
//! [`BlockDevice`] (block I/O) or a [`Namespace`] (everything a filesystem
//! view of the device needs), and sends the replies.
//!
//! One engine serves every transport. A transport supplies channels (one per
//! queue or worker thread) and a [`SessionConfig`]; the engine owns the FUSE
//! handshake and the mapping of FUSE operations to block operations:
//!
//! | FUSE                                   | block device                       |
//! |----------------------------------------|------------------------------------|
//! | READ                                   | `read`                             |
//! | WRITE (`flags` has `O_DSYNC`: FUA)      | `write`                            |
//! | FSYNC                                  | `flush`                            |
//! | FALLOCATE ZERO_RANGE                   | `write_zeroes(may_unmap = false)`  |
//! | FALLOCATE PUNCH_HOLE\|KEEP_SIZE         | `discard`, or `write_zeroes(may_unmap = true)` where a punched hole must read as zeros (stock path) |
//! | DESTROY (ends its channel's worker)    | `destroy`, once every worker has ended |

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fuse_blk_proto::abi::{self, falloc, init_flags, init_flags2, InitOut};
use fuse_blk_proto::request::{
    parse_request, parse_request_split, Operation, ParseError, ParseErrorKind,
    Request as WireRequest,
};
use zerocopy::IntoBytes;

use crate::channel::{Channel, Stop};
use crate::handler::{BlockDevice, Geometry, GeometryError, Request};
use crate::mapping::Mapping;
use crate::reply::{self, ReplyData, ReplyEmpty, ReplySink, ReplyWrite, Responder};
use crate::stats::{Kind, Stats};

/// Answers the requests that are not block I/O: the stock path presents the
/// device as one file in a directory and needs LOOKUP, GETATTR, OPEN, ...
pub trait Namespace: Send + Sync + 'static {
    /// Answers `request` through `reply`, exactly once.
    fn handle(&self, request: &WireRequest<'_>, reply: Responder);
}

/// How deep a stack of file systems may be under ours with passthrough:
/// one, a backing file on an ordinary file system. A backing file on
/// another stacking file system is refused when it is registered.
const PASSTHROUGH_STACK_DEPTH: u32 = 1;

/// A worker that saw no request for this long gives back the pages its
/// buffers took for large requests: an idle daemon stays small however
/// many queues it has.
pub(crate) const IDLE_TICK: Duration = Duration::from_secs(1);

/// A read/write-channel worker keeps this much of its buffers touched
/// without counting itself as holding memory: small requests alone never
/// make it bound its wait for the next request to give it back.
const IDLE_KEEP: usize = 64 * 1024;

/// `Session::granted_flags2` before FUSE_INIT (no real flags2 has all bits).
const NO_INIT: u32 = u32::MAX;

/// How a transport moves requests and replies between the kernel and the
/// engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring where the kernel offers it, read(2)/write(2) elsewhere.
    #[default]
    Auto,
    /// io_uring, or an error where the kernel does not offer it.
    Uring,
    /// One read(2) per request and one write(2) per reply.
    ReadWrite,
}

/// What a transport asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Largest READ or WRITE, in bytes (a multiple of 4096).
    pub max_write: u32,
    /// Requests the kernel may have in flight in the background (async
    /// direct I/O counts here).
    pub max_background: u16,
    /// INIT flags the transport wants, granted where the kernel offers them.
    pub init_flags: u32,
    /// The same for the high 32 bits (`flags2`, with `INIT_EXT`).
    pub init_flags2: u32,
    /// A punched hole must read back as zeros (FUSE file semantics), so
    /// PUNCH_HOLE goes to `write_zeroes(may_unmap = true)` instead of
    /// `discard`.
    pub punch_hole_zeroes: bool,
    /// An io_uring worker polls its ring for the next request, instead of
    /// sleeping, while its requests come at most this far apart on
    /// average; zero: never (see `ring`).
    pub ring_poll: Duration,
}

/// [`SessionConfig::ring_poll`] unless a transport says otherwise.
pub const DEFAULT_RING_POLL: Duration = Duration::from_micros(500);

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_write: 1 << 20,
            max_background: 128,
            init_flags: init_flags::ASYNC_READ | init_flags::BIG_WRITES | init_flags::MAX_PAGES,
            init_flags2: 0,
            punch_hole_zeroes: false,
            ring_poll: DEFAULT_RING_POLL,
        }
    }
}

impl SessionConfig {
    /// Bytes a receive buffer needs: the largest WRITE plus its headers.
    pub fn buffer_size(&self) -> usize {
        self.max_write as usize + 4096
    }
}

/// One served block device: the handler, its geometry and the engine state
/// shared by all worker threads.
pub struct Session {
    device: Arc<dyn BlockDevice>,
    /// As validated when the session was made; its size is `size`'s.
    geometry: Geometry,
    /// The device's size now: the geometry's until it is resized.
    size: AtomicU64,
    namespace: Option<Arc<dyn Namespace>>,
    config: SessionConfig,
    destroyed: AtomicBool,
    /// Calls of `serve_with` under way: while there are any, the handler is
    /// destroyed when their last worker has ended, not at a FUSE_DESTROY.
    serving: AtomicUsize,
    /// Set by `stop`: workers leave at their next wait for a request.
    stopping: AtomicBool,
    /// `flags2` of the FUSE_INIT reply once it has been sent (and, as the
    /// kernel handles it inside the write, taken); `NO_INIT` before.
    granted_flags2: AtomicU32,
    /// Worker threads in their receive loop, by queue, with the event that
    /// `stop` sets to end their wait for a request.
    waiting_workers: parking_lot::Mutex<std::collections::HashMap<u16, Arc<Stop>>>,
    /// What the block requests were and how long they took (see `stats`).
    stats: Arc<Stats>,
}

impl Session {
    /// Asks the handler for its geometry and checks it.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        config: SessionConfig,
    ) -> Result<Session, GeometryError> {
        let geometry = device.geometry();
        geometry.validate()?;
        Ok(Session {
            device,
            size: AtomicU64::new(geometry.size),
            geometry,
            namespace: None,
            config,
            destroyed: AtomicBool::new(false),
            serving: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            granted_flags2: AtomicU32::new(NO_INIT),
            waiting_workers: parking_lot::Mutex::new(std::collections::HashMap::new()),
            stats: Stats::new(),
        })
    }

    /// The session with `namespace` answering the requests that are not
    /// block I/O.
    pub fn with_namespace(mut self, namespace: Arc<dyn Namespace>) -> Session {
        self.namespace = Some(namespace);
        self
    }

    /// The handler's geometry, as validated when the session was made,
    /// with the size it has now.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size(),
            ..self.geometry
        }
    }

    /// The device's size in bytes now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Changes the device's size: the handler's ([`BlockDevice::resize`])
    /// and then, through `kernel`, the kernel's. When growing, the engine
    /// takes the new size after the handler; when shrinking, before it,
    /// so that requests past the new end are refused by the engine (reads
    /// shortened, writes ENOSPC) and none reaches the handler after it
    /// shrank. A size that is zero or not a multiple of the logical block
    /// size is refused, and so is one the handler refuses: then nothing
    /// changes, the kernel's size included.
    pub fn resize(&self, size: u64, kernel: impl FnOnce(u64) -> io::Result<()>) -> io::Result<()> {
        self.check_size(size)?;
        let old = self.size();
        if size >= old {
            self.device.resize(size)?;
            self.size.store(size, Ordering::Release);
        } else {
            self.size.store(size, Ordering::Release);
            if let Err(refused) = self.device.resize(size) {
                self.size.store(old, Ordering::Release);
                return Err(refused);
            }
        }
        kernel(size)
    }

    /// Tells the engine and, through `kernel`, the kernel that the handler
    /// serves `size` bytes now: for a handler whose size changed by itself
    /// (an image grown by another client) or that its program resized.
    pub fn announce_size(
        &self,
        size: u64,
        kernel: impl FnOnce(u64) -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_size(size)?;
        self.size.store(size, Ordering::Release);
        kernel(size)
    }

    fn check_size(&self, size: u64) -> io::Result<()> {
        if self.geometry.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the device is read-only; its size cannot change",
            ));
        }
        Geometry {
            size,
            ..self.geometry
        }
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// See [`BlockDevice::parallel_large_io`].
    pub fn parallel_large_io(&self, write: bool) -> bool {
        self.device.parallel_large_io(write)
    }

    /// The configuration the session was made with.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The counters of the block requests served (also reachable through
    /// [`crate::stats::process_snapshot`]).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The `flags2` bits granted in the FUSE_INIT reply, once the kernel
    /// has it; `None` before.
    pub fn granted_flags2(&self) -> Option<u32> {
        match self.granted_flags2.load(Ordering::Acquire) {
            NO_INIT => None,
            flags2 => Some(flags2),
        }
    }

    /// Serves every channel on a thread of its own until all have ended,
    /// then tells the handler the device is gone.
    pub fn serve(self: &Arc<Self>, channels: Vec<Arc<dyn Channel>>) -> io::Result<()> {
        let queues =
            u16::try_from(channels.len()).map_err(|_| io::Error::other("too many channels"))?;
        let channels = parking_lot::Mutex::new(channels.into_iter().map(Some).collect::<Vec<_>>());
        self.serve_with(queues, move |session, queue| {
            let channel = channels.lock()[usize::from(queue)]
                .take()
                .expect("each queue's channel is taken once");
            session.run_worker(queue, channel)
        })
    }

    /// Runs `worker(session, queue)` for queues `0..queues`, each on a thread
    /// of its own, until all have returned, then tells the handler the
    /// device is gone. Transports with their own receive loop (io_uring)
    /// serve through this.
    ///
    /// A FUSE_DESTROY ends only the worker that read it: the kernel module
    /// retires a handed-over daemon's channels one queue at a time, and the
    /// other queues still dispatch to the handler meanwhile.
    pub fn serve_with<W>(self: &Arc<Self>, queues: u16, worker: W) -> io::Result<()>
    where
        W: Fn(&Session, u16) -> io::Result<()> + Send + Sync + 'static,
    {
        self.serving.fetch_add(1, Ordering::AcqRel);
        let result = self
            .spawn_workers(queues, worker)
            .map(Session::join_workers);
        self.serving.fetch_sub(1, Ordering::AcqRel);
        // A worker that could not be started leaves the others running,
        // with the handler.
        let result = result?;
        self.destroy();
        result
    }

    fn spawn_workers<W>(
        self: &Arc<Self>,
        queues: u16,
        worker: W,
    ) -> io::Result<Vec<thread::JoinHandle<io::Result<()>>>>
    where
        W: Fn(&Session, u16) -> io::Result<()> + Send + Sync + 'static,
    {
        let worker = Arc::new(worker);
        let mut workers = Vec::with_capacity(usize::from(queues));
        for queue in 0..queues {
            let session = Arc::clone(self);
            let worker = Arc::clone(&worker);
            workers.push(
                thread::Builder::new()
                    .name(format!("fuse-blk-q{queue}"))
                    .spawn(move || {
                        crate::io_thread::mark_io_flusher();
                        worker(&session, queue)
                    })?,
            );
        }
        Ok(workers)
    }

    /// Waits for every worker; the first error of any.
    fn join_workers(workers: Vec<thread::JoinHandle<io::Result<()>>>) -> io::Result<()> {
        let mut result = Ok(());
        for worker in workers {
            let outcome = worker
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("worker thread panicked")));
            if let Err(e) = outcome {
                log::error!("worker ended with an error: {e}");
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Receives and dispatches requests from one channel until it ends.
    pub fn run_worker(&self, queue: u16, channel: Arc<dyn Channel>) -> io::Result<()> {
        let buffer = Mapping::new(self.config.buffer_size())?.without_huge_pages();
        let stop = Arc::new(Stop::new()?);
        self.waiting_workers.lock().insert(queue, stop.clone());
        let result = self.worker_loop(queue, &channel, &buffer, &stop);
        self.waiting_workers.lock().remove(&queue);
        result
    }

    fn worker_loop(
        &self,
        queue: u16,
        channel: &Arc<dyn Channel>,
        buffer: &Mapping,
        stop: &Stop,
    ) -> io::Result<()> {
        // How far requests reached into `buffer` since its pages were last
        // given back.
        let mut touched = 0;
        while !self.stopping.load(Ordering::Acquire) {
            // With more than IDLE_KEEP of the buffers touched, the wait for
            // the next request is bounded, so that an idle worker gives
            // them back.
            let holding = touched.max(reply::fill_buffer_touched()) > IDLE_KEEP;
            let received = {
                // SAFETY: the mapping is this worker's alone, and the slice
                // ends with this block, before the buffer can be released.
                let buf = unsafe { std::slice::from_raw_parts_mut(buffer.as_ptr(), buffer.len()) };
                if holding {
                    channel.receive_or_idle(buf, stop, IDLE_TICK)
                } else {
                    channel.receive_or_stop(buf, stop)
                }
            };
            match received {
                Ok(Some(len)) => {
                    touched = touched.max(len);
                    // SAFETY: as above; the request ends with its dispatch.
                    let message = unsafe { std::slice::from_raw_parts(buffer.as_ptr(), len) };
                    if !self.dispatch(queue, message, channel) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    // SAFETY: no request is being handled, and none refers
                    // into the buffer afterwards (a handler sees WRITE data
                    // only for the length of its call).
                    unsafe { buffer.release(0, touched) };
                    reply::release_fill_buffer();
                    touched = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Workers currently in their receive loop.
    pub fn workers_waiting(&self) -> usize {
        self.waiting_workers.lock().len()
    }

    /// Makes every worker leave once it has answered the request it is
    /// handling, without ending the channels: another process can go on
    /// serving them (handoff). Requests not yet read stay queued in the
    /// kernel. Call repeatedly until `serve` returns: a worker that was not
    /// yet waiting when this was called notices at its next wait.
    ///
    /// No signal is involved: each worker waits for its next request on
    /// the channel and on a [`Stop`] of its own together
    /// ([`Channel::receive_or_stop`]), which this sets.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for stop in self.waiting_workers.lock().values() {
            stop.set();
        }
    }

    fn destroy(&self) {
        if !self.destroyed.swap(true, Ordering::AcqRel) {
            self.device.destroy();
        }
    }

    /// Handles one message; returns false once the session must end.
    pub fn dispatch(&self, queue: u16, message: &[u8], channel: &Arc<dyn Channel>) -> bool {
        self.handle(queue, parse_request(message), channel.clone())
    }

    /// Handles one message delivered in a header and a payload buffer (see
    /// [`parse_request_split`]), answering through `sink`; returns false once
    /// the session must end.
    pub fn dispatch_split(
        &self,
        queue: u16,
        head: &[u8],
        payload: &[u8],
        sink: Arc<dyn ReplySink>,
    ) -> bool {
        self.handle(queue, parse_request_split(head, payload), sink)
    }

    fn handle(
        &self,
        queue: u16,
        parsed: Result<WireRequest<'_>, ParseError>,
        sink: Arc<dyn ReplySink>,
    ) -> bool {
        let request = match parsed {
            Ok(request) => request,
            Err(e) => {
                log::error!("malformed request: {e}");
                self.stats.count_malformed();
                if let Some(header) = e.header {
                    // The kernel expects no answer to these, even broken.
                    if matches!(
                        header.opcode,
                        abi::opcode::FORGET | abi::opcode::BATCH_FORGET | abi::opcode::INTERRUPT
                    ) {
                        return true;
                    }
                    let errno = match e.kind {
                        ParseErrorKind::UnknownOpcode(_) => libc::ENOSYS,
                        _ => libc::EINVAL,
                    };
                    Responder::new(header.unique, sink).error(errno);
                }
                return true;
            }
        };
        let mut responder = Responder::new(request.unique(), sink);
        if let Some((kind, bytes)) = self.counted(&request.operation) {
            responder = responder.tracked(self.stats.track(kind, bytes));
        }
        let req = Request::new(request.unique(), queue);
        match request.operation {
            Operation::Init(init) => self.init(&init, responder),
            Operation::Destroy => {
                responder.ok(&[]);
                // Served by workers, the handler goes when the last of them
                // ends (see `serve_with`); a caller driving `dispatch`
                // itself has one channel, which this ends.
                if self.serving.load(Ordering::Acquire) == 0 {
                    self.destroy();
                }
                return false;
            }
            // Block requests are short; an interrupted one is simply
            // answered when it completes.
            Operation::Interrupt(_) => responder.no_reply(),
            Operation::Read(arg) => self.read(&req, &arg, responder),
            Operation::Write { arg, data } => self.write(&req, &arg, data, responder),
            Operation::Fsync(_) => {
                if self.geometry.features.flush {
                    self.device.flush(&req, ReplyEmpty::new(responder));
                } else {
                    responder.ok(&[]);
                }
            }
            Operation::Fallocate(arg) => self.fallocate(&req, &arg, responder),
            // FLUSH is sent on close(2) of the file, not a cache flush.
            Operation::Flush(_) => responder.ok(&[]),
            // FORGET and BATCH_FORGET are never answered.
            _ if !request.expects_reply() => responder.no_reply(),
            _ => match &self.namespace {
                Some(namespace) => namespace.handle(&request, responder),
                None => responder.error(libc::ENOSYS),
            },
        }
        true
    }

    /// The kind and bytes under which a request is counted, if it is a
    /// block request. A punched hole counts as a discard: on the stock path
    /// the loop driver sends discards and unmapping write-zeroes alike as
    /// punch-hole, and which one it was cannot be told here.
    fn counted(&self, operation: &Operation<'_>) -> Option<(Kind, u64)> {
        Some(match operation {
            Operation::Read(arg) => (
                Kind::Read,
                u64::from(arg.size).min(self.size().saturating_sub(arg.offset)),
            ),
            Operation::Write { data, .. } => (Kind::Write, data.len() as u64),
            Operation::Fsync(_) => (Kind::Flush, 0),
            Operation::Fallocate(arg) if arg.mode & !falloc::KEEP_SIZE == falloc::ZERO_RANGE => {
                (Kind::WriteZeroes, arg.length)
            }
            Operation::Fallocate(arg) => (Kind::Discard, arg.length),
            _ => return None,
        })
    }

    fn init(&self, init: &abi::InitIn, responder: Responder) {
        if init.major < abi::KERNEL_VERSION {
            log::error!("kernel speaks FUSE {}.{}, too old", init.major, init.minor);
            return responder.error(libc::EPROTO);
        }
        if init.major > abi::KERNEL_VERSION {
            // The kernel answers a lower major by sending INIT again with it.
            let out = InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                ..InitOut::default()
            };
            return responder.ok(&[&out.as_bytes()[..8]]);
        }
        if init.minor < abi::MIN_KERNEL_MINOR_VERSION {
            log::error!(
                "kernel speaks FUSE 7.{}, 7.{} needed",
                init.minor,
                abi::MIN_KERNEL_MINOR_VERSION
            );
            return responder.error(libc::EPROTO);
        }
        let mut flags = init.flags & self.config.init_flags;
        let flags2 = if init.flags & init_flags::INIT_EXT != 0 {
            init.flags2 & self.config.init_flags2
        } else {
            0
        };
        if flags2 != 0 {
            flags |= init_flags::INIT_EXT;
        }
        let max_pages = (self.config.max_write / 4096).clamp(1, u32::from(u16::MAX)) as u16;
        let out = InitOut {
            major: abi::KERNEL_VERSION,
            minor: init.minor.min(abi::KERNEL_MINOR_VERSION),
            max_readahead: init.max_readahead,
            flags,
            max_background: self.config.max_background,
            congestion_threshold: self.config.max_background / 4 * 3,
            max_write: self.config.max_write,
            flags2,
            time_gran: 1,
            max_stack_depth: if flags2 & init_flags2::PASSTHROUGH != 0 {
                PASSTHROUGH_STACK_DEPTH
            } else {
                0
            },
            max_pages: if flags & init_flags::MAX_PAGES != 0 {
                max_pages
            } else {
                0
            },
            ..InitOut::default()
        };
        log::debug!(
            "FUSE 7.{} session, flags {:#x} {:#x}",
            out.minor,
            out.flags,
            out.flags2
        );
        responder.ok(&[out.as_bytes()]);
        self.granted_flags2.store(flags2, Ordering::Release);
    }

    /// Checks that `[offset, offset + len)` is block-aligned; the caller
    /// clamps or refuses ranges past the end.
    fn aligned(&self, offset: u64, len: u64) -> bool {
        let block = u64::from(self.geometry.logical_block_size);
        offset % block == 0 && len % block == 0
    }

    fn read(&self, req: &Request, arg: &abi::ReadIn, responder: Responder) {
        // A read reaching past the end is a file read hitting EOF: it is
        // shortened, as a file system would.
        if arg.size > self.config.max_write {
            return responder.error(libc::EINVAL);
        }
        let available = self.size().saturating_sub(arg.offset);
        let len = u64::from(arg.size).min(available) as u32;
        if len == 0 {
            return responder.ok(&[]);
        }
        if !self.aligned(arg.offset, u64::from(len)) {
            return responder.error(libc::EINVAL);
        }
        self.device
            .read(req, arg.offset, len, ReplyData::new(responder, len));
    }

    fn write(&self, req: &Request, arg: &abi::WriteIn, data: &[u8], responder: Responder) {
        if self.geometry.read_only {
            return responder.error(libc::EROFS);
        }
        let len = data.len() as u64;
        if arg
            .offset
            .checked_add(len)
            .is_none_or(|end| end > self.size())
        {
            return responder.error(libc::ENOSPC);
        }
        if !self.aligned(arg.offset, len) {
            return responder.error(libc::EINVAL);
        }
        let fua = self.geometry.features.fua && arg.flags & (libc::O_DSYNC as u32) != 0;
        self.device.write(
            req,
            arg.offset,
            data,
            fua,
            ReplyWrite::new(responder, arg.size),
        );
    }

    fn fallocate(&self, req: &Request, arg: &abi::FallocateIn, responder: Responder) {
        if self.geometry.read_only {
            return responder.error(libc::EROFS);
        }
        if arg
            .offset
            .checked_add(arg.length)
            .is_none_or(|end| end > self.size())
        {
            return responder.error(libc::EINVAL);
        }
        if !self.aligned(arg.offset, arg.length) {
            return responder.error(libc::EINVAL);
        }
        if arg.length == 0 {
            return responder.ok(&[]);
        }
        let features = self.geometry.features;
        let reply = ReplyEmpty::new(responder);
        let mode = arg.mode & !falloc::KEEP_SIZE;
        match mode {
            falloc::ZERO_RANGE if features.write_zeroes => self
                .device
                .write_zeroes(req, arg.offset, arg.length, false, reply),
            falloc::PUNCH_HOLE if arg.mode & falloc::KEEP_SIZE != 0 => {
                if self.config.punch_hole_zeroes {
                    if features.write_zeroes {
                        self.device
                            .write_zeroes(req, arg.offset, arg.length, true, reply)
                    } else {
                        reply.error(libc::EOPNOTSUPP)
                    }
                } else if features.discard {
                    self.device.discard(req, arg.offset, arg.length, reply)
                } else {
                    reply.error(libc::EOPNOTSUPP)
                }
            }
            _ => reply.error(libc::EOPNOTSUPP),
        }
    }
}
