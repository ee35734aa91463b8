//! `garbage-soak COUNT [SEED [SECONDS]]`: COUNT garbage replies and
//! io_uring commits, seeded and reproducible, half on a read/write channel
//! and half on an io_uring channel, each of its own device.
//!
//! An application thread reads and writes the device with O_DIRECT, one
//! request at a time; the daemon (this thread) answers each of its requests
//! with a burst of garbage before a valid reply. Every garbage item is
//! predicted from the driver's rules (fuse_blk.c: `fblk_write_iter`,
//! `fblk_init_reply`, `fblk_take_reply`, `fblk_uring_cmd`,
//! `fblk_ring_register`, `fblk_ring_take_reply`) before it is sent: refused
//! with a given errno, or accepted because it happens to be valid (an
//! interrupt reply, a read answered with zeros or an error, a flipped byte
//! inside read data). Any difference fails the run, as does an application
//! result that differs from what the accepted reply said. Each device ends
//! destroyed with a request outstanding, which must fail, not hang.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fuse_blk::proto::abi::{opcode, InHeader, InitOut, OutHeader, ReadIn, WriteIn, WriteOut};
use fuse_blk::Geometry;
use fuse_blk_kmod::uapi::{
    self, UringCmd, URING_COMMIT_AND_FETCH, URING_FETCH, URING_F_DATA_ADDR, URING_F_DATA_IOVEC,
    URING_HEADER_SIZE,
};
use fuse_blk_kmod::{attach_fd, Control, KmodOptions};
use io_uring::{opcode as op, squeue, types, IoUring};
use zerocopy::{FromBytes, IntoBytes};

use super::read_message;

/// The driver's limits (fuse_blk.c).
const MAX_ERRNO: i32 = 511;
const MIN_MINOR: u32 = 23;
const INIT_OUT_MIN: usize = 24; // FUSE_COMPAT_22_INIT_OUT_SIZE
const UIO_MAXIOV: u32 = 1024;
const DEPTH: u16 = 8;
const DEVICE_SIZE: u64 = 64 << 20;
/// The application's requests stay in [16 MiB, 48 MiB), away from where
/// partition and filesystem probes read.
const AREA: (u64, u64) = (16 << 20, 48 << 20);
const WAIT: Duration = Duration::from_secs(60);

/// xorshift64*, as `fuse_blk_tests::random_bytes`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// The application's operation number `i`: a read or a write of 4..64 KiB.
#[derive(Clone, Debug)]
struct AppOp {
    write: bool,
    offset: u64,
    len: usize,
}

fn app_op(seed: u64, i: u64) -> AppOp {
    let mut rng = Rng::new(seed ^ (i << 20) ^ 0x5eed);
    let len = 4096 * (1 + rng.below(16) as usize);
    let offset = AREA.0 + 4096 * rng.below((AREA.1 - AREA.0) / 4096 - 16);
    AppOp {
        write: rng.chance(400),
        offset,
        len,
    }
}

/// The data of operation `i`: what a write writes, what a read is sent.
fn content(seed: u64, i: u64, len: usize) -> Vec<u8> {
    Rng::new(seed ^ i.wrapping_mul(0x1234_5678_9abc_def1)).bytes(len)
}

/// How a request ended, as the daemon's accepted reply said.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Data(Vec<u8>),
    Zeros,
    Written,
    Failed,
}

/// What the driver must do with one garbage item.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    Refused(i32),
    /// Accepted and ignored (an answer to an interrupt).
    Ignored,
    /// Accepted as the INIT reply.
    Init,
    /// Accepted as the request's reply.
    Completed(Outcome),
}

/// The request the daemon holds (the only one SENT on its queue).
struct Pending {
    unique: u64,
    write: bool,
    size: u32,
}

#[derive(Default)]
struct Stats {
    items: u64,
    refused: BTreeMap<i32, u64>,
    accepted: u64,
    requests: u64,
    strays: u64,
}

impl Stats {
    fn record(&mut self, verdict: &Verdict) {
        self.items += 1;
        match verdict {
            Verdict::Refused(errno) => *self.refused.entry(*errno).or_default() += 1,
            _ => self.accepted += 1,
        }
    }
    fn summary(&self) -> String {
        let refused: u64 = self.refused.values().sum();
        let by_errno: Vec<String> = self
            .refused
            .iter()
            .map(|(errno, n)| format!("{} {n}", errno_name(*errno)))
            .collect();
        format!(
            "{} garbage items: {refused} refused ({}), {} accepted as valid; {} requests \
             verified, {} other requests served",
            self.items,
            by_errno.join(", "),
            self.accepted,
            self.requests,
            self.strays
        )
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        _ => "other",
    }
}

/// The application: a thread doing operation `i` when told, with O_DIRECT.
struct App {
    go: mpsc::Sender<Option<u64>>,
    done: mpsc::Receiver<(u64, Result<Vec<u8>, i32>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl App {
    /// Starts the thread, which opens `device` first: the daemon serves
    /// meanwhile (opening waits for the partition scan, whose reads the
    /// daemon answers).
    fn start(device: &str, seed: u64) -> App {
        let device = device.to_owned();
        let (go, go_rx) = mpsc::channel::<Option<u64>>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // The disk is added once the INIT reply is in, from a work item.
            let deadline = Instant::now() + WAIT;
            let file = loop {
                match File::options()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&device)
                {
                    Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        eprintln!("garbage-soak: opening {device}: {e}");
                        return;
                    }
                    Ok(file) => break file,
                }
            };
            let mut buf = vec![0u8; (64 << 10) + 4096];
            let at = buf.as_ptr().align_offset(4096);
            while let Ok(Some(i)) = go_rx.recv() {
                let op = app_op(seed, i);
                let io = &mut buf[at..at + op.len];
                let result = if op.write {
                    io.copy_from_slice(&content(seed, i, op.len));
                    file.write_at(io, op.offset).map(|_| Vec::new())
                } else {
                    file.read_at(io, op.offset).map(|n| io[..n].to_vec())
                };
                let result = result.map_err(|e| e.raw_os_error().unwrap_or(0));
                if done_tx.send((i, result)).is_err() {
                    break;
                }
            }
        });
        App {
            go,
            done,
            thread: Some(thread),
        }
    }

    fn go(&self, i: u64) -> io::Result<()> {
        self.go
            .send(Some(i))
            .map_err(|_| io::Error::other("the application thread is gone"))
    }

    /// Operation `i`'s result, checked against `outcome`.
    fn check(&self, seed: u64, i: u64, outcome: &Outcome) -> io::Result<()> {
        let (n, result) = self
            .done
            .recv_timeout(WAIT)
            .map_err(|e| io::Error::other(format!("operation {i}: no result: {e}")))?;
        let op = app_op(seed, i);
        let ok = n == i
            && match (outcome, &result) {
                (Outcome::Failed, Err(_)) => true,
                (Outcome::Written, Ok(_)) => op.write,
                (Outcome::Zeros, Ok(data)) => {
                    !op.write && data.len() == op.len && data.iter().all(|&b| b == 0)
                }
                (Outcome::Data(want), Ok(data)) => !op.write && data == want,
                _ => false,
            };
        if ok {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "operation {i} ({op:?}) ended {}, the accepted reply said {}",
                match &result {
                    Ok(data) => format!("ok with {} bytes", data.len()),
                    Err(errno) => format!("with errno {errno}"),
                },
                match outcome {
                    Outcome::Data(_) => "data".to_string(),
                    other => format!("{other:?}"),
                }
            )))
        }
    }
}

impl Drop for App {
    /// Tells the thread to end, without waiting for it: on an error path
    /// it may still wait for its request, which ends when the device is
    /// destroyed.
    fn drop(&mut self) {
        let _ = self.go.send(None);
        drop(self.thread.take());
    }
}

fn create(control: &Control, name: &str) -> io::Result<u32> {
    let params = control.create(&fuse_blk_kmod::params_for(
        &Geometry::new(DEVICE_SIZE, 512),
        &KmodOptions {
            name: name.into(),
            queues: 1,
            queue_depth: DEPTH,
            // A request is held for a burst of garbage, well within this
            // (past it the driver sends an INTERRUPT, which fails the run);
            // if the soak itself dies, what it held fails at once instead
            // of keeping its application thread, and so the process, alive.
            io_timeout_ms: 30_000,
            recovery_timeout_ms: Some(0),
            ..KmodOptions::default()
        },
    ))?;
    Ok(params.dev_id)
}

/// Waits until device `id` is gone: its node and its control record.
fn gone(control: &Control, id: u32) -> io::Result<()> {
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/dev/fuseblk{id}")).exists() || control.info(id).is_ok() {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("device {id} not removed")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn run(args: &[&str]) -> io::Result<()> {
    let number = |i: usize, default: u64| -> io::Result<u64> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse()
                .map_err(|_| io::Error::other(format!("not a number: {s}")))
        })
    };
    let count = number(0, 0)?;
    let seed = number(1, 1)?;
    // Without SECONDS the count alone ends the run: a year stands for no
    // limit (u64::MAX / 2 seconds overflowed the Instant it was added to).
    let seconds = number(2, 365 * 24 * 3600)?;
    if args.is_empty() || args.len() > 3 || count == 0 {
        return Err(io::Error::other(
            "usage: garbage-soak COUNT [SEED [SECONDS]]",
        ));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let control = Control::open()?;
    let wanted = uapi::F_URING | uapi::F_URING_DATA_ADDR | uapi::F_URING_DATA_IOVEC;
    if control.features()?.features & wanted != wanted {
        return Err(io::Error::other(
            "the module does not offer io_uring channels with data addresses and iovecs",
        ));
    }
    println!("garbage-soak: {count} items, seed {seed}");

    let half = count / 2;
    let mut rw = Stats::default();
    let id = create(&control, "garbage-soak-rw")?;
    let result = rw_phase(id, count - half, seed, deadline, &mut rw);
    if result.is_err() {
        let _ = control.destroy(id);
    }
    result?;
    gone(&control, id)?;
    println!("read/write channel: {}", rw.summary());

    let mut ring = Stats::default();
    let id = create(&control, "garbage-soak-ring")?;
    let result = ring_phase(id, half, seed.wrapping_add(1), deadline, &mut ring);
    if result.is_err() {
        let _ = control.destroy(id);
    }
    result?;
    gone(&control, id)?;
    println!("io_uring channel: {}", ring.summary());

    let total = rw.items + ring.items;
    println!(
        "garbage-soak: {total} of {count} items, {} refused, {} accepted as valid, {} requests \
         verified, seed {seed}, {:.1} s{}",
        total - rw.accepted - ring.accepted,
        rw.accepted + ring.accepted,
        rw.requests + ring.requests,
        start.elapsed().as_secs_f64(),
        if total < count { " (time ran out)" } else { "" }
    );
    println!("device usable after garbage-soak, removed cleanly");
    Ok(())
}

// ---- what the driver does with a reply ----

fn out_header(bytes: &[u8]) -> OutHeader {
    OutHeader::read_from_prefix(bytes).unwrap().0
}

/// A reply to INIT with `payload` (zero-padded to a full `fuse_init_out`),
/// on a channel whose INIT was answered already (`ready`) or not.
fn predict_init(error: i32, payload: &[u8], max_io: u32, ready: bool) -> Verdict {
    if !payload.is_empty() {
        if error != 0
            || payload.len() < INIT_OUT_MIN
            || payload.len() > std::mem::size_of::<InitOut>()
        {
            return Verdict::Refused(libc::EINVAL);
        }
        let mut full = [0u8; std::mem::size_of::<InitOut>()];
        full[..payload.len()].copy_from_slice(payload);
        let out = InitOut::read_from_bytes(&full).unwrap();
        if out.major != 7 || out.minor < MIN_MINOR || out.max_write < max_io {
            return Verdict::Refused(libc::EINVAL);
        }
    } else if error == 0 {
        return Verdict::Refused(libc::EINVAL);
    }
    if ready {
        Verdict::Refused(libc::ENOENT)
    } else if error != 0 {
        // A refused INIT: the channel fails. The generator never sends it.
        Verdict::Refused(0)
    } else {
        Verdict::Init
    }
}

/// The part of `fblk_take_reply` after the request is found: `payload` is
/// what the reply carries (`data`, readable or not).
fn predict_take(
    p: &Pending,
    error: i32,
    payload: usize,
    data: Option<&[u8]>,
    args: &[u8],
) -> Verdict {
    let fits = if p.write {
        payload == std::mem::size_of::<WriteOut>()
    } else {
        payload == p.size as usize || payload == 0
    };
    if (error == 0 && !fits) || (error != 0 && payload != 0) {
        return Verdict::Refused(libc::EINVAL);
    }
    if error != 0 {
        return Verdict::Completed(Outcome::Failed);
    }
    if p.write {
        let out = WriteOut::read_from_prefix(args).unwrap().0;
        return if out.size == p.size {
            Verdict::Completed(Outcome::Written)
        } else {
            Verdict::Refused(libc::EINVAL)
        };
    }
    match (payload, data) {
        (0, _) => Verdict::Completed(Outcome::Zeros),
        (_, Some(data)) if data.len() >= payload => {
            Verdict::Completed(Outcome::Data(data[..payload].to_vec()))
        }
        (_, Some(_)) => Verdict::Refused(libc::EINVAL),
        (_, None) => Verdict::Refused(libc::EFAULT),
    }
}

/// `fblk_write_iter` on `bytes`, with `pending` the request SENT on the
/// queue (none before INIT).
fn predict_write(
    bytes: &[u8],
    pending: Option<&Pending>,
    init_unique: u64,
    max_io: u32,
    ready: bool,
) -> Verdict {
    if bytes.len() < 16 {
        return Verdict::Refused(libc::EINVAL);
    }
    let oh = out_header(bytes);
    if oh.len as usize != bytes.len() || !(-MAX_ERRNO..=0).contains(&oh.error) {
        return Verdict::Refused(libc::EINVAL);
    }
    if oh.unique & 1 != 0 {
        return Verdict::Ignored;
    }
    let payload = &bytes[16..];
    if oh.unique == init_unique {
        return predict_init(oh.error, payload, max_io, ready);
    }
    if (oh.unique as u32 >> 1) >= u32::from(DEPTH) {
        return Verdict::Refused(libc::ENOENT);
    }
    match pending {
        Some(p) if p.unique == oh.unique => {
            predict_take(p, oh.error, payload.len(), Some(payload), payload)
        }
        _ => Verdict::Refused(libc::ENOENT),
    }
}

fn reply(unique: u64, error: i32, payload: &[u8]) -> Vec<u8> {
    let mut out = OutHeader {
        len: (16 + payload.len()) as u32,
        error,
        unique,
    }
    .as_bytes()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

/// A valid reply's payload for `p`: the read data or a `fuse_write_out`.
fn valid_payload(p: &Pending, data: &[u8]) -> Vec<u8> {
    if p.write {
        WriteOut {
            size: p.size,
            padding: 0,
        }
        .as_bytes()
        .to_vec()
    } else {
        data.to_vec()
    }
}

/// An error in the range the driver takes, or out of it.
fn errno(rng: &mut Rng, valid: bool) -> i32 {
    if valid {
        -(1 + rng.below(MAX_ERRNO as u64) as i32)
    } else {
        match rng.below(3) {
            0 => 1 + rng.below(1000) as i32,
            1 => -MAX_ERRNO - 1 - rng.below(1 << 20) as i32,
            _ => rng.next() as i32 | 1 << 30,
        }
    }
}

/// A unique that is not `p`'s: another sequence, another tag, past the
/// depth, the INIT's, an interrupt's, or anything.
fn other_unique(rng: &mut Rng, p: &Pending, init_unique: u64, stale: u64) -> u64 {
    match rng.below(7) {
        0 => p.unique ^ (1 + rng.below(0xffff)) << 32,
        1 => {
            let tag = u64::from(p.unique as u32 >> 1);
            let other = (tag + 1 + rng.below(u64::from(DEPTH) - 1)) % u64::from(DEPTH);
            (p.unique & !0xffff_ffff) | other << 1
        }
        2 => (p.unique & !0xffff_ffff) | (u64::from(DEPTH) + rng.below(1 << 20)) << 1,
        3 => init_unique,
        4 => p.unique | 1,
        5 => stale,
        _ => rng.next(),
    }
}

/// One garbage reply for `p` on a read/write channel.
fn garbage_write(rng: &mut Rng, p: &Pending, data: &[u8], init_unique: u64, stale: u64) -> Vec<u8> {
    let good = valid_payload(p, data);
    match rng.below(10) {
        0 => {
            let len = 1 + rng.below(300) as usize;
            rng.bytes(len)
        }
        1 => {
            let len = 16 + rng.below(64) as usize;
            let mut bytes = rng.bytes(len);
            let len = bytes.len() as u32;
            bytes[..4].copy_from_slice(&len.to_ne_bytes());
            bytes
        }
        2 => reply(other_unique(rng, p, init_unique, stale), 0, &good),
        3 => {
            let mut bytes = reply(p.unique, 0, &good);
            let len = match rng.below(3) {
                0 => rng.next() as u32,
                1 => bytes.len() as u32 + 1 + rng.below(4096) as u32,
                _ => rng.below(bytes.len() as u64) as u32,
            };
            bytes[..4].copy_from_slice(&len.to_ne_bytes());
            bytes
        }
        4 => reply(p.unique, errno(rng, false), &good),
        5 => {
            let len = 1 + rng.below(64) as usize;
            reply(p.unique, errno(rng, true), &rng.bytes(len))
        }
        6 => {
            // A success with the wrong amount of data.
            let size = p.size as usize;
            let len = match rng.below(4) {
                0 => size.saturating_sub(512 * (1 + rng.below(8) as usize)),
                1 => size + 512 * (1 + rng.below(8) as usize),
                2 => std::mem::size_of::<WriteOut>(),
                _ => rng.below(size as u64 + 4096) as usize,
            };
            let payload: Vec<u8> = data.iter().copied().cycle().take(len).collect();
            reply(p.unique, 0, &payload)
        }
        7 if p.write => {
            let mut size = rng.next() as u32;
            if rng.chance(500) {
                size = p.size.wrapping_add(1 + rng.below(8192) as u32);
            }
            reply(p.unique, 0, WriteOut { size, padding: 0 }.as_bytes())
        }
        7 => {
            let init = InitOut {
                major: 7,
                minor: 31,
                max_write: 1 << 20,
                ..InitOut::default()
            };
            reply(init_unique, 0, init.as_bytes())
        }
        8 => {
            // Accepted: a read answered with zeros (no data) or an error;
            // the unique of an interrupt.
            match rng.below(3) {
                0 if !p.write => reply(p.unique, 0, &[]),
                1 => reply(p.unique, errno(rng, true), &[]),
                _ => reply(p.unique | 1, errno(rng, true), &[]),
            }
        }
        _ => {
            // A valid reply with one to three bytes changed.
            let mut bytes = reply(p.unique, 0, &good);
            for _ in 0..1 + rng.below(3) {
                let at = if rng.chance(800) {
                    rng.below(24.min(bytes.len() as u64))
                } else {
                    rng.below(bytes.len() as u64)
                } as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            bytes
        }
    }
}

/// Garbage while the channel's INIT waits for its reply.
fn garbage_init(rng: &mut Rng, init_unique: u64) -> Vec<u8> {
    match rng.below(4) {
        0 => {
            let len = 1 + rng.below(200) as usize;
            rng.bytes(len)
        }
        1 => {
            let unique = rng.next() & !1;
            let len = rng.below(80) as usize;
            reply(unique, 0, &rng.bytes(len))
        }
        _ => {
            let init = InitOut {
                major: if rng.chance(800) {
                    7
                } else {
                    rng.below(9) as u32
                },
                minor: rng.below(40) as u32,
                max_write: if rng.chance(500) {
                    1 << 20
                } else {
                    rng.below(2 << 20) as u32
                },
                ..InitOut::default()
            };
            let len = if rng.chance(700) {
                std::mem::size_of::<InitOut>()
            } else {
                rng.below(80) as usize
            };
            let payload: Vec<u8> = init
                .as_bytes()
                .iter()
                .copied()
                .chain([0; 16])
                .take(len)
                .collect();
            let error = if rng.chance(900) {
                0
            } else {
                {
                    let valid = rng.chance(500);
                    errno(rng, valid)
                }
            };
            reply(init_unique, error, &payload)
        }
    }
}

fn check(
    what: &str,
    index: u64,
    verdict: &Verdict,
    got: Option<i32>,
    bytes: &[u8],
) -> io::Result<()> {
    let ok = match (verdict, got) {
        (Verdict::Refused(want), Some(errno)) => *want == errno,
        (Verdict::Refused(_), None) => false,
        (_, got) => got.is_none(),
    };
    if ok {
        return Ok(());
    }
    let head: Vec<String> = bytes.iter().take(48).map(|b| format!("{b:02x}")).collect();
    Err(io::Error::other(format!(
        "{what} item {index}: expected {verdict:?}, the driver answered {} ({} bytes: {}...)",
        got.map_or("success".to_string(), |e| format!("errno {e}")),
        bytes.len(),
        head.join("")
    )))
}

fn write_reply(channel: &File, bytes: &[u8]) -> Option<i32> {
    match nix::unistd::write(channel, bytes) {
        Ok(_) => None,
        Err(e) => Some(e as i32),
    }
}

fn wait_readable(channel: &File, what: &str) -> io::Result<()> {
    let mut fds = [nix::poll::PollFd::new(
        channel.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut fds, 60_000u16).map_err(io::Error::from)? == 0 {
        return Err(io::Error::other(format!(
            "no message for {what} within 60 s"
        )));
    }
    Ok(())
}

/// Answers INIT on a read/write channel after `n` garbage items sent while
/// it waits.
fn init_with_garbage(
    channel: &File,
    rng: &mut Rng,
    n: u64,
    max_io: u32,
    stats: &mut Stats,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 2 * max_io as usize + 4096];
    wait_readable(channel, "INIT")?;
    let (init, _) = read_message(channel, &mut buf)?;
    if init.opcode != opcode::INIT {
        return Err(io::Error::other(format!(
            "first message is opcode {}",
            init.opcode
        )));
    }
    let mut ready = false;
    for index in 0..n {
        let bytes = garbage_init(rng, init.unique);
        let verdict = predict_write(&bytes, None, init.unique, max_io, ready);
        if verdict == Verdict::Refused(0) {
            continue; // would fail the channel
        }
        check(
            "INIT garbage",
            index,
            &verdict,
            write_reply(channel, &bytes),
            &bytes,
        )?;
        stats.record(&verdict);
        ready |= verdict == Verdict::Init;
    }
    if !ready {
        let out = InitOut {
            major: 7,
            minor: 31,
            max_write: max_io,
            ..InitOut::default()
        };
        if let Some(errno) = write_reply(channel, &reply(init.unique, 0, out.as_bytes())) {
            return Err(io::Error::other(format!("valid INIT refused: {errno}")));
        }
    }
    Ok(init.unique)
}

/// How many garbage items for the next request, at most `left`.
fn burst(rng: &mut Rng, left: u64) -> u64 {
    (1 + rng.below(64)).min(left)
}

/// The valid reply ending a request that garbage did not end.
fn final_outcome(rng: &mut Rng, p: &Pending, data: &[u8]) -> (i32, Vec<u8>, Outcome) {
    if rng.chance(15) {
        (-libc::EIO, Vec::new(), Outcome::Failed)
    } else if p.write {
        (0, valid_payload(p, data), Outcome::Written)
    } else if rng.chance(30) {
        (0, Vec::new(), Outcome::Zeros)
    } else {
        (0, data.to_vec(), Outcome::Data(data.to_vec()))
    }
}

fn rw_phase(
    id: u32,
    count: u64,
    seed: u64,
    deadline: Instant,
    stats: &mut Stats,
) -> io::Result<()> {
    let control = Control::open()?;
    let max_io = control.info(id)?.params.max_io_bytes;
    let channel = File::from(attach_fd(id, 0, false)?);
    let mut rng = Rng::new(seed);
    let init_unique =
        init_with_garbage(&channel, &mut rng, (count / 50).min(20_000), max_io, stats)?;
    let mut buf = vec![0u8; 2 * max_io as usize + 4096];
    let app = App::start(&format!("/dev/fuseblk{id}"), seed);
    let mut stale = 0u64;
    let mut i = 0u64;
    loop {
        let last = stats.items >= count || Instant::now() > deadline;
        app.go(i)?;
        let op = app_op(seed, i);
        // The application's request; others (probes) get valid answers.
        let (p, data) = loop {
            wait_readable(&channel, &format!("operation {i}"))?;
            let (header, body) = read_message(&channel, &mut buf)?;
            let (offset, size) = match header.opcode {
                opcode::READ => {
                    let arg = ReadIn::read_from_prefix(&body).unwrap().0;
                    (arg.offset, arg.size)
                }
                opcode::WRITE => {
                    let arg = WriteIn::read_from_prefix(&body).unwrap().0;
                    (arg.offset, arg.size)
                }
                other => return Err(io::Error::other(format!("unexpected opcode {other}"))),
            };
            let write = header.opcode == opcode::WRITE;
            let p = Pending {
                unique: header.unique,
                write,
                size,
            };
            if write == op.write && offset == op.offset && size as usize == op.len {
                if write && body[std::mem::size_of::<WriteIn>()..] != content(seed, i, op.len) {
                    return Err(io::Error::other(format!(
                        "operation {i}: WRITE data differs"
                    )));
                }
                break (p, content(seed, i, op.len));
            }
            stats.strays += 1;
            let payload = valid_payload(&p, &vec![0; size as usize]);
            if let Some(errno) = write_reply(&channel, &reply(p.unique, 0, &payload)) {
                return Err(io::Error::other(format!("valid reply refused: {errno}")));
            }
        };
        if last {
            // Destroyed with the request outstanding: it fails, replies are
            // refused, the device goes.
            control.destroy(id)?;
            app.check(seed, i, &Outcome::Failed)?;
            let verdict = Verdict::Refused(libc::ENODEV);
            let bytes = reply(p.unique, 0, &valid_payload(&p, &data));
            check(
                "after destroy",
                0,
                &verdict,
                write_reply(&channel, &bytes),
                &bytes,
            )?;
            return Ok(());
        }
        let mut outcome = None;
        for _ in 0..burst(&mut rng, count - stats.items) {
            let bytes = garbage_write(&mut rng, &p, &data, init_unique, stale);
            let verdict = predict_write(&bytes, Some(&p), init_unique, max_io, true);
            check(
                "read/write",
                stats.items,
                &verdict,
                write_reply(&channel, &bytes),
                &bytes,
            )?;
            stats.record(&verdict);
            if let Verdict::Completed(done) = verdict {
                outcome = Some(done);
                break;
            }
        }
        let outcome = match outcome {
            Some(outcome) => outcome,
            None => {
                let (error, payload, outcome) = final_outcome(&mut rng, &p, &data);
                if let Some(errno) = write_reply(&channel, &reply(p.unique, error, &payload)) {
                    return Err(io::Error::other(format!(
                        "operation {i}: valid reply refused: {errno}"
                    )));
                }
                outcome
            }
        };
        app.check(seed, i, &outcome)?;
        stats.requests += 1;
        stale = p.unique;
        i += 1;
    }
}

// ---- io_uring channel ----

/// Where a commit's READ data comes from, as the driver will find it.
enum Source<'a> {
    /// Readable bytes (the entry's payload buffer, a buffer at data_addr,
    /// or what the iovecs gather, in order).
    Bytes(&'a [u8]),
    /// data_addr passes access_ok but is not mapped: the copy faults.
    Unmapped,
    /// data_addr or an iovec outside user memory, or an unreadable iovec
    /// array: importing it faults.
    Fault,
}

/// What the driver does with a FETCH or COMMIT_AND_FETCH SQE, past the
/// checks of its command's fields: `None` if those pass.
fn predict_sqe(cmd_op: u32, cmd: &UringCmd) -> Option<Verdict> {
    let both = URING_F_DATA_ADDR | URING_F_DATA_IOVEC;
    let commit = cmd_op == URING_COMMIT_AND_FETCH;
    let bad = (cmd_op != URING_FETCH && !commit)
        || cmd.entry >= DEPTH
        || cmd.flags & !both != 0
        || (cmd.flags != 0 && !commit)
        || cmd.flags == both
        || (cmd.flags == 0) != (cmd.data_addr == 0)
        || (cmd.flags & URING_F_DATA_IOVEC == 0) != (cmd.data_segs == 0)
        || cmd.data_segs > UIO_MAXIOV;
    bad.then_some(Verdict::Refused(libc::EINVAL))
}

/// A COMMIT_AND_FETCH of the entry holding `p`, its header buffer holding
/// `header`, the READ data at `source`.
fn predict_commit(p: &Pending, header: &[u8], source: Source, max_io: usize) -> Verdict {
    let oh = out_header(header);
    if oh.unique != p.unique || (oh.len as usize) < 16 || !(-MAX_ERRNO..=0).contains(&oh.error) {
        return Verdict::Refused(libc::EINVAL);
    }
    let payload = oh.len as usize - 16;
    let readable = payload.min(max_io);
    let data = match source {
        Source::Fault => return Verdict::Refused(libc::EFAULT),
        Source::Unmapped => None,
        Source::Bytes(bytes) => Some(&bytes[..bytes.len().min(readable)]),
    };
    predict_take(p, oh.error, payload, data, &header[16..])
}

struct Ring {
    ring: IoUring,
    channel: File,
    headers: Vec<u8>,
    payloads: Vec<u8>,
    iovecs: Vec<[libc::iovec; 2]>,
    /// Entries that completed with a request not yet looked at.
    ready: VecDeque<u16>,
    max_io: usize,
    /// The next garbage SQE's user_data (past any entry's).
    serial: u64,
}

impl Ring {
    fn new(channel: File, max_io: usize) -> io::Result<Ring> {
        let (headers, payloads, iovecs) =
            super::ring_garbage::entry_buffers(usize::from(DEPTH), max_io);
        Ok(Ring {
            ring: IoUring::new(64)?,
            channel,
            headers,
            payloads,
            iovecs,
            ready: VecDeque::new(),
            max_io,
            serial: 1 << 32,
        })
    }

    fn header(&mut self, entry: u16) -> &mut [u8] {
        let at = usize::from(entry) * URING_HEADER_SIZE;
        &mut self.headers[at..at + URING_HEADER_SIZE]
    }

    fn payload(&mut self, entry: u16) -> &mut [u8] {
        let at = usize::from(entry) * self.max_io;
        &mut self.payloads[at..at + self.max_io]
    }

    fn submit(
        &mut self,
        cmd_op: u32,
        cmd: UringCmd,
        addr: Option<u64>,
        user_data: u64,
    ) -> io::Result<()> {
        let sqe: squeue::Entry = op::UringCmd16::new(types::Fd(self.channel.as_raw_fd()), cmd_op)
            .cmd(cmd.to_bytes())
            .addr(addr)
            .build()
            .user_data(user_data);
        // SAFETY: the SQE points at this ring's iovecs and buffers, which
        // outlive the ring (fields drop in order: the ring first), or at
        // memory the caller keeps until the command completes; or at bad
        // addresses on purpose, which the driver must refuse.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        self.ring.submit()?;
        Ok(())
    }

    fn fetch(&mut self, entry: u16) -> io::Result<()> {
        let iov = self.iovecs[usize::from(entry)].as_ptr() as u64;
        let cmd = UringCmd {
            entry,
            ..UringCmd::default()
        };
        self.submit(URING_FETCH, cmd, Some(iov), u64::from(entry))
    }

    fn commit(&mut self, entry: u16) -> io::Result<()> {
        let cmd = UringCmd {
            entry,
            ..UringCmd::default()
        };
        self.submit(URING_COMMIT_AND_FETCH, cmd, None, u64::from(entry))
    }

    /// Takes the completions there are; entries' go to `ready`. Returns the
    /// result of `wanted`'s if it was among them.
    fn reap(&mut self, wanted: u64) -> io::Result<Option<i32>> {
        let mut found = None;
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in cqes {
            if user_data == wanted {
                found = Some(result);
            } else if user_data < u64::from(DEPTH) && result == 0 {
                self.ready.push_back(user_data as u16);
            } else {
                return Err(io::Error::other(format!(
                    "command {user_data:#x} completed with {result}"
                )));
            }
        }
        Ok(found)
    }

    /// Waits for the completion of `wanted` (or, with `u64::MAX`, for an
    /// entry to hold a request).
    fn wait(&mut self, wanted: u64) -> io::Result<Option<i32>> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(result) = self.reap(wanted)? {
                return Ok(Some(result));
            }
            if wanted == u64::MAX && !self.ready.is_empty() {
                return Ok(None);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no completion of {wanted:#x} in 60 s"
                )));
            }
            super::ring_garbage::wait_for_completion(&self.ring, Duration::from_millis(100))?;
        }
    }

    /// The next entry holding a request, and the request.
    fn request(&mut self) -> io::Result<(u16, InHeader, u64, u32)> {
        if self.ready.is_empty() {
            self.wait(u64::MAX)?;
        }
        let entry = self.ready.pop_front().unwrap();
        let header = self.header(entry);
        let (in_header, args) = InHeader::read_from_prefix(header).unwrap();
        let (offset, size) = match in_header.opcode {
            opcode::READ => {
                let arg = ReadIn::read_from_prefix(args).unwrap().0;
                (arg.offset, arg.size)
            }
            opcode::WRITE => {
                let arg = WriteIn::read_from_prefix(args).unwrap().0;
                (arg.offset, arg.size)
            }
            other => return Err(io::Error::other(format!("unexpected opcode {other}"))),
        };
        Ok((entry, in_header, offset, size))
    }

    /// Writes a reply into `entry`'s header buffer.
    fn set_header(&mut self, entry: u16, unique: u64, error: i32, len: u32, args: &[u8]) {
        let header = self.header(entry);
        header[..16].copy_from_slice(OutHeader { len, error, unique }.as_bytes());
        header[16..16 + args.len()].copy_from_slice(args);
    }

    /// A valid reply's header for `p` (the data, for a READ, in the
    /// payload buffer).
    fn set_valid(&mut self, entry: u16, p: &Pending) {
        if p.write {
            let out = WriteOut {
                size: p.size,
                padding: 0,
            };
            self.set_header(entry, p.unique, 0, 24, out.as_bytes());
        } else {
            self.set_header(entry, p.unique, 0, 16 + p.size, &[]);
        }
    }

    /// Submits one garbage command and checks the driver's answer against
    /// `verdict`. A command predicted to be taken is the entry's next
    /// FETCH: it must not complete at once with an error.
    fn send(
        &mut self,
        index: u64,
        entry: u16,
        (cmd_op, cmd, addr): (u32, UringCmd, Option<u64>),
        verdict: &Verdict,
    ) -> io::Result<()> {
        let shown = cmd.to_bytes();
        if let Verdict::Refused(_) = verdict {
            let user_data = self.serial;
            self.serial += 1;
            self.submit(cmd_op, cmd, addr, user_data)?;
            let got = self.wait(user_data)?.unwrap();
            check(
                "io_uring",
                index,
                verdict,
                (got < 0).then_some(-got),
                &shown,
            )
        } else {
            self.submit(cmd_op, cmd, addr, u64::from(entry))?;
            // A refusal completes within the submission.
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (user_data, result) in cqes {
                if user_data == u64::from(entry) && result < 0 {
                    return check("io_uring", index, verdict, Some(-result), &shown);
                }
                if user_data < u64::from(DEPTH) && result == 0 {
                    self.ready.push_back(user_data as u16);
                } else {
                    return Err(io::Error::other(format!(
                        "command {user_data:#x} completed with {result}"
                    )));
                }
            }
            Ok(())
        }
    }
}

fn commit_cmd(
    entry: u16,
    flags: u16,
    data_segs: u32,
    data_addr: u64,
) -> (u32, UringCmd, Option<u64>) {
    (
        URING_COMMIT_AND_FETCH,
        UringCmd {
            entry,
            flags,
            data_segs,
            data_addr,
        },
        None,
    )
}

/// An address that passes access_ok but is not mapped.
const UNMAPPED: u64 = 8;
/// An address outside user memory.
const OUTSIDE: u64 = u64::MAX - 4095;

/// One garbage command for `p`, held in `entry`, sent and checked.
fn ring_garbage(
    ring: &mut Ring,
    rng: &mut Rng,
    index: u64,
    entry: u16,
    p: &Pending,
    pattern: &[u8],
    stale: u64,
) -> io::Result<Verdict> {
    let max_io = ring.max_io;
    let iovec = |at: &[u8], len: usize| libc::iovec {
        iov_base: at.as_ptr().cast_mut().cast(),
        iov_len: len,
    };
    let kind = rng.below(10);
    match kind {
        0 => {
            // Another entry: never fetched into, waiting, past the depth.
            let other = (entry + 1 + rng.below(u64::from(DEPTH) + 3) as u16) % (DEPTH + 4);
            ring.set_valid(entry, p);
            let verdict = Verdict::Refused(libc::EINVAL);
            ring.send(index, entry, commit_cmd(other, 0, 0, 0), &verdict)?;
            Ok(verdict)
        }
        1 | 2 => {
            // Random command fields, any operation code now and then.
            let cmd_op = match rng.below(8) {
                0 => rng.next() as u32,
                1 => URING_FETCH,
                _ => URING_COMMIT_AND_FETCH,
            };
            let flags = if rng.chance(300) {
                rng.next() as u16
            } else {
                rng.below(4) as u16
            };
            let data_segs = match rng.below(4) {
                0 => 0,
                1 => 1 + rng.below(4) as u32,
                2 => UIO_MAXIOV + 1 + rng.below(1000) as u32,
                _ => rng.next() as u32,
            };
            let whole = [iovec(pattern, max_io)];
            let data_addr = match rng.below(4) {
                0 => 0,
                1 => pattern.as_ptr() as u64,
                2 => whole.as_ptr() as u64,
                _ => rng.next(),
            };
            let entry_field = if rng.chance(800) {
                entry
            } else {
                rng.below(u64::from(DEPTH) * 2) as u16
            };
            let cmd = UringCmd {
                entry: entry_field,
                flags,
                data_segs,
                data_addr,
            };
            let verdict = match predict_sqe(cmd_op, &cmd) {
                Some(verdict) => verdict,
                // Legal fields: keep only the FETCH of an entry in use
                // (EBUSY) and commits of another entry (EINVAL); a commit of
                // this one is the business of the kinds below.
                None if cmd_op == URING_FETCH => Verdict::Refused(libc::EBUSY),
                None if entry_field != entry => Verdict::Refused(libc::EINVAL),
                None => return ring_garbage(ring, rng, index, entry, p, pattern, stale),
            };
            let addr =
                (cmd_op == URING_FETCH).then(|| ring.iovecs[usize::from(entry)].as_ptr() as u64);
            ring.set_valid(entry, p);
            ring.send(index, entry, (cmd_op, cmd, addr), &verdict)?;
            Ok(verdict)
        }
        3 => {
            // A FETCH with bad buffers, or of an entry in use.
            let mut iov = ring.iovecs[usize::from(entry)];
            let (addr, verdict) = match rng.below(6) {
                0 => (Some(0), Verdict::Refused(libc::EFAULT)),
                1 => (Some(UNMAPPED), Verdict::Refused(libc::EFAULT)),
                2 => {
                    iov[0].iov_len = rng.below(URING_HEADER_SIZE as u64) as usize;
                    (None, Verdict::Refused(libc::EINVAL))
                }
                3 => {
                    iov[1].iov_len = rng.below(max_io as u64) as usize;
                    (None, Verdict::Refused(libc::EINVAL))
                }
                4 => {
                    iov[rng.below(2) as usize].iov_base = OUTSIDE as *mut _;
                    (None, Verdict::Refused(libc::EFAULT))
                }
                _ => (None, Verdict::Refused(libc::EBUSY)),
            };
            let addr = addr.unwrap_or(iov.as_ptr() as u64);
            let cmd = UringCmd {
                entry: rng.below(u64::from(DEPTH)) as u16,
                ..UringCmd::default()
            };
            ring.send(index, entry, (URING_FETCH, cmd, Some(addr)), &verdict)?;
            Ok(verdict)
        }
        4..=6 => {
            // The reply in the header buffer, wrong.
            let size = p.size;
            let (unique, error, len, args): (u64, i32, u32, Vec<u8>) = match rng.below(8) {
                0 => (rng.next(), 0, 16 + size, Vec::new()),
                1 => (
                    [p.unique | 1, stale, p.unique ^ 1 << 33][rng.below(3) as usize],
                    0,
                    16 + size,
                    Vec::new(),
                ),
                2 => (p.unique, 0, rng.below(16) as u32, Vec::new()),
                3 => (p.unique, errno(rng, false), 16, Vec::new()),
                4 => (
                    p.unique,
                    errno(rng, true),
                    17 + rng.below(u64::from(size)) as u32,
                    Vec::new(),
                ),
                5 => {
                    // A success with the wrong amount of data (or zeros,
                    // which a READ may be answered with).
                    let len = match rng.below(4) {
                        0 => size.saturating_sub(512 * (1 + rng.below(8) as u32)),
                        1 => size + 512 * (1 + rng.below(8) as u32),
                        2 => max_io as u32 + 1 + rng.below(1 << 20) as u32,
                        _ => rng.below(u64::from(size) + 4096) as u32,
                    };
                    (
                        p.unique,
                        0,
                        16 + len,
                        WriteOut { size, padding: 0 }.as_bytes().to_vec(),
                    )
                }
                6 => {
                    let size = if rng.chance(500) {
                        rng.next() as u32
                    } else {
                        size ^ (1 << rng.below(20))
                    };
                    (
                        p.unique,
                        0,
                        24,
                        WriteOut { size, padding: 0 }.as_bytes().to_vec(),
                    )
                }
                _ => {
                    // Accepted: an error, or zeros for a READ.
                    if rng.chance(500) && !p.write {
                        (p.unique, 0, 16, Vec::new())
                    } else {
                        (p.unique, errno(rng, true), 16, Vec::new())
                    }
                }
            };
            ring.set_header(entry, unique, error, len, &args);
            if rng.chance(100) && !p.write {
                // A flipped bit in the data: taken as it is.
                let at = rng.below(u64::from(size)) as usize;
                ring.payload(entry)[at] ^= 1 << rng.below(8);
            }
            let verdict = {
                let header =
                    &ring.headers[usize::from(entry) * URING_HEADER_SIZE..][..URING_HEADER_SIZE];
                let at = usize::from(entry) * max_io;
                predict_commit(
                    p,
                    header,
                    Source::Bytes(&ring.payloads[at..at + max_io]),
                    max_io,
                )
            };
            ring.send(index, entry, commit_cmd(entry, 0, 0, 0), &verdict)?;
            Ok(verdict)
        }
        7 if !p.write => {
            // READ data at an address.
            ring.set_valid(entry, p);
            let (addr, source) = match rng.below(3) {
                0 => (UNMAPPED, Source::Unmapped),
                1 => (OUTSIDE, Source::Fault),
                _ => (pattern.as_ptr() as u64, Source::Bytes(pattern)),
            };
            let header = ring.header(entry).to_vec();
            let verdict = predict_commit(p, &header, source, max_io);
            ring.send(
                index,
                entry,
                commit_cmd(entry, URING_F_DATA_ADDR, 0, addr),
                &verdict,
            )?;
            Ok(verdict)
        }
        8 if !p.write => {
            // READ data gathered from iovecs: too few bytes, enough, or
            // unreadable.
            ring.set_valid(entry, p);
            const PIECE: usize = 64 << 10;
            let zeros = vec![0u8; PIECE];
            let n = 1 + rng.below(12) as usize;
            let mut iovecs = Vec::with_capacity(n);
            let mut gathered = Vec::new();
            for k in 0..n {
                let len = if rng.chance(300) {
                    rng.below(p.size as u64 / n as u64 + 1) as usize
                } else {
                    p.size as usize / n + 1 + rng.below(512) as usize
                }
                .min(PIECE);
                let from = if k % 2 == 0 {
                    &pattern[rng.below((max_io - PIECE) as u64) as usize..]
                } else {
                    &zeros[..]
                };
                iovecs.push(iovec(from, len));
                gathered.extend_from_slice(&from[..len]);
            }
            let (addr, source) = match rng.below(4) {
                0 => (UNMAPPED, Source::Fault),
                1 => {
                    let k = rng.below(n as u64) as usize;
                    iovecs[k].iov_base = OUTSIDE as *mut _;
                    iovecs[k].iov_len = iovecs[k].iov_len.max(1);
                    (iovecs.as_ptr() as u64, Source::Fault)
                }
                _ => (iovecs.as_ptr() as u64, Source::Bytes(&gathered)),
            };
            let header = ring.header(entry).to_vec();
            let verdict = predict_commit(p, &header, source, max_io);
            ring.send(
                index,
                entry,
                commit_cmd(entry, URING_F_DATA_IOVEC, n as u32, addr),
                &verdict,
            )?;
            Ok(verdict)
        }
        _ => {
            // A stale COMMIT: an entry that completed already, of the
            // previous request (EINVAL), written right for this one.
            ring.set_valid(entry, p);
            let verdict = Verdict::Refused(libc::EINVAL);
            let other = (entry + 1 + rng.below(u64::from(DEPTH) - 1) as u16) % DEPTH;
            ring.send(index, entry, commit_cmd(other, 0, 0, 0), &verdict)?;
            Ok(verdict)
        }
    }
}

fn ring_phase(
    id: u32,
    count: u64,
    seed: u64,
    deadline: Instant,
    stats: &mut Stats,
) -> io::Result<()> {
    let control = Control::open()?;
    let max_io = control.info(id)?.params.max_io_bytes;
    let channel = File::from(attach_fd(id, 0, false)?);
    let mut rng = Rng::new(seed);
    init_with_garbage(&channel, &mut rng, (count / 50).min(20_000), max_io, stats)?;
    let mut ring = Ring::new(channel, max_io as usize)?;
    for entry in 0..DEPTH {
        ring.fetch(entry)?;
    }
    let pattern = Rng::new(seed ^ 0xda7a).bytes(max_io as usize);
    let app = App::start(&format!("/dev/fuseblk{id}"), seed);
    let mut stale = 0u64;
    let mut i = 0u64;
    loop {
        let last = stats.items >= count || Instant::now() > deadline;
        app.go(i)?;
        let op = app_op(seed, i);
        let (entry, p, data) = loop {
            let (entry, header, offset, size) = ring.request()?;
            let write = header.opcode == opcode::WRITE;
            let p = Pending {
                unique: header.unique,
                write,
                size,
            };
            if write == op.write && offset == op.offset && size as usize == op.len {
                let data = content(seed, i, op.len);
                if write && ring.payload(entry)[..op.len] != data[..] {
                    return Err(io::Error::other(format!(
                        "operation {i}: WRITE data differs"
                    )));
                }
                if !write {
                    ring.payload(entry)[..op.len].copy_from_slice(&data);
                }
                break (entry, p, data);
            }
            stats.strays += 1;
            if !write {
                ring.payload(entry)[..size as usize].fill(0);
            }
            ring.set_valid(entry, &p);
            ring.commit(entry)?;
        };
        if last {
            // Destroyed with the request in an entry: it fails, the other
            // entries' commands end with ENODEV, and so does a commit.
            control.destroy(id)?;
            app.check(seed, i, &Outcome::Failed)?;
            // Entries holding a request not yet looked at have no command.
            let waiting = usize::from(DEPTH) - 1 - ring.ready.len();
            let mut ended = 0;
            let stop = Instant::now() + WAIT;
            while ended < waiting && Instant::now() < stop {
                let cqes: Vec<(u64, i32)> = ring
                    .ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result()))
                    .collect();
                for (user_data, result) in cqes {
                    if user_data >= u64::from(DEPTH) || result != -libc::ENODEV {
                        return Err(io::Error::other(format!(
                            "after destroy: command {user_data:#x} completed with {result}"
                        )));
                    }
                    ended += 1;
                }
                ring.ring.submit_and_wait(0)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            if ended != waiting {
                return Err(io::Error::other(format!(
                    "after destroy: {ended} of {waiting} waiting commands ended"
                )));
            }
            ring.set_valid(entry, &p);
            let verdict = Verdict::Refused(libc::ENODEV);
            ring.send(0, entry, commit_cmd(entry, 0, 0, 0), &verdict)?;
            return Ok(());
        }
        let mut outcome = None;
        for _ in 0..burst(&mut rng, count - stats.items) {
            let verdict =
                ring_garbage(&mut ring, &mut rng, stats.items, entry, &p, &pattern, stale)?;
            stats.record(&verdict);
            if let Verdict::Completed(done) = verdict {
                outcome = Some(done);
                break;
            }
        }
        let outcome = match outcome {
            Some(outcome) => outcome,
            None => {
                let (error, _, outcome) = final_outcome(&mut rng, &p, &data);
                if outcome == Outcome::Zeros {
                    ring.set_header(entry, p.unique, 0, 16, &[]);
                } else if error != 0 {
                    ring.set_header(entry, p.unique, error, 16, &[]);
                } else {
                    ring.payload(entry)[..data.len()].copy_from_slice(&data);
                    ring.set_valid(entry, &p);
                }
                ring.commit(entry)?;
                outcome
            }
        };
        app.check(seed, i, &outcome)?;
        stats.requests += 1;
        stale = p.unique;
        i += 1;
    }
}
