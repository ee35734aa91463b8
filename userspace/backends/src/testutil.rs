//! Drives a device through the real session engine without a kernel.
//!
//! The typed replies can only be built by the `fuse-blk` crate, and calling a
//! handler directly would skip the engine's checks anyway, so the tests
//! encode FUSE requests as the kernel would, hand them to
//! [`Session::dispatch`] and parse what comes back on a capturing channel.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_blk::{BlockDevice, Channel, ReplySink, Session, SessionConfig};
use fuse_blk_proto::abi::{falloc, opcode, FallocateIn, FsyncIn, ReadIn, WriteIn, WriteOut};
use fuse_blk_proto::client::{encode_request, parse_reply, read_struct};
use parking_lot::{Condvar, Mutex};
use zerocopy::IntoBytes;

/// A channel that never yields a request and keeps every reply sent on it.
#[derive(Default)]
pub struct CaptureChannel {
    replies: Mutex<Vec<Vec<u8>>>,
    /// Signalled on every reply, for devices that answer later, from
    /// threads of their own.
    replied: Condvar,
}

/// How long a reply may take (a device waiting for a server that
/// restarts, on a busy machine) before the request counts as unanswered.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

impl CaptureChannel {
    /// Removes and returns the reply to `unique`, waiting for it if it
    /// has not been sent yet; None if it never came.
    fn take(&self, unique: u64) -> Option<Vec<u8>> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut replies = self.replies.lock();
        loop {
            let index = replies.iter().position(|r| {
                parse_reply(r)
                    .map(|reply| reply.unique == unique)
                    .unwrap_or(false)
            });
            if let Some(index) = index {
                return Some(replies.swap_remove(index));
            }
            if self.replied.wait_until(&mut replies, deadline).timed_out() {
                return None;
            }
        }
    }
}

impl ReplySink for CaptureChannel {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        let message = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.replies.lock().push(message);
        self.replied.notify_all();
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

/// One device behind two sessions: the kernel module's (PUNCH_HOLE is a
/// discard) and the stock path's (PUNCH_HOLE must read back as zeros, so it
/// becomes `write_zeroes(may_unmap = true)`).
pub struct Harness {
    session: Session,
    zeroing_session: Session,
    channel: Arc<CaptureChannel>,
    dyn_channel: Arc<dyn Channel>,
    next_unique: AtomicU64,
}

const NODEID: u64 = 2;

impl Harness {
    pub fn new(device: Arc<dyn BlockDevice>) -> Harness {
        // Large requests, to test requests bigger than the backends' buffers.
        let config = SessionConfig {
            max_write: 16 << 20,
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

    /// Resizes the device as a transport would, with no kernel to tell.
    pub fn resize(&self, size: u64) -> std::io::Result<()> {
        self.session.resize(size, |_| Ok(()))
    }

    pub fn geometry(&self) -> fuse_blk::Geometry {
        self.session.geometry()
    }

    /// Sends one request and returns its reply's payload or errno.
    fn call(&self, zeroing: bool, opcode: u32, args: &[&[u8]]) -> Result<Vec<u8>, i32> {
        let unique = self.next_unique.fetch_add(1, Ordering::Relaxed);
        let message = encode_request(opcode, unique, NODEID, args);
        let session = if zeroing {
            &self.zeroing_session
        } else {
            &self.session
        };
        assert!(session.dispatch(0, &message, &self.dyn_channel));
        let raw = self
            .channel
            .take(unique)
            .unwrap_or_else(|| panic!("no reply to request {unique} (opcode {opcode})"));
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

    /// Writes `data`; with `fua` the request carries `O_DSYNC`, as the
    /// transports mark force-unit-access writes.
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
        self.call(false, opcode::FSYNC, &[arg.as_bytes()])
            .map(|p| assert!(p.is_empty()))
    }

    fn fallocate(&self, zeroing: bool, offset: u64, length: u64, mode: u32) -> Result<(), i32> {
        let arg = FallocateIn {
            offset,
            length,
            mode,
            ..FallocateIn::default()
        };
        self.call(zeroing, opcode::FALLOCATE, &[arg.as_bytes()])
            .map(|p| assert!(p.is_empty()))
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

    /// `may_unmap` comes from PUNCH_HOLE on the stock path, keep-allocated
    /// from ZERO_RANGE.
    pub fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), i32> {
        if may_unmap {
            self.fallocate(true, offset, length, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        } else {
            self.fallocate(false, offset, length, falloc::ZERO_RANGE)
        }
    }
}

/// A recognisable, position-dependent pattern, so misplaced data shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)).to_le_bytes()[0] | 1)
        .collect()
}
