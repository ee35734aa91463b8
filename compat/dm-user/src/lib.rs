//! dm-user's ABI on fuse-blk: `/dev/dm-user/NAME`, a character device
//! served through CUSE, on which a daemon written for dm-user runs
//! unchanged and serves a fuse-blk block device.
//!
//! - [`wire`]: the dm-user message header, types and flags.
//! - [`bridge`]: the queue of messages, the descriptors open on the node and
//!   what each has read and answered; no I/O.
//! - [`cuse`]: the CUSE connection that makes the node and turns its
//!   opens, reads, writes, polls and closes into calls of the bridge.
//! - [`DmUserDevice`]: the [`BlockDevice`] handler that turns each block
//!   request into a message, for either fuse-blk transport.
//! - [`channel`]: the other way round, any fuse-blk handler as a dm-user
//!   daemon: each descriptor of a node is a channel of the session engine.
//! - [`target`]: dm-user's own device-mapper target, where the kernel has
//!   it, made and removed with dmsetup.
//!
//! See Documentation/DM-USER.md.

#![deny(missing_docs)]

pub mod bridge;
pub mod channel;
pub mod cuse;
pub mod target;
pub mod wire;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};

pub use bridge::Policy;
use bridge::{Bridge, Done, Message};
use cuse::{Connection, CuseDevice};
use wire::{flags, kind, Header};

/// Bytes per dm-user sector.
pub const SECTOR: u64 = 512;

/// A dm-user node and the block device it serves.
pub struct DmUser {
    bridge: Arc<Bridge>,
    cuse: CuseDevice,
    device: Arc<DmUserDevice>,
}

impl DmUser {
    /// Creates `/dev/dm-user/NAME` for a block device of `size` bytes of
    /// `block_size`-byte blocks, read-only if `read_only` (the fuse-blk
    /// device is then read-only: writes never reach the node's daemon).
    /// Fails with a one-line message naming the cuse module where
    /// `/dev/cuse` is missing.
    pub fn create(
        name: &str,
        size: u64,
        block_size: u32,
        read_only: bool,
        policy: Policy,
    ) -> io::Result<DmUser> {
        let mut geometry = Geometry::new(size, block_size);
        geometry.features = Features::ALL;
        geometry.read_only = read_only;
        geometry.validate()?;
        let bridge = Arc::new(Bridge::new(policy));
        let cuse = CuseDevice::create(&format!("dm-user/{name}"), bridge.clone())?;
        let device = Arc::new(DmUserDevice {
            bridge: bridge.clone(),
            connection: cuse.connection(),
            geometry,
        });
        Ok(DmUser {
            bridge,
            cuse,
            device,
        })
    }

    /// The handler to serve the block device with.
    pub fn device(&self) -> Arc<DmUserDevice> {
        self.device.clone()
    }

    /// `/dev/dm-user/NAME`.
    pub fn node(&self) -> &Path {
        self.cuse.node()
    }

    /// The target is gone: daemons' reads end with ENOTBLK; once they have
    /// closed the node (at most `grace` later) it goes away.
    pub fn finish(mut self, grace: Duration) {
        self.cuse.connection().perform(self.bridge.remove());
        let deadline = Instant::now() + grace;
        while self.bridge.descriptors() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.cuse.stop();
    }
}

/// Serves block requests as dm-user messages.
pub struct DmUserDevice {
    bridge: Arc<Bridge>,
    connection: Arc<Connection>,
    geometry: Geometry,
}

impl DmUserDevice {
    fn send(&self, kind: u64, flags: u64, offset: u64, len: u64, data: Vec<u8>, done: Done) {
        let header = Header {
            seq: 0,
            kind,
            flags,
            sector: offset / SECTOR,
            len,
        };
        let actions = self.bridge.submit(Message::new(header, data, done));
        self.connection.perform(actions);
    }
}

fn empty_done(reply: ReplyEmpty) -> Done {
    Box::new(move |result| match result {
        Ok(_) => reply.ok(),
        Err(errno) => reply.error(errno),
    })
}

impl BlockDevice for DmUserDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        let done: Done = Box::new(move |result| match result {
            Ok(data) => reply.data(&data),
            Err(errno) => reply.error(errno),
        });
        self.send(kind::READ, 0, offset, len.into(), Vec::new(), done);
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        let done: Done = Box::new(move |result| match result {
            Ok(_) => reply.ok(),
            Err(errno) => reply.error(errno),
        });
        let flags = if fua { flags::FUA } else { 0 };
        self.send(
            kind::WRITE,
            flags,
            offset,
            data.len() as u64,
            data.to_vec(),
            done,
        );
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        self.send(
            kind::FLUSH,
            flags::PREFLUSH,
            0,
            0,
            Vec::new(),
            empty_done(reply),
        );
    }

    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        self.send(kind::DISCARD, 0, offset, len, Vec::new(), empty_done(reply));
    }

    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        let flags = if may_unmap { 0 } else { flags::NOUNMAP };
        self.send(
            kind::WRITE_ZEROES,
            flags,
            offset,
            len,
            Vec::new(),
            empty_done(reply),
        );
    }

    fn destroy(&self) {
        self.connection.perform(self.bridge.remove());
    }

    fn parallel_large_io(&self, _write: bool) -> bool {
        false
    }
}
