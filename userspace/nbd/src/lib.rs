//! `nbd://` and `nbd+unix://` backends: a fuse-blk block device whose
//! blocks live on an NBD server (nbdkit, qemu-nbd, a storage appliance),
//! reached through libnbd, the protocol's reference client library.
//!
//! The server may restart or the connection drop without failing a
//! request: a command whose connection broke waits while the device
//! reconnects with backoff, and is reissued on the new connection; only
//! after [`ReconnectPolicy::timeout`] do requests fail, with EIO. A
//! command the server leaves unanswered for
//! [`ReconnectPolicy::command_timeout`] counts as a broken connection. An
//! error the server answers (an I/O error of its storage, say) goes to the
//! caller at once.
//!
//! - [`uri`]: recognising and checking NBD URIs.
//! - [`buffer`]: a command's data, large ones in mappings of their own.
//! - [`handle`]: one libnbd handle (a connection), safely.
//! - [`link`]: a connection that reconnects, driven by a thread of its own
//!   with many commands in flight.
//! - [`NbdDevice`]: the `BlockDevice`.

#![deny(missing_docs)]

pub mod buffer;
mod device;
mod ffi;
pub mod handle;
pub mod link;
#[cfg(feature = "testutil")]
#[doc(hidden)]
pub mod testutil;
pub mod uri;

pub use device::{NbdDevice, Options};
pub use link::{LinkStatus, ReconnectPolicy};
