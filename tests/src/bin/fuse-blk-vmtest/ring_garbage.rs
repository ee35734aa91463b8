//! `ring-garbage`: io_uring commands (FUSE_BLK_URING_*) the driver must
//! refuse, rings that go away while the driver holds their commands or
//! while a request sits in an entry, and a device destroyed under waiting
//! entries. After each, the device must still serve requests correctly.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fuse_blk::proto::abi::{opcode, InHeader, InitOut, OutHeader};
use fuse_blk::Geometry;
use fuse_blk_kmod::uapi::{
    self, UringCmd, URING_COMMIT_AND_FETCH, URING_FETCH, URING_F_DATA_ADDR, URING_F_DATA_IOVEC,
    URING_HEADER_SIZE,
};
use fuse_blk_kmod::{attach_fd, Control, KmodOptions};
use io_uring::{opcode as op, squeue, types, IoUring};
use zerocopy::{FromBytes, IntoBytes};

use super::{expect_refused, read_message, reply_bytes, write_reply};

const DEPTH: u16 = 4;
const MAX_IO: usize = 1 << 20;

/// A ring on one channel with `DEPTH` entries' buffers.
struct Probe {
    ring: IoUring,
    channel: File,
    headers: Vec<u8>,
    payloads: Vec<u8>,
    iovecs: Vec<[libc::iovec; 2]>,
    /// A FETCH that completed early carrying a request: handed out by the
    /// next `request`, while other steps wait for their own completions.
    early: Option<(u64, i32)>,
}

/// Waits at most `tick` for a completion on `ring`, submitting what is
/// queued; a wait that times out or is interrupted is no error.
pub(crate) fn wait_for_completion(ring: &IoUring, tick: Duration) -> io::Result<()> {
    let ts = types::Timespec::from(tick);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Err(e)
            if e.raw_os_error() != Some(libc::ETIME) && e.raw_os_error() != Some(libc::EINTR) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// Header and payload buffers for `depth` ring entries, and the pair of
/// iovecs naming each entry's two, as a FETCH takes them (the buffers'
/// memory stays where it is when the vectors move).
pub(crate) fn entry_buffers(
    depth: usize,
    max_io: usize,
) -> (Vec<u8>, Vec<u8>, Vec<[libc::iovec; 2]>) {
    let mut headers = vec![0u8; depth * URING_HEADER_SIZE];
    let mut payloads = vec![0u8; depth * max_io];
    let iovecs = (0..depth)
        .map(|i| {
            [
                libc::iovec {
                    iov_base: headers[i * URING_HEADER_SIZE..].as_mut_ptr().cast(),
                    iov_len: URING_HEADER_SIZE,
                },
                libc::iovec {
                    iov_base: payloads[i * max_io..].as_mut_ptr().cast(),
                    iov_len: max_io,
                },
            ]
        })
        .collect();
    (headers, payloads, iovecs)
}

impl Probe {
    fn new(channel: File) -> io::Result<Probe> {
        let (headers, payloads, iovecs) = entry_buffers(usize::from(DEPTH), MAX_IO);
        Ok(Probe {
            ring: IoUring::new(16)?,
            channel,
            headers,
            payloads,
            iovecs,
            early: None,
        })
    }

    fn sqe(&self, cmd_op: u32, cmd: UringCmd, addr: Option<u64>) -> squeue::Entry {
        op::UringCmd16::new(types::Fd(self.channel.as_raw_fd()), cmd_op)
            .cmd(cmd.to_bytes())
            .addr(addr)
            .build()
            .user_data(u64::from(cmd.entry))
    }

    fn fetch(&self, entry: u16) -> squeue::Entry {
        let iov = self.iovecs[usize::from(entry)].as_ptr() as u64;
        self.sqe(
            URING_FETCH,
            UringCmd {
                entry,
                ..UringCmd::default()
            },
            Some(iov),
        )
    }

    fn commit(&self, entry: u16) -> squeue::Entry {
        self.commit_with(entry, 0, 0, 0)
    }

    /// A COMMIT_AND_FETCH with `flags`, `data_segs` and `data_addr` as
    /// given.
    fn commit_with(&self, entry: u16, flags: u16, data_segs: u32, data_addr: u64) -> squeue::Entry {
        self.sqe(
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

    fn submit(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: the SQE points at this probe's iovecs and buffers, which
        // outlive the ring (fields drop in declaration order: ring first).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        self.ring.submit()?;
        Ok(())
    }

    /// The next completion, within `timeout`.
    fn complete(&mut self, timeout: Duration) -> io::Result<Option<(u64, i32)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                return Ok(Some((cqe.user_data(), cqe.result())));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            wait_for_completion(&self.ring, Duration::from_millis(50))?;
        }
    }

    /// Submits `sqe` and checks that it completes at once with `-errno`.
    fn expect_result(&mut self, what: &str, sqe: squeue::Entry, errno: i32) -> io::Result<()> {
        self.submit(sqe)?;
        match self.complete(Duration::from_secs(5))? {
            Some((_, result)) if result == -errno => {
                println!("refused as expected: {what} (errno {errno})");
                Ok(())
            }
            other => Err(io::Error::other(format!(
                "{what}: expected -{errno}, got {other:?}"
            ))),
        }
    }

    /// Submits `sqe` and checks that the driver holds it.
    fn expect_held(&mut self, what: &str, sqe: squeue::Entry) -> io::Result<()> {
        self.submit(sqe)?;
        match self.complete(Duration::from_millis(300))? {
            None => Ok(()),
            Some(cqe) => Err(io::Error::other(format!(
                "{what}: completed at once: {cqe:?}"
            ))),
        }
    }

    /// Waits for a request in some entry; returns the entry and its header.
    fn request(&mut self) -> io::Result<(u16, InHeader)> {
        let completion = match self.early.take() {
            Some(early) => Some(early),
            None => self.complete(Duration::from_secs(20))?,
        };
        match completion {
            Some((entry, 0)) => {
                let at = entry as usize * URING_HEADER_SIZE;
                let header = InHeader::read_from_prefix(&self.headers[at..]).unwrap().0;
                Ok((entry as u16, header))
            }
            other => Err(io::Error::other(format!(
                "expected a request, got {other:?}"
            ))),
        }
    }

    /// Writes a reply into `entry`'s buffers: header (with `len` claimed),
    /// then `payload` into the payload buffer.
    fn write_reply(
        &mut self,
        entry: u16,
        unique: u64,
        error: i32,
        payload: &[u8],
        len: Option<u32>,
    ) {
        let header = OutHeader {
            len: len.unwrap_or((16 + payload.len()) as u32),
            error,
            unique,
        };
        let at = usize::from(entry) * URING_HEADER_SIZE;
        self.headers[at..at + 16].copy_from_slice(header.as_bytes());
        let at = usize::from(entry) * MAX_IO;
        self.payloads[at..at + payload.len()].copy_from_slice(payload);
    }

    /// Answers READs with zeros (through their entries) until `reader` is
    /// done; fails on anything else.
    fn serve_zeros_until(&mut self, reader: &mut Child) -> io::Result<()> {
        self.serve_reads_until(reader, ReadAnswer::Zeros)
    }

    /// Answers READs until `reader` is done as `answer` says; fails on
    /// anything else.
    fn serve_reads_until(&mut self, reader: &mut Child, answer: ReadAnswer) -> io::Result<()> {
        loop {
            if let Some(status) = reader.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!("reader failed: {status}")))
                };
            }
            let Some((entry, result)) = self.complete(Duration::from_millis(100))? else {
                continue;
            };
            if result != 0 {
                return Err(io::Error::other(format!(
                    "entry {entry} ended with {result}"
                )));
            }
            let at = entry as usize * URING_HEADER_SIZE;
            let (header, body) = InHeader::read_from_prefix(&self.headers[at..]).unwrap();
            if header.opcode != opcode::READ {
                return Err(io::Error::other(format!(
                    "unexpected opcode {}",
                    header.opcode
                )));
            }
            let size = u32::from_ne_bytes(body[16..20].try_into().unwrap()) as usize;
            let commit = match answer {
                ReadAnswer::Zeros => {
                    self.write_reply(entry as u16, header.unique, 0, &vec![0; size], None);
                    self.commit(entry as u16)
                }
                ReadAnswer::At(data) => {
                    self.write_reply(entry as u16, header.unique, 0, &[], Some(16 + size as u32));
                    self.commit_with(entry as u16, URING_F_DATA_ADDR, 0, data.as_ptr() as u64)
                }
                ReadAnswer::Gathered(iovecs) => {
                    self.write_reply(entry as u16, header.unique, 0, &[], Some(16 + size as u32));
                    self.commit_with(
                        entry as u16,
                        URING_F_DATA_IOVEC,
                        iovecs.len() as u32,
                        iovecs.as_ptr() as u64,
                    )
                }
            };
            self.submit(commit)?;
        }
    }
}

/// How [`Probe::serve_reads_until`] answers READs.
#[derive(Clone, Copy)]
enum ReadAnswer<'a> {
    /// Zeros, from the entry's payload buffer.
    Zeros,
    /// The first bytes at this address (`URING_F_DATA_ADDR`).
    At(&'a [u8]),
    /// The first bytes gathered from these iovecs (`URING_F_DATA_IOVEC`).
    Gathered(&'a [libc::iovec]),
}

/// Serves one [`reader`] with `answer` and checks it read `expected`.
fn expect_block(
    probe: &mut Probe,
    mut dd: Child,
    answer: ReadAnswer,
    expected: &[u8],
    what: &str,
) -> io::Result<()> {
    probe.serve_reads_until(&mut dd, answer)?;
    let mut got = Vec::new();
    io::Read::read_to_end(&mut dd.stdout.take().expect("piped"), &mut got)?;
    if got != expected {
        return Err(io::Error::other(format!(
            "READ data {what}: got {} bytes, not what was sent",
            got.len()
        )));
    }
    println!("READ data taken {what}");
    Ok(())
}

/// A 4 KiB direct read of block `block` of `device`, to a pipe.
fn reader(device: &str, block: u64) -> io::Result<Child> {
    Command::new("dd")
        .args([
            format!("if={device}"),
            "bs=4096".into(),
            "count=1".into(),
            format!("skip={block}"),
            "iflag=direct".into(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
}

fn channel(id: u32, takeover: bool) -> io::Result<File> {
    Ok(File::from(attach_fd(id, 0, takeover)?))
}

/// Answers FUSE_INIT on a fresh channel over read/write.
fn answer_init(channel: &File) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_IO + 4096];
    let (init, _) = read_message(channel, &mut buf)?;
    if init.opcode != opcode::INIT {
        return Err(io::Error::other(format!(
            "first message is opcode {}",
            init.opcode
        )));
    }
    let out = InitOut {
        major: 7,
        minor: 31,
        max_write: MAX_IO as u32,
        ..InitOut::default()
    };
    match write_reply(channel, &reply_bytes(init.unique, 0, out.as_bytes(), None)) {
        None => Ok(()),
        Some(errno) => Err(io::Error::other(format!("INIT refused: {errno}"))),
    }
}

pub fn run() -> io::Result<()> {
    let control = Control::open()?;
    let wanted = uapi::F_URING | uapi::F_URING_DATA_ADDR | uapi::F_URING_DATA_IOVEC;
    if control.features()?.features & wanted != wanted {
        return Err(io::Error::other(
            "the module does not offer io_uring channels with data addresses and iovecs",
        ));
    }
    let params = control.create(&fuse_blk_kmod::params_for(
        &Geometry::new(8 << 20, 512),
        &KmodOptions {
            name: "ring-garbage".into(),
            queues: 1,
            queue_depth: DEPTH,
            io_timeout_ms: 60_000,
            recovery_timeout_ms: Some(60_000),
            ..KmodOptions::default()
        },
    ))?;
    let id = params.dev_id;
    let result = misbehave(id);
    control.destroy(id).ok();
    result
}

fn misbehave(id: u32) -> io::Result<()> {
    let device = format!("/dev/fuseblk{id}");

    // A control fd (not attached) is no channel.
    let mut control_probe = Probe::new(
        File::options()
            .read(true)
            .write(true)
            .open("/dev/fuse-blk")?,
    )?;
    let fetch = control_probe.fetch(0);
    control_probe.expect_result("command on a control fd", fetch, libc::EINVAL)?;

    let mut probe = Probe::new(channel(id, false)?)?;
    let fetch = probe.fetch(0);
    probe.expect_result("FETCH before FUSE_INIT", fetch, libc::EPROTO)?;
    answer_init(&probe.channel)?;

    let bad = [
        (
            "entry past the queue depth",
            UringCmd {
                entry: DEPTH,
                ..UringCmd::default()
            },
        ),
        (
            "flags",
            UringCmd {
                flags: 1,
                ..UringCmd::default()
            },
        ),
        (
            "data_segs",
            UringCmd {
                data_segs: 1,
                ..UringCmd::default()
            },
        ),
        (
            "iovecs on a FETCH",
            UringCmd {
                flags: URING_F_DATA_IOVEC,
                data_segs: 1,
                data_addr: 1 << 40,
                ..UringCmd::default()
            },
        ),
        (
            "data_addr without its flag",
            UringCmd {
                data_addr: 1 << 40,
                ..UringCmd::default()
            },
        ),
        (
            "a data address on a FETCH",
            UringCmd {
                flags: URING_F_DATA_ADDR,
                data_addr: 1 << 40,
                ..UringCmd::default()
            },
        ),
    ];
    for (what, cmd) in bad {
        let sqe = probe.sqe(URING_FETCH, cmd, Some(probe.iovecs[0].as_ptr() as u64));
        probe.expect_result(what, sqe, libc::EINVAL)?;
    }
    let sqe = probe.sqe(URING_FETCH + 7, UringCmd::default(), None);
    probe.expect_result("unknown command", sqe, libc::EINVAL)?;
    let sqe = probe.sqe(URING_FETCH, UringCmd::default(), Some(8));
    probe.expect_result("iovec at a bad address", sqe, libc::EFAULT)?;
    let mut small = probe.iovecs[0];
    small[0].iov_len = URING_HEADER_SIZE - 1;
    let sqe = probe.sqe(
        URING_FETCH,
        UringCmd::default(),
        Some(small.as_ptr() as u64),
    );
    probe.expect_result("header buffer too small", sqe, libc::EINVAL)?;
    let mut small = probe.iovecs[0];
    small[1].iov_len = MAX_IO - 4096;
    let sqe = probe.sqe(
        URING_FETCH,
        UringCmd::default(),
        Some(small.as_ptr() as u64),
    );
    probe.expect_result("payload buffer too small", sqe, libc::EINVAL)?;
    let bad_buffers = [
        libc::iovec {
            iov_base: usize::MAX as *mut _,
            iov_len: URING_HEADER_SIZE,
        },
        probe.iovecs[0][1],
    ];
    let sqe = probe.sqe(
        URING_FETCH,
        UringCmd::default(),
        Some(bad_buffers.as_ptr() as u64),
    );
    probe.expect_result("header buffer outside user memory", sqe, libc::EFAULT)?;
    let commit = probe.commit(1);
    probe.expect_result("COMMIT of an entry never fetched", commit, libc::EINVAL)?;

    // The driver holds the FETCH, unless a request (the partition scan's)
    // was already waiting: then it completes at once carrying it, and the
    // READ below is that one.
    let fetch = probe.fetch(0);
    probe.submit(fetch)?;
    match probe.complete(Duration::from_millis(300))? {
        None => println!("FETCH held"),
        Some((0, 0)) => {
            println!("FETCH completed at once with a waiting request");
            probe.early = Some((0, 0));
        }
        Some(cqe) => return Err(io::Error::other(format!("FETCH: completed with {cqe:?}"))),
    }
    let fetch = probe.fetch(0);
    probe.expect_result("FETCH of a registered entry", fetch, libc::EBUSY)?;

    // A request in entry 0: bad replies are refused, the entry keeps it.
    // (The first reads may be the partition scan's; any READ will do.)
    let mut dd = reader(&device, 0)?;
    let (entry, read) = probe.request()?;
    if entry != 0 || read.opcode != opcode::READ {
        return Err(io::Error::other(format!(
            "expected a READ in entry 0, got {read:?} in {entry}"
        )));
    }
    let at = usize::from(entry) * URING_HEADER_SIZE + 40;
    let size = u32::from_ne_bytes(probe.headers[at + 16..at + 20].try_into().unwrap()) as usize;
    let replies: [(&str, u64, i32, usize, Option<u32>); 6] = [
        (
            "reply naming another request",
            read.unique ^ (1 << 40),
            0,
            size,
            None,
        ),
        ("short read data", read.unique, 0, size - 512, None),
        (
            "read data past max_io",
            read.unique,
            0,
            size,
            Some((16 + MAX_IO + 4096) as u32),
        ),
        ("error with data", read.unique, -libc::EIO, 4, None),
        ("positive error", read.unique, 5, 0, None),
        ("length below the header", read.unique, 0, 0, Some(8)),
    ];
    for (what, unique, error, len, claimed) in replies {
        probe.write_reply(entry, unique, error, &vec![0; len], claimed);
        let commit = probe.commit(entry);
        probe.expect_result(what, commit, libc::EINVAL)?;
    }
    // Commits naming where the READ data is, wrongly.
    probe.write_reply(entry, read.unique, 0, &[], Some(16 + size as u32));
    let pattern: Vec<u8> = (0..MAX_IO).map(|i| (i % 251) as u8).collect();
    let zeros = vec![0u8; MAX_IO];
    let iovec = |data: &[u8], len: usize| libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: len,
    };
    let short = [iovec(&pattern, size / 2), iovec(&zeros, size / 2 - 1)];
    let outside = [
        iovec(&pattern, 512),
        libc::iovec {
            iov_base: (u64::MAX - 4095) as *mut _,
            iov_len: 4096,
        },
    ];
    let whole = [iovec(&pattern, size)];
    let bad_commits = [
        (
            "unknown commit flag",
            1 << 2,
            0,
            pattern.as_ptr() as u64,
            libc::EINVAL,
        ),
        (
            "data_addr without its flag on a COMMIT",
            0,
            0,
            pattern.as_ptr() as u64,
            libc::EINVAL,
        ),
        ("NULL data_addr", URING_F_DATA_ADDR, 0, 0, libc::EINVAL),
        (
            "READ data at an unmapped address",
            URING_F_DATA_ADDR,
            0,
            8,
            libc::EFAULT,
        ),
        (
            "READ data outside user memory",
            URING_F_DATA_ADDR,
            0,
            u64::MAX - 4095,
            libc::EFAULT,
        ),
        (
            "both ways of naming READ data",
            URING_F_DATA_ADDR | URING_F_DATA_IOVEC,
            1,
            whole.as_ptr() as u64,
            libc::EINVAL,
        ),
        (
            "data_segs with a data address",
            URING_F_DATA_ADDR,
            1,
            pattern.as_ptr() as u64,
            libc::EINVAL,
        ),
        (
            "iovecs without a count",
            URING_F_DATA_IOVEC,
            0,
            whole.as_ptr() as u64,
            libc::EINVAL,
        ),
        ("NULL iovecs", URING_F_DATA_IOVEC, 1, 0, libc::EINVAL),
        (
            "more iovecs than UIO_MAXIOV",
            URING_F_DATA_IOVEC,
            1025,
            whole.as_ptr() as u64,
            libc::EINVAL,
        ),
        (
            "iovecs at an unmapped address",
            URING_F_DATA_IOVEC,
            1,
            8,
            libc::EFAULT,
        ),
        (
            "an iovec outside user memory",
            URING_F_DATA_IOVEC,
            2,
            outside.as_ptr() as u64,
            libc::EFAULT,
        ),
        (
            "iovecs one byte short of the READ data",
            URING_F_DATA_IOVEC,
            2,
            short.as_ptr() as u64,
            libc::EINVAL,
        ),
    ];
    for (what, flags, segs, addr, errno) in bad_commits {
        let commit = probe.commit_with(entry, flags, segs, addr);
        probe.expect_result(what, commit, errno)?;
    }
    // Now properly: the reader and the partition scan get zeros.
    probe.write_reply(entry, read.unique, 0, &vec![0; size], None);
    let commit = probe.commit(entry);
    probe.submit(commit)?;
    probe.serve_zeros_until(&mut dd)?;
    println!("device usable after bad commands");

    // A commit that names where its READ data is: the reader gets that.
    let dd = reader(&device, 5)?;
    expect_block(
        &mut probe,
        dd,
        ReadAnswer::At(&pattern),
        &pattern[..4096],
        "from the address a commit names",
    )?;

    // Gathered from more iovecs than the driver keeps on its stack (8),
    // pieces of the pattern between zeros, and more than the READ needs.
    let pieces: Vec<libc::iovec> = (0..12)
        .map(|i| {
            if i % 2 == 0 {
                iovec(&pattern[i * 400..], 400)
            } else {
                iovec(&zeros, 400)
            }
        })
        .collect();
    let expected: Vec<u8> = (0..12)
        .flat_map(|i| {
            if i % 2 == 0 {
                pattern[i * 400..i * 400 + 400].to_vec()
            } else {
                vec![0; 400]
            }
        })
        .take(4096)
        .collect();
    let dd = reader(&device, 6)?;
    expect_block(
        &mut probe,
        dd,
        ReadAnswer::Gathered(&pieces),
        &expected,
        "from the iovecs a commit names",
    )?;

    // The ring goes away while the driver holds a command: the command is
    // cancelled and the entry can be fetched again, on a ring that lives on
    // a thread of its own, whose exit cancels its commands before join
    // returns. Then read(2) on the same channel still serves.
    drop(std::mem::replace(&mut probe.ring, IoUring::new(16)?));
    let clone = probe.channel.try_clone()?;
    std::thread::spawn(move || -> io::Result<()> {
        let mut short_lived = Probe::new(clone)?;
        let mut tries = 0;
        loop {
            let fetch = short_lived.fetch(0);
            short_lived.submit(fetch)?;
            match short_lived.complete(Duration::from_millis(300))? {
                None => break,
                Some((_, result)) if result == -libc::EBUSY && tries < 100 => tries += 1,
                other => {
                    return Err(io::Error::other(format!(
                        "entry not freed with its ring: {other:?}"
                    )))
                }
            }
        }
        // The buffers must outlive the command, which ends with the thread;
        // the descriptor must not outlive it (it would keep the channel).
        let Probe {
            ring,
            channel,
            headers,
            payloads,
            iovecs,
            early: _,
        } = short_lived;
        std::mem::forget((headers, payloads, iovecs));
        drop(channel);
        drop(ring);
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("ring thread panicked"))??;
    println!("ring entries freed when their ring goes away");
    let mut dd = reader(&device, 1)?;
    let mut buf = vec![0u8; MAX_IO + 4096];
    loop {
        let (header, _) = read_message(&probe.channel, &mut buf)?;
        if header.opcode != opcode::READ {
            return Err(io::Error::other(format!(
                "after the ring: opcode {}",
                header.opcode
            )));
        }
        if let Some(errno) = write_reply(
            &probe.channel,
            &reply_bytes(header.unique, 0, &vec![0; 4096], None),
        ) {
            return Err(io::Error::other(format!(
                "read/write reply refused: {errno}"
            )));
        }
        if dd.try_wait()?.is_some() || {
            std::thread::sleep(Duration::from_millis(50));
            dd.try_wait()?.is_some()
        } {
            break;
        }
    }
    if !dd.wait()?.success() {
        return Err(io::Error::other("reader failed after the ring went away"));
    }
    println!("channel usable after its ring went away");

    // A request sits in an entry when the daemon (ring and channel) goes:
    // it is reissued to the next daemon.
    let fetch = probe.fetch(0);
    probe.expect_held("FETCH on a new ring", fetch)?;
    let mut dd = reader(&device, 2)?;
    let (_, held) = probe.request()?;
    drop(probe);
    // The old channel is released once its ring has wound down: take over.
    let mut probe = Probe::new(channel(id, true)?)?;
    answer_init(&probe.channel)?;
    for entry in 0..DEPTH {
        let fetch = probe.fetch(entry);
        probe.submit(fetch)?;
    }
    let (entry, again) = probe.request()?;
    if again.unique & 0xffff_ffff != held.unique & 0xffff_ffff || again.opcode != opcode::READ {
        return Err(io::Error::other(format!(
            "expected the held READ again, got {again:?}"
        )));
    }
    let at = usize::from(entry) * URING_HEADER_SIZE + 40;
    let size = u32::from_ne_bytes(probe.headers[at + 16..at + 20].try_into().unwrap()) as usize;
    probe.write_reply(entry, again.unique, 0, &vec![0; size], None);
    let commit = probe.commit(entry);
    probe.submit(commit)?;
    probe.serve_zeros_until(&mut dd)?;
    println!("request held in a ring entry reissued to the next daemon");

    // Destroyed under waiting entries: each ends with ENODEV.
    Control::open()?.destroy(id)?;
    for _ in 0..DEPTH {
        match probe.complete(Duration::from_secs(5))? {
            Some((_, result)) if result == -libc::ENODEV => {}
            other => return Err(io::Error::other(format!("after destroy: {other:?}"))),
        }
    }
    println!("waiting entries end with ENODEV on destroy");
    // Committing after the end is refused; reads say FUSE_DESTROY.
    let fetch = probe.fetch(0);
    probe.expect_result("FETCH after destroy", fetch, libc::ENODEV)?;
    expect_refused(
        "reply after destroy",
        &probe.channel,
        &reply_bytes(2, 0, &[], None),
        &[libc::ENODEV, libc::ENOENT],
    )?;
    Ok(())
}
