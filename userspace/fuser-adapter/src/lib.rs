//! Serve a regular file of an existing [`fuser::Filesystem`] as a fuse-blk
//! block device, with the filesystem unchanged.
//!
//! The adapter is a FUSE *client* living in the same process: it creates a
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)` (message boundaries are kept, so one
//! read is one message, as on `/dev/fuse`), runs a [`fuser::Session`] on one
//! end and speaks the kernel's side of the protocol on the other: INIT, a
//! LOOKUP of each component of the configured path, OPEN, then READ, WRITE,
//! FSYNC and FALLOCATE for the block requests, and FLUSH, RELEASE and
//! DESTROY at the end.
//!
//! Block requests never wait for their reply: each is registered under a
//! fresh unique, sent, and answered later by a reader thread. Requests larger
//! than the negotiated `max_write` (at most [`MAX_CHUNK`]) are split and
//! answered when every part is back. If the fuser session ends, everything
//! in flight is answered EIO and later requests ENOTCONN at once.
//!
//! ```no_run
//! # fn demo<FS: fuser::Filesystem>(fs: FS) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use fuse_blk_fuser::{FuserDevice, FuserOptions};
//!
//! let device = FuserDevice::new(fs, FuserOptions::new("disk.img"))?;
//! let session = fuse_blk::Session::new(Arc::new(device), fuse_blk::SessionConfig::default())
//!     .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
//! # let _ = session;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod conn;

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};
use fuse_blk_proto::abi::{
    self, falloc, fsync_flags, init_flags, opcode, EntryOut, FallocateIn, FlushIn, FsyncIn, InitIn,
    InitOut, OpenIn, OpenOut, ReadIn, ReleaseIn, WriteIn,
};
use fuse_blk_proto::client::read_struct;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::time::TimeVal;
use parking_lot::Mutex;
use zerocopy::{FromBytes, IntoBytes};

use crate::conn::{Aggregate, CallError, Conn, Expect, FsyncAfter, Pending, ReadAggregate, Target};

/// Largest READ or WRITE sent to the filesystem in one message. The
/// negotiated `max_write` lowers it; a larger request is split.
pub const MAX_CHUNK: u32 = 128 * 1024;

/// Socket buffer asked for on both ends; the kernel caps it at
/// `net.core.wmem_max` (doubled). A message must fit in the sender's buffer.
const SOCKET_BUFFER: usize = 4 << 20;

/// How long INIT, LOOKUP and OPEN may take before `new` gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long teardown waits for requests in flight and for FLUSH, RELEASE
/// and DESTROY to be answered before leaving the filesystem behind.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to serve a file of a fuser filesystem as a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuserOptions {
    /// The file inside the filesystem, relative to its root (for example
    /// `"disk.img"` or `"images/vm0.img"`). Its size is the device size.
    pub path: PathBuf,
    /// Logical block size of the device (512 to 4096, a power of two). The
    /// file size must be a non-zero multiple of it.
    pub logical_block_size: u32,
    /// Open the file read-only and present a read-only device.
    pub read_only: bool,
    /// Number of fuser event-loop threads (`fuser::Config::n_threads`);
    /// 0 is taken as 1.
    pub threads: usize,
}

impl FuserOptions {
    /// Serves `path` with 512-byte blocks, writable, on one fuser thread.
    pub fn new(path: impl Into<PathBuf>) -> FuserOptions {
        FuserOptions {
            path: path.into(),
            logical_block_size: 512,
            read_only: false,
            threads: 1,
        }
    }
}

/// The opened file, as the filesystem knows it.
#[derive(Debug, Clone, Copy)]
struct OpenFile {
    nodeid: u64,
    fh: u64,
    /// The `open(2)` flags it was opened with (`O_RDWR` or `O_RDONLY`).
    flags: u32,
}

/// The adapter's threads: the fuser session, the reply reader and the
/// follow-up sender.
struct Workers {
    session: JoinHandle<io::Result<()>>,
    reader: JoinHandle<()>,
    followups: JoinHandle<()>,
}

/// A regular file of a [`fuser::Filesystem`], served as a
/// [`BlockDevice`].
///
/// Dropping it (or the engine calling [`BlockDevice::destroy`]) releases
/// the file, sends DESTROY and stops the fuser session.
pub struct FuserDevice {
    conn: Arc<Conn>,
    file: OpenFile,
    geometry: Geometry,
    chunk: u32,
    path: PathBuf,
    threads: usize,
    workers: Mutex<Option<Workers>>,
}

impl fmt::Debug for FuserDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuserDevice")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("max_io_size", &self.chunk)
            .field("connected", &!self.conn.is_closed())
            .finish()
    }
}

impl FuserDevice {
    /// Starts a fuser session for `fs` on its own thread(s), connects to it
    /// and opens `options.path`.
    ///
    /// Fails with a message naming the path when the file is missing, is
    /// not a regular file, cannot be opened, or its size is not a non-zero
    /// multiple of the block size; the session is stopped then.
    pub fn new<FS: fuser::Filesystem>(fs: FS, options: FuserOptions) -> io::Result<FuserDevice> {
        let threads = options.threads.max(1);
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let socket_limit = tune_socket(&ours)?.min(tune_socket(&theirs)?);
        let conn = Conn::new(ours);
        socket::setsockopt(
            conn.sock(),
            sockopt::ReceiveTimeout,
            &TimeVal::new(SETUP_TIMEOUT.as_secs() as _, 0),
        )?;

        let mut config = fuser::Config::default();
        config.n_threads = Some(threads);
        config.acl = fuser::SessionACL::All;
        // `from_fd` reads INIT and answers it before returning, so the
        // session runs on its own thread from the start.
        let session = thread::Builder::new()
            .name("fuser-blk-session".into())
            .spawn(move || {
                fuser::Session::from_fd(fs, theirs, fuser::SessionACL::All, config)?.run()
            })?;

        let mut setup = Setup {
            conn: Arc::clone(&conn),
            session: Some(session),
            threads,
            initialized: false,
            opened: None,
            healthy: true,
        };
        let connected = match setup.connect(&options, socket_limit) {
            Ok(connected) => connected,
            Err(e) => return Err(setup.abort(e)),
        };
        if let Err(e) =
            socket::setsockopt(conn.sock(), sockopt::ReceiveTimeout, &TimeVal::new(0, 0))
        {
            return Err(setup.abort(e.into()));
        }

        let queue = conn.start_followups();
        let followups = {
            let conn = Arc::clone(&conn);
            thread::Builder::new()
                .name("fuser-blk-tx".into())
                .spawn(move || conn.run_followups(queue))
        };
        let followups = match followups {
            Ok(handle) => handle,
            Err(e) => {
                conn.stop_followups();
                return Err(setup.abort(e));
            }
        };
        let reader = {
            let conn = Arc::clone(&conn);
            let buf_size = connected.chunk as usize + 4096;
            thread::Builder::new()
                .name("fuser-blk-rx".into())
                .spawn(move || conn.run_reader(buf_size))
        };
        let reader = match reader {
            Ok(handle) => handle,
            Err(e) => {
                conn.stop_followups();
                let _ = followups.join();
                return Err(setup.abort(e));
            }
        };
        let session = setup.session.take().expect("session thread handle");
        log::debug!(
            "{}: serving {} bytes, nodeid {}, fh {}, I/O in chunks of {} bytes",
            options.path.display(),
            connected.geometry.size,
            connected.file.nodeid,
            connected.file.fh,
            connected.chunk
        );
        Ok(FuserDevice {
            conn,
            file: connected.file,
            geometry: connected.geometry,
            chunk: connected.chunk,
            path: options.path,
            threads,
            workers: Mutex::new(Some(Workers {
                session,
                reader,
                followups,
            })),
        })
    }

    /// The file inside the filesystem this device serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Largest READ or WRITE sent to the filesystem in one message; larger
    /// requests are split.
    pub fn max_io_size(&self) -> u32 {
        self.chunk
    }

    /// Whether the fuser session is still there to answer requests.
    pub fn is_connected(&self) -> bool {
        !self.conn.is_closed()
    }

    /// Releases the file, sends DESTROY, stops the session and joins the
    /// threads. Runs once; later calls (and `Drop`) do nothing. Requests
    /// still unanswered when it gives up are answered EIO.
    fn shutdown(&self) {
        let Some(workers) = self.workers.lock().take() else {
            return;
        };
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        let mut healthy = self.conn.wait_idle(deadline);
        if !healthy {
            log::error!(
                "{}: requests still unanswered after {TEARDOWN_TIMEOUT:?}; abandoning the filesystem",
                self.path.display()
            );
        }
        if healthy && !self.conn.is_closed() {
            healthy = self.goodbye(deadline);
        }
        self.conn.stop_followups();
        self.conn.shutdown();
        let current = thread::current().id();
        // The last reference may be dropped on one of our own threads (a
        // reply object holding the channel that holds the session); never
        // join a thread from itself.
        for handle in [workers.reader, workers.followups] {
            if handle.thread().id() != current && handle.join().is_err() {
                log::error!("{}: an adapter thread panicked", self.path.display());
            }
        }
        if !healthy {
            log::warn!(
                "{}: not waiting for the fuser session to end",
                self.path.display()
            );
            return;
        }
        match workers.session.join() {
            Ok(Ok(())) => log::debug!("{}: fuser session ended", self.path.display()),
            Ok(Err(e)) => log::warn!("{}: fuser session ended: {e}", self.path.display()),
            Err(_) => log::error!("{}: fuser session thread panicked", self.path.display()),
        }
    }

    /// FLUSH and RELEASE the file, then one DESTROY per session thread
    /// (each fuser event loop ends on the DESTROY it reads). False if the
    /// filesystem stopped answering.
    fn goodbye(&self, deadline: Instant) -> bool {
        let OpenFile { nodeid, fh, flags } = self.file;
        let flush = FlushIn {
            fh,
            ..FlushIn::default()
        };
        let release = ReleaseIn {
            fh,
            flags,
            ..ReleaseIn::default()
        };
        let mut calls: Vec<(u32, u64, Vec<u8>)> = vec![
            (opcode::FLUSH, nodeid, flush.as_bytes().to_vec()),
            (opcode::RELEASE, nodeid, release.as_bytes().to_vec()),
        ];
        calls.extend((0..self.threads).map(|_| (opcode::DESTROY, 0, Vec::new())));
        for (op, nodeid, arg) in calls {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.conn.call(op, nodeid, &[&arg], timeout) {
                Ok(_) => {}
                // FLUSH is optional (fuser's default answers ENOSYS).
                Err(CallError::Errno(errno)) => {
                    if op != opcode::FLUSH || errno != libc::ENOSYS {
                        log::debug!(
                            "{}: opcode {op} answered {}",
                            self.path.display(),
                            io::Error::from_raw_os_error(errno)
                        );
                    }
                    if errno == libc::ENOTCONN {
                        return true;
                    }
                }
                Err(CallError::TimedOut) => {
                    log::error!(
                        "{}: the filesystem did not answer opcode {op} in time",
                        self.path.display()
                    );
                    return false;
                }
                Err(CallError::Io(e)) => {
                    log::debug!("{}: opcode {op}: {e}", self.path.display());
                    return true;
                }
            }
        }
        true
    }

    fn submit(&self, op: u32, args: &[&[u8]], expect: Expect, target: Target) {
        self.conn
            .submit(op, self.file.nodeid, args, Pending::new(expect, target));
    }

    fn read_in(&self, offset: u64, size: u32) -> ReadIn {
        ReadIn {
            fh: self.file.fh,
            offset,
            size,
            flags: self.file.flags,
            ..ReadIn::default()
        }
    }

    fn fallocate(
        &self,
        offset: u64,
        length: u64,
        mode: u32,
        fallback: Option<u32>,
        reply: ReplyEmpty,
    ) {
        let arg = |mode| FallocateIn {
            fh: self.file.fh,
            offset,
            length,
            mode,
            padding: 0,
        };
        let fallback = fallback.map(|mode| (self.file.nodeid, arg(mode)));
        self.submit(
            opcode::FALLOCATE,
            &[arg(mode).as_bytes()],
            Expect::Fallocate,
            Target::Empty { reply, fallback },
        );
    }

    fn fsync_in(&self) -> FsyncIn {
        FsyncIn {
            fh: self.file.fh,
            fsync_flags: fsync_flags::FDATASYNC,
            padding: 0,
        }
    }
}

impl BlockDevice for FuserDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        let chunk = self.chunk;
        if len <= chunk {
            let arg = self.read_in(offset, len);
            self.submit(
                opcode::READ,
                &[arg.as_bytes()],
                Expect::Data(len as usize),
                Target::Read(reply),
            );
            return;
        }
        let parts = len.div_ceil(chunk) as usize;
        let aggregate = ReadAggregate::new(reply, len as usize, parts);
        for part in 0..parts as u32 {
            let start = part * chunk;
            let size = chunk.min(len - start);
            let arg = self.read_in(offset + u64::from(start), size);
            self.submit(
                opcode::READ,
                &[arg.as_bytes()],
                Expect::Data(size as usize),
                Target::ReadPart {
                    aggregate: Arc::clone(&aggregate),
                    start: start as usize,
                },
            );
        }
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        let then = fua.then(|| FsyncAfter {
            nodeid: self.file.nodeid,
            arg: self.fsync_in(),
        });
        if data.is_empty() {
            match then {
                None => reply.ok(),
                Some(then) => self.submit(
                    opcode::FSYNC,
                    &[then.arg.as_bytes()],
                    Expect::Fsync,
                    Target::Write(Aggregate::new(reply, 1, None)),
                ),
            }
            return;
        }
        let chunk = self.chunk as usize;
        let aggregate = Aggregate::new(reply, data.len().div_ceil(chunk), then);
        let mut flags = self.file.flags;
        if fua {
            flags |= libc::O_DSYNC as u32;
        }
        for (i, part) in data.chunks(chunk).enumerate() {
            let arg = WriteIn {
                fh: self.file.fh,
                offset: offset + (i * chunk) as u64,
                size: part.len() as u32,
                flags,
                ..WriteIn::default()
            };
            self.submit(
                opcode::WRITE,
                &[arg.as_bytes(), part],
                Expect::Written(part.len() as u32),
                Target::Write(Arc::clone(&aggregate)),
            );
        }
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        let arg = self.fsync_in();
        self.submit(
            opcode::FSYNC,
            &[arg.as_bytes()],
            Expect::Fsync,
            Target::Empty {
                reply,
                fallback: None,
            },
        );
    }

    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        self.fallocate(
            offset,
            len,
            falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
            None,
            reply,
        );
    }

    /// ZERO_RANGE; with `may_unmap`, PUNCH_HOLE first (a punched hole reads
    /// as zeros), falling back to ZERO_RANGE if the filesystem cannot punch.
    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        let zero = falloc::ZERO_RANGE | falloc::KEEP_SIZE;
        if may_unmap {
            self.fallocate(
                offset,
                len,
                falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
                Some(zero),
                reply,
            );
        } else {
            self.fallocate(offset, len, zero, None, reply);
        }
    }

    fn destroy(&self) {
        self.shutdown();
    }
}

impl Drop for FuserDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Enlarges both socket buffers and returns the largest message payload
/// this end can send (a datagram must fit in the sender's buffer).
fn tune_socket(fd: &OwnedFd) -> io::Result<usize> {
    for result in [
        socket::setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER),
        socket::setsockopt(fd, sockopt::RcvBuf, &SOCKET_BUFFER),
    ] {
        if let Err(e) = result {
            log::debug!("cannot enlarge socket buffer: {e}");
        }
    }
    let sndbuf = socket::getsockopt(fd, sockopt::SndBuf)?;
    // The kernel refuses a datagram longer than the send buffer less 32
    // bytes; leave room for the FUSE headers too.
    Ok(sndbuf.saturating_sub(32 + 4096) & !4095)
}

/// What connecting found.
struct Connected {
    file: OpenFile,
    geometry: Geometry,
    chunk: u32,
}

/// The connection while `FuserDevice::new` sets it up, before the reader
/// thread exists: calls are made synchronously on the caller's thread.
struct Setup {
    conn: Arc<Conn>,
    session: Option<JoinHandle<io::Result<()>>>,
    threads: usize,
    initialized: bool,
    opened: Option<OpenFile>,
    /// False once a call timed out: the filesystem may be stuck.
    healthy: bool,
}

impl Setup {
    fn call(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> Result<Vec<u8>, CallError> {
        let result = self.conn.call_direct(op, nodeid, args);
        if matches!(result, Err(CallError::TimedOut)) {
            self.healthy = false;
        }
        result
    }

    fn connect(&mut self, options: &FuserOptions, socket_limit: usize) -> io::Result<Connected> {
        let path = &options.path;
        let shown = path.display();

        let init = InitIn {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: init_flags::ASYNC_READ | init_flags::BIG_WRITES | init_flags::MAX_PAGES,
            ..InitIn::default()
        };
        let payload = self
            .call(opcode::INIT, 0, &[init.as_bytes()])
            .map_err(|e| e.into_io("fuser session: INIT"))?;
        self.initialized = true;
        let init_out: InitOut = read_zero_filled(&payload);
        if init_out.major != abi::KERNEL_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "fuser session speaks FUSE {}.{}, not {}.x",
                    init_out.major,
                    init_out.minor,
                    abi::KERNEL_VERSION
                ),
            ));
        }
        let chunk = chunk_size(init_out.max_write, socket_limit, options.logical_block_size);
        log::debug!(
            "fuser session: FUSE 7.{}, max_write {}, flags {:#x}",
            init_out.minor,
            init_out.max_write,
            init_out.flags
        );

        let names = components(path)?;
        let mut nodeid = abi::ROOT_ID;
        let mut attr = None;
        let mut walked = PathBuf::new();
        for name in names {
            if let Some(attr) = attr {
                if file_type(&attr) != libc::S_IFDIR {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{shown}: {} is not a directory", walked.display()),
                    ));
                }
            }
            walked.push(name);
            let mut arg = name.as_bytes().to_vec();
            arg.push(0);
            let entry = match self.call(opcode::LOOKUP, nodeid, &[&arg]) {
                Ok(payload) => read_struct::<EntryOut>(&payload).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{shown}: malformed LOOKUP reply of {} bytes", payload.len()),
                    )
                })?,
                Err(e) => return Err(lookup_error(path, &walked, e)),
            };
            // A zero nodeid is a cached negative entry: ENOENT.
            if entry.nodeid == 0 {
                return Err(lookup_error(path, &walked, CallError::Errno(libc::ENOENT)));
            }
            nodeid = entry.nodeid;
            attr = Some(entry.attr);
        }
        let attr = attr.expect("at least one component");
        let kind = file_type(&attr);
        if kind != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{shown}: not a regular file (it is {})",
                    describe_type(kind)
                ),
            ));
        }
        let geometry = Geometry {
            size: attr.size,
            logical_block_size: options.logical_block_size,
            physical_block_size: options.logical_block_size,
            read_only: options.read_only,
            features: Features::ALL,
        };
        geometry
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{shown}: {e}")))?;

        let flags = if options.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        } as u32;
        let open = OpenIn {
            flags,
            open_flags: 0,
        };
        let payload = self
            .call(opcode::OPEN, nodeid, &[open.as_bytes()])
            .map_err(|e| e.into_io(&format!("{shown}: open")))?;
        let out = read_struct::<OpenOut>(&payload).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{shown}: malformed OPEN reply of {} bytes", payload.len()),
            )
        })?;
        let file = OpenFile {
            nodeid,
            fh: out.fh,
            flags,
        };
        self.opened = Some(file);
        Ok(Connected {
            file,
            geometry,
            chunk,
        })
    }

    /// Undoes a failed setup: releases what was opened, ends the session
    /// and returns `error`, with the session's own error when it died.
    fn abort(mut self, error: io::Error) -> io::Error {
        if self.healthy && self.initialized && !self.conn.is_closed() {
            if let Some(file) = self.opened {
                let release = ReleaseIn {
                    fh: file.fh,
                    flags: file.flags,
                    ..ReleaseIn::default()
                };
                let _ = self.call(opcode::RELEASE, file.nodeid, &[release.as_bytes()]);
            }
            for _ in 0..self.threads {
                if self.call(opcode::DESTROY, 0, &[]).is_err() {
                    break;
                }
            }
        }
        self.conn.shutdown();
        let Some(session) = self.session.take() else {
            return error;
        };
        if !self.healthy {
            log::warn!("not waiting for the stuck fuser session to end");
            return error;
        }
        match session.join() {
            Ok(Ok(())) => error,
            // The session's failure is the interesting one when it never
            // answered (a refused INIT, for instance).
            Ok(Err(e)) if !self.initialized => {
                io::Error::new(e.kind(), format!("fuser session failed: {e} ({error})"))
            }
            Ok(Err(e)) => {
                log::debug!("fuser session ended: {e}");
                error
            }
            Err(_) => io::Error::other(format!("fuser session panicked ({error})")),
        }
    }
}

/// The message size to split I/O into: the filesystem's `max_write`
/// (128 KiB if it gives none), at most [`MAX_CHUNK`] and what the socket
/// carries, in whole blocks.
fn chunk_size(max_write: u32, socket_limit: usize, block: u32) -> u32 {
    let max_write = if max_write == 0 { MAX_CHUNK } else { max_write };
    let limit = u32::try_from(socket_limit).unwrap_or(u32::MAX).max(4096);
    let chunk = max_write.min(MAX_CHUNK).min(limit);
    if chunk >= block {
        chunk / block * block
    } else {
        chunk
    }
}

/// Reads `T` from the front of `payload`, zero-filling what a shorter
/// (older-protocol) payload lacks.
fn read_zero_filled<T: FromBytes + IntoBytes + Default>(payload: &[u8]) -> T {
    let mut value = T::default();
    let bytes = value.as_mut_bytes();
    let n = bytes.len().min(payload.len());
    bytes[..n].copy_from_slice(&payload[..n]);
    value
}

/// The names to LOOKUP one after the other from the root.
fn components(path: &Path) -> io::Result<Vec<&OsStr>> {
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => names.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: \"..\" is not supported in the path", path.display()),
                ))
            }
        }
    }
    if names.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} names no file inside the filesystem", path),
        ));
    }
    Ok(names)
}

fn lookup_error(path: &Path, walked: &Path, error: CallError) -> io::Error {
    let what = if walked == path {
        format!("{}", path.display())
    } else {
        format!("{}: {}", path.display(), walked.display())
    };
    error.into_io(&what)
}

fn file_type(attr: &abi::Attr) -> u32 {
    attr.mode & libc::S_IFMT
}

fn describe_type(kind: u32) -> &'static str {
    match kind {
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFBLK => "a block device",
        libc::S_IFCHR => "a character device",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        _ => "of an unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(16 << 20, 400 << 10, 512), MAX_CHUNK);
        assert_eq!(chunk_size(0, 400 << 10, 512), MAX_CHUNK);
        assert_eq!(chunk_size(64 << 10, 400 << 10, 4096), 64 << 10);
        assert_eq!(chunk_size(100_000, 400 << 10, 4096), 98_304);
        assert_eq!(chunk_size(16 << 20, 60 << 10, 512), 60 << 10);
        assert_eq!(chunk_size(1000, 400 << 10, 4096), 1000);
    }

    #[test]
    fn path_components() {
        let names = components(Path::new("/a/./b.img")).unwrap();
        assert_eq!(names, [OsStr::new("a"), OsStr::new("b.img")]);
        assert!(components(Path::new("")).is_err());
        assert!(components(Path::new("/")).is_err());
        assert!(components(Path::new("a/../b")).is_err());
    }
}
