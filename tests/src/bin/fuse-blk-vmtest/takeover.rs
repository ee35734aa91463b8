//! Channel-level checks of takeovers and reply lookup, driven message by
//! message so that each race the driver must settle happens in a known
//! order:
//!
//! - two takeovers of one queue: the later attach answers INIT first, so
//!   the earlier one, retired before its INIT reply, must be refused
//!   (ESTALE) and must not take the queue back; the winner gets the next
//!   request;
//! - a read with RWF_NOWAIT on a channel with nothing to read returns
//!   EAGAIN instead of sleeping;
//! - a reply naming a request that ended before the queue's I/O scheduler
//!   was switched (which frees the scheduler's requests) is refused without
//!   the driver looking at a freed request (a KASAN kernel reports it if it
//!   does).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fuse_blk::proto::abi::{self, opcode, InHeader, InitOut};
use fuse_blk_kmod::attach_fd;

use super::{expect_refused, read_message, reply_bytes, write_reply};

/// Room for the largest message of a 1 MiB device.
const BUF_LEN: usize = (2 << 20) + 4096;

pub fn run() -> io::Result<()> {
    super::with_raw_device("takeover", checks)
}

fn checks(id: u32) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    let first = channel(id, false)?;
    answer_init(&first, &mut buf)?;

    // Two takeovers: `late` attaches after `early` but answers INIT first.
    let early = channel(id, true)?;
    let late = channel(id, true)?;
    let early_init = read_init(&early, &mut buf)?;
    let late_init = read_init(&late, &mut buf)?;
    if let Some(errno) = write_reply(&late, &reply_bytes(late_init, 0, &good_init(), None)) {
        return Err(io::Error::other(format!(
            "the later takeover's INIT refused: {errno}"
        )));
    }
    expect_refused(
        "INIT of a takeover retired by a later one",
        &early,
        &reply_bytes(early_init, 0, &good_init(), None),
        &[libc::ESTALE],
    )?;
    for (name, retired) in [("first", &first), ("early", &early)] {
        let (header, _) = read_message(retired, &mut buf)?;
        if header.opcode != opcode::DESTROY {
            return Err(io::Error::other(format!(
                "the {name} channel read opcode {} instead of DESTROY",
                header.opcode
            )));
        }
    }
    println!("takeover: the later attach keeps the queue");

    // The winner serves: a reader's request reaches `late`.
    serve_reader(&late, &mut buf, &mut reader(id)?)?;
    println!("takeover: the winner serves the next request");

    drain(&late, &mut buf)?;
    nowait_read(&late)?;
    stale_reply_after_elevator_switch(id, &late, &mut buf)
}

fn channel(id: u32, takeover: bool) -> io::Result<File> {
    Ok(File::from(attach_fd(id, 0, takeover)?))
}

fn good_init() -> Vec<u8> {
    let init = InitOut {
        major: 7,
        minor: 31,
        max_write: 1 << 20,
        ..InitOut::default()
    };
    zerocopy::IntoBytes::as_bytes(&init).to_vec()
}

/// Reads a channel's INIT and returns its unique.
fn read_init(channel: &File, buf: &mut [u8]) -> io::Result<u64> {
    let (header, _) = read_message(channel, buf)?;
    if header.opcode != opcode::INIT {
        return Err(io::Error::other(format!(
            "first message is opcode {}",
            header.opcode
        )));
    }
    Ok(header.unique)
}

fn answer_init(channel: &File, buf: &mut [u8]) -> io::Result<()> {
    let unique = read_init(channel, buf)?;
    match write_reply(channel, &reply_bytes(unique, 0, &good_init(), None)) {
        None => Ok(()),
        Some(errno) => Err(io::Error::other(format!("INIT refused: {errno}"))),
    }
}

/// `dd` reading the device's first 4 KiB directly.
fn reader(id: u32) -> io::Result<Child> {
    Command::new("dd")
        .args([
            format!("if=/dev/fuseblk{id}"),
            "of=/dev/null".into(),
            "bs=4096".into(),
            "count=1".into(),
            "iflag=direct".into(),
        ])
        .stderr(Stdio::null())
        .spawn()
}

/// Answers READs with zeros until `reader` exits. Returns the unique of
/// the first request answered.
pub(crate) fn serve_reader(channel: &File, buf: &mut [u8], reader: &mut Child) -> io::Result<u64> {
    serve_until(channel, buf, || match reader.try_wait()? {
        None => Ok(false),
        Some(status) if status.success() => Ok(true),
        Some(status) => Err(io::Error::other(format!("reader failed: {status}"))),
    })
}

/// Switches the queue's I/O scheduler, answering READs meanwhile: the
/// switch freezes the queue, which waits for every request (the partition
/// scan's, udev's probes) to end.
fn switch_scheduler(id: u32, scheduler: &str, channel: &File, buf: &mut [u8]) -> io::Result<()> {
    let path = format!("/sys/block/fuseblk{id}/queue/scheduler");
    let scheduler = scheduler.to_owned();
    let switch = std::thread::spawn(move || std::fs::write(path, scheduler));
    serve_until(channel, buf, || Ok(switch.is_finished()))?;
    switch
        .join()
        .map_err(|_| io::Error::other("the scheduler switch panicked"))?
}

/// Answers READs with zeros until `done` says so (the partition scan and
/// udev may send some too); fails if nothing comes for 10 s before then.
/// Returns the unique of the first request answered (0 if none).
fn serve_until(
    channel: &File,
    buf: &mut [u8],
    mut done: impl FnMut() -> io::Result<bool>,
) -> io::Result<u64> {
    let mut first = 0;
    let mut idle = Duration::ZERO;
    loop {
        if done()? {
            return Ok(first);
        }
        let mut fds = [nix::poll::PollFd::new(
            channel.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, 100u16).map_err(io::Error::from)? == 0 {
            idle += Duration::from_millis(100);
            if idle > Duration::from_secs(10) {
                return Err(io::Error::other("no request reached the channel"));
            }
            continue;
        }
        let (request, body) = read_message(channel, buf)?;
        answer_read(channel, &request, &body)?;
        if first == 0 {
            first = request.unique;
        }
    }
}

/// Answers READ `request` (its `body`) with zeros; any other request is an
/// error. Returns the READ's offset and size.
fn answer_read(channel: &File, request: &InHeader, body: &[u8]) -> io::Result<(u64, u32)> {
    if request.opcode != opcode::READ {
        return Err(io::Error::other(format!(
            "unexpected opcode {}",
            request.opcode
        )));
    }
    let read_in = <abi::ReadIn as zerocopy::FromBytes>::read_from_prefix(body)
        .map_err(|_| io::Error::other("short READ"))?
        .0;
    let zeros = vec![0; read_in.size as usize];
    if let Some(errno) = write_reply(channel, &reply_bytes(request.unique, 0, &zeros, None)) {
        return Err(io::Error::other(format!(
            "valid READ reply refused: {errno}"
        )));
    }
    Ok((read_in.offset, read_in.size))
}

/// Answers what is still queued on `channel` until nothing has come for
/// 300 ms: READs after the reader's own (seen after the systemd case,
/// from something probing the new device), which the RWF_NOWAIT check
/// would otherwise read.
fn drain(channel: &File, buf: &mut [u8]) -> io::Result<()> {
    loop {
        let mut fds = [nix::poll::PollFd::new(
            channel.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, 300u16).map_err(io::Error::from)? == 0 {
            return Ok(());
        }
        let (request, body) = read_message(channel, buf)?;
        let (offset, size) = answer_read(channel, &request, &body)?;
        println!("takeover: answered a later READ of {size} bytes at {offset}");
    }
}

/// preadv2(RWF_NOWAIT) with nothing queued must not sleep. The read runs
/// on a thread of its own so that a driver that sleeps fails the check
/// instead of hanging it (destroying the device ends that read later).
fn nowait_read(channel: &File) -> io::Result<()> {
    let reader = channel.try_clone()?;
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; BUF_LEN];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec naming `buf`, which outlives the call; offset
        // -1 reads at the file position, as read(2) does (nix 0.30 has no
        // preadv2).
        let got = unsafe { libc::preadv2(reader.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        let _ = done.send(nix::errno::Errno::result(got).map(drop));
    });
    match result.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(nix::errno::Errno::EAGAIN)) => {
            println!("refused as expected: RWF_NOWAIT read with nothing queued (EAGAIN)");
            Ok(())
        }
        Ok(other) => Err(io::Error::other(format!(
            "RWF_NOWAIT read with nothing queued: {other:?}"
        ))),
        Err(_) => Err(io::Error::other(
            "RWF_NOWAIT read with nothing queued slept",
        )),
    }
}

/// A request served under mq-deadline, the scheduler switched away (its
/// requests freed), then a reply with that request's unique.
fn stale_reply_after_elevator_switch(id: u32, channel: &File, buf: &mut [u8]) -> io::Result<()> {
    let schedulers = std::fs::read_to_string(format!("/sys/block/fuseblk{id}/queue/scheduler"))?;
    if !schedulers.contains("mq-deadline") {
        println!("SKIP: stale reply after an elevator switch: no mq-deadline ({schedulers:?})");
        return Ok(());
    }
    switch_scheduler(id, "mq-deadline", channel, buf)?;
    let served = serve_reader(channel, buf, &mut reader(id)?)?;
    switch_scheduler(id, "none", channel, buf)?;
    let zeros = vec![0; 4096];
    expect_refused(
        "reply to a request ended before an elevator switch",
        channel,
        &reply_bytes(served, 0, &zeros, None),
        &[libc::ENOENT],
    )
}
