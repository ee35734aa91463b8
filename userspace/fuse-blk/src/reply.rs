//! Reply objects. Each request owns exactly one; answering consumes it and
//! dropping it unanswered answers EIO, so no request can be left hanging.

use std::io::IoSlice;
use std::sync::Arc;

use fuse_blk_proto::abi::WriteOut;
use fuse_blk_proto::reply::{error_header, success_header};
use zerocopy::IntoBytes;

/// Where replies go: the channel a request came from.
pub trait ReplySink: Send + Sync {
    /// Sends one whole reply (header included) as a single message.
    fn send_reply(&self, parts: &[IoSlice<'_>]);
}

/// The untyped answer to one request: a payload or an errno. Transports and
/// namespaces use it directly; handlers get the typed wrappers below.
pub struct Responder {
    unique: u64,
    sink: Option<Arc<dyn ReplySink>>,
}

impl Responder {
    pub fn new(unique: u64, sink: Arc<dyn ReplySink>) -> Responder {
        Responder {
            unique,
            sink: Some(sink),
        }
    }

    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Consumes the responder without answering: for the messages the
    /// kernel expects no answer to (FORGET, INTERRUPT).
    pub fn no_reply(mut self) {
        self.sink.take();
    }

    /// Answers with the concatenation of `payload`.
    pub fn ok(mut self, payload: &[&[u8]]) {
        if let Some(sink) = self.sink.take() {
            let len = payload.iter().map(|p| p.len()).sum();
            let header = success_header(self.unique, len);
            let mut parts = Vec::with_capacity(payload.len() + 1);
            parts.push(IoSlice::new(header.as_bytes()));
            parts.extend(payload.iter().map(|p| IoSlice::new(p)));
            sink.send_reply(&parts);
        }
    }

    /// Answers with an errno (a positive value such as `libc::EIO`).
    pub fn error(mut self, errno: i32) {
        if let Some(sink) = self.sink.take() {
            let header = error_header(self.unique, errno);
            sink.send_reply(&[IoSlice::new(header.as_bytes())]);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            log::warn!(
                "request {} dropped without a reply; answering EIO",
                self.unique
            );
            let header = error_header(self.unique, libc::EIO);
            sink.send_reply(&[IoSlice::new(header.as_bytes())]);
        }
    }
}

/// Answer to `read`: exactly the requested number of bytes, or an errno.
pub struct ReplyData {
    responder: Responder,
    len: u32,
}

impl ReplyData {
    pub(crate) fn new(responder: Responder, len: u32) -> ReplyData {
        ReplyData { responder, len }
    }

    /// Number of bytes the reply must carry.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Answers with `data`, which must be exactly [`len`](Self::len) bytes;
    /// anything else would let the kernel see a short read of a block
    /// device, so it is answered EIO.
    pub fn data(self, data: &[u8]) {
        self.data_parts(&[data]);
    }

    /// Like [`data`](Self::data), gathered from several buffers.
    pub fn data_parts(self, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total != self.len as usize {
            log::error!(
                "read {} answered with {total} bytes instead of {}; answering EIO",
                self.responder.unique(),
                self.len
            );
            self.responder.error(libc::EIO);
        } else {
            self.responder.ok(parts);
        }
    }

    pub fn error(self, errno: i32) {
        self.responder.error(errno);
    }
}

/// Answer to `write`: all of it was written, or an errno.
pub struct ReplyWrite {
    responder: Responder,
    len: u32,
}

impl ReplyWrite {
    pub(crate) fn new(responder: Responder, len: u32) -> ReplyWrite {
        ReplyWrite { responder, len }
    }

    pub fn ok(self) {
        let out = WriteOut {
            size: self.len,
            padding: 0,
        };
        self.responder.ok(&[out.as_bytes()]);
    }

    pub fn error(self, errno: i32) {
        self.responder.error(errno);
    }
}

/// Answer to operations that return nothing but success or an errno.
pub struct ReplyEmpty {
    responder: Responder,
}

impl ReplyEmpty {
    pub(crate) fn new(responder: Responder) -> ReplyEmpty {
        ReplyEmpty { responder }
    }

    pub fn ok(self) {
        self.responder.ok(&[]);
    }

    pub fn error(self, errno: i32) {
        self.responder.error(errno);
    }
}

impl<T> From<std::io::Result<T>> for Outcome {
    fn from(result: std::io::Result<T>) -> Outcome {
        Outcome(result.err().map(|e| e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

/// The result of a synchronous operation as an errno, for handlers that
/// work with `std::io` results: `reply.outcome(file.sync_data())`.
pub struct Outcome(Option<i32>);

impl ReplyEmpty {
    /// Answers success or the errno of an `io::Error` (EIO when it has none).
    pub fn outcome(self, result: impl Into<Outcome>) {
        match result.into().0 {
            None => self.ok(),
            Some(errno) => self.error(errno),
        }
    }
}

impl ReplyWrite {
    /// Answers success or the errno of an `io::Error` (EIO when it has none).
    pub fn outcome(self, result: impl Into<Outcome>) {
        match result.into().0 {
            None => self.ok(),
            Some(errno) => self.error(errno),
        }
    }
}
