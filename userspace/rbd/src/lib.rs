//! `rbd:POOL/IMAGE` backends: a fuse-blk block device whose blocks are a
//! Ceph RBD image, reached through librbd, Ceph's own client library.
//!
//! librbd does the hard part: it talks to the monitors and the OSDs,
//! holds a request while an OSD restarts and resends it to whichever OSD
//! serves the object next. This crate hands each request to librbd's
//! asynchronous calls from the handler's threads and answers it from one
//! thread that collects librbd's completions through an eventfd.
//!
//! - [`spec`]: recognising and checking `rbd:` specs.
//! - [`image`]: a connection to the cluster and an open image, safely.
//! - [`RbdDevice`]: the `BlockDevice`.

#![deny(missing_docs)]

mod device;
mod ffi;
pub mod image;
pub mod spec;

pub use device::RbdDevice;
pub use image::Credentials;
pub use spec::Spec;
