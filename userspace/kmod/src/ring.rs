//! io_uring channels (`FUSE_BLK_URING_*`, ABI 2): a queue's requests
//! arrive as completions of commands held in the kernel, and each reply is
//! sent by the command that also waits for the entry's next request.
//!
//! A queue's worker answers FUSE_INIT over read/write, then serves the
//! channel with the engine's ring loop ([`fuse_blk::ring`]), one entry per
//! tag: a header buffer of `URING_HEADER_SIZE` bytes (request header and
//! argument in, reply header and `fuse_write_out` out) and a payload buffer
//! of `max_io_bytes` (WRITE data in, READ data out). The entries end with
//! `ENODEV` when the device is destroyed or a newer daemon took the queue
//! over, `ECANCELED` when the ring goes away.

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_blk::proto::abi::{opcode, InHeader, WriteIn};
pub use fuse_blk::ring::ReadSources;
use fuse_blk::ring::{self, ReadSource, Target, Wire};
use fuse_blk::{Channel, FdChannel, ReplySink, Session};
use io_uring::{opcode as op, squeue, types, IoUring};
use zerocopy::FromBytes;

use crate::uapi;

/// Whether the running kernel and module offer io_uring channels.
pub fn supported(features: &uapi::Features) -> bool {
    unsupported_reason(features).is_none()
}

/// Why io_uring channels cannot be used here, in one line, or `None` if
/// they can.
pub fn unsupported_reason(features: &uapi::Features) -> Option<String> {
    if features.features & uapi::F_URING == 0 {
        // The module leaves the flag out where the kernel lacks what its
        // channels need (cancelable commands, task work that knows its
        // task is dying: before 6.12; see fuse-blk-kmod/compat.h).
        return Some(
            "the fuse_blk module offers no io_uring channels on this kernel \
             (FUSE_BLK_F_URING not set; they need Linux 6.12 or later): use --io rw"
                .to_owned(),
        );
    }
    match IoUring::<squeue::Entry>::new(2) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "io_uring cannot be set up here ({e}; see the kernel.io_uring_disabled sysctl): use --io rw"
        )),
    }
}

/// How the running module lets a commit name where its READ data is, if
/// not in the entry's payload buffer: at one address
/// (`FUSE_BLK_URING_F_DATA_ADDR`, ABI 4), gathered from iovecs
/// (`FUSE_BLK_URING_F_DATA_IOVEC`, ABI 5).
pub fn read_sources_offered(features: &uapi::Features) -> ReadSources {
    ReadSources {
        addr: features.features & uapi::F_URING_DATA_ADDR != 0,
        iovecs: features.features & uapi::F_URING_DATA_IOVEC != 0,
    }
}

/// The module's ring entries on one channel.
struct ChannelWire {
    channel: Arc<FdChannel>,
}

impl ChannelWire {
    fn command(target: Target, cmd_op: u32, cmd: uapi::UringCmd) -> op::UringCmd16 {
        match target {
            Target::Registered => op::UringCmd16::new(types::Fixed(0), cmd_op),
            Target::Fd(fd) => op::UringCmd16::new(types::Fd(fd), cmd_op),
        }
        .cmd(cmd.to_bytes())
    }
}

impl Wire for ChannelWire {
    type Sqe = squeue::Entry;
    const HEADER_SIZE: usize = uapi::URING_HEADER_SIZE;
    // ABI 2: a READ answered without data reads as zeros.
    const ZEROS_REPLY: bool = true;

    fn fd(&self) -> RawFd {
        self.channel.as_fd().as_raw_fd()
    }

    fn fetch(&self, target: Target, entry: u16, iovecs: *const libc::iovec) -> squeue::Entry {
        let cmd = uapi::UringCmd {
            entry,
            ..uapi::UringCmd::default()
        };
        Self::command(target, uapi::URING_FETCH, cmd)
            .addr(Some(iovecs as u64))
            .build()
    }

    fn commit(
        &self,
        target: Target,
        entry: u16,
        _commit_id: u64,
        // fuse_out_header.len says all the module reads of a reply.
        _header: &mut [u8],
        read_data: Option<ReadSource>,
    ) -> squeue::Entry {
        let (flags, data_segs, data_addr) = match read_data {
            None => (0, 0, 0),
            Some(ReadSource::Addr(addr)) => (uapi::URING_F_DATA_ADDR, 0, addr),
            Some(ReadSource::Iovecs { iovecs, count }) => (uapi::URING_F_DATA_IOVEC, count, iovecs),
        };
        let cmd = uapi::UringCmd {
            entry,
            flags,
            data_segs,
            data_addr,
        };
        Self::command(target, uapi::URING_COMMIT_AND_FETCH, cmd).build()
    }

    fn request(&self, header: &[u8], head: &mut [u8; 256]) -> (usize, u64) {
        // Header and argument lie together at the start; only WRITE data is
        // in the payload buffer.
        head[..Self::HEADER_SIZE].copy_from_slice(&header[..Self::HEADER_SIZE]);
        let data = match InHeader::read_from_prefix(header) {
            // `len` counts the data in the payload buffer too.
            Ok((request, _)) if request.opcode == opcode::WRITE => {
                (request.len as usize).saturating_sub(size_of::<InHeader>() + size_of::<WriteIn>())
            }
            _ => 0,
        };
        (data, 0)
    }

    fn body_in_payload(&self, opcode: u32) -> bool {
        opcode == opcode::READ
    }

    fn ended(&self, errno: i32) -> bool {
        matches!(errno, libc::ENODEV | libc::ECANCELED)
    }
}

/// Serves `queue` of a device through `channel` with an io_uring of
/// `depth` entries, until the device is destroyed or taken over. READ
/// replies answered from the handler's own memory are copied by the kernel
/// from there as far as `read_sources` allows.
pub fn serve_queue(
    session: &Session,
    queue: u16,
    channel: Arc<FdChannel>,
    depth: u16,
    read_sources: ReadSources,
) -> io::Result<()> {
    if !answer_init(session, queue, channel.clone())? {
        return Ok(());
    }
    let max_io = session.config().max_write as usize;
    let wire = ChannelWire { channel };
    ring::serve(session, queue, wire, depth, max_io, read_sources)
}

/// Reads and answers FUSE_INIT, the first message of a new channel; false
/// if the channel ended instead, or if the module refused the answer
/// because a newer channel took the queue over first (a takeover racing
/// this one): such a channel reads FUSE_DESTROY next and has nothing to
/// serve, and its ring commands would only be refused.
fn answer_init(session: &Session, queue: u16, channel: Arc<dyn Channel>) -> io::Result<bool> {
    let mut buf = vec![0u8; session.config().buffer_size()];
    loop {
        match channel.receive(&mut buf) {
            Ok(Some(len)) => {
                let reply = Arc::new(InitReply {
                    channel,
                    lost: AtomicBool::new(false),
                });
                let going_on = session.dispatch_split(queue, &buf[..len], &[], reply.clone());
                if reply.lost.load(Ordering::Relaxed) {
                    log::info!("queue {queue}: a newer daemon took the queue over first");
                    return Ok(false);
                }
                return Ok(going_on);
            }
            Ok(None) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends the answer to FUSE_INIT and notes whether the module refused it
/// with ESTALE: the channel lost a takeover race (ABI.md, handoff).
struct InitReply {
    channel: Arc<dyn Channel>,
    lost: AtomicBool,
}

impl ReplySink for InitReply {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        match self.channel.send(parts) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                self.lost.store(true, Ordering::Relaxed)
            }
            Err(e) => log::error!("answering FUSE_INIT: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_blk::proto::abi::ReadIn;
    use std::fs::File;
    use zerocopy::IntoBytes;

    /// A wire on /dev/null: `request` only reads the buffers it is given.
    fn wire() -> ChannelWire {
        let null = File::open("/dev/null").expect("/dev/null");
        ChannelWire {
            channel: Arc::new(FdChannel::new(null.into())),
        }
    }

    /// An entry's header buffer holding `header` and then `arg`.
    fn entry_header(header: InHeader, arg: &[u8]) -> [u8; uapi::URING_HEADER_SIZE] {
        let mut buf = [0u8; uapi::URING_HEADER_SIZE];
        let at = size_of::<InHeader>();
        buf[..at].copy_from_slice(header.as_bytes());
        buf[at..at + arg.len()].copy_from_slice(arg);
        buf
    }

    /// A channel that delivers one FUSE_INIT and answers its reply with
    /// `reply_errno` (0: taken).
    struct InitChannel {
        init: parking_lot::Mutex<Option<Vec<u8>>>,
        reply_errno: i32,
        replies: std::sync::atomic::AtomicUsize,
    }

    impl InitChannel {
        fn new(reply_errno: i32) -> Arc<InitChannel> {
            let init = fuse_blk::proto::abi::InitIn {
                major: fuse_blk::proto::abi::KERNEL_VERSION,
                minor: fuse_blk::proto::abi::KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            let message =
                fuse_blk::proto::client::encode_request(opcode::INIT, 2, 0, &[init.as_bytes()]);
            Arc::new(InitChannel {
                init: parking_lot::Mutex::new(Some(message)),
                reply_errno,
                replies: Default::default(),
            })
        }
    }

    // Every reply goes through `InitReply`; this one is never used.
    impl ReplySink for InitChannel {
        fn send_reply(&self, parts: &[IoSlice<'_>]) {
            let _ = self.send(parts);
        }
    }

    impl Channel for InitChannel {
        fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
            Ok(self.init.lock().take().map(|message| {
                buf[..message.len()].copy_from_slice(&message);
                message.len()
            }))
        }

        fn send(&self, _parts: &[IoSlice<'_>]) -> io::Result<()> {
            self.replies.fetch_add(1, Ordering::Relaxed);
            match self.reply_errno {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        }
    }

    struct Zeros;

    impl fuse_blk::BlockDevice for Zeros {
        fn geometry(&self) -> fuse_blk::Geometry {
            fuse_blk::Geometry::new(1 << 20, 4096)
        }
        fn read(&self, _: &fuse_blk::Request, _: u64, _: u32, reply: fuse_blk::ReplyData) {
            reply.zeros();
        }
        fn write(
            &self,
            _: &fuse_blk::Request,
            _: u64,
            _: &[u8],
            _: bool,
            reply: fuse_blk::ReplyWrite,
        ) {
            reply.ok();
        }
    }

    #[test]
    fn a_channel_whose_init_answer_is_refused_as_stale_has_nothing_to_serve() {
        let session = Session::new(
            Arc::new(Zeros),
            crate::session_config(1 << 20, std::time::Duration::ZERO),
        )
        .expect("session");
        for (errno, serves) in [(0, true), (libc::ESTALE, false)] {
            let channel = InitChannel::new(errno);
            let served = answer_init(&session, 0, channel.clone()).expect("answering INIT");
            assert_eq!(channel.replies.load(Ordering::Relaxed), 1, "one answer");
            assert_eq!(served, serves, "INIT answered, errno {errno}");
        }
    }

    #[test]
    fn only_a_write_has_data_in_the_payload_buffer() {
        let wire = wire();
        let fixed = size_of::<InHeader>() + size_of::<WriteIn>();
        let write = WriteIn {
            size: 8192,
            ..WriteIn::default()
        };
        let buf = entry_header(
            InHeader {
                len: (fixed + 8192) as u32,
                opcode: opcode::WRITE,
                unique: 2,
                ..InHeader::default()
            },
            write.as_bytes(),
        );
        let mut head = [0u8; 256];
        assert_eq!(wire.request(&buf, &mut head), (8192, 0));
        assert_eq!(&head[..buf.len()], &buf[..], "header and argument copied");

        let read = ReadIn {
            size: 8192,
            ..ReadIn::default()
        };
        let buf = entry_header(
            InHeader {
                len: (size_of::<InHeader>() + size_of::<ReadIn>()) as u32,
                opcode: opcode::READ,
                unique: 4,
                ..InHeader::default()
            },
            read.as_bytes(),
        );
        assert_eq!(
            wire.request(&buf, &mut head),
            (0, 0),
            "a READ's data goes out"
        );

        // A WRITE whose length does not even cover its argument has none.
        let buf = entry_header(
            InHeader {
                len: size_of::<InHeader>() as u32,
                opcode: opcode::WRITE,
                unique: 6,
                ..InHeader::default()
            },
            &[],
        );
        assert_eq!(wire.request(&buf, &mut head), (0, 0));
    }
}
