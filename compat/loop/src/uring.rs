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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use fuse_blk::proto::abi::{init_flags2, InHeader};
use fuse_blk::ring::{self, ReadSource, Target, Wire, MAX_HEAD};
use fuse_blk::Session;
use io_uring::{opcode as op, squeue, types};

/// `sizeof(struct fuse_uring_req_header)`.
const HEADER_SIZE: usize = 288;
/// Offsets in it: `op_in`, and in `ring_ent_in_out` the commit id and the
/// payload size.
const OP_IN: usize = 128;
const COMMIT_ID: usize = 256 + 8;
const PAYLOAD_SZ: usize = 256 + 16;

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
        // struct fuse_uring_cmd_req: flags, commit_id, qid.
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
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
        _read_data: Option<ReadSource>,
    ) -> squeue::Entry128 {
        self.command(target, CMD_COMMIT_AND_FETCH, commit_id)
            .build()
    }

    fn request(&self, header: &[u8], head: &mut [u8; MAX_HEAD]) -> (usize, u64) {
        let in_header = std::mem::size_of::<InHeader>();
        let len = u32::from_ne_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let in_payload = u32::from_ne_bytes(
            header[PAYLOAD_SZ..PAYLOAD_SZ + 4]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let commit_id = u64::from_ne_bytes(
            header[COMMIT_ID..COMMIT_ID + 8]
                .try_into()
                .expect("8 bytes"),
        );
        // What is neither header nor payload is the argument, in op_in.
        let arg = len
            .saturating_sub(in_header + in_payload)
            .min(MAX_HEAD - in_header)
            .min(HEADER_SIZE - OP_IN);
        head[..in_header].copy_from_slice(&header[..in_header]);
        head[in_header..in_header + arg].copy_from_slice(&header[OP_IN..OP_IN + arg]);
        (in_payload, commit_id)
    }

    fn body_in_payload(&self, _opcode: u32) -> bool {
        true
    }

    fn set_body_len(&self, header: *mut u8, len: usize) {
        // SAFETY: `header` is an entry's header buffer of HEADER_SIZE bytes,
        // owned by the reply being written.
        unsafe {
            header
                .add(PAYLOAD_SZ)
                .cast::<u32>()
                .write_unaligned(len as u32)
        };
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
    ring::serve(session, qid, FuseWire { fd, qid }, depth, max_io)
}
