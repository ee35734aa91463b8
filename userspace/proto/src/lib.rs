//! The FUSE wire protocol as fuse-blk speaks it, with no I/O.
//!
//! A fuse-blk block device is one FUSE file. The kernel (the fuse-blk
//! module, or stock FUSE with a loop device on top) sends requests such as
//! FUSE_READ and FUSE_WRITE; a daemon answers each with a reply. This crate
//! turns bytes into [`Request`]s and replies into bytes, and the reverse for
//! the client side ([`client`]), so that the session engine, the fuser
//! adapter and the tests share one definition of every message.
//!
//! Layers: [`abi`] holds the kernel structures, [`request`] parses what a
//! daemon reads, [`reply`] encodes what it writes; [`cuse`] adds what a
//! character device served through CUSE (`/dev/cuse`) speaks besides.

#![deny(missing_docs)]

pub mod abi;
pub mod client;
pub mod cuse;
pub mod reply;
pub mod request;

pub use request::{
    parse_request, parse_request_split, Operation, ParseError, ParseErrorKind, Request,
};
