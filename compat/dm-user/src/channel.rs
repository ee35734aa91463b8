//! The other direction: a fuse-blk handler as a dm-user daemon. Each
//! descriptor open on a dm-user node (`/dev/dm-user/NAME`, made by the real
//! target or by this crate's bridge) is a fuse-blk [`Channel`]: a message
//! read from it is handed to the session engine as the FUSE request the
//! kernel would have sent for the same block request, and the engine's
//! reply goes back as the message's answer. So a handler written once runs
//! on the module, on the stock path, and behind dm-user, with the engine's
//! checks (bounds, alignment, read-only) on every path.
//!
//! | dm-user message               | FUSE request to the engine         |
//! |-------------------------------|------------------------------------|
//! | READ                          | FUSE_READ                          |
//! | WRITE (FUA flag)              | FUSE_WRITE (`O_DSYNC`)             |
//! | FLUSH                         | FUSE_FSYNC                         |
//! | DISCARD                       | FUSE_FALLOCATE, PUNCH_HOLE         |
//! | WRITE_ZEROES                  | FUSE_FALLOCATE, ZERO_RANGE         |
//! | anything else                 | answered UNSUPPORTED here          |
//!
//! The message is read into the request buffer behind the room for the
//! FUSE headers, so a WRITE's data is not copied again; the headers are
//! then written in front of it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_blk::proto::abi::{
    falloc, opcode, FallocateIn, FsyncIn, InHeader, OutHeader, ReadIn, WriteIn,
};
use fuse_blk::{BlockDevice, Channel, ReplySink, Session, SessionConfig, Stop};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use zerocopy::{FromBytes, IntoBytes};

use crate::wire::{answer, kind, Header, HEADER_LEN};
use crate::SECTOR;

const IN_HEADER: usize = std::mem::size_of::<InHeader>();
const WRITE_IN: usize = std::mem::size_of::<WriteIn>();
/// Where a message is read to: its data then sits where FUSE_WRITE's does.
const MESSAGE_AT: usize = IN_HEADER + WRITE_IN - HEADER_LEN;

/// A message handed to the engine and not yet answered.
struct Pending {
    header: Header,
}

/// One descriptor of a dm-user node, as a fuse-blk channel.
pub struct DmUserChannel {
    node: File,
    pending: Mutex<HashMap<u64, Pending>>,
    next_unique: Arc<AtomicU64>,
    /// The thread in read(2) of the node, if one is: [`Stopper::stop`]
    /// wakes it with a signal, since dm-user's target has no poll and a
    /// read there blocks until a message comes.
    reader: Mutex<Option<Pthread>>,
}

impl DmUserChannel {
    /// A channel on `node`, an open descriptor of a dm-user node. Channels
    /// of one node share `uniques`, so that a FUSE unique names one message.
    pub fn new(node: File, uniques: Arc<AtomicU64>) -> DmUserChannel {
        DmUserChannel {
            node,
            pending: Mutex::new(HashMap::new()),
            next_unique: uniques,
            reader: Mutex::new(None),
        }
    }

    /// One read(2) of the node, during which [`DmUserChannel::wake_reader`]
    /// can interrupt it.
    fn read_node(&self, buf: &mut [u8]) -> io::Result<usize> {
        *self.reader.lock() = Some(pthread_self());
        let read = (&self.node).read(buf);
        *self.reader.lock() = None;
        read
    }

    /// Sends `signal` to the thread in read(2) of the node, if one is; a
    /// handler installed without SA_RESTART makes the read fail with EINTR
    /// (on the bridge through FUSE_INTERRUPT). Sent under the lock the
    /// reader clears after its read, so it reaches no other call.
    fn wake_reader(&self, signal: Signal) {
        if let Some(thread) = *self.reader.lock() {
            let _ = pthread_kill(thread, signal);
        }
    }

    /// Reads the next whole message into `buf[MESSAGE_AT..]`: the header,
    /// then a WRITE's data. The first read asks for all the room there is,
    /// since a read of a dm-user node never returns more than one message;
    /// a message that comes in pieces is read on to its end. `None` once
    /// the target is gone (ENOTBLK) or the node was closed.
    fn read_message(&self, buf: &mut [u8]) -> io::Result<Option<Header>> {
        let room = &mut buf[MESSAGE_AT..];
        let mut have = 0;
        loop {
            let wanted = match Header::parse(&room[..have]) {
                None => room.len(),
                Some(header) if header.carries_data_to_daemon() => {
                    HEADER_LEN.saturating_add(header.len as usize)
                }
                Some(_) => HEADER_LEN,
            };
            if have > wanted {
                return Err(io::Error::other(format!(
                    "dm-user node returned {have} bytes for a message of {wanted}"
                )));
            }
            if have == wanted {
                return Ok(Header::parse(&room[..have]));
            }
            if wanted > room.len() {
                // Never sent by a target that was told the largest request
                // (max_write): read the rest to keep the stream in step.
                let header = Header::parse(&room[..have]).expect("parsed above");
                log::error!(
                    "dm-user WRITE of {} bytes is larger than the buffer ({} bytes)",
                    header.len,
                    room.len() - HEADER_LEN
                );
                self.discard_data(wanted - have)?;
                self.answer(&header, answer::ERROR, &[])?;
                have = 0;
                continue;
            }
            match self.read_node(&mut room[have..wanted]) {
                Ok(0) => return Ok(None),
                Ok(n) => have += n,
                Err(e) if e.raw_os_error() == Some(libc::ENOTBLK) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted && have > 0 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn discard_data(&self, mut left: usize) -> io::Result<()> {
        let mut node = &self.node;
        let mut sink = vec![0; left.min(1 << 16)];
        while left > 0 {
            let n = sink.len().min(left);
            match node.read(&mut sink[..n]) {
                Ok(0) => return Ok(()),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes the answer to `header`'s message: the header with `outcome`
    /// as its type, then `data` (a READ's), in one write.
    fn answer(&self, header: &Header, outcome: u64, data: &[&[u8]]) -> io::Result<()> {
        let head = Header {
            kind: outcome,
            ..*header
        }
        .encode();
        let mut parts = vec![IoSlice::new(&head)];
        parts.extend(data.iter().map(|d| IoSlice::new(d)));
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let written = (&self.node).write_vectored(&parts)?;
        if written != total {
            return Err(io::Error::other(format!(
                "dm-user answer written in part: {written} of {total} bytes"
            )));
        }
        Ok(())
    }

    /// Writes the FUSE request for `header`'s message at the start of
    /// `buf`, in front of a WRITE's data; returns its length, or `None` if
    /// the message has no FUSE request (answered UNSUPPORTED here).
    fn translate(&self, header: &Header, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let unique = self.next_unique.fetch_add(1, Ordering::Relaxed);
        let offset = header.sector.saturating_mul(SECTOR);
        let mut in_header = InHeader {
            unique,
            ..InHeader::default()
        };
        let len = match header.kind {
            kind::WRITE => {
                let fua = header.flags & crate::wire::flags::FUA != 0;
                let arg = WriteIn {
                    offset,
                    size: header.len as u32,
                    flags: if fua { libc::O_DSYNC as u32 } else { 0 },
                    ..WriteIn::default()
                };
                in_header.opcode = opcode::WRITE;
                in_header.len = (IN_HEADER + WRITE_IN) as u32 + arg.size;
                buf[IN_HEADER..IN_HEADER + WRITE_IN].copy_from_slice(arg.as_bytes());
                in_header.len as usize
            }
            kind::READ => {
                let arg = ReadIn {
                    offset,
                    size: u32::try_from(header.len).unwrap_or(u32::MAX),
                    ..ReadIn::default()
                };
                self.fuse_request(buf, &mut in_header, opcode::READ, arg.as_bytes())
            }
            kind::FLUSH => self.fuse_request(
                buf,
                &mut in_header,
                opcode::FSYNC,
                FsyncIn::default().as_bytes(),
            ),
            kind::DISCARD | kind::WRITE_ZEROES => {
                let mode = if header.kind == kind::DISCARD {
                    falloc::PUNCH_HOLE | falloc::KEEP_SIZE
                } else {
                    falloc::ZERO_RANGE
                };
                let arg = FallocateIn {
                    offset,
                    length: header.len,
                    mode,
                    ..FallocateIn::default()
                };
                self.fuse_request(buf, &mut in_header, opcode::FALLOCATE, arg.as_bytes())
            }
            _ => {
                self.answer(header, answer::UNSUPPORTED, &[])?;
                return Ok(None);
            }
        };
        buf[..IN_HEADER].copy_from_slice(in_header.as_bytes());
        self.pending
            .lock()
            .insert(unique, Pending { header: *header });
        Ok(Some(len))
    }

    /// A request of a header and one argument, at the start of `buf`;
    /// returns its length.
    fn fuse_request(&self, buf: &mut [u8], in_header: &mut InHeader, op: u32, arg: &[u8]) -> usize {
        in_header.opcode = op;
        in_header.len = (IN_HEADER + arg.len()) as u32;
        buf[IN_HEADER..IN_HEADER + arg.len()].copy_from_slice(arg);
        in_header.len as usize
    }
}

impl ReplySink for DmUserChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        if let Err(e) = self.send(parts) {
            log::error!("dm-user: answering a message: {e}");
        }
    }
}

impl Channel for DmUserChannel {
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let Some(header) = self.read_message(buf)? else {
                return Ok(None);
            };
            if let Some(len) = self.translate(&header, buf)? {
                return Ok(Some(len));
            }
        }
    }

    fn receive_or_stop(&self, buf: &mut [u8], stop: &Stop) -> io::Result<Option<usize>> {
        // Waits for a message or the stop together; a node that cannot be
        // polled reports itself readable and the read then blocks.
        let mut fds = [
            PollFd::new(self.node.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Err(io::ErrorKind::Interrupted.into()),
            Err(e) => return Err(e.into()),
        }
        if fds[1].any().unwrap_or(false) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.receive(buf)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        let mut head = [0u8; std::mem::size_of::<OutHeader>()];
        let mut filled = 0;
        for part in parts {
            let n = part.len().min(head.len() - filled);
            head[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
        }
        let out = OutHeader::read_from_bytes(&head[..])
            .map_err(|_| io::Error::other("reply shorter than its header"))?;
        let Some(pending) = self.pending.lock().remove(&out.unique) else {
            return Err(io::Error::other(format!(
                "reply to unknown request {}",
                out.unique
            )));
        };
        let header = pending.header;
        if out.error != 0 {
            let outcome = if -out.error == libc::EOPNOTSUPP {
                answer::UNSUPPORTED
            } else {
                answer::ERROR
            };
            return self.answer(&header, outcome, &[]);
        }
        if header.kind != kind::READ {
            return self.answer(&header, answer::SUCCESS, &[]);
        }
        // The READ's data: what follows the FUSE header in `parts`.
        let mut data: Vec<&[u8]> = Vec::with_capacity(parts.len());
        let mut skip = head.len();
        for part in parts {
            let n = skip.min(part.len());
            skip -= n;
            if n < part.len() {
                data.push(&part[n..]);
            }
        }
        let len: usize = data.iter().map(|d| d.len()).sum();
        if len as u64 != header.len {
            // A read past the device's end comes back short; dm-user has
            // no short reads.
            return self.answer(&header, answer::ERROR, &[]);
        }
        self.answer(&header, answer::SUCCESS, &data)
    }
}

/// Serves `device` as a dm-user daemon on `node` with `descriptors`
/// descriptors, each on a thread of its own, until the target is removed
/// (reads fail with ENOTBLK). Messages of up to `max_message` bytes are
/// served; larger ones fail. Requests come in the target's sectors, so the
/// device's logical block size must be the target's (512 bytes for a
/// device-mapper target, unless its table says otherwise): the engine
/// fails requests not aligned to it.
pub fn serve_node(
    device: Arc<dyn BlockDevice>,
    node: &Path,
    descriptors: u16,
    max_message: u32,
) -> io::Result<()> {
    serve_descriptors(device, open_node(node, descriptors)?, max_message)
}

/// Opens `descriptors` descriptors (at least one) on a dm-user node.
pub fn open_node(node: &Path, descriptors: u16) -> io::Result<Vec<File>> {
    (0..descriptors.max(1))
        .map(|_| {
            File::options()
                .read(true)
                .write(true)
                .open(node)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", node.display())))
        })
        .collect()
}

/// As [`serve_node`], on descriptors already open (each one a stream of
/// dm-user messages and answers).
pub fn serve_descriptors(
    device: Arc<dyn BlockDevice>,
    descriptors: Vec<File>,
    max_message: u32,
) -> io::Result<()> {
    Server::new(device, descriptors, max_message)?.serve()
}

/// A handler ready to serve open descriptors of a dm-user node: made
/// first, so that its counters can be taken before it serves.
pub struct Server {
    session: Arc<Session>,
    channels: Vec<Arc<DmUserChannel>>,
}

/// Stops a [`Server`] from another thread: a daemon being replaced stops
/// reading, answers what it has read and ends, leaving its descriptors to
/// be closed (what they still held goes to the node's other daemons).
#[derive(Clone)]
pub struct Stopper {
    session: Arc<Session>,
    channels: Vec<Arc<DmUserChannel>>,
}

impl Stopper {
    /// Makes every worker leave once it has answered the message it is
    /// handling. Workers waiting in poll(2) are woken by the engine's stop;
    /// one blocked in read(2) (dm-user's target has no poll, and on any
    /// node several descriptors may be woken by one message) by `wake`,
    /// whose handler must be installed without SA_RESTART. Call it again
    /// until [`Server::serve`] returns: a worker about to read when it was
    /// called notices only at the next call.
    pub fn stop(&self, wake: Signal) {
        self.session.stop();
        for channel in &self.channels {
            channel.wake_reader(wake);
        }
    }
}

impl Server {
    /// See [`serve_node`] for `max_message` and the block size.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        descriptors: Vec<File>,
        max_message: u32,
    ) -> io::Result<Server> {
        let config = SessionConfig {
            max_write: max_message,
            ..SessionConfig::default()
        };
        let session = Arc::new(
            Session::new(device, config)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
        );
        let uniques = Arc::new(AtomicU64::new(1));
        let channels = descriptors
            .into_iter()
            .map(|file| Arc::new(DmUserChannel::new(file, uniques.clone())))
            .collect();
        Ok(Server { session, channels })
    }

    /// What stops this server from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            session: self.session.clone(),
            channels: self.channels.clone(),
        }
    }

    /// Serves until every descriptor has ended (the target is gone), or
    /// until stopped.
    pub fn serve(self) -> io::Result<()> {
        let channels = self
            .channels
            .into_iter()
            .map(|channel| channel as Arc<dyn Channel>)
            .collect();
        self.session.serve(channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::flags;
    use fuse_blk_backends::MemDevice;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::thread::JoinHandle;
    use std::time::Duration;

    const SIZE: u64 = 1 << 20;

    /// The target's end of one descriptor, and the daemon serving a 1 MiB
    /// memory device of 4 KiB blocks on the other.
    struct Target {
        socket: File,
        daemon: Option<JoinHandle<io::Result<()>>>,
    }

    impl Target {
        /// Over a SOCK_SEQPACKET pair (one read, one message: as a dm-user
        /// node) or a stream (messages in pieces, one in flight at a time).
        fn start(kind: SockType, max_message: u32) -> Target {
            let (target, daemon) =
                socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)
                    .expect("socketpair");
            let device = Arc::new(MemDevice::new(SIZE, 4096).expect("mem device"));
            let daemon = std::thread::spawn(move || {
                serve_descriptors(device, vec![File::from(daemon)], max_message)
            });
            Target {
                socket: File::from(target),
                daemon: Some(daemon),
            }
        }

        fn send(&self, seq: u64, kind: u64, flags: u64, sector: u64, len: u64, data: &[u8]) {
            let mut message = Header {
                seq,
                kind,
                flags,
                sector,
                len,
            }
            .encode()
            .to_vec();
            message.extend_from_slice(data);
            (&self.socket)
                .write_all(&message)
                .expect("sending a message");
        }

        /// The next answer: its header, and the data of a successful READ
        /// of `read_len` bytes (0: no data expected). The first read asks
        /// for all there is (a SOCK_SEQPACKET message is read whole or
        /// cut); on a stream, where only one message is in flight, the
        /// answer may come in pieces.
        fn answer(&self, read_len: usize) -> (Header, Vec<u8>) {
            let mut buf = vec![0; HEADER_LEN + (1 << 20)];
            let mut have = 0;
            loop {
                let wanted = match Header::parse(&buf[..have]) {
                    Some(h) if h.kind == answer::SUCCESS => HEADER_LEN + read_len,
                    Some(_) => HEADER_LEN,
                    None if have == 0 => buf.len(),
                    None => HEADER_LEN,
                };
                if have >= wanted {
                    let header = Header::parse(&buf[..have]).expect("parsed above");
                    assert_eq!(have, wanted, "answer longer than expected");
                    return (header, buf[HEADER_LEN..have].to_vec());
                }
                let n = (&self.socket)
                    .read(&mut buf[have..wanted])
                    .expect("an answer");
                assert!(n > 0, "the daemon closed its end");
                have += n;
            }
        }

        /// Sends one message and returns its answer's type and data.
        fn ask(&self, kind: u64, flags: u64, sector: u64, len: u64, data: &[u8]) -> (u64, Vec<u8>) {
            self.send(7, kind, flags, sector, len, data);
            let read_len = if kind == kind::READ { len as usize } else { 0 };
            let (header, data) = self.answer(read_len);
            assert_eq!((header.seq, header.sector, header.len), (7, sector, len));
            (header.kind, data)
        }

        /// Closes the target's end; the daemon must then end by itself.
        fn finish(mut self) {
            let daemon = self.daemon.take().expect("running");
            drop(self);
            daemon
                .join()
                .expect("the daemon panicked")
                .expect("the daemon failed");
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn every_message_kind_reaches_the_handler_and_is_answered() {
        let target = Target::start(SockType::SeqPacket, 1 << 20);
        let data = pattern(8192, 1);
        assert_eq!(
            target.ask(kind::WRITE, 0, 16, 8192, &data).0,
            answer::SUCCESS
        );
        let (outcome, read) = target.ask(kind::READ, 0, 16, 8192, &[]);
        assert_eq!(outcome, answer::SUCCESS);
        assert!(read == data, "read back other data");
        let fua = pattern(4096, 2);
        assert_eq!(
            target.ask(kind::WRITE, flags::FUA, 40, 4096, &fua).0,
            answer::SUCCESS
        );
        assert_eq!(
            target.ask(kind::FLUSH, flags::PREFLUSH, 0, 0, &[]).0,
            answer::SUCCESS
        );
        assert!(
            target.ask(kind::READ, 0, 40, 4096, &[]).1 == fua,
            "FUA write read back"
        );
        assert_eq!(
            target.ask(kind::WRITE_ZEROES, 0, 16, 4096, &[]).0,
            answer::SUCCESS
        );
        let (_, read) = target.ask(kind::READ, 0, 16, 8192, &[]);
        assert!(read[..4096].iter().all(|&b| b == 0), "zeroed");
        assert!(read[4096..] == data[4096..], "beyond the zeroed range");
        assert_eq!(
            target.ask(kind::DISCARD, 0, 40, 4096, &[]).0,
            answer::SUCCESS
        );
        // No fuse-blk request behind them.
        for other in [
            kind::SECURE_ERASE,
            kind::WRITE_SAME,
            kind::ZONE_RESET_ALL,
            99,
        ] {
            assert_eq!(
                target.ask(other, 0, 0, 4096, &[]).0,
                answer::UNSUPPORTED,
                "{other}"
            );
        }
        target.finish();
    }

    #[test]
    fn the_engine_checks_apply() {
        let target = Target::start(SockType::SeqPacket, 64 << 10);
        // Past the end, not block-aligned, larger than the largest request.
        let end = SIZE / SECTOR;
        assert_eq!(target.ask(kind::READ, 0, end, 4096, &[]).0, answer::ERROR);
        assert_eq!(
            target.ask(kind::READ, 0, end - 4, 4096, &[]).0,
            answer::ERROR
        );
        assert_eq!(target.ask(kind::READ, 0, 1, 4096, &[]).0, answer::ERROR);
        assert_eq!(
            target.ask(kind::WRITE, 0, 0, 512, &[1; 512]).0,
            answer::ERROR
        );
        assert_eq!(
            target.ask(kind::READ, 0, 0, 128 << 10, &[]).0,
            answer::ERROR
        );
        assert_eq!(
            target.ask(kind::DISCARD, 0, end, 4096, &[]).0,
            answer::ERROR
        );
        // Still serving.
        assert_eq!(target.ask(kind::READ, 0, 0, 4096, &[]).0, answer::SUCCESS);
        target.finish();
    }

    #[test]
    fn answers_carry_their_messages_seq_whatever_the_order() {
        let target = Target::start(SockType::SeqPacket, 1 << 20);
        for seq in 1..=8u64 {
            let data = pattern(4096, seq as u8);
            target.send(seq, kind::WRITE, 0, seq * 8, 4096, &data);
        }
        let mut seen: Vec<u64> = (0..8)
            .map(|_| target.answer(0))
            .map(|(h, _)| h.seq)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (1..=8).collect::<Vec<_>>());
        for seq in 1..=8u64 {
            target.send(100 + seq, kind::READ, 0, seq * 8, 4096, &[]);
        }
        for _ in 1..=8 {
            let (header, data) = target.answer(4096);
            assert_eq!(header.kind, answer::SUCCESS);
            assert_eq!(
                data,
                pattern(4096, (header.seq - 100) as u8),
                "seq {}",
                header.seq
            );
        }
        target.finish();
    }

    #[test]
    fn messages_in_pieces_and_oversized_writes() {
        let target = Target::start(SockType::Stream, 64 << 10);
        // The header in two pieces, the data in three.
        let data = pattern(12288, 3);
        let mut message = Header {
            seq: 5,
            kind: kind::WRITE,
            flags: 0,
            sector: 8,
            len: 12288,
        }
        .encode()
        .to_vec();
        message.extend_from_slice(&data);
        for piece in [
            &message[..7],
            &message[7..100],
            &message[100..5000],
            &message[5000..],
        ] {
            (&target.socket).write_all(piece).expect("a piece");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (header, _) = target.answer(0);
        assert_eq!((header.seq, header.kind), (5, answer::SUCCESS));
        assert!(target.ask(kind::READ, 0, 8, 12288, &[]).1 == data, "pieces");
        // Larger than the daemon's buffer: refused, and the stream stays
        // in step for the next message.
        let big = pattern(256 << 10, 4);
        assert_eq!(
            target.ask(kind::WRITE, 0, 0, big.len() as u64, &big).0,
            answer::ERROR
        );
        assert_eq!(target.ask(kind::READ, 0, 8, 12288, &[]).1, data);
        target.finish();
    }

    /// A memory device's server on a stream socket pair, with its
    /// stopper and the thread serving; SIGUSR1 wakes its reads.
    fn stoppable() -> (Target, Stopper, JoinHandle<io::Result<()>>) {
        extern "C" fn woken(_: libc::c_int) {}
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(woken),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(Signal::SIGUSR1, &action) }.expect("sigaction");
        let (target, daemon) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let device = Arc::new(MemDevice::new(SIZE, 4096).expect("mem device"));
        let server = Server::new(device, vec![File::from(daemon)], 1 << 20).expect("server");
        let stopper = server.stopper();
        let serving = std::thread::spawn(move || server.serve());
        let target = Target {
            socket: File::from(target),
            daemon: None,
        };
        (target, stopper, serving)
    }

    /// Stops the server until it ends (10 s at most).
    fn stop_until_ended(stopper: &Stopper, serving: JoinHandle<io::Result<()>>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !serving.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stopped server did not end"
            );
            stopper.stop(Signal::SIGUSR1);
            std::thread::sleep(Duration::from_millis(20));
        }
        serving.join().expect("no panic").expect("served");
    }

    /// A daemon being replaced, stopped while a message has come only in
    /// part (its worker in read(2) for the rest, interrupted by the
    /// signal), answers that message and then ends, the target still
    /// there.
    #[test]
    fn a_stopped_server_answers_what_it_read_and_ends() {
        let (target, stopper, serving) = stoppable();
        let data = pattern(4096, 3);
        assert_eq!(
            target.ask(kind::WRITE, 0, 8, 4096, &data).0,
            answer::SUCCESS
        );
        let header = Header {
            seq: 9,
            kind: kind::READ,
            flags: 0,
            sector: 8,
            len: 4096,
        }
        .encode();
        (&target.socket).write_all(&header[..7]).expect("a piece");
        std::thread::sleep(Duration::from_millis(100));
        stopper.stop(Signal::SIGUSR1);
        std::thread::sleep(Duration::from_millis(100));
        stopper.stop(Signal::SIGUSR1);
        (&target.socket).write_all(&header[7..]).expect("the rest");
        let (answered, read) = target.answer(4096);
        assert_eq!((answered.seq, answered.kind), (9, answer::SUCCESS));
        assert!(read == data, "read back other data");
        stop_until_ended(&stopper, serving);
    }

    /// A worker in read(2) with nothing to come (as on dm-user's target,
    /// which has no poll) is ended by the stop's signal. A message with no
    /// request behind it is answered by the channel, which then reads again
    /// without polling: that is where the worker waits here.
    #[test]
    fn a_stop_ends_a_read_with_nothing_to_come() {
        let (target, stopper, serving) = stoppable();
        target.send(10, 99, 0, 0, 0, &[]);
        assert_eq!(target.answer(0).0.kind, answer::UNSUPPORTED);
        std::thread::sleep(Duration::from_millis(100));
        stop_until_ended(&stopper, serving);
    }
}
