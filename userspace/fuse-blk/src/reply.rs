//! Reply objects. Each request owns exactly one; answering consumes it and
//! dropping it unanswered answers EIO, so no request can be left hanging.

use std::cell::RefCell;
use std::io::IoSlice;
use std::sync::Arc;

use fuse_blk_proto::abi::WriteOut;
use fuse_blk_proto::reply::{error_header, success_header};
use zerocopy::IntoBytes;

use crate::mapping::Mapping;
use crate::stats::Tracker;

/// Where replies go: the channel a request came from.
pub trait ReplySink: Send + Sync {
    /// Sends one whole reply (header included) as a single message.
    fn send_reply(&self, parts: &[IoSlice<'_>]);

    /// Answers a READ with "the range reads as zeros" and no data, where
    /// the transport has such a reply; returns false (sending nothing)
    /// where it has not.
    fn send_zeros_reply(&self, _unique: u64) -> bool {
        false
    }

    /// Answers request `unique` with `len` bytes that `fill` writes in
    /// place, or with the errno `fill` returns. A transport whose replies
    /// live in a buffer the kernel reads (an io_uring entry) lets `fill`
    /// write there, so the data is copied once; the default assembles the
    /// reply in a per-thread buffer and sends it with `send_reply`.
    fn send_filled(
        &self,
        unique: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), i32>,
    ) {
        FILL_BUF.with_borrow_mut(|fill_buf| {
            let Some(buf) = fill_buf.get(len) else {
                let header = error_header(unique, libc::ENOMEM);
                return self.send_reply(&[IoSlice::new(header.as_bytes())]);
            };
            match fill(buf) {
                Ok(()) => {
                    let header = success_header(unique, len);
                    self.send_reply(&[IoSlice::new(header.as_bytes()), IoSlice::new(buf)]);
                }
                Err(errno) => {
                    let header = error_header(unique, errno);
                    self.send_reply(&[IoSlice::new(header.as_bytes())]);
                }
            }
        })
    }

    /// Answers request `unique` with the `len` bytes `extents` describe,
    /// in order: ranges of `mapping` (checked to lie within it) and zeros.
    /// A transport whose kernel can copy a reply's data from anywhere in
    /// the daemon's memory (the kernel module's io_uring channels, ABI 4
    /// for one range, ABI 5 for several) hands over where the data is and
    /// keeps `mapping` alive until the kernel has read it, so the data is
    /// copied once, into the request's pages; the default sends it with
    /// `send_reply`, which copies once as well. Zeros come from a region
    /// of zeros of their own, so the holes of a sparse store are never
    /// read (which would map pages into them).
    ///
    /// # Safety
    /// As for [`ReplyData::gathered`].
    unsafe fn send_gathered(
        &self,
        unique: u64,
        mapping: &Arc<Mapping>,
        extents: &[Extent],
        len: usize,
    ) {
        let header = success_header(unique, len);
        let mut parts = Vec::with_capacity(extents.len() + 1);
        parts.push(IoSlice::new(header.as_bytes()));
        // SAFETY: passed on from the caller.
        let complete = unsafe {
            gather(mapping, extents, MAX_REPLY_PARTS - 1, |part| {
                parts.push(IoSlice::new(part))
            })
        };
        if complete {
            return self.send_reply(&parts);
        }
        drop(parts);
        self.send_filled(unique, len, &mut |buf| {
            // SAFETY: passed on from the caller.
            unsafe { copy_extents(mapping, extents, buf) };
            Ok(())
        });
    }
}

/// One part of a READ reply gathered with [`ReplyData::gathered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `offset` in the mapping.
    Mapped {
        /// Where they start in the mapping.
        offset: usize,
        /// How many bytes.
        len: usize,
    },
    /// `len` bytes of zeros.
    Zeros {
        /// How many bytes.
        len: usize,
    },
}

impl Extent {
    /// The bytes it contributes to the reply.
    pub fn len(&self) -> usize {
        match *self {
            Extent::Mapped { len, .. } | Extent::Zeros { len } => len,
        }
    }

    /// Whether it contributes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pieces a gathered reply is sent in at most (`IOV_MAX`, and the kernel
/// module's limit on a commit's iovecs); one needing more is assembled.
pub const MAX_REPLY_PARTS: usize = 1024;

/// Bytes of the zeros that gathered replies point into.
const ZERO_REGION_LEN: usize = 1 << 20;

/// A read-only region of zeros (all of it the shared zero page once read,
/// none of it counted as resident memory), or None if it could not be
/// mapped.
fn zero_region() -> Option<&'static [u8]> {
    static ZEROS: std::sync::OnceLock<Option<Mapping>> = std::sync::OnceLock::new();
    let zeros = ZEROS
        .get_or_init(|| Mapping::zeros(ZERO_REGION_LEN).ok())
        .as_ref()?;
    // SAFETY: a read-only mapping that lives as long as the process.
    Some(unsafe { std::slice::from_raw_parts(zeros.as_ptr(), zeros.len()) })
}

/// Hands `push` the memory `extents` name, in order, zeros as pieces of
/// [`zero_region`]; returns false, having stopped, rather than push more
/// than `limit` pieces, or when there is no zero region.
///
/// # Safety
/// Mapped extents lie within `mapping`, and nothing writes them while the
/// pieces are in use (the contract of [`ReplyData::gathered`]).
pub(crate) unsafe fn gather<'a>(
    mapping: &'a Mapping,
    extents: &[Extent],
    limit: usize,
    mut push: impl FnMut(&'a [u8]),
) -> bool {
    let mut pieces = 0;
    let mut push_piece = |piece: &'a [u8]| {
        pieces += 1;
        if pieces > limit {
            return false;
        }
        push(piece);
        true
    };
    for extent in extents {
        match *extent {
            Extent::Mapped { offset, len } => {
                // SAFETY: within the mapping, and left alone meanwhile (the
                // caller's contract).
                let piece =
                    unsafe { std::slice::from_raw_parts(mapping.as_ptr().add(offset), len) };
                if !push_piece(piece) {
                    return false;
                }
            }
            Extent::Zeros { len } => {
                let Some(zeros) = zero_region() else {
                    return false;
                };
                let mut left = len;
                while left > 0 {
                    let piece = left.min(zeros.len());
                    if !push_piece(&zeros[..piece]) {
                        return false;
                    }
                    left -= piece;
                }
            }
        }
    }
    true
}

/// Copies what `extents` name into `buf`, which is exactly as long.
///
/// # Safety
/// As for [`gather`].
pub(crate) unsafe fn copy_extents(mapping: &Mapping, extents: &[Extent], buf: &mut [u8]) {
    let mut at = 0;
    for extent in extents {
        let piece = &mut buf[at..at + extent.len()];
        match *extent {
            // SAFETY: within the mapping, and left alone meanwhile (the
            // caller's contract).
            Extent::Mapped { offset, len } => piece.copy_from_slice(unsafe {
                std::slice::from_raw_parts(mapping.as_ptr().add(offset), len)
            }),
            Extent::Zeros { .. } => piece.fill(0),
        }
        at += extent.len();
    }
}

impl dyn ReplySink {
    /// Answers request `unique` with `len` bytes of zeros: without copying
    /// anything where the transport can say "zeros" (the kernel module's
    /// io_uring channels), else by filling them in.
    fn send_zeros(&self, unique: u64, len: usize) {
        if !self.send_zeros_reply(unique) {
            self.send_filled(unique, len, &mut |buf| {
                buf.fill(0);
                Ok(())
            });
        }
    }
}

/// Where [`ReplySink::send_filled`] assembles replies by default: one per
/// thread, mapped once for the largest read it has answered rather than
/// allocated per request, and whose pages a worker gives back when it has
/// been idle a while ([`release_fill_buffer`]). A reply is sent before
/// `send_filled` returns, so the buffer is free again for the next.
#[derive(Default)]
struct FillBuffer {
    mapping: Option<Mapping>,
    /// How far replies have written into it since its pages were last
    /// given back.
    touched: usize,
}

/// A thread's first fill buffer is at least this long (the engine's
/// default largest request): mapping costs nothing until it is written,
/// and a buffer this size is seldom mapped again.
const FILL_BUFFER_MIN: usize = 1 << 20;

impl FillBuffer {
    /// The first `len` bytes of the buffer, mapped larger first if need
    /// be; None if that mapping failed.
    fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if self
            .mapping
            .as_ref()
            .is_none_or(|mapping| mapping.len() < len)
        {
            // The old buffer goes first: the two need not both be mapped.
            self.mapping = None;
            self.touched = 0;
            let size = len.next_power_of_two().max(FILL_BUFFER_MIN);
            match Mapping::new(size) {
                Ok(mapping) => self.mapping = Some(mapping.without_huge_pages()),
                Err(e) => {
                    log::error!("mapping a {size}-byte reply buffer: {e}");
                    return None;
                }
            }
        }
        let mapping = self.mapping.as_ref()?;
        self.touched = self.touched.max(len);
        // SAFETY: the mapping is at least `len` long (above) and is this
        // thread's alone; the slice borrows `self` mutably, so no other
        // reference into it is made while the slice lives.
        Some(unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr(), len) })
    }
}

thread_local! {
    static FILL_BUF: RefCell<FillBuffer> = RefCell::new(FillBuffer::default());
}

/// Bytes of this thread's reply buffer written since its pages were last
/// given back.
pub fn fill_buffer_touched() -> usize {
    FILL_BUF.with_borrow(|fill_buf| fill_buf.touched)
}

/// Gives back the pages of this thread's reply buffer (see
/// [`ReplySink::send_filled`]): for a worker that has been idle a while.
pub fn release_fill_buffer() {
    FILL_BUF.with_borrow_mut(|fill_buf| {
        if let Some(mapping) = &fill_buf.mapping {
            // SAFETY: the buffer is borrowed only while a reply is being
            // assembled in it, and this borrows it mutably: no reference
            // into it is live.
            unsafe { mapping.release(0, fill_buf.touched) };
        }
        fill_buf.touched = 0;
    })
}

/// The untyped answer to one request: a payload or an errno. Transports and
/// namespaces use it directly; handlers get the typed wrappers below.
pub struct Responder {
    unique: u64,
    sink: Option<Arc<dyn ReplySink>>,
    /// Counts the answer of a block request (see `stats`).
    tracker: Option<Tracker>,
}

impl Responder {
    /// The responder of request `unique`, whose answer goes to `sink`.
    pub fn new(unique: u64, sink: Arc<dyn ReplySink>) -> Responder {
        Responder {
            unique,
            sink: Some(sink),
            tracker: None,
        }
    }

    pub(crate) fn tracked(mut self, tracker: Tracker) -> Responder {
        self.tracker = Some(tracker);
        self
    }

    /// Counts the answer just sent, if this request is counted.
    fn answered(&mut self, errno: i32, dropped: bool) {
        if let Some(tracker) = self.tracker.take() {
            tracker.finish(errno, dropped);
        }
    }

    /// The id of the request it answers.
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
            self.answered(0, false);
        }
    }

    /// Answers with `len` bytes written in place by `fill`, or with the
    /// errno it returns.
    pub fn fill(mut self, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Result<(), i32>) {
        if let Some(sink) = self.sink.take() {
            let mut errno = 0;
            sink.send_filled(self.unique, len, &mut |buf| {
                fill(buf).inspect_err(|&e| errno = e)
            });
            self.answered(errno, false);
        }
    }

    /// Answers with the `len` bytes `extents` describe.
    ///
    /// # Safety
    /// As for [`ReplyData::gathered`]; the mapped extents lie within the
    /// mapping and add up to `len` with the zeros.
    pub unsafe fn gathered(mut self, mapping: &Arc<Mapping>, extents: &[Extent], len: usize) {
        if let Some(sink) = self.sink.take() {
            // SAFETY: passed on from the caller.
            unsafe { sink.send_gathered(self.unique, mapping, extents, len) };
            self.answered(0, false);
        }
    }

    /// Answers with `len` bytes of zeros.
    pub fn zeros(mut self, len: usize) {
        if let Some(sink) = self.sink.take() {
            sink.send_zeros(self.unique, len);
            self.answered(0, false);
        }
    }

    /// Answers with an errno (a positive value such as `libc::EIO`).
    pub fn error(mut self, errno: i32) {
        if let Some(sink) = self.sink.take() {
            let header = error_header(self.unique, errno);
            sink.send_reply(&[IoSlice::new(header.as_bytes())]);
            self.answered(errno, false);
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
            self.answered(libc::EIO, true);
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

    /// Whether the read is of no bytes (the kernel sends none such).
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

    /// Answers with data written in place: `fill` gets a buffer of exactly
    /// [`len`](Self::len) bytes and must fill all of it, or return an errno.
    /// Where the transport allows, the buffer is the one the kernel copies
    /// from, which saves a copy over [`data`](Self::data):
    /// `reply.fill(|buf| file.read_exact_at(buf, offset))`.
    pub fn fill(self, mut fill: impl FnMut(&mut [u8]) -> std::io::Result<()>) {
        let len = self.len as usize;
        self.responder.fill(len, &mut |buf| {
            fill(buf).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        });
    }

    /// Answers with the [`len`](Self::len) bytes at `offset` in `mapping`,
    /// memory the handler keeps its data in (a RAM disk's store, a
    /// cache). Where the transport allows (the kernel module's io_uring
    /// channels), the kernel copies them straight from there into the
    /// request's pages, after this returns and before the request
    /// completes, so the data moves once where [`fill`](Self::fill) moves
    /// it twice; elsewhere they are copied or sent before this returns. The
    /// reply holds a reference to `mapping` until the kernel is done with
    /// it. A range outside the mapping is answered EIO.
    ///
    /// # Safety
    /// Nothing may write the range while this call runs. From then until
    /// the request completes, the range must go on holding these blocks:
    /// it may change only by newer data of the same blocks (a write or
    /// discard racing with this read, which a block device may answer
    /// either way), never be reused for other data.
    pub unsafe fn mapped(self, mapping: &Arc<Mapping>, offset: usize) {
        let len = self.len as usize;
        // SAFETY: the caller's contract is the one gathered asks for.
        unsafe { self.gathered(mapping, &[Extent::Mapped { offset, len }]) };
    }

    /// Like [`mapped`](Self::mapped), with the data gathered in order from
    /// ranges of `mapping` and runs of zeros: a sparse store answers a
    /// read over written blocks and holes without reading the holes (which
    /// would map pages into them) and without assembling the data first.
    /// Over the kernel module's io_uring channels (ABI 5) the kernel
    /// gathers it straight into the request's pages. Extents that do not
    /// add up to [`len`](Self::len) or leave the mapping are answered EIO.
    ///
    /// # Safety
    /// As for [`mapped`](Self::mapped), for every mapped extent.
    pub unsafe fn gathered(self, mapping: &Arc<Mapping>, extents: &[Extent]) {
        let len = self.len as usize;
        let outside = extents.iter().find(|extent| match **extent {
            Extent::Mapped { offset, len } => offset
                .checked_add(len)
                .is_none_or(|end| end > mapping.len()),
            Extent::Zeros { .. } => false,
        });
        if let Some(extent) = outside {
            log::error!(
                "read {} answered from outside its mapping ({extent:?} of {} bytes); answering EIO",
                self.responder.unique(),
                mapping.len()
            );
            return self.responder.error(libc::EIO);
        }
        let total = extents
            .iter()
            .try_fold(0usize, |sum, extent| sum.checked_add(extent.len()));
        if total != Some(len) {
            log::error!(
                "read {} answered with extents of {total:?} bytes instead of {len}; answering EIO",
                self.responder.unique()
            );
            return self.responder.error(libc::EIO);
        }
        // SAFETY: in range and adding up (checked above); the rest is the
        // caller's.
        unsafe { self.responder.gathered(mapping, extents, len) };
    }

    /// Answers that the whole range reads as zeros, as a sparse backend
    /// does for what was never written: over the kernel module's io_uring
    /// channels nothing is copied, the kernel zeroes the pages itself.
    pub fn zeros(self) {
        self.responder.zeros(self.len as usize);
    }

    /// Answers that the read failed with `errno` (e.g. `libc::EIO`).
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

    /// Answers that all of the data was written.
    pub fn ok(self) {
        let out = WriteOut {
            size: self.len,
            padding: 0,
        };
        self.responder.ok(&[out.as_bytes()]);
    }

    /// Answers that the write failed with `errno` (e.g. `libc::EIO`,
    /// `libc::ENOSPC`).
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

    /// Answers that the operation succeeded.
    pub fn ok(self) {
        self.responder.ok(&[]);
    }

    /// Answers that the operation failed with `errno` (e.g. `libc::EIO`,
    /// `libc::EOPNOTSUPP`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_blk_proto::abi::OutHeader;
    use zerocopy::FromBytes;

    /// Keeps every reply it is sent, as one byte string each, and the
    /// number of parts each came in.
    #[derive(Default)]
    struct Recorder(
        parking_lot::Mutex<Vec<Vec<u8>>>,
        parking_lot::Mutex<Vec<usize>>,
    );

    impl ReplySink for Recorder {
        fn send_reply(&self, parts: &[IoSlice<'_>]) {
            self.0
                .lock()
                .push(parts.iter().flat_map(|p| p.iter().copied()).collect());
            self.1.lock().push(parts.len());
        }
    }

    fn reply_with(fill: impl FnMut(&mut [u8]) -> std::io::Result<()>) -> Vec<u8> {
        let sink = Arc::new(Recorder::default());
        ReplyData::new(Responder::new(9, sink.clone()), 6).fill(fill);
        let mut replies = sink.0.lock();
        assert_eq!(replies.len(), 1);
        replies.pop().unwrap()
    }

    #[test]
    fn fill_answers_what_was_written_in_place() {
        let reply = reply_with(|buf| {
            assert_eq!(buf.len(), 6);
            buf.copy_from_slice(b"abcdef");
            Ok(())
        });
        let (header, payload) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!((header.len, header.error, header.unique), (22, 0, 9));
        assert_eq!(payload, b"abcdef");
    }

    #[test]
    fn zeros_are_filled_in_where_the_transport_has_no_zeros_reply() {
        let sink = Arc::new(Recorder::default());
        ReplyData::new(Responder::new(4, sink.clone()), 4096).zeros();
        let reply = sink.0.lock().pop().unwrap();
        let (header, payload) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!((header.len, header.error, header.unique), (16 + 4096, 0, 4));
        assert!(payload.len() == 4096 && payload.iter().all(|&b| b == 0));
    }

    #[test]
    fn mapped_sends_the_range_and_refuses_one_outside_the_mapping() {
        let mapping = Arc::new(Mapping::new(8192).unwrap());
        // SAFETY: a fresh mapping of this test's own.
        unsafe { mapping.as_ptr().add(4096).copy_from(b"abcdef".as_ptr(), 6) };
        let sink = Arc::new(Recorder::default());
        // SAFETY: nothing else uses the mapping.
        unsafe { ReplyData::new(Responder::new(3, sink.clone()), 6).mapped(&mapping, 4096) };
        // SAFETY: as above.
        unsafe { ReplyData::new(Responder::new(5, sink.clone()), 6).mapped(&mapping, 8190) };
        let replies = sink.0.lock();
        let (header, payload) = OutHeader::read_from_prefix(&replies[0]).unwrap();
        assert_eq!((header.len, header.error, header.unique), (22, 0, 3));
        assert_eq!(payload, b"abcdef");
        let (header, payload) = OutHeader::read_from_prefix(&replies[1]).unwrap();
        assert_eq!(
            (header.error, header.unique, payload.len()),
            (-libc::EIO, 5, 0)
        );
    }

    #[test]
    fn gathered_sends_mapped_ranges_and_zeros_in_order_without_copying() {
        let mapping = Arc::new(Mapping::new(8192).unwrap());
        // SAFETY: a fresh mapping of this test's own.
        unsafe {
            mapping.as_ptr().copy_from(b"head".as_ptr(), 4);
            mapping.as_ptr().add(4096).copy_from(b"abcdef".as_ptr(), 6);
        }
        // More zeros than the zero region holds: sent as two pieces of it.
        let zeros = ZERO_REGION_LEN + 100;
        let extents = [
            Extent::Mapped {
                offset: 4096,
                len: 6,
            },
            Extent::Zeros { len: zeros },
            Extent::Mapped { offset: 0, len: 4 },
        ];
        let len = 10 + zeros as u32;
        let sink = Arc::new(Recorder::default());
        // SAFETY: nothing else uses the mapping.
        unsafe {
            ReplyData::new(Responder::new(3, sink.clone()), len).gathered(&mapping, &extents)
        };
        let reply = sink.0.lock().pop().unwrap();
        let (header, payload) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!((header.len, header.error, header.unique), (16 + len, 0, 3));
        let mut expected = b"abcdef".to_vec();
        expected.resize(6 + zeros, 0);
        expected.extend_from_slice(b"head");
        assert!(payload == expected);
        assert_eq!(*sink.1.lock(), [1 + 4]);
    }

    #[test]
    fn gathered_refuses_extents_outside_the_mapping_or_of_the_wrong_length() {
        let mapping = Arc::new(Mapping::new(4096).unwrap());
        let sink = Arc::new(Recorder::default());
        // Past the mapping's end, offset overflowing, 11 bytes of 12.
        let bad: [&[Extent]; 3] = [
            &[
                Extent::Zeros { len: 6 },
                Extent::Mapped {
                    offset: 4094,
                    len: 6,
                },
            ],
            &[
                Extent::Mapped {
                    offset: usize::MAX,
                    len: 2,
                },
                Extent::Zeros { len: 10 },
            ],
            &[
                Extent::Mapped { offset: 0, len: 6 },
                Extent::Zeros { len: 5 },
            ],
        ];
        for extents in bad {
            // SAFETY: nothing else uses the mapping.
            unsafe {
                ReplyData::new(Responder::new(5, sink.clone()), 12).gathered(&mapping, extents)
            };
        }
        for reply in sink.0.lock().iter() {
            let (header, payload) = OutHeader::read_from_prefix(reply).unwrap();
            assert_eq!(
                (header.error, header.unique, payload.len()),
                (-libc::EIO, 5, 0)
            );
        }
        assert_eq!(sink.0.lock().len(), 3);
    }

    #[test]
    fn gathered_replies_of_too_many_pieces_are_assembled() {
        let mapping = Arc::new(Mapping::new(4096).unwrap());
        // SAFETY: a fresh mapping of this test's own.
        unsafe { mapping.as_ptr().write_bytes(7, 4096) };
        let extents: Vec<Extent> = (0..MAX_REPLY_PARTS)
            .flat_map(|_| {
                [
                    Extent::Mapped { offset: 10, len: 1 },
                    Extent::Zeros { len: 1 },
                ]
            })
            .collect();
        let len = extents.len() as u32;
        let sink = Arc::new(Recorder::default());
        // SAFETY: nothing else uses the mapping.
        unsafe {
            ReplyData::new(Responder::new(6, sink.clone()), len).gathered(&mapping, &extents)
        };
        let reply = sink.0.lock().pop().unwrap();
        let (header, payload) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!((header.error, header.unique), (0, 6));
        assert!(payload.chunks(2).all(|pair| pair == [7, 0]) && payload.len() == len as usize);
        assert_eq!(*sink.1.lock(), [2]);
    }

    #[test]
    fn fill_answers_the_errno_of_a_failure() {
        let reply = reply_with(|_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        let (header, payload) = OutHeader::read_from_prefix(&reply).unwrap();
        assert_eq!((header.error, payload.len()), (-libc::ENOSPC, 0));
        let reply = reply_with(|_| Err(std::io::ErrorKind::UnexpectedEof.into()));
        assert_eq!(
            OutHeader::read_from_prefix(&reply).unwrap().0.error,
            -libc::EIO
        );
    }
}
