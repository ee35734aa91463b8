//! FUSE over io_uring (Linux 6.14+, `fs/fuse/dev_uring.c`) for the stock
//! path: the engine's ring loop ([`fuse_blk::ring`]) with FUSE's entry
//! layout. One queue per possible CPU (the kernel queues a request on the
//! queue of the CPU it was issued from, and uses the ring only once every
//! queue has entries); INIT, FORGET and INTERRUPT keep travelling over
//! `/dev/fuse`, which the read/write workers go on serving.
//!
//! An entry's header buffer is `struct fuse_uring_req_header`: `in_out`
//! (the request's `fuse_in_header`, then the reply's `fuse_out_header`),
//! `op_in` (the opcode's argument) and `ring_ent_in_out` (the commit id and
//! the size of what is in the payload buffer). Everything else, WRITE data
//! and LOOKUP names in, every reply body out, is in the payload buffer.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use fuse_blk::proto::abi::{init_flags2, InHeader, OutHeader};
use fuse_blk::ring::{self, ReadSource, ReadSources, Target, Wire, MAX_HEAD};
use fuse_blk::Session;
use io_uring::{opcode as op, squeue, types};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

// The structures of FUSE's io_uring ABI (include/uapi/linux/fuse.h, Linux
// 6.14), which the proto crate does not know.

/// `struct fuse_uring_req_header`: an entry's header buffer.
#[repr(C)]
struct ReqHeader {
    /// The request's `fuse_in_header`, then the reply's `fuse_out_header`.
    in_out: [u8; 128],
    /// The opcode's argument.
    op_in: [u8; 128],
    ring_ent_in_out: EntInOut,
}

/// `struct fuse_uring_ent_in_out`.
#[derive(FromBytes, Immutable, KnownLayout)]
#[repr(C)]
struct EntInOut {
    flags: u64,
    /// Which request the entry holds, for its COMMIT_AND_FETCH.
    commit_id: u64,
    /// Bytes in the payload buffer: of the request, then of the reply.
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_cmd_req`: the command area of an SQE.
#[derive(IntoBytes, Immutable)]
#[repr(C)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

const HEADER_SIZE: usize = size_of::<ReqHeader>();
/// Where `payload_sz` is in a header buffer.
const PAYLOAD_SZ: usize = offset_of!(ReqHeader, ring_ent_in_out) + offset_of!(EntInOut, payload_sz);
const _: () = assert!(HEADER_SIZE == 288 && size_of::<CmdReq>() == 24);

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

const ENABLE_PARAMETER: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel's FUSE takes io_uring commands now.
pub fn enabled() -> bool {
    std::fs::read_to_string(ENABLE_PARAMETER).is_ok_and(|v| v.trim() == "Y")
}

/// Why io_uring cannot be used here, for a one-line error.
pub fn unavailable_reason() -> String {
    if std::path::Path::new(ENABLE_PARAMETER).exists() {
        format!("FUSE over io_uring is switched off ({ENABLE_PARAMETER} is not Y)")
    } else {
        "this kernel's FUSE has no io_uring support (Linux 6.14 or later is needed)".into()
    }
}

/// Queues the kernel keeps: one per possible CPU.
pub fn queues() -> io::Result<u16> {
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let last = possible
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse::<u16>().ok())
        .ok_or_else(|| io::Error::other(format!("cpu/possible: {possible:?}")))?;
    Ok(last + 1)
}

/// FUSE's ring entries of queue `qid` on one `/dev/fuse` descriptor.
struct FuseWire {
    fd: OwnedFd,
    qid: u16,
}

impl FuseWire {
    fn command(&self, target: Target, cmd_op: u32, commit_id: u64) -> op::UringCmd80 {
        let req = CmdReq {
            flags: 0,
            commit_id,
            qid: self.qid,
            padding: [0; 6],
        };
        let mut cmd = [0u8; 80];
        cmd[..size_of::<CmdReq>()].copy_from_slice(req.as_bytes());
        match target {
            Target::Registered => op::UringCmd80::new(types::Fixed(0), cmd_op),
            Target::Fd(fd) => op::UringCmd80::new(types::Fd(fd), cmd_op),
        }
        .cmd(cmd)
    }
}

impl Wire for FuseWire {
    type Sqe = squeue::Entry128;
    const HEADER_SIZE: usize = HEADER_SIZE;
    const ZEROS_REPLY: bool = false;

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn fetch(&self, target: Target, _entry: u16, iovecs: *const libc::iovec) -> squeue::Entry128 {
        let sqe = self
            .command(target, CMD_REGISTER, 0)
            .addr(Some(iovecs as u64))
            .build();
        // The kernel wants sqe->len = 2 (header and payload), which the
        // builder cannot set.
        // SAFETY: Entry128 is #[repr(C)], 128 bytes of plain integers.
        let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: as above; every bit pattern is a valid SQE.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
    }

    fn commit(
        &self,
        target: Target,
        _entry: u16,
        commit_id: u64,
        header: &mut [u8],
        // Never set: FUSE takes READ data from the payload buffer only, so
        // this wire is served with no `ReadSources`.
        _read_data: Option<ReadSource>,
    ) -> squeue::Entry128 {
        // FUSE copies the reply's body from the payload buffer by
        // `payload_sz`, not by `fuse_out_header.len`; every body is there
        // (`body_in_payload`), so it is what follows the header.
        let (out_header, _) =
            OutHeader::read_from_prefix(header).expect("a header buffer holds fuse_out_header");
        let body = (out_header.len as usize).saturating_sub(size_of::<OutHeader>());
        header[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&(body as u32).to_ne_bytes());
        self.command(target, CMD_COMMIT_AND_FETCH, commit_id)
            .build()
    }

    fn request(&self, header: &[u8], head: &mut [u8; MAX_HEAD]) -> (usize, u64) {
        let in_header_len = size_of::<InHeader>();
        let (in_header, _) =
            InHeader::read_from_prefix(header).expect("a header buffer holds fuse_in_header");
        let (ent, _) =
            EntInOut::read_from_prefix(&header[offset_of!(ReqHeader, ring_ent_in_out)..])
                .expect("a header buffer holds fuse_uring_ent_in_out");
        let in_payload = ent.payload_sz as usize;
        // What is neither header nor payload is the argument, in op_in.
        let op_in = &header[offset_of!(ReqHeader, op_in)..offset_of!(ReqHeader, ring_ent_in_out)];
        let arg = (in_header.len as usize)
            .saturating_sub(in_header_len + in_payload)
            .min(MAX_HEAD - in_header_len)
            .min(op_in.len());
        head[..in_header_len].copy_from_slice(in_header.as_bytes());
        head[in_header_len..in_header_len + arg].copy_from_slice(&op_in[..arg]);
        (in_payload, ent.commit_id)
    }

    fn body_in_payload(&self, _opcode: u32) -> bool {
        true
    }

    fn ended(&self, errno: i32) -> bool {
        matches!(
            errno,
            libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED | libc::ENODEV
        )
    }
}

/// Serves queue `qid` of the connection behind `fd` with `depth` entries,
/// from when FUSE_INIT granted io_uring (nothing if it did not) until the
/// connection ends.
pub fn serve_queue(session: &Session, qid: u16, fd: OwnedFd, depth: u16) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let granted = loop {
        if let Some(flags2) = session.granted_flags2() {
            break flags2;
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no FUSE_INIT within 30 s",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    if granted & init_flags2::OVER_IO_URING == 0 {
        return Ok(());
    }
    let max_io = session.config().max_write as usize;
    let wire = FuseWire { fd, qid };
    ring::serve(session, qid, wire, depth, max_io, ReadSources::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_blk::proto::abi::{opcode, WriteIn};

    /// FUSE's layout, as the kernel's offsets give it: the structures above
    /// must put everything here.
    const OP_IN: usize = 128;
    const COMMIT_ID: usize = 256 + 8;
    const PAYLOAD_SZ_AT: usize = 256 + 16;
    /// Where an SQE's command area starts, and in it `commit_id` and `qid`.
    const SQE_CMD: usize = 48;

    fn wire() -> FuseWire {
        FuseWire {
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            qid: 3,
        }
    }

    #[test]
    fn requests_replies_and_commands_sit_where_fuse_puts_them() {
        let wire = wire();
        let in_header = InHeader {
            len: (size_of::<InHeader>() + size_of::<WriteIn>() + 4096) as u32,
            opcode: opcode::WRITE,
            unique: 77,
            ..InHeader::default()
        };
        let arg = WriteIn {
            offset: 8192,
            size: 4096,
            ..WriteIn::default()
        };
        let mut header = [0u8; HEADER_SIZE];
        header[..size_of::<InHeader>()].copy_from_slice(in_header.as_bytes());
        header[OP_IN..OP_IN + size_of::<WriteIn>()].copy_from_slice(arg.as_bytes());
        header[COMMIT_ID..COMMIT_ID + 8].copy_from_slice(&0x1122_u64.to_ne_bytes());
        header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&4096_u32.to_ne_bytes());

        let mut head = [0u8; MAX_HEAD];
        assert_eq!(wire.request(&header, &mut head), (4096, 0x1122));
        assert_eq!(&head[..size_of::<InHeader>()], in_header.as_bytes());
        let arg_at = size_of::<InHeader>();
        assert_eq!(&head[arg_at..arg_at + size_of::<WriteIn>()], arg.as_bytes());

        // The reply to it: `fuse_write_out` (8 bytes) after the header.
        let out_header = OutHeader {
            len: (size_of::<OutHeader>() + 8) as u32,
            error: 0,
            unique: 77,
        };
        header[..size_of::<OutHeader>()].copy_from_slice(out_header.as_bytes());
        let sqe = wire.commit(Target::Fd(5), 0, 0x1122, &mut header, None);
        assert_eq!(
            header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4],
            8_u32.to_ne_bytes()
        );
        // An error has no body.
        let mut error = header;
        error[..size_of::<OutHeader>()]
            .copy_from_slice(fuse_blk::proto::reply::error_header(77, libc::EIO).as_bytes());
        wire.commit(Target::Fd(5), 0, 0x1122, &mut error, None);
        assert_eq!(error[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4], 0_u32.to_ne_bytes());

        // SAFETY: Entry128 is #[repr(C)], 128 bytes of plain integers.
        let sqe: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        let cmd = &sqe[SQE_CMD..];
        assert_eq!(cmd[8..16], 0x1122_u64.to_ne_bytes());
        assert_eq!(cmd[16..18], 3_u16.to_ne_bytes());
    }
}
