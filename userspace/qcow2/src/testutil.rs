//! Drives a device through the real session engine without a kernel, as
//! the backends crate's tests do: FUSE requests encoded as the kernel
//! would, handed to [`Session::dispatch`], replies parsed back.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_blk::{BlockDevice, Channel, ReplySink, Session, SessionConfig};
use fuse_blk_proto::abi::{falloc, opcode, FallocateIn, FsyncIn, ReadIn, WriteIn, WriteOut};
use fuse_blk_proto::client::{encode_request, parse_reply, read_struct};
use parking_lot::Mutex;
use zerocopy::IntoBytes;

#[derive(Default)]
struct CaptureChannel {
    replies: Mutex<Vec<Vec<u8>>>,
}

impl ReplySink for CaptureChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let message = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.replies.lock().push(message);
    }
}

impl Channel for CaptureChannel {
    fn receive(&self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

/// A device behind the stock path's session (punch-hole requests become
/// `write_zeroes(may_unmap)`), plus the module's (they are discards).
pub struct Harness {
    session: Session,
    zeroing_session: Session,
    channel: Arc<CaptureChannel>,
    dyn_channel: Arc<dyn Channel>,
    next_unique: AtomicU64,
}

impl Harness {
    pub fn new(device: Arc<dyn BlockDevice>) -> Harness {
        let config = SessionConfig {
            max_write: 4 << 20,
            ..SessionConfig::default()
        };
        let session = Session::new(device.clone(), config).expect("geometry");
        let zeroing_session = Session::new(
            device,
            SessionConfig {
                punch_hole_zeroes: true,
                ..config
            },
        )
        .expect("geometry");
        let channel = Arc::new(CaptureChannel::default());
        Harness {
            session,
            zeroing_session,
            dyn_channel: channel.clone(),
            channel,
            next_unique: AtomicU64::new(1),
        }
    }

    fn call(&self, zeroing: bool, opcode: u32, args: &[&[u8]]) -> Result<Vec<u8>, i32> {
        let unique = self.next_unique.fetch_add(1, Ordering::Relaxed);
        let message = encode_request(opcode, unique, 2, args);
        let session = if zeroing {
            &self.zeroing_session
        } else {
            &self.session
        };
        assert!(session.dispatch(0, &message, &self.dyn_channel));
        let raw = {
            let mut replies = self.channel.replies.lock();
            let index = replies
                .iter()
                .position(|r| parse_reply(r).is_ok_and(|reply| reply.unique == unique))
                .unwrap_or_else(|| panic!("no reply to request {unique}"));
            replies.swap_remove(index)
        };
        let reply = parse_reply(&raw).expect("well-formed reply");
        reply.result.map(<[u8]>::to_vec)
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        let arg = ReadIn {
            offset,
            size: len,
            ..ReadIn::default()
        };
        self.call(false, opcode::READ, &[arg.as_bytes()])
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        let arg = WriteIn {
            offset,
            size: data.len() as u32,
            flags: if fua { libc::O_DSYNC as u32 } else { 0 },
            ..WriteIn::default()
        };
        let payload = self.call(false, opcode::WRITE, &[arg.as_bytes(), data])?;
        let out: WriteOut = read_struct(&payload).expect("write_out");
        assert_eq!(out.size as usize, data.len(), "short write reply");
        Ok(())
    }

    pub fn flush(&self) -> Result<(), i32> {
        let arg = FsyncIn::default();
        self.call(false, opcode::FSYNC, &[arg.as_bytes()]).map(drop)
    }

    fn fallocate(&self, zeroing: bool, offset: u64, length: u64, mode: u32) -> Result<(), i32> {
        let arg = FallocateIn {
            offset,
            length,
            mode,
            ..FallocateIn::default()
        };
        self.call(zeroing, opcode::FALLOCATE, &[arg.as_bytes()])
            .map(drop)
    }

    /// PUNCH_HOLE on the kernel module's path: a discard.
    pub fn discard(&self, offset: u64, length: u64) -> Result<(), i32> {
        self.fallocate(
            false,
            offset,
            length,
            falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
        )
    }

    /// ZERO_RANGE: write-zeroes.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), i32> {
        self.fallocate(false, offset, length, falloc::ZERO_RANGE)
    }

    /// PUNCH_HOLE on the stock path: write-zeroes that may unmap.
    pub fn punch_hole(&self, offset: u64, length: u64) -> Result<(), i32> {
        self.fallocate(true, offset, length, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
    }
}

/// A recognisable, position-dependent pattern, so misplaced data shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)).to_le_bytes()[0] | 1)
        .collect()
}
