//! fuse-blk: write a Linux block device in Rust.
//!
//! A handler implements [`BlockDevice`]; a [`Session`] serves it over FUSE
//! channels, either the fuse-blk kernel module's (`/dev/fuseblkN`) or, on a
//! stock kernel, a one-file FUSE filesystem with a loop device on top (see
//! the `fuse-blk-loop` crate). Replies are typed and consumed by value; one
//! dropped unanswered answers EIO, as in fuser.
//!
//! ```no_run
//! use fuse_blk::{BlockDevice, Geometry, ReplyData, ReplyWrite, Request};
//!
//! struct Zeros;
//!
//! impl BlockDevice for Zeros {
//!     fn geometry(&self) -> Geometry {
//!         Geometry::new(1 << 30, 4096)
//!     }
//!     fn read(&self, _req: &Request, _offset: u64, len: u32, reply: ReplyData) {
//!         reply.data(&vec![0; len as usize]);
//!     }
//!     fn write(&self, _req: &Request, _offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
//!         reply.ok();
//!     }
//! }
//! ```

#![deny(missing_docs)]

pub mod channel;
mod event;
pub mod handler;
pub mod io_thread;
pub mod mapping;
pub mod reply;
pub mod ring;
pub mod session;
pub mod stats;

pub use channel::{Channel, FdChannel, Stop};
pub use handler::{BlockDevice, Features, Geometry, GeometryError, Request};
pub use reply::{Extent, ReplyData, ReplyEmpty, ReplySink, ReplyWrite, Responder};
pub use session::{IoMode, Namespace, Session, SessionConfig, DEFAULT_RING_POLL};

pub use fuse_blk_proto as proto;
