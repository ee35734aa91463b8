//! The session engine driven without a kernel: requests are encoded with
//! the proto crate's client side, handed to `Session::dispatch` (or fed to
//! `Session::serve` through queue-backed channels), and the replies are
//! captured and parsed.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_blk::proto::abi::{
    self, falloc, init_flags, init_flags2, opcode, InitIn, InitOut, WriteOut,
};
use fuse_blk::proto::client::{encode_request, parse_reply, read_struct};
use fuse_blk::proto::request::{Operation, Request as WireRequest};
use fuse_blk::{
    BlockDevice, Channel, Features, Geometry, Namespace, ReplyData, ReplyEmpty, ReplySink,
    ReplyWrite, Request, Responder, Session, SessionConfig,
};
use zerocopy::IntoBytes;

// ---------------------------------------------------------------------------
// Test channel
// ---------------------------------------------------------------------------

/// A channel whose `receive` pops queued messages (then ends, or fails) and
/// whose replies are captured whole.
#[derive(Default)]
struct TestChannel {
    incoming: Mutex<VecDeque<Vec<u8>>>,
    replies: Mutex<Vec<Vec<u8>>>,
    /// After the last message, `receive` fails instead of ending.
    fail_at_end: bool,
}

impl TestChannel {
    fn with_messages(messages: Vec<Vec<u8>>) -> Arc<TestChannel> {
        Arc::new(TestChannel {
            incoming: Mutex::new(messages.into()),
            ..TestChannel::default()
        })
    }

    fn take_replies(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

impl ReplySink for TestChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let mut message = Vec::new();
        for part in parts {
            message.extend_from_slice(part);
        }
        self.replies.lock().unwrap().push(message);
    }
}

impl Channel for TestChannel {
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.incoming.lock().unwrap().pop_front() {
            Some(message) => {
                assert!(message.len() <= buf.len(), "receive buffer too small");
                buf[..message.len()].copy_from_slice(&message);
                Ok(Some(message.len()))
            }
            None if self.fail_at_end => Err(io::Error::other("channel broke")),
            None => Ok(None),
        }
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Test device
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Read {
        offset: u64,
        len: u32,
        queue: u16,
    },
    Write {
        offset: u64,
        len: usize,
        fua: bool,
        queue: u16,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
    Resize(u64),
}

/// How `read` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// With the stored data.
    Normal,
    /// Drops the reply unanswered.
    Drop,
    /// With `len + delta` bytes.
    WrongLength(i64),
    /// Parks the reply in `pending` for the test to answer later.
    Later,
    /// With the stored data, written in place (`ReplyData::fill`).
    Fill,
}

/// How `flush` answers, through `ReplyEmpty::outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushMode {
    Ok,
    Os(i32),
    NoErrno,
}

struct TestDevice {
    geometry: Geometry,
    data: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
    destroyed: AtomicUsize,
    read_mode: ReadMode,
    flush_mode: FlushMode,
    /// When set, `write` answers this errno instead of writing.
    write_errno: Option<i32>,
    pending: Mutex<Vec<(u64, u32, ReplyData)>>,
}

impl TestDevice {
    fn new(geometry: Geometry) -> TestDevice {
        let data = (0..geometry.size).map(|i| (i % 251) as u8).collect();
        TestDevice {
            geometry,
            data: Mutex::new(data),
            calls: Mutex::new(Vec::new()),
            destroyed: AtomicUsize::new(0),
            read_mode: ReadMode::Normal,
            flush_mode: FlushMode::Ok,
            write_errno: None,
            pending: Mutex::new(Vec::new()),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn destroyed(&self) -> usize {
        self.destroyed.load(Ordering::SeqCst)
    }

    fn range(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockDevice for TestDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData) {
        self.calls.lock().unwrap().push(Call::Read {
            offset,
            len,
            queue: req.queue(),
        });
        assert_eq!(reply.len(), len);
        match self.read_mode {
            ReadMode::Normal => reply.data(&self.range(offset, len as usize)),
            ReadMode::Drop => drop(reply),
            ReadMode::WrongLength(delta) => reply.data(&vec![0; (i64::from(len) + delta) as usize]),
            ReadMode::Later => self.pending.lock().unwrap().push((offset, len, reply)),
            ReadMode::Fill => reply.fill(|buf| {
                buf.copy_from_slice(&self.range(offset, buf.len()));
                Ok(())
            }),
        }
    }

    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        self.calls.lock().unwrap().push(Call::Write {
            offset,
            len: data.len(),
            fua,
            queue: req.queue(),
        });
        if let Some(errno) = self.write_errno {
            return reply.error(errno);
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        reply.ok();
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        self.calls.lock().unwrap().push(Call::Flush);
        match self.flush_mode {
            FlushMode::Ok => reply.outcome(Ok::<(), io::Error>(())),
            FlushMode::Os(errno) => {
                reply.outcome(Err::<(), _>(io::Error::from_raw_os_error(errno)))
            }
            FlushMode::NoErrno => reply.outcome(Err::<(), _>(io::Error::other("no errno"))),
        }
    }

    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Discard { offset, len });
        reply.ok();
    }

    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        self.calls.lock().unwrap().push(Call::WriteZeroes {
            offset,
            len,
            may_unmap,
        });
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        reply.ok();
    }

    fn destroy(&self) {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
    }

    fn resize(&self, size: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Resize(size));
        self.data.lock().unwrap().resize(size as usize, 0);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

const SIZE: u64 = 1 << 20;
const BLOCK: u32 = 512;

fn all_features() -> Features {
    Features {
        flush: true,
        fua: true,
        discard: true,
        write_zeroes: true,
    }
}

fn geometry(features: Features) -> Geometry {
    Geometry {
        features,
        ..Geometry::new(SIZE, BLOCK)
    }
}

struct Harness {
    session: Arc<Session>,
    device: Arc<TestDevice>,
    channel: Arc<TestChannel>,
    dyn_channel: Arc<dyn Channel>,
}

/// A parsed reply: its unique and its payload or errno.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    unique: u64,
    result: Result<Vec<u8>, i32>,
}

impl Harness {
    fn with(device: TestDevice, config: SessionConfig) -> Harness {
        let device = Arc::new(device);
        let session = Session::new(device.clone(), config).expect("valid geometry");
        let channel = Arc::new(TestChannel::default());
        Harness {
            session: Arc::new(session),
            device,
            dyn_channel: channel.clone(),
            channel,
        }
    }

    fn new(features: Features) -> Harness {
        Harness::with(
            TestDevice::new(geometry(features)),
            SessionConfig::default(),
        )
    }

    fn dispatch(&self, message: &[u8]) -> bool {
        self.session.dispatch(0, message, &self.dyn_channel)
    }

    fn answers(&self) -> Vec<Answer> {
        self.channel
            .take_replies()
            .iter()
            .map(|bytes| answer(bytes))
            .collect()
    }

    /// Dispatches `message` and returns its only reply.
    fn call(&self, message: &[u8]) -> Answer {
        assert!(self.dispatch(message), "dispatch ended the session");
        let mut answers = self.answers();
        assert_eq!(answers.len(), 1, "expected one reply, got {answers:?}");
        answers.remove(0)
    }

    fn call_ok(&self, message: &[u8]) -> Vec<u8> {
        let answer = self.call(message);
        match answer.result {
            Ok(payload) => payload,
            Err(errno) => panic!("request failed with errno {errno}"),
        }
    }

    fn call_err(&self, message: &[u8]) -> i32 {
        let answer = self.call(message);
        match answer.result {
            Ok(payload) => panic!("request succeeded with {} bytes", payload.len()),
            Err(errno) => errno,
        }
    }

    /// Dispatches `message` and checks that nothing was answered.
    fn call_silent(&self, message: &[u8]) {
        assert!(self.dispatch(message));
        assert_eq!(self.answers(), Vec::new());
    }
}

fn answer(bytes: &[u8]) -> Answer {
    let reply = parse_reply(bytes).unwrap_or_else(|e| panic!("malformed reply {bytes:?}: {e}"));
    Answer {
        unique: reply.unique,
        result: reply.result.map(<[u8]>::to_vec),
    }
}

// Request builders.

fn init_request(unique: u64, major: u32, minor: u32, flags: u32) -> Vec<u8> {
    let arg = InitIn {
        major,
        minor,
        max_readahead: 0x20000,
        flags,
        ..InitIn::default()
    };
    encode_request(opcode::INIT, unique, 0, &[arg.as_bytes()])
}

fn read_request(unique: u64, offset: u64, size: u32) -> Vec<u8> {
    let arg = abi::ReadIn {
        offset,
        size,
        ..Default::default()
    };
    encode_request(opcode::READ, unique, 2, &[arg.as_bytes()])
}

fn write_request(unique: u64, offset: u64, data: &[u8], flags: u32) -> Vec<u8> {
    let arg = abi::WriteIn {
        offset,
        size: data.len() as u32,
        flags,
        ..Default::default()
    };
    encode_request(opcode::WRITE, unique, 2, &[arg.as_bytes(), data])
}

fn fallocate_request(unique: u64, offset: u64, length: u64, mode: u32) -> Vec<u8> {
    let arg = abi::FallocateIn {
        offset,
        length,
        mode,
        ..Default::default()
    };
    encode_request(opcode::FALLOCATE, unique, 2, &[arg.as_bytes()])
}

fn fsync_request(unique: u64) -> Vec<u8> {
    encode_request(
        opcode::FSYNC,
        unique,
        2,
        &[abi::FsyncIn::default().as_bytes()],
    )
}

fn destroy_request(unique: u64) -> Vec<u8> {
    encode_request(opcode::DESTROY, unique, 0, &[])
}

fn init_out(payload: &[u8]) -> InitOut {
    assert_eq!(payload.len(), 64, "INIT reply of {} bytes", payload.len());
    read_struct(payload).unwrap()
}

const O_DSYNC: u32 = libc::O_DSYNC as u32;
const O_SYNC: u32 = libc::O_SYNC as u32;

// ---------------------------------------------------------------------------
// INIT
// ---------------------------------------------------------------------------

#[test]
fn init_negotiates() {
    let h = Harness::new(all_features());
    let offered = init_flags::ASYNC_READ
        | init_flags::BIG_WRITES
        | init_flags::MAX_PAGES
        | init_flags::ASYNC_DIO
        | init_flags::WRITEBACK_CACHE
        | init_flags::INIT_EXT;
    let answer = h.call(&init_request(1, 7, 38, offered));
    assert_eq!(answer.unique, 1);
    let out = init_out(&answer.result.unwrap());
    let config = SessionConfig::default();
    assert_eq!(out.major, 7);
    assert_eq!(out.minor, abi::KERNEL_MINOR_VERSION);
    assert_eq!(out.flags, offered & config.init_flags);
    assert_eq!(
        out.flags,
        init_flags::ASYNC_READ | init_flags::BIG_WRITES | init_flags::MAX_PAGES
    );
    assert_eq!(out.max_readahead, 0x20000);
    assert_eq!(out.max_write, config.max_write);
    assert_eq!(out.max_pages, (config.max_write / 4096) as u16);
    assert_eq!(out.max_pages, 256);
    assert_eq!(out.max_background, config.max_background);
    assert!(out.congestion_threshold <= out.max_background);
    assert_eq!(out.flags2, 0);
}

#[test]
fn init_echoes_an_older_minor() {
    let h = Harness::new(all_features());
    for minor in [
        abi::MIN_KERNEL_MINOR_VERSION,
        26,
        abi::KERNEL_MINOR_VERSION,
        40,
        u32::MAX,
    ] {
        let out = init_out(&h.call_ok(&init_request(1, 7, minor, init_flags::MAX_PAGES)));
        assert_eq!(
            out.minor,
            minor.min(abi::KERNEL_MINOR_VERSION),
            "kernel 7.{minor}"
        );
    }
}

#[test]
fn init_old_16_byte_layout() {
    let h = Harness::new(all_features());
    let body = [
        7u32.to_ne_bytes(),
        27u32.to_ne_bytes(),
        0x1000u32.to_ne_bytes(),
        init_flags::ASYNC_READ.to_ne_bytes(),
    ]
    .concat();
    let out = init_out(&h.call_ok(&encode_request(opcode::INIT, 3, 0, &[&body])));
    assert_eq!((out.major, out.minor), (7, 27));
    assert_eq!(out.max_readahead, 0x1000);
    assert_eq!(out.flags, init_flags::ASYNC_READ);
}

#[test]
fn init_max_pages_only_when_granted() {
    // Not offered by the kernel.
    let h = Harness::new(all_features());
    let out = init_out(&h.call_ok(&init_request(
        1,
        7,
        31,
        init_flags::ASYNC_READ | init_flags::BIG_WRITES,
    )));
    assert_eq!(out.flags & init_flags::MAX_PAGES, 0);
    assert_eq!(out.max_pages, 0);

    // Offered, but not wanted by the transport.
    let config = SessionConfig {
        init_flags: init_flags::ASYNC_READ,
        ..SessionConfig::default()
    };
    let h = Harness::with(TestDevice::new(geometry(all_features())), config);
    let out = init_out(&h.call_ok(&init_request(1, 7, 31, u32::MAX)));
    assert_eq!(out.flags, init_flags::ASYNC_READ);
    assert_eq!(out.max_pages, 0);

    // Granted, with a smaller max_write.
    let config = SessionConfig {
        max_write: 128 << 10,
        ..SessionConfig::default()
    };
    let h = Harness::with(TestDevice::new(geometry(all_features())), config);
    let out = init_out(&h.call_ok(&init_request(1, 7, 31, u32::MAX)));
    assert_eq!(out.max_write, 128 << 10);
    assert_eq!(out.max_pages, 32);
    assert_eq!(out.flags, config.init_flags);
}

fn init_request_ext(unique: u64, flags: u32, flags2: u32) -> Vec<u8> {
    let arg = InitIn {
        major: 7,
        minor: 41,
        flags: flags | init_flags::INIT_EXT,
        flags2,
        ..InitIn::default()
    };
    encode_request(opcode::INIT, unique, 0, &[arg.as_bytes()])
}

#[test]
fn init_passthrough_gets_a_stack_depth_only_when_granted() {
    let wanting = SessionConfig {
        init_flags: SessionConfig::default().init_flags | init_flags::INIT_EXT,
        init_flags2: init_flags2::PASSTHROUGH,
        ..SessionConfig::default()
    };
    // Offered and wanted: granted, with room for one file system below.
    let h = Harness::with(TestDevice::new(geometry(all_features())), wanting);
    let out = init_out(&h.call_ok(&init_request_ext(1, u32::MAX, u32::MAX)));
    assert_eq!(out.flags2, init_flags2::PASSTHROUGH);
    assert_ne!(out.flags & init_flags::INIT_EXT, 0);
    assert_eq!(out.max_stack_depth, 1);

    // Wanted, not offered (a kernel without CONFIG_FUSE_PASSTHROUGH).
    let h = Harness::with(TestDevice::new(geometry(all_features())), wanting);
    let out = init_out(&h.call_ok(&init_request_ext(1, u32::MAX, init_flags2::OVER_IO_URING)));
    assert_eq!(out.flags2, 0);
    assert_eq!(out.max_stack_depth, 0);

    // Offered, not wanted (the default).
    let h = Harness::new(all_features());
    let out = init_out(&h.call_ok(&init_request_ext(1, u32::MAX, u32::MAX)));
    assert_eq!(out.flags2 & init_flags2::PASSTHROUGH, 0);
    assert_eq!(out.max_stack_depth, 0);
}

#[test]
fn init_newer_major_answers_only_the_version() {
    let h = Harness::new(all_features());
    let payload = h.call_ok(&init_request(4, 8, 0, u32::MAX));
    assert_eq!(payload.len(), 8);
    let mut expected = 7u32.to_ne_bytes().to_vec();
    expected.extend_from_slice(&abi::KERNEL_MINOR_VERSION.to_ne_bytes());
    assert_eq!(payload, expected);
}

#[test]
fn init_too_old_is_eproto() {
    let h = Harness::new(all_features());
    assert_eq!(
        h.call_err(&init_request(1, 7, abi::MIN_KERNEL_MINOR_VERSION - 1, 0)),
        libc::EPROTO
    );
    assert_eq!(h.call_err(&init_request(2, 7, 0, 0)), libc::EPROTO);
    assert_eq!(h.call_err(&init_request(3, 6, 99, 0)), libc::EPROTO);
    assert!(h.device.calls().is_empty());
}

// ---------------------------------------------------------------------------
// READ / WRITE
// ---------------------------------------------------------------------------

#[test]
fn read_returns_the_device_data() {
    let h = Harness::new(Features::default());
    let answer = h.call(&read_request(10, 4096, 8192));
    assert_eq!(answer.unique, 10);
    assert_eq!(answer.result, Ok(h.device.range(4096, 8192)));
    assert_eq!(
        h.device.calls(),
        vec![Call::Read {
            offset: 4096,
            len: 8192,
            queue: 0
        }]
    );
}

#[test]
fn write_then_read_round_trip() {
    let h = Harness::new(Features::default());
    let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
    let payload = h.call_ok(&write_request(11, 2048, &data, 0));
    assert_eq!(
        read_struct::<WriteOut>(&payload),
        Some(WriteOut {
            size: 1024,
            padding: 0
        })
    );
    assert_eq!(payload.len(), 8);
    assert_eq!(h.call_ok(&read_request(12, 2048, 1024)), data);
    // The neighbours are untouched.
    assert_eq!(
        h.call_ok(&read_request(13, 1536, 512)),
        TestDevice::new(geometry(Features::default())).range(1536, 512)
    );
}

#[test]
fn read_past_the_end_is_shortened() {
    let h = Harness::new(Features::default());
    let answer = h.call(&read_request(1, SIZE - 512, 4096));
    assert_eq!(answer.result, Ok(h.device.range(SIZE - 512, 512)));
    assert_eq!(
        h.device.calls(),
        vec![Call::Read {
            offset: SIZE - 512,
            len: 512,
            queue: 0
        }]
    );
}

#[test]
fn read_at_or_after_the_end_is_empty() {
    let h = Harness::new(Features::default());
    for offset in [SIZE, SIZE + 512, SIZE + 4096, u64::MAX - 511, u64::MAX] {
        assert_eq!(
            h.call_ok(&read_request(1, offset, 4096)),
            Vec::<u8>::new(),
            "offset {offset}"
        );
    }
    // A zero-length read inside the device is empty too.
    assert_eq!(h.call_ok(&read_request(1, 0, 0)), Vec::<u8>::new());
    assert!(h.device.calls().is_empty());
}

#[test]
fn misaligned_read_is_einval() {
    let h = Harness::new(Features::default());
    assert_eq!(h.call_err(&read_request(1, 100, 512)), libc::EINVAL);
    assert_eq!(h.call_err(&read_request(2, 0, 100)), libc::EINVAL);
    assert_eq!(h.call_err(&read_request(3, 512, 1000)), libc::EINVAL);
    assert!(h.device.calls().is_empty());
}

#[test]
fn misaligned_write_is_einval() {
    let h = Harness::new(Features::default());
    assert_eq!(
        h.call_err(&write_request(1, 100, &[0; 512], 0)),
        libc::EINVAL
    );
    assert_eq!(h.call_err(&write_request(2, 0, &[0; 100], 0)), libc::EINVAL);
    assert_eq!(
        h.call_err(&write_request(3, 1024, &[0; 513], 0)),
        libc::EINVAL
    );
    assert!(h.device.calls().is_empty());
}

#[test]
fn resize_asks_the_handler_before_the_kernel_and_the_engine_refuses_past_a_new_end() {
    let h = Harness::new(Features::default());
    let kernel_saw = Mutex::new(Vec::new());
    h.session
        .resize(2 * SIZE, |size| {
            kernel_saw.lock().unwrap().push((size, h.device.calls()));
            Ok(())
        })
        .unwrap();
    assert_eq!(h.session.geometry().size, 2 * SIZE);
    // The new end is served: writes there reach the handler.
    h.call_ok(&write_request(1, 2 * SIZE - 512, &[0xcd; 512], 0));
    h.session
        .resize(SIZE / 2, |size| {
            kernel_saw.lock().unwrap().push((size, h.device.calls()));
            Ok(())
        })
        .unwrap();
    let seen = kernel_saw.into_inner().unwrap();
    assert_eq!(seen[0], (2 * SIZE, vec![Call::Resize(2 * SIZE)]));
    assert_eq!(seen[1].0, SIZE / 2);
    assert_eq!(seen[1].1.last(), Some(&Call::Resize(SIZE / 2)));
    let calls = h.device.calls().len();
    assert_eq!(
        h.call_err(&write_request(2, SIZE / 2, &[0; 512], 0)),
        libc::ENOSPC
    );
    let short = h.call_ok(&read_request(3, SIZE / 2 - 512, 4096));
    assert_eq!(short.len(), 512, "reads stop at the new end");
    assert_eq!(
        h.device.calls().len(),
        calls + 1,
        "only the short read reached it"
    );
}

#[test]
fn resize_refuses_bad_sizes_without_asking_anyone() {
    let h = Harness::new(Features::default());
    for bad in [0, SIZE + 100] {
        let e = h.session.resize(bad, |_| panic!("not asked")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}: {e}");
    }
    assert!(h.device.calls().is_empty(), "the handler was not asked");
    assert_eq!(h.session.size(), SIZE);
}

/// A handler that cannot change its size.
struct FixedSize(TestDevice);

impl BlockDevice for FixedSize {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }

    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData) {
        self.0.read(req, offset, len, reply)
    }

    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        self.0.write(req, offset, data, fua, reply)
    }
}

#[test]
fn a_handler_that_refuses_to_shrink_leaves_everything_as_it_was() {
    let device = FixedSize(TestDevice::new(geometry(Features::default())));
    let session = Session::new(Arc::new(device), SessionConfig::default()).unwrap();
    let e = session
        .resize(SIZE / 2, |_| panic!("the kernel was asked"))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    assert_eq!(session.size(), SIZE);
}

#[test]
fn write_past_the_end_is_enospc() {
    let h = Harness::new(Features::default());
    assert_eq!(
        h.call_err(&write_request(1, SIZE, &[0; 512], 0)),
        libc::ENOSPC
    );
    assert_eq!(
        h.call_err(&write_request(2, SIZE - 512, &[0; 1024], 0)),
        libc::ENOSPC
    );
    assert_eq!(
        h.call_err(&write_request(3, u64::MAX - 511, &[0; 1024], 0)),
        libc::ENOSPC
    );
    assert!(h.device.calls().is_empty());
    // The last block itself is writable.
    h.call_ok(&write_request(4, SIZE - 512, &[0xab; 512], 0));
    assert_eq!(h.device.range(SIZE - 512, 512), vec![0xab; 512]);
}

#[test]
fn write_on_a_read_only_device_is_erofs() {
    let geometry = Geometry {
        read_only: true,
        ..geometry(all_features())
    };
    let h = Harness::with(TestDevice::new(geometry), SessionConfig::default());
    assert_eq!(h.call_err(&write_request(1, 0, &[0; 512], 0)), libc::EROFS);
    assert_eq!(
        h.call_err(&write_request(2, 0, &[0; 512], O_DSYNC)),
        libc::EROFS
    );
    // Even a malformed (misaligned) write is refused before the device.
    assert_eq!(h.call_err(&write_request(3, 7, &[0; 3], 0)), libc::EROFS);
    assert_eq!(
        h.call_err(&fallocate_request(
            4,
            0,
            4096,
            falloc::PUNCH_HOLE | falloc::KEEP_SIZE
        )),
        libc::EROFS
    );
    assert_eq!(
        h.call_err(&fallocate_request(5, 0, 4096, falloc::ZERO_RANGE)),
        libc::EROFS
    );
    assert!(h.device.calls().is_empty());
    // Reads still work.
    assert_eq!(h.call_ok(&read_request(6, 0, 512)).len(), 512);
}

#[test]
fn write_fua_with_the_feature() {
    let h = Harness::new(Features {
        fua: true,
        ..Features::default()
    });
    h.call_ok(&write_request(1, 0, &[1; 512], O_DSYNC));
    h.call_ok(&write_request(
        2,
        512,
        &[1; 512],
        O_SYNC | libc::O_RDWR as u32,
    ));
    h.call_ok(&write_request(3, 1024, &[1; 512], libc::O_RDWR as u32));
    h.call_ok(&write_request(4, 1536, &[1; 512], 0));
    let fua: Vec<bool> = h
        .device
        .calls()
        .iter()
        .map(|call| match call {
            Call::Write { fua, .. } => *fua,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(fua, [true, true, false, false]);
}

#[test]
fn write_never_fua_without_the_feature() {
    let h = Harness::new(Features {
        flush: true,
        discard: true,
        write_zeroes: true,
        fua: false,
    });
    h.call_ok(&write_request(1, 0, &[1; 512], O_DSYNC));
    h.call_ok(&write_request(2, 512, &[1; 512], O_SYNC));
    assert_eq!(
        h.device.calls(),
        vec![
            Call::Write {
                offset: 0,
                len: 512,
                fua: false,
                queue: 0
            },
            Call::Write {
                offset: 512,
                len: 512,
                fua: false,
                queue: 0
            },
        ]
    );
}

#[test]
fn write_errors_from_the_handler() {
    let mut device = TestDevice::new(geometry(Features::default()));
    device.write_errno = Some(libc::ENOSPC);
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(h.call_err(&write_request(1, 0, &[0; 512], 0)), libc::ENOSPC);

    // An errno the kernel would refuse becomes EIO.
    for bad in [0, -5, 512, i32::MAX] {
        let mut device = TestDevice::new(geometry(Features::default()));
        device.write_errno = Some(bad);
        let h = Harness::with(device, SessionConfig::default());
        assert_eq!(
            h.call_err(&write_request(1, 0, &[0; 512], 0)),
            libc::EIO,
            "errno {bad}"
        );
    }
}

// ---------------------------------------------------------------------------
// FSYNC, FLUSH, FALLOCATE
// ---------------------------------------------------------------------------

#[test]
fn fsync_calls_flush_with_the_feature() {
    let h = Harness::new(Features {
        flush: true,
        ..Features::default()
    });
    let answer = h.call(&fsync_request(5));
    assert_eq!(
        answer,
        Answer {
            unique: 5,
            result: Ok(vec![])
        }
    );
    assert_eq!(h.device.calls(), vec![Call::Flush]);
}

#[test]
fn fsync_without_the_feature_is_just_ok() {
    let h = Harness::new(Features {
        flush: false,
        ..all_features()
    });
    assert_eq!(h.call_ok(&fsync_request(5)), Vec::<u8>::new());
    assert!(h.device.calls().is_empty());
}

#[test]
fn fsync_errors_through_outcome() {
    let mut device = TestDevice::new(geometry(all_features()));
    device.flush_mode = FlushMode::Os(libc::EIO);
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(h.call_err(&fsync_request(1)), libc::EIO);

    let mut device = TestDevice::new(geometry(all_features()));
    device.flush_mode = FlushMode::Os(libc::ENOSPC);
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(h.call_err(&fsync_request(1)), libc::ENOSPC);

    let mut device = TestDevice::new(geometry(all_features()));
    device.flush_mode = FlushMode::NoErrno;
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(h.call_err(&fsync_request(1)), libc::EIO);
}

#[test]
fn flush_is_ok_without_touching_the_device() {
    let h = Harness::new(all_features());
    let message = encode_request(opcode::FLUSH, 6, 2, &[abi::FlushIn::default().as_bytes()]);
    assert_eq!(
        h.call(&message),
        Answer {
            unique: 6,
            result: Ok(vec![])
        }
    );
    assert!(h.device.calls().is_empty());
}

#[test]
fn fallocate_zero_range() {
    let h = Harness::new(all_features());
    h.call_ok(&fallocate_request(1, 4096, 8192, falloc::ZERO_RANGE));
    h.call_ok(&fallocate_request(
        2,
        0,
        512,
        falloc::ZERO_RANGE | falloc::KEEP_SIZE,
    ));
    assert_eq!(
        h.device.calls(),
        vec![
            Call::WriteZeroes {
                offset: 4096,
                len: 8192,
                may_unmap: false
            },
            Call::WriteZeroes {
                offset: 0,
                len: 512,
                may_unmap: false
            },
        ]
    );
    assert_eq!(h.call_ok(&read_request(3, 4096, 8192)), vec![0; 8192]);
}

#[test]
fn fallocate_punch_hole_discards() {
    let h = Harness::new(all_features());
    h.call_ok(&fallocate_request(
        1,
        4096,
        8192,
        falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
    ));
    assert_eq!(
        h.device.calls(),
        vec![Call::Discard {
            offset: 4096,
            len: 8192
        }]
    );
}

#[test]
fn fallocate_punch_hole_zeroes_when_configured() {
    let config = SessionConfig {
        punch_hole_zeroes: true,
        ..SessionConfig::default()
    };
    let h = Harness::with(TestDevice::new(geometry(all_features())), config);
    h.call_ok(&fallocate_request(
        1,
        4096,
        8192,
        falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
    ));
    assert_eq!(
        h.device.calls(),
        vec![Call::WriteZeroes {
            offset: 4096,
            len: 8192,
            may_unmap: true
        }]
    );
}

#[test]
fn fallocate_unsupported_is_eopnotsupp() {
    let punch = falloc::PUNCH_HOLE | falloc::KEEP_SIZE;
    // (features, punch_hole_zeroes, mode)
    let cases = [
        // ZERO_RANGE without write_zeroes.
        (
            Features {
                write_zeroes: false,
                ..all_features()
            },
            false,
            falloc::ZERO_RANGE,
        ),
        // PUNCH_HOLE without discard.
        (
            Features {
                discard: false,
                ..all_features()
            },
            false,
            punch,
        ),
        // PUNCH_HOLE to zeroes without write_zeroes (discard alone does not do).
        (
            Features {
                write_zeroes: false,
                ..all_features()
            },
            true,
            punch,
        ),
        // Mode 0 (allocate) and KEEP_SIZE alone.
        (all_features(), false, 0),
        (all_features(), false, falloc::KEEP_SIZE),
        // PUNCH_HOLE without KEEP_SIZE is invalid for fallocate(2).
        (all_features(), false, falloc::PUNCH_HOLE),
        (all_features(), true, falloc::PUNCH_HOLE),
        // Combinations and unknown bits.
        (
            all_features(),
            false,
            falloc::PUNCH_HOLE | falloc::ZERO_RANGE,
        ),
        (all_features(), false, 0x08), // FALLOC_FL_COLLAPSE_RANGE
        (all_features(), false, 0x20), // FALLOC_FL_INSERT_RANGE
    ];
    for (features, punch_hole_zeroes, mode) in cases {
        let config = SessionConfig {
            punch_hole_zeroes,
            ..SessionConfig::default()
        };
        let h = Harness::with(TestDevice::new(geometry(features)), config);
        assert_eq!(
            h.call_err(&fallocate_request(1, 0, 4096, mode)),
            libc::EOPNOTSUPP,
            "mode {mode:#x}, {features:?}, punch_hole_zeroes {punch_hole_zeroes}"
        );
        assert!(h.device.calls().is_empty());
    }
}

#[test]
fn fallocate_out_of_range_or_misaligned_is_einval() {
    let h = Harness::new(all_features());
    let punch = falloc::PUNCH_HOLE | falloc::KEEP_SIZE;
    assert_eq!(
        h.call_err(&fallocate_request(1, SIZE - 512, 1024, punch)),
        libc::EINVAL
    );
    assert_eq!(
        h.call_err(&fallocate_request(2, u64::MAX - 511, 1024, punch)),
        libc::EINVAL
    );
    assert_eq!(
        h.call_err(&fallocate_request(3, 100, 512, falloc::ZERO_RANGE)),
        libc::EINVAL
    );
    assert_eq!(
        h.call_err(&fallocate_request(4, 0, 100, falloc::ZERO_RANGE)),
        libc::EINVAL
    );
    assert!(h.device.calls().is_empty());
}

// ---------------------------------------------------------------------------
// Messages without a reply, unknown and namespace operations
// ---------------------------------------------------------------------------

#[test]
fn forget_and_interrupt_get_no_reply() {
    let h = Harness::new(all_features());
    h.call_silent(&encode_request(
        opcode::FORGET,
        1,
        2,
        &[abi::ForgetIn { nlookup: 1 }.as_bytes()],
    ));
    let batch = [
        abi::BatchForgetIn { count: 1, dummy: 0 }.as_bytes(),
        abi::ForgetOne {
            nodeid: 2,
            nlookup: 1,
        }
        .as_bytes(),
    ]
    .concat();
    h.call_silent(&encode_request(opcode::BATCH_FORGET, 2, 0, &[&batch]));
    h.call_silent(&encode_request(
        opcode::INTERRUPT,
        3,
        0,
        &[abi::InterruptIn { unique: 10 }.as_bytes()],
    ));
    assert!(h.device.calls().is_empty());
}

#[test]
fn unknown_opcode_is_enosys() {
    let h = Harness::new(all_features());
    let answer = h.call(&encode_request(9999, 77, 2, &[&[1, 2, 3]]));
    assert_eq!(
        answer,
        Answer {
            unique: 77,
            result: Err(libc::ENOSYS)
        }
    );
}

#[test]
fn known_opcode_without_a_namespace_is_enosys() {
    let h = Harness::new(all_features());
    for op in [
        opcode::GETXATTR,
        opcode::SETXATTR,
        opcode::MKDIR,
        opcode::IOCTL,
        opcode::LSEEK,
        opcode::COPY_FILE_RANGE,
    ] {
        let answer = h.call(&encode_request(op, 78, 2, &[b"user.x\0"]));
        assert_eq!(
            answer,
            Answer {
                unique: 78,
                result: Err(libc::ENOSYS)
            },
            "opcode {op}"
        );
    }
    // The namespace operations too.
    assert_eq!(
        h.call_err(&encode_request(opcode::LOOKUP, 79, 1, &[b"disk\0"])),
        libc::ENOSYS
    );
    assert_eq!(
        h.call_err(&encode_request(opcode::STATFS, 80, 1, &[])),
        libc::ENOSYS
    );
    assert_eq!(
        h.call_err(&encode_request(
            opcode::GETATTR,
            81,
            2,
            &[abi::GetattrIn::default().as_bytes()]
        )),
        libc::ENOSYS
    );
}

#[test]
fn malformed_requests_with_a_header_are_einval() {
    let h = Harness::new(all_features());
    // READ with a truncated body.
    let answer = h.call(&encode_request(opcode::READ, 90, 2, &[&[0; 20]]));
    assert_eq!(
        answer,
        Answer {
            unique: 90,
            result: Err(libc::EINVAL)
        }
    );
    // WRITE whose size disagrees with its data.
    let arg = abi::WriteIn {
        size: 1024,
        ..Default::default()
    };
    assert_eq!(
        h.call_err(&encode_request(
            opcode::WRITE,
            91,
            2,
            &[arg.as_bytes(), &[0; 512]]
        )),
        libc::EINVAL
    );
    // LOOKUP with a bad name.
    assert_eq!(
        h.call_err(&encode_request(opcode::LOOKUP, 92, 1, &[b"a/b\0"])),
        libc::EINVAL
    );
    assert!(h.device.calls().is_empty());
}

#[test]
fn malformed_requests_without_a_header_are_dropped() {
    let h = Harness::new(all_features());
    // Too short for a header.
    h.call_silent(&[0; 10]);
    h.call_silent(&[]);
    // Length field lying.
    let mut message = read_request(1, 0, 512);
    message.push(0);
    h.call_silent(&message);
    message.truncate(message.len() - 2);
    h.call_silent(&message);
    assert!(h.device.calls().is_empty());
}

/// Records what reaches it and answers every request with its nodeid.
#[derive(Default)]
struct TestNamespace {
    seen: Mutex<Vec<u32>>,
}

impl Namespace for TestNamespace {
    fn handle(&self, request: &WireRequest<'_>, reply: Responder) {
        self.seen.lock().unwrap().push(request.header.opcode);
        match request.operation {
            Operation::Lookup { name } if name == b"disk" => {
                reply.ok(&[&request.header.nodeid.to_ne_bytes()])
            }
            Operation::Lookup { .. } => reply.error(libc::ENOENT),
            Operation::Unsupported(_) => reply.error(libc::EOPNOTSUPP),
            _ => reply.ok(&[]),
        }
    }
}

#[test]
fn namespace_gets_the_non_block_requests() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let namespace = Arc::new(TestNamespace::default());
    let session = Session::new(device.clone(), SessionConfig::default())
        .unwrap()
        .with_namespace(namespace.clone());
    let channel = Arc::new(TestChannel::default());
    let dyn_channel: Arc<dyn Channel> = channel.clone();
    let send = |message: Vec<u8>| {
        assert!(session.dispatch(0, &message, &dyn_channel));
        channel
            .take_replies()
            .iter()
            .map(|r| answer(r))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        send(encode_request(opcode::LOOKUP, 1, 1, &[b"disk\0"])),
        [Answer {
            unique: 1,
            result: Ok(1u64.to_ne_bytes().to_vec())
        }]
    );
    assert_eq!(
        send(encode_request(opcode::LOOKUP, 2, 1, &[b"nope\0"])),
        [Answer {
            unique: 2,
            result: Err(libc::ENOENT)
        }]
    );
    assert_eq!(
        send(encode_request(opcode::GETXATTR, 3, 2, &[b"x\0"])),
        [Answer {
            unique: 3,
            result: Err(libc::EOPNOTSUPP)
        }]
    );
    assert_eq!(send(encode_request(opcode::STATFS, 4, 2, &[])).len(), 1);
    // Block I/O, INIT, FLUSH and FORGET never reach the namespace.
    assert_eq!(send(read_request(5, 0, 512)).len(), 1);
    assert_eq!(send(init_request(6, 7, 31, 0)).len(), 1);
    assert_eq!(
        send(encode_request(
            opcode::FLUSH,
            7,
            2,
            &[abi::FlushIn::default().as_bytes()]
        ))
        .len(),
        1
    );
    assert!(send(encode_request(
        opcode::FORGET,
        8,
        2,
        &[abi::ForgetIn { nlookup: 1 }.as_bytes()]
    ))
    .is_empty());
    assert_eq!(
        *namespace.seen.lock().unwrap(),
        [
            opcode::LOOKUP,
            opcode::LOOKUP,
            opcode::GETXATTR,
            opcode::STATFS
        ]
    );
}

// ---------------------------------------------------------------------------
// DESTROY and serve
// ---------------------------------------------------------------------------

#[test]
fn destroy_replies_and_ends_the_session() {
    let h = Harness::new(all_features());
    assert!(!h.dispatch(&destroy_request(50)));
    assert_eq!(
        h.answers(),
        [Answer {
            unique: 50,
            result: Ok(vec![])
        }]
    );
    assert_eq!(h.device.destroyed(), 1);

    // A second DESTROY (another queue) does not destroy again.
    assert!(!h.dispatch(&destroy_request(51)));
    assert_eq!(h.answers().len(), 1);
    assert_eq!(h.device.destroyed(), 1);

    // Nor does serve ending afterwards.
    let channel: Arc<dyn Channel> = TestChannel::with_messages(vec![]);
    h.session.serve(vec![channel]).unwrap();
    assert_eq!(h.device.destroyed(), 1);
}

#[test]
fn serve_two_channels() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    let q0 = TestChannel::with_messages(vec![
        init_request(1, 7, 31, u32::MAX),
        write_request(2, 0, &[0x11; 512], 0),
        read_request(3, 0, 512),
        encode_request(
            opcode::FORGET,
            4,
            2,
            &[abi::ForgetIn { nlookup: 1 }.as_bytes()],
        ),
    ]);
    let q1 = TestChannel::with_messages(vec![
        write_request(11, 4096, &[0x22; 1024], O_DSYNC),
        read_request(12, 4096, 1024),
        fsync_request(13),
    ]);
    session.serve(vec![q0.clone(), q1.clone()]).unwrap();
    assert_eq!(device.destroyed(), 1);

    let a0: Vec<Answer> = q0.take_replies().iter().map(|r| answer(r)).collect();
    assert_eq!(a0.iter().map(|a| a.unique).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(a0[2].result, Ok(vec![0x11; 512]));
    let a1: Vec<Answer> = q1.take_replies().iter().map(|r| answer(r)).collect();
    assert_eq!(
        a1.iter().map(|a| a.unique).collect::<Vec<_>>(),
        [11, 12, 13]
    );
    assert_eq!(a1[1].result, Ok(vec![0x22; 1024]));

    // Each request saw the queue it arrived on.
    let calls = device.calls();
    for call in &calls {
        match call {
            Call::Read {
                offset: 0, queue, ..
            }
            | Call::Write {
                offset: 0, queue, ..
            } => assert_eq!(*queue, 0),
            Call::Read {
                offset: 4096,
                queue,
                ..
            }
            | Call::Write {
                offset: 4096,
                queue,
                ..
            } => {
                assert_eq!(*queue, 1)
            }
            Call::Flush => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(calls.contains(&Call::Write {
        offset: 4096,
        len: 1024,
        fua: true,
        queue: 1
    }));
    assert_eq!(calls.len(), 5);
}

#[test]
fn serve_with_destroy_on_one_channel() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    // The requests after DESTROY on its channel are not read.
    let q0 = TestChannel::with_messages(vec![destroy_request(1), read_request(2, 0, 512)]);
    let q1 = TestChannel::with_messages(vec![read_request(3, 0, 512)]);
    session.serve(vec![q0.clone(), q1.clone()]).unwrap();
    assert_eq!(device.destroyed(), 1);
    let a0: Vec<Answer> = q0.take_replies().iter().map(|r| answer(r)).collect();
    assert_eq!(
        a0,
        [Answer {
            unique: 1,
            result: Ok(vec![])
        }]
    );
    assert_eq!(q0.incoming.lock().unwrap().len(), 1);
    assert_eq!(q1.take_replies().len(), 1);
}

/// A channel fed by the test while it is being served: `receive` waits
/// for the next message, and ends once the test drops its sender.
struct FedChannel {
    incoming: Mutex<std::sync::mpsc::Receiver<Vec<u8>>>,
    replies: Mutex<std::sync::mpsc::Sender<Vec<u8>>>,
}

/// What the test keeps of a [`FedChannel`]: where to send its requests and
/// where its replies come.
struct Feed {
    requests: std::sync::mpsc::Sender<Vec<u8>>,
    replies: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Feed {
    /// Sends `message` and returns its reply.
    fn call(&self, message: Vec<u8>) -> Answer {
        self.requests.send(message).unwrap();
        let reply = self
            .replies
            .recv_timeout(Duration::from_secs(10))
            .expect("a reply");
        answer(&reply)
    }
}

fn fed_channel() -> (Arc<FedChannel>, Feed) {
    let (requests, incoming) = std::sync::mpsc::channel();
    let (replies_in, replies) = std::sync::mpsc::channel();
    let channel = FedChannel {
        incoming: Mutex::new(incoming),
        replies: Mutex::new(replies_in),
    };
    (Arc::new(channel), Feed { requests, replies })
}

impl ReplySink for FedChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let message = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let _ = self.replies.lock().unwrap().send(message);
    }
}

impl Channel for FedChannel {
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Ok(message) = self.incoming.lock().unwrap().recv() else {
            return Ok(None);
        };
        buf[..message.len()].copy_from_slice(&message);
        Ok(Some(message.len()))
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

#[test]
fn destroy_on_one_channel_leaves_the_handler_to_the_others_until_the_last_ends() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    let (channels, feeds): (Vec<_>, Vec<_>) = (0..3).map(|_| fed_channel()).unzip();
    let serving = {
        let session = session.clone();
        let channels = channels
            .into_iter()
            .map(|c| c as Arc<dyn Channel>)
            .collect();
        std::thread::spawn(move || session.serve(channels))
    };
    let mut feeds = feeds.into_iter();
    let retired = feeds.next().unwrap();
    // The module retires a handed-over daemon's queues one at a time: the
    // first reads DESTROY and its worker ends ...
    assert_eq!(retired.call(destroy_request(1)).result, Ok(vec![]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while session.workers_waiting() > 2 {
        assert!(std::time::Instant::now() < deadline, "the worker stayed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(device.destroyed(), 0, "destroyed with two queues left");
    // ... while the others still dispatch to a live handler.
    for (queue, feed) in (1..).zip(feeds.by_ref().collect::<Vec<_>>()) {
        let offset = 4096 * queue;
        let written = feed.call(write_request(10 + queue, offset, &[0x5a; 512], 0));
        assert!(written.result.is_ok(), "{written:?}");
        let read = feed.call(read_request(20 + queue, offset, 512));
        assert_eq!(read.result, Ok(vec![0x5a; 512]));
        assert_eq!(device.destroyed(), 0);
        // Dropping the feed ends the channel.
    }
    serving.join().unwrap().unwrap();
    assert_eq!(device.destroyed(), 1, "destroyed once, after the last");
    assert_eq!(device.calls().len(), 4);
}

#[test]
fn serve_reports_a_channel_error_and_still_destroys() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    let broken = Arc::new(TestChannel {
        incoming: Mutex::new(vec![read_request(1, 0, 512)].into()),
        fail_at_end: true,
        ..TestChannel::default()
    });
    let fine = TestChannel::with_messages(vec![read_request(2, 0, 512)]);
    assert!(session.serve(vec![broken.clone(), fine.clone()]).is_err());
    assert_eq!(device.destroyed(), 1);
    assert_eq!(broken.take_replies().len(), 1);
    assert_eq!(fine.take_replies().len(), 1);
}

#[test]
fn serve_with_no_channels_destroys() {
    let device = Arc::new(TestDevice::new(geometry(all_features())));
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    session.serve(Vec::new()).unwrap();
    assert_eq!(device.destroyed(), 1);
}

// ---------------------------------------------------------------------------
// Reply objects
// ---------------------------------------------------------------------------

#[test]
fn dropped_read_reply_answers_eio() {
    let mut device = TestDevice::new(geometry(all_features()));
    device.read_mode = ReadMode::Drop;
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(
        h.call(&read_request(20, 0, 512)),
        Answer {
            unique: 20,
            result: Err(libc::EIO)
        }
    );
}

#[test]
fn read_answered_with_the_wrong_length_is_eio() {
    for delta in [-1i64, -512, 1, 512] {
        let mut device = TestDevice::new(geometry(all_features()));
        device.read_mode = ReadMode::WrongLength(delta);
        let h = Harness::with(device, SessionConfig::default());
        assert_eq!(
            h.call(&read_request(21, 0, 1024)),
            Answer {
                unique: 21,
                result: Err(libc::EIO)
            },
            "delta {delta}"
        );
    }
}

#[test]
fn reply_later_from_another_thread() {
    let mut device = TestDevice::new(geometry(all_features()));
    device.read_mode = ReadMode::Later;
    let h = Harness::with(device, SessionConfig::default());
    assert!(h.dispatch(&read_request(30, 512, 1024)));
    assert!(h.dispatch(&read_request(31, 4096, 512)));
    // Nothing answered yet: the replies are parked.
    assert!(h.answers().is_empty());
    let pending = std::mem::take(&mut *h.device.pending.lock().unwrap());
    assert_eq!(pending.len(), 2);
    let device = h.device.clone();
    std::thread::spawn(move || {
        // Answer in the reverse order.
        for (offset, len, reply) in pending.into_iter().rev() {
            reply.data(&device.range(offset, len as usize));
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        h.answers(),
        [
            Answer {
                unique: 31,
                result: Ok(h.device.range(4096, 512))
            },
            Answer {
                unique: 30,
                result: Ok(h.device.range(512, 1024))
            },
        ]
    );
}

#[test]
fn responder_directly() {
    let channel = Arc::new(TestChannel::default());
    let sink: Arc<dyn ReplySink> = channel.clone();

    let responder = Responder::new(1, sink.clone());
    assert_eq!(responder.unique(), 1);
    responder.ok(&[b"ab", b"", b"c"]);
    Responder::new(2, sink.clone()).error(libc::ENOENT);
    Responder::new(3, sink.clone()).no_reply();
    drop(Responder::new(4, sink.clone()));
    Responder::new(5, sink.clone()).error(0);
    Responder::new(6, sink).ok(&[]);

    let answers: Vec<Answer> = channel.take_replies().iter().map(|r| answer(r)).collect();
    assert_eq!(
        answers,
        [
            Answer {
                unique: 1,
                result: Ok(b"abc".to_vec())
            },
            Answer {
                unique: 2,
                result: Err(libc::ENOENT)
            },
            Answer {
                unique: 4,
                result: Err(libc::EIO)
            },
            Answer {
                unique: 5,
                result: Err(libc::EIO)
            },
            Answer {
                unique: 6,
                result: Ok(vec![])
            },
        ]
    );
}

#[test]
fn session_rejects_a_bad_geometry() {
    let device = Arc::new(TestDevice::new(Geometry::new(1000, 512)));
    assert!(Session::new(device, SessionConfig::default()).is_err());
    let device = Arc::new(TestDevice::new(Geometry::new(4096, 4096)));
    let session = Session::new(device, SessionConfig::default()).unwrap();
    assert_eq!(session.geometry().size, 4096);
    assert_eq!(session.config().buffer_size(), (1 << 20) + 4096);
}

#[test]
fn four_k_device_rejects_512_byte_io() {
    let device = TestDevice::new(Geometry::new(1 << 20, 4096));
    let h = Harness::with(device, SessionConfig::default());
    assert_eq!(h.call_err(&read_request(1, 512, 4096)), libc::EINVAL);
    assert_eq!(h.call_err(&read_request(2, 0, 512)), libc::EINVAL);
    assert_eq!(h.call_err(&write_request(3, 0, &[0; 512], 0)), libc::EINVAL);
    assert_eq!(h.call_ok(&read_request(4, 4096, 4096)).len(), 4096);
}

#[test]
fn malformed_forget_is_never_answered() {
    let h = Harness::new(all_features());
    // FORGET and INTERRUPT without their argument, BATCH_FORGET with fewer
    // entries than its count: the kernel waits for no answer to any of them.
    h.call_silent(&encode_request(opcode::FORGET, 1, 2, &[&[0; 4]]));
    h.call_silent(&encode_request(opcode::INTERRUPT, 2, 0, &[]));
    h.call_silent(&encode_request(
        opcode::BATCH_FORGET,
        3,
        0,
        &[abi::BatchForgetIn { count: 2, dummy: 0 }.as_bytes()],
    ));
}

/// One step of what [`IdleChannel`] plays: a message, or a wait for a
/// request that times out.
enum Step {
    Message(Vec<u8>),
    Idle,
}

/// What the worker did, as [`IdleChannel`] saw it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A wait for a request, and whether one was ready.
    Wait(bool),
    /// A receive: whether the receive buffer held only zeros, and how far
    /// replies had written into the thread's reply buffer.
    Receive { zeros: bool, fill_touched: usize },
}

/// Plays `steps` to a worker and notes how it waits and what its buffers
/// hold.
struct IdleChannel {
    steps: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<Seen>>,
}

impl ReplySink for IdleChannel {
    fn send_reply(&self, _parts: &[IoSlice<'_>]) {}
}

impl Channel for IdleChannel {
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.seen.lock().unwrap().push(Seen::Receive {
            zeros: buf.iter().all(|&b| b == 0),
            // The worker's thread runs this.
            fill_touched: fuse_blk::reply::fill_buffer_touched(),
        });
        match self.steps.lock().unwrap().pop_front() {
            Some(Step::Message(message)) => {
                buf[..message.len()].copy_from_slice(&message);
                Ok(Some(message.len()))
            }
            Some(Step::Idle) => panic!("the worker read where it should have waited"),
            None => Ok(None),
        }
    }

    fn wait_ready(&self, timeout: Duration, _stop: &fuse_blk::Stop) -> io::Result<bool> {
        assert!(timeout >= Duration::from_millis(100), "{timeout:?}");
        let mut steps = self.steps.lock().unwrap();
        let idle = matches!(steps.front(), Some(Step::Idle));
        if idle {
            steps.pop_front();
        }
        self.seen.lock().unwrap().push(Seen::Wait(!idle));
        Ok(!idle)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

#[test]
fn an_idle_worker_gives_its_buffers_back() {
    let mut device = TestDevice::new(geometry(all_features()));
    device.read_mode = ReadMode::Fill;
    let session = Arc::new(Session::new(Arc::new(device), SessionConfig::default()).unwrap());
    const LARGE: usize = 512 * 1024;
    let channel = Arc::new(IdleChannel {
        steps: Mutex::new(
            [
                Step::Message(init_request(1, 7, 31, u32::MAX)),
                // Small requests: the worker reads on without waiting.
                Step::Message(write_request(2, 0, &[0x11; 4096], 0)),
                Step::Message(read_request(3, 0, 4096)),
                // A large WRITE fills the receive buffer: the worker waits
                // a while before reading again, and as nothing comes it
                // gives the pages back (they read as zeros again).
                Step::Message(write_request(4, 0, &[0x22; LARGE], 0)),
                Step::Idle,
                Step::Message(read_request(5, 0, 4096)),
                // A large read fills the reply buffer, likewise.
                Step::Message(read_request(6, 0, LARGE as u32)),
                // A request that comes in time is read at once.
                Step::Message(read_request(7, 0, 4096)),
                Step::Idle,
                Step::Message(read_request(8, 0, 4096)),
            ]
            .into(),
        ),
        seen: Mutex::new(Vec::new()),
    });
    session.serve(vec![channel.clone()]).unwrap();
    let receive = |zeros, fill_touched| Seen::Receive {
        zeros,
        fill_touched,
    };
    assert_eq!(
        *channel.seen.lock().unwrap(),
        [
            receive(true, 0),
            receive(false, 0),
            receive(false, 0),
            receive(false, 4096),
            Seen::Wait(false),
            receive(true, 0),
            receive(false, 4096),
            Seen::Wait(true),
            receive(false, LARGE),
            Seen::Wait(false),
            receive(true, 0),
            receive(false, 4096),
        ]
    );
}
