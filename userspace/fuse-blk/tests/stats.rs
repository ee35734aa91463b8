//! The engine's counters, driven through `Session::dispatch` with encoded
//! FUSE requests: every kind counted with its bytes, errors by errno,
//! replies dropped by the handler, requests in flight until answered from
//! another thread, and service times that include the handler's time.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_blk::proto::abi::{falloc, opcode, FallocateIn, FsyncIn, ReadIn, WriteIn};
use fuse_blk::proto::client::encode_request;
use fuse_blk::stats::{Kind, ERROR_NAMES};
use fuse_blk::{
    BlockDevice, Channel, Features, Geometry, ReplyData, ReplyEmpty, ReplySink, ReplyWrite,
    Request, Session, SessionConfig,
};
use zerocopy::IntoBytes;

/// Counts replies; drops them.
#[derive(Default)]
struct Counting(Mutex<usize>);

impl ReplySink for Counting {
    fn send_reply(&self, _parts: &[IoSlice<'_>]) {
        *self.0.lock().unwrap() += 1;
    }
}

impl Channel for Counting {
    fn receive(&self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

const SIZE: u64 = 1 << 20;

/// Reads zeros; a write at the last block fails with ENOSPC; flushes are
/// kept until the test answers them; discards are dropped unanswered;
/// write-zeroes succeed.
#[derive(Default)]
struct Scripted {
    held_flushes: Mutex<Vec<ReplyEmpty>>,
}

impl BlockDevice for Scripted {
    fn geometry(&self) -> Geometry {
        Geometry {
            features: Features::ALL,
            ..Geometry::new(SIZE, 512)
        }
    }

    fn read(&self, _req: &Request, _offset: u64, _len: u32, reply: ReplyData) {
        reply.zeros();
    }

    fn write(&self, _req: &Request, offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
        if offset == SIZE - 4096 {
            reply.error(libc::ENOSPC);
        } else {
            reply.ok();
        }
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        self.held_flushes.lock().unwrap().push(reply);
    }

    fn discard(&self, _req: &Request, _offset: u64, _len: u64, reply: ReplyEmpty) {
        drop(reply);
    }

    fn write_zeroes(
        &self,
        _req: &Request,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

struct Harness {
    session: Session,
    device: Arc<Scripted>,
    channel: Arc<dyn Channel>,
    sink: Arc<Counting>,
    unique: u64,
}

impl Harness {
    fn new() -> Harness {
        let device = Arc::new(Scripted::default());
        let session = Session::new(device.clone(), SessionConfig::default()).expect("geometry");
        let sink = Arc::new(Counting::default());
        Harness {
            session,
            device,
            channel: sink.clone(),
            sink,
            unique: 0,
        }
    }

    fn send(&mut self, queue: u16, opcode: u32, args: &[&[u8]]) {
        self.unique += 1;
        let message = encode_request(opcode, self.unique, 2, args);
        assert!(self.session.dispatch(queue, &message, &self.channel));
    }

    fn read(&mut self, queue: u16, offset: u64, size: u32) {
        let arg = ReadIn {
            offset,
            size,
            ..ReadIn::default()
        };
        self.send(queue, opcode::READ, &[arg.as_bytes()]);
    }

    fn write(&mut self, queue: u16, offset: u64, len: usize) {
        let arg = WriteIn {
            offset,
            size: len as u32,
            ..WriteIn::default()
        };
        self.send(queue, opcode::WRITE, &[arg.as_bytes(), &vec![1; len]]);
    }

    fn fallocate(&mut self, queue: u16, offset: u64, length: u64, mode: u32) {
        let arg = FallocateIn {
            offset,
            length,
            mode,
            ..FallocateIn::default()
        };
        self.send(queue, opcode::FALLOCATE, &[arg.as_bytes()]);
    }
}

#[test]
fn every_kind_is_counted_with_its_bytes_errors_and_time() {
    let mut harness = Harness::new();
    // Reads on two queues (two shards), one of them past the end: a file
    // read at EOF, shortened to what is left.
    for i in 0..10 {
        harness.read(i % 2, i as u64 * 4096, 4096);
    }
    harness.read(0, SIZE - 512, 4096);
    // A misaligned read is refused by the engine: an EINVAL.
    harness.read(1, 100, 4096);
    // Writes: 3 of 8 KiB, one that the device fails with ENOSPC, one past
    // the end that the engine refuses with ENOSPC.
    for i in 0..3 {
        harness.write(1, i * 8192, 8192);
    }
    harness.write(0, SIZE - 4096, 4096);
    harness.write(0, SIZE, 4096);
    // Discards are dropped by the device: EIO from the reply's drop.
    harness.fallocate(0, 0, 65536, falloc::PUNCH_HOLE | falloc::KEEP_SIZE);
    harness.fallocate(1, 0, 131072, falloc::ZERO_RANGE);
    harness.fallocate(1, 131072, 4096, falloc::ZERO_RANGE | falloc::KEEP_SIZE);
    // Flushes are held by the device: in flight until answered.
    harness.send(0, opcode::FSYNC, &[FsyncIn::default().as_bytes()]);
    harness.send(1, opcode::FSYNC, &[FsyncIn::default().as_bytes()]);
    // Not block requests: not counted, and a malformed one is.
    harness.send(0, opcode::GETATTR, &[&[0u8; 16]]);
    harness.send(0, opcode::READ, &[&[0u8; 3]]);

    let stats = harness.session.stats().clone();
    let before = stats.snapshot();
    assert_eq!(before.started, 22);
    assert_eq!(before.in_flight(), 2, "the two held flushes");
    assert_eq!(before.malformed, 1);
    let read = before.kind(Kind::Read);
    assert_eq!((read.ops, read.bytes), (12, 10 * 4096 + 512));
    let write = before.kind(Kind::Write);
    assert_eq!((write.ops, write.bytes), (5, 3 * 8192));
    let discard = before.kind(Kind::Discard);
    assert_eq!((discard.ops, discard.bytes), (1, 0));
    let zeroes = before.kind(Kind::WriteZeroes);
    assert_eq!((zeroes.ops, zeroes.bytes), (2, 131072 + 4096));
    assert_eq!(before.kind(Kind::Flush).ops, 0);
    let errors: Vec<(&str, u64)> = ERROR_NAMES
        .iter()
        .copied()
        .zip(before.errors)
        .filter(|&(_, count)| count > 0)
        .collect();
    assert_eq!(errors, [("EIO", 1), ("ENOSPC", 2), ("EINVAL", 1)]);
    assert_eq!(before.dropped, 1);
    assert_eq!(before.histogram.iter().sum::<u64>(), before.completed());

    // Answered from another thread, after a wait that is part of their
    // service time.
    let device = harness.device.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        for reply in device.held_flushes.lock().unwrap().drain(..) {
            reply.ok();
        }
    })
    .join()
    .unwrap();
    let after = stats.snapshot();
    assert_eq!(after.in_flight(), 0);
    let flush = after.kind(Kind::Flush);
    assert_eq!(flush.ops, 2);
    assert!(
        flush.service_ns >= 2 * 30_000_000,
        "flushes held 30 ms each took {} ns in all",
        flush.service_ns
    );
    assert!(after.quantile(1.0).unwrap() >= 29_000_000);
    assert_eq!(after.histogram.iter().sum::<u64>(), 22);
    // Every request got exactly one reply (the GETATTR's an ENOSYS, the
    // malformed READ's an EINVAL).
    assert_eq!(*harness.sink.0.lock().unwrap(), 24);
}

#[test]
fn queues_count_concurrently_without_losing_a_request() {
    let device = Arc::new(Scripted::default());
    let session = Arc::new(Session::new(device, SessionConfig::default()).expect("geometry"));
    let channel: Arc<dyn Channel> = Arc::new(Counting::default());
    let per_queue = 20_000u64;
    let threads: Vec<_> = (0..4u16)
        .map(|queue| {
            let session = session.clone();
            let channel = channel.clone();
            std::thread::spawn(move || {
                let arg = ReadIn {
                    offset: 0,
                    size: 4096,
                    ..ReadIn::default()
                };
                let message = encode_request(opcode::READ, 1, 2, &[arg.as_bytes()]);
                for _ in 0..per_queue {
                    assert!(session.dispatch(queue, &message, &channel));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let snapshot = session.stats().snapshot();
    let read = snapshot.kind(Kind::Read);
    assert_eq!(read.ops, 4 * per_queue);
    assert_eq!(read.bytes, 4 * per_queue * 4096);
    assert_eq!(snapshot.in_flight(), 0);
    assert_eq!(snapshot.histogram.iter().sum::<u64>(), 4 * per_queue);
}
