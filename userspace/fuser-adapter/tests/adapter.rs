//! The adapter driven through the fuse-blk session engine, against a small
//! in-memory fuser filesystem, without a kernel.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuse_blk::{BlockDevice, Channel, ReplySink, Session, SessionConfig};
use fuse_blk_fuser::{FuserDevice, FuserOptions, MAX_CHUNK};
use fuse_blk_proto::abi::{falloc, opcode, FallocateIn, FsyncIn, ReadIn, WriteIn, WriteOut};
use fuse_blk_proto::client::{encode_request, parse_reply, read_struct};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, WriteFlags,
};
use parking_lot::{Condvar, Mutex};
use zerocopy::IntoBytes;

const DISK_SIZE: usize = 4 << 20;
const TTL: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The filesystem.

/// What the filesystem saw, for the tests to check.
#[derive(Default)]
struct Probe {
    open_flags: Mutex<Vec<i32>>,
    events: Mutex<Vec<String>>,
    largest_write: AtomicU32,
    largest_read: AtomicU32,
    fsyncs: AtomicUsize,
    short_reads: AtomicBool,
    panic_on_read: AtomicBool,
    destroyed: AtomicBool,
}

impl Probe {
    fn event(&self, e: impl Into<String>) {
        self.events.lock().push(e.into());
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().clone()
    }
}

struct Node {
    parent: u64,
    name: &'static str,
    kind: FileType,
    data: Option<Arc<Mutex<Vec<u8>>>>,
}

/// Root (1) holds "disk.img" (2, 4 MiB), "odd.img" (3, 1000 bytes),
/// "sub/" (4) and "empty.img" (6); "sub" holds "inner.img" (5, 64 KiB).
struct MemFs {
    nodes: HashMap<u64, Node>,
    probe: Arc<Probe>,
    max_write: Option<u32>,
    fsync: bool,
    punch_hole: bool,
    zero_range: bool,
    fail_init: bool,
}

impl MemFs {
    fn new() -> (MemFs, Arc<Mutex<Vec<u8>>>, Arc<Probe>) {
        let disk = Arc::new(Mutex::new(vec![0u8; DISK_SIZE]));
        let probe = Arc::new(Probe::default());
        let file = |parent, name, size: usize| Node {
            parent,
            name,
            kind: FileType::RegularFile,
            data: Some(Arc::new(Mutex::new(vec![0u8; size]))),
        };
        let dir = |parent, name| Node {
            parent,
            name,
            kind: FileType::Directory,
            data: None,
        };
        let mut nodes = HashMap::new();
        nodes.insert(1, dir(1, ""));
        nodes.insert(
            2,
            Node {
                data: Some(Arc::clone(&disk)),
                ..file(1, "disk.img", 0)
            },
        );
        nodes.insert(3, file(1, "odd.img", 1000));
        nodes.insert(4, dir(1, "sub"));
        nodes.insert(5, file(4, "inner.img", 64 << 10));
        nodes.insert(6, file(1, "empty.img", 0));
        let fs = MemFs {
            nodes,
            probe: Arc::clone(&probe),
            max_write: None,
            fsync: true,
            punch_hole: true,
            zero_range: true,
            fail_init: false,
        };
        (fs, disk, probe)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let node = &self.nodes[&ino];
        let size = node.data.as_ref().map_or(0, |d| d.lock().len() as u64);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: node.kind,
            perm: if node.kind == FileType::Directory {
                0o755
            } else {
                0o644
            },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn data(&self, ino: INodeNo) -> Option<&Arc<Mutex<Vec<u8>>>> {
        self.nodes.get(&ino.0).and_then(|n| n.data.as_ref())
    }
}

impl Filesystem for MemFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.fail_init {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if let Some(max_write) = self.max_write {
            config.set_max_write(max_write).expect("max_write");
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.probe.destroyed.store(true, Ordering::SeqCst);
        self.probe.event("destroy");
    }

    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .nodes
            .iter()
            .find(|(&ino, n)| ino != 1 && n.parent == parent.0 && OsStr::new(n.name) == name);
        match found {
            Some((&ino, _)) => reply.entry(&TTL, &self.attr(ino), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        if self.nodes.contains_key(&ino.0) {
            reply.attr(&TTL, &self.attr(ino.0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.probe.open_flags.lock().push(flags.0);
        self.probe.event("open");
        reply.opened(FileHandle(ino.0 * 100), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        assert_eq!(fh.0, ino.0 * 100, "wrong file handle");
        if self.probe.panic_on_read.load(Ordering::SeqCst) {
            panic!("test filesystem told to die");
        }
        self.probe.largest_read.fetch_max(size, Ordering::SeqCst);
        let Some(data) = self.data(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let data = data.lock();
        let start = (offset as usize).min(data.len());
        let mut end = (start + size as usize).min(data.len());
        if self.probe.short_reads.load(Ordering::SeqCst) {
            end = start + (end - start) / 2;
        }
        reply.data(&data[start..end]);
    }

    fn write(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        assert_eq!(fh.0, ino.0 * 100, "wrong file handle");
        self.probe
            .largest_write
            .fetch_max(data.len() as u32, Ordering::SeqCst);
        if flags.0 & libc::O_DSYNC != 0 {
            self.probe.event("write O_DSYNC");
        }
        let Some(file) = self.data(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let mut file = file.lock();
        let start = offset as usize;
        if file.len() < start + data.len() {
            file.resize(start + data.len(), 0);
        }
        file[start..start + data.len()].copy_from_slice(data);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.probe.event("flush");
        reply.ok();
    }

    fn release(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.probe.event("release");
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if !self.fsync {
            return reply.error(Errno::ENOSYS);
        }
        self.probe.fsyncs.fetch_add(1, Ordering::SeqCst);
        self.probe.event(format!("fsync datasync={datasync}"));
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.punch_hole && !self.zero_range {
            return reply.error(Errno::ENOSYS);
        }
        let mode = mode as u32;
        let supported = if mode & falloc::PUNCH_HOLE != 0 {
            self.punch_hole && mode & falloc::KEEP_SIZE != 0
        } else if mode & falloc::ZERO_RANGE != 0 {
            self.zero_range
        } else {
            false
        };
        if !supported {
            return reply.error(Errno::EOPNOTSUPP);
        }
        self.probe.event(format!("fallocate {mode:#x}"));
        let Some(file) = self.data(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let mut file = file.lock();
        let start = (offset as usize).min(file.len());
        let end = ((offset + length) as usize).min(file.len());
        file[start..end].fill(0);
        reply.ok();
    }
}

// ---------------------------------------------------------------------------
// A channel that captures replies, and the engine around the device.

#[derive(Default)]
struct TestChannel {
    replies: Mutex<Vec<Vec<u8>>>,
    arrived: Condvar,
}

impl ReplySink for TestChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let msg = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.replies.lock().push(msg);
        self.arrived.notify_all();
    }
}

impl Channel for TestChannel {
    fn receive(&self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

struct Harness {
    session: Session,
    channel: Arc<TestChannel>,
    dyn_channel: Arc<dyn Channel>,
    next_unique: AtomicU64,
}

impl Harness {
    fn new(device: Arc<FuserDevice>) -> Harness {
        Harness::with_config(device, config())
    }

    fn with_config(device: Arc<FuserDevice>, config: SessionConfig) -> Harness {
        let device: Arc<dyn BlockDevice> = device;
        let session = Session::new(device, config).expect("valid geometry");
        let channel = Arc::new(TestChannel::default());
        Harness {
            session,
            dyn_channel: channel.clone(),
            channel,
            next_unique: AtomicU64::new(1),
        }
    }

    /// Dispatches one request and returns its unique.
    fn send(&self, op: u32, args: &[&[u8]]) -> u64 {
        let unique = self.next_unique.fetch_add(1, Ordering::Relaxed);
        let msg = encode_request(op, unique, 2, args);
        self.session.dispatch(0, &msg, &self.dyn_channel);
        unique
    }

    /// Waits for the reply to `unique` (answered from whatever thread).
    fn wait(&self, unique: u64) -> Result<Vec<u8>, i32> {
        let deadline = Instant::now() + WAIT;
        let mut replies = self.channel.replies.lock();
        loop {
            let found = replies
                .iter()
                .position(|r| parse_reply(r).expect("well-formed reply").unique == unique);
            if let Some(i) = found {
                let msg = replies.remove(i);
                let reply = parse_reply(&msg).unwrap();
                return reply.result.map(<[u8]>::to_vec);
            }
            if self
                .channel
                .arrived
                .wait_until(&mut replies, deadline)
                .timed_out()
            {
                panic!("no reply to request {unique} within {WAIT:?}");
            }
        }
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        let arg = ReadIn {
            offset,
            size: len,
            ..ReadIn::default()
        };
        let data = self.wait(self.send(opcode::READ, &[arg.as_bytes()]))?;
        assert_eq!(data.len(), len as usize, "read reply length");
        Ok(data)
    }

    fn write_flags(&self, offset: u64, data: &[u8], flags: u32) -> Result<(), i32> {
        let arg = WriteIn {
            offset,
            size: data.len() as u32,
            flags,
            ..WriteIn::default()
        };
        let out = self.wait(self.send(opcode::WRITE, &[arg.as_bytes(), data]))?;
        let out: WriteOut = read_struct(&out).expect("fuse_write_out");
        assert_eq!(out.size as usize, data.len());
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.write_flags(offset, data, libc::O_RDWR as u32)
    }

    fn flush(&self) -> Result<(), i32> {
        let arg = FsyncIn::default();
        self.wait(self.send(opcode::FSYNC, &[arg.as_bytes()]))
            .map(drop)
    }

    fn fallocate(&self, offset: u64, length: u64, mode: u32) -> Result<(), i32> {
        let arg = FallocateIn {
            offset,
            length,
            mode,
            ..FallocateIn::default()
        };
        self.wait(self.send(opcode::FALLOCATE, &[arg.as_bytes()]))
            .map(drop)
    }

    fn destroy(&self) {
        let unique = self.send(opcode::DESTROY, &[]);
        assert_eq!(self.wait(unique), Ok(Vec::new()));
    }
}

/// The engine's configuration for these tests: requests up to the whole
/// 4 MiB disk, so that the adapter does all the splitting.
fn config() -> SessionConfig {
    SessionConfig {
        max_write: 8 << 20,
        ..SessionConfig::default()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn device(fs: MemFs, options: FuserOptions) -> Arc<FuserDevice> {
    Arc::new(FuserDevice::new(fs, options).expect("adapter starts"))
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn geometry_and_features() {
    let (fs, _disk, probe) = MemFs::new();
    let dev = device(fs, FuserOptions::new("disk.img"));
    let g = dev.geometry();
    assert_eq!(g.size, DISK_SIZE as u64);
    assert_eq!(g.logical_block_size, 512);
    assert!(!g.read_only);
    assert!(g.features.flush && g.features.fua && g.features.discard && g.features.write_zeroes);
    // fuser offers 16 MiB writes; the adapter caps its messages.
    assert_eq!(dev.max_io_size(), MAX_CHUNK);
    assert_eq!(*probe.open_flags.lock(), [libc::O_RDWR]);
    assert!(dev.is_connected());
}

#[test]
fn write_then_read_back_at_several_offsets() {
    let (fs, disk, probe) = MemFs::new();
    let dev = device(fs, FuserOptions::new("disk.img"));
    let h = Harness::new(dev);
    let cases: [(u64, usize); 6] = [
        (0, 4096),
        (7 * 512, 512),
        (64 << 10, 128 << 10),                       // exactly one chunk
        (1 << 20, 1 << 20),                          // 8 chunks
        (DISK_SIZE as u64 - (300 << 10), 300 << 10), // 2 chunks and a tail, to the end
        (3 * 512, 200 << 10),                        // unaligned to the chunk size
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64, len);
        h.write(offset, &data).expect("write");
        assert_eq!(h.read(offset, len as u32).expect("read"), data, "case {i}");
        let disk = disk.lock();
        assert_eq!(&disk[offset as usize..offset as usize + len], &data[..]);
    }
    // The whole device in one request: 32 chunks gathered.
    let whole = h.read(0, DISK_SIZE as u32).expect("read all");
    assert_eq!(whole, *disk.lock());
    assert_eq!(probe.largest_write.load(Ordering::SeqCst), MAX_CHUNK);
    assert_eq!(probe.largest_read.load(Ordering::SeqCst), MAX_CHUNK);
}

#[test]
fn small_max_write_splits_requests() {
    let (mut fs, disk, probe) = MemFs::new();
    fs.max_write = Some(20_000);
    let dev = device(fs, FuserOptions::new("disk.img"));
    // In whole blocks.
    assert_eq!(dev.max_io_size(), 19_968);
    let h = Harness::new(dev);
    let data = pattern(7, 1 << 20);
    h.write(512, &data).expect("write");
    assert_eq!(h.read(512, 1 << 20).expect("read"), data);
    assert_eq!(&disk.lock()[512..512 + (1 << 20)], &data[..]);
    assert_eq!(probe.largest_write.load(Ordering::SeqCst), 19_968);
    assert_eq!(probe.largest_read.load(Ordering::SeqCst), 19_968);
}

#[test]
fn flush_is_fdatasync() {
    let (fs, _disk, probe) = MemFs::new();
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    h.flush().expect("flush");
    assert_eq!(probe.fsyncs.load(Ordering::SeqCst), 1);
    assert!(probe.events().contains(&"fsync datasync=true".to_string()));
}

#[test]
fn flush_without_fsync_in_the_filesystem_succeeds() {
    // As with the kernel: ENOSYS from FSYNC means there is nothing to sync.
    let (mut fs, _disk, probe) = MemFs::new();
    fs.fsync = false;
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    h.flush().expect("flush");
    assert_eq!(probe.fsyncs.load(Ordering::SeqCst), 0);
}

#[test]
fn fua_write_is_dsync_and_followed_by_fsync() {
    let (fs, disk, probe) = MemFs::new();
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    let data = pattern(3, 256 << 10);
    h.write_flags(4096, &data, (libc::O_RDWR | libc::O_DSYNC) as u32)
        .expect("fua write");
    assert_eq!(&disk.lock()[4096..4096 + data.len()], &data[..]);
    let events = probe.events();
    let writes = events.iter().filter(|e| *e == "write O_DSYNC").count();
    assert_eq!(writes, 2, "{events:?}");
    assert_eq!(events.last().unwrap(), "fsync datasync=true", "{events:?}");
    // A plain write carries no O_DSYNC and no fsync.
    h.write(0, &data).expect("write");
    assert_eq!(probe.events().len(), events.len());
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let (fs, disk, probe) = MemFs::new();
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    let data = pattern(9, 1 << 20);
    h.write(0, &data).expect("write");

    // Discard (PUNCH_HOLE|KEEP_SIZE with the default engine config).
    h.fallocate(8192, 64 << 10, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        .expect("discard");
    let back = h.read(0, 1 << 20).expect("read");
    assert!(back[8192..8192 + (64 << 10)].iter().all(|&b| b == 0));
    assert_eq!(&back[..8192], &data[..8192]);
    assert_eq!(&back[8192 + (64 << 10)..], &data[8192 + (64 << 10)..]);

    // Write zeroes (ZERO_RANGE).
    h.fallocate(512 << 10, 4096, falloc::ZERO_RANGE | falloc::KEEP_SIZE)
        .expect("write zeroes");
    assert!(disk.lock()[512 << 10..(512 << 10) + 4096]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(disk.lock().len(), DISK_SIZE, "KEEP_SIZE");
    let events = probe.events();
    assert!(events.contains(&format!(
        "fallocate {:#x}",
        falloc::PUNCH_HOLE | falloc::KEEP_SIZE
    )));
    assert!(events.contains(&format!(
        "fallocate {:#x}",
        falloc::ZERO_RANGE | falloc::KEEP_SIZE
    )));
}

#[test]
fn write_zeroes_may_unmap_punches_then_falls_back() {
    let config = SessionConfig {
        punch_hole_zeroes: true,
        ..config()
    };
    // Punching supported: PUNCH_HOLE goes through as is.
    let (fs, disk, probe) = MemFs::new();
    let h = Harness::with_config(device(fs, FuserOptions::new("disk.img")), config);
    h.write(0, &[0xaa; 8192]).unwrap();
    h.fallocate(0, 4096, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        .expect("punch");
    assert!(disk.lock()[..4096].iter().all(|&b| b == 0));
    assert_eq!(disk.lock()[4096], 0xaa);
    assert_eq!(
        probe.events().last().unwrap(),
        &format!("fallocate {:#x}", falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
    );

    // Only ZERO_RANGE supported: the adapter falls back to it.
    let (mut fs, disk, probe) = MemFs::new();
    fs.punch_hole = false;
    let h = Harness::with_config(device(fs, FuserOptions::new("disk.img")), config);
    h.write(0, &[0xaa; 8192]).unwrap();
    h.fallocate(0, 4096, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        .expect("zeroed by fallback");
    assert!(disk.lock()[..4096].iter().all(|&b| b == 0));
    assert_eq!(
        probe.events().last().unwrap(),
        &format!("fallocate {:#x}", falloc::ZERO_RANGE | falloc::KEEP_SIZE)
    );
}

#[test]
fn fallocate_unsupported_is_eopnotsupp() {
    let (mut fs, _disk, _probe) = MemFs::new();
    fs.punch_hole = false;
    fs.zero_range = false; // the filesystem answers ENOSYS
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    assert_eq!(
        h.fallocate(0, 4096, falloc::PUNCH_HOLE | falloc::KEEP_SIZE),
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(
        h.fallocate(0, 4096, falloc::ZERO_RANGE | falloc::KEEP_SIZE),
        Err(libc::EOPNOTSUPP)
    );
    let (mut fs, _disk, _probe) = MemFs::new();
    fs.punch_hole = false; // EOPNOTSUPP for PUNCH_HOLE only
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    assert_eq!(
        h.fallocate(0, 4096, falloc::PUNCH_HOLE | falloc::KEEP_SIZE),
        Err(libc::EOPNOTSUPP)
    );
}

fn open_error(path: &str, block: u32) -> io::Error {
    let (fs, _disk, probe) = MemFs::new();
    let options = FuserOptions {
        logical_block_size: block,
        ..FuserOptions::new(path)
    };
    let e = FuserDevice::new(fs, options).expect_err(path);
    // The session was ended cleanly, and nothing stayed open.
    assert!(
        probe.destroyed.load(Ordering::SeqCst),
        "{path}: session not destroyed"
    );
    let events = probe.events();
    assert_eq!(
        events.iter().filter(|e| *e == "open").count(),
        events.iter().filter(|e| *e == "release").count(),
        "{path}: {events:?}"
    );
    e
}

#[test]
fn missing_path_is_a_clear_error() {
    let e = open_error("missing.img", 512);
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().starts_with("missing.img: "), "{e}");

    let e = open_error("sub/missing.img", 512);
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("sub/missing.img"), "{e}");

    let e = open_error("nodir/disk.img", 512);
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().starts_with("nodir/disk.img: nodir: "), "{e}");

    let e = open_error("disk.img/x", 512);
    assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
    assert_eq!(e.to_string(), "disk.img/x: disk.img is not a directory");

    let e = open_error("", 512);
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn directory_and_bad_sizes_are_clear_errors() {
    let e = open_error("sub", 512);
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(e.to_string(), "sub: not a regular file (it is a directory)");

    let e = open_error("odd.img", 512);
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        e.to_string(),
        "odd.img: size 1000 is not a multiple of the block size 512"
    );

    let e = open_error("empty.img", 512);
    assert_eq!(e.to_string(), "empty.img: size is zero");

    let e = open_error("disk.img", 1000);
    assert!(
        e.to_string().starts_with("disk.img: block size 1000"),
        "{e}"
    );
}

#[test]
fn refused_init_is_reported() {
    let (mut fs, _disk, _probe) = MemFs::new();
    fs.fail_init = true;
    let e = FuserDevice::new(fs, FuserOptions::new("disk.img")).expect_err("init fails");
    assert!(e.to_string().contains("fuser session failed"), "{e}");
}

#[test]
fn nested_path_with_4k_blocks() {
    let (fs, _disk, _probe) = MemFs::new();
    let options = FuserOptions {
        logical_block_size: 4096,
        ..FuserOptions::new("/sub/inner.img")
    };
    let dev = device(fs, options);
    let g = dev.geometry();
    assert_eq!(
        (g.size, g.logical_block_size, g.physical_block_size),
        (64 << 10, 4096, 4096)
    );
    let h = Harness::new(dev);
    let data = pattern(11, 64 << 10);
    h.write(0, &data).unwrap();
    assert_eq!(h.read(0, 64 << 10).unwrap(), data);
}

#[test]
fn read_only_refuses_writes() {
    let (fs, disk, probe) = MemFs::new();
    disk.lock()[..4].copy_from_slice(b"data");
    let options = FuserOptions {
        read_only: true,
        ..FuserOptions::new("disk.img")
    };
    let dev = device(fs, options);
    assert!(dev.geometry().read_only);
    assert_eq!(*probe.open_flags.lock(), [libc::O_RDONLY]);
    let h = Harness::new(dev);
    assert_eq!(h.write(0, &[1; 512]), Err(libc::EROFS));
    assert_eq!(
        h.fallocate(0, 512, falloc::PUNCH_HOLE | falloc::KEEP_SIZE),
        Err(libc::EROFS)
    );
    assert_eq!(&h.read(0, 512).unwrap()[..4], b"data");
}

#[test]
fn short_read_is_eio() {
    let (fs, _disk, probe) = MemFs::new();
    let h = Harness::new(device(fs, FuserOptions::new("disk.img")));
    probe.short_reads.store(true, Ordering::SeqCst);
    assert_eq!(h.read(0, 4096), Err(libc::EIO));
    assert_eq!(h.read(0, 1 << 20), Err(libc::EIO), "split read");
    probe.short_reads.store(false, Ordering::SeqCst);
    assert!(h.read(0, 4096).is_ok());
}

#[test]
fn concurrent_writes_and_reads_of_distinct_ranges() {
    let (mut fs, disk, _probe) = MemFs::new();
    fs.max_write = Some(64 << 10);
    let options = FuserOptions {
        threads: 2,
        ..FuserOptions::new("disk.img")
    };
    let h = Arc::new(Harness::new(device(fs, options)));
    const RANGE: usize = 1 << 20;
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let h = Arc::clone(&h);
            std::thread::spawn(move || {
                let base = (t * RANGE) as u64;
                for round in 0..12u64 {
                    let len = [4096, 192 << 10, 512, 300 << 10][(round % 4) as usize];
                    let offset = base + (round * 65536) % (RANGE - len) as u64 / 512 * 512;
                    let data = pattern(t as u64 * 1000 + round, len);
                    h.write(offset, &data).expect("write");
                    assert_eq!(h.read(offset, len as u32).expect("read"), data);
                }
                // Leave a known final pattern over the whole range.
                let data = pattern(t as u64 + 77, RANGE);
                h.write(base, &data).expect("write");
                data
            })
        })
        .collect();
    let expected: Vec<u8> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert_eq!(*disk.lock(), expected);
    assert_eq!(h.read(0, DISK_SIZE as u32).unwrap(), expected);
}

#[test]
fn destroy_releases_the_file_and_ends_the_session() {
    let (fs, _disk, probe) = MemFs::new();
    let dev = device(fs, FuserOptions::new("disk.img"));
    let h = Harness::new(Arc::clone(&dev));
    h.write(0, &[5; 4096]).unwrap();
    h.destroy();
    assert!(!dev.is_connected());
    assert!(probe.destroyed.load(Ordering::SeqCst));
    let events = probe.events();
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(String::as_str)
        .collect();
    assert_eq!(tail, ["flush", "release", "destroy"], "{events:?}");
    // The device answers at once afterwards.
    assert_eq!(h.read(0, 4096), Err(libc::ENOTCONN));
    assert_eq!(h.write(0, &[1; 512]), Err(libc::ENOTCONN));
}

#[test]
fn drop_releases_the_file_with_several_session_threads() {
    let (fs, _disk, probe) = MemFs::new();
    let options = FuserOptions {
        threads: 3,
        ..FuserOptions::new("disk.img")
    };
    let dev = device(fs, options);
    let h = Harness::new(Arc::clone(&dev));
    h.write(0, &[5; 4096]).unwrap();
    drop(h);
    drop(dev);
    assert!(probe.destroyed.load(Ordering::SeqCst));
    assert!(probe.events().contains(&"release".to_string()));
}

#[test]
fn session_death_fails_requests_instead_of_hanging() {
    let (fs, _disk, probe) = MemFs::new();
    let dev = device(fs, FuserOptions::new("disk.img"));
    let h = Harness::new(Arc::clone(&dev));
    h.write(0, &[5; 4096]).unwrap();
    probe.panic_on_read.store(true, Ordering::SeqCst);
    assert_eq!(h.read(0, 4096), Err(libc::EIO));
    // The session thread is gone; the reader notices the closed socket.
    let deadline = Instant::now() + WAIT;
    while dev.is_connected() {
        assert!(Instant::now() < deadline, "session death not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    assert_eq!(h.write(0, &[1; 512]), Err(libc::ENOTCONN));
    assert_eq!(h.read(0, 1 << 20), Err(libc::ENOTCONN));
    assert_eq!(h.flush(), Err(libc::ENOTCONN));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Tearing down a dead session does not hang either.
    h.destroy();
}
