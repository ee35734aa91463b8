//! A queue's helper threads. Large reads and writes go to them, unless the
//! device declines ([`BlockDevice::parallel_large_io`]): the kernel copies
//! a request's data in the worker's thread, the device copies it again in
//! its handler, and with helpers the two overlap across requests and one
//! queue's large requests use more than one CPU. A helper commits the
//! entry only once the handler has returned, since a WRITE's data stays
//! borrowed for the whole call.
//!
//! [`BlockDevice::parallel_large_io`]: crate::BlockDevice::parallel_large_io

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use fuse_blk_proto::abi::{opcode, InHeader, ReadIn};
use zerocopy::FromBytes;

use super::{EntrySink, Wire, COMMIT_NOW, IN_HELPER, MAX_HEAD, REPLIED_IN_HELPER};
use crate::session::Session;

/// Reads and writes of at least this many bytes go to the helper threads:
/// below it the hand-over costs more than the overlap gains.
const OFFLOAD_MIN: usize = 128 * 1024;

/// Helper threads per queue at most (at most one per CPU).
const MAX_HELPERS: usize = 4;

/// Where a worker hands large requests; dropping it ends the helpers.
pub(super) struct Helpers<W> {
    jobs: mpsc::Sender<Job<W>>,
    /// Whether large reads, and large writes, go there.
    reads: bool,
    writes: bool,
}

/// A large request handed to a helper thread.
struct Job<W> {
    sink: Arc<EntrySink<W>>,
    head: [u8; MAX_HEAD],
    /// Bytes of WRITE data in the entry's payload buffer.
    payload_len: usize,
}

/// Runs `run` with the helper threads of `queue`, or with none where the
/// device wants none; returns once `run` has and the helpers have ended.
pub(super) fn with_helpers<W: Wire>(
    session: &Session,
    queue: u16,
    run: impl FnOnce(Option<Helpers<W>>) -> io::Result<()>,
) -> io::Result<()> {
    let reads = session.parallel_large_io(false);
    let writes = session.parallel_large_io(true);
    let count = if reads || writes {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_HELPERS)
    } else {
        0
    };
    let (jobs, receiver) = mpsc::channel::<Job<W>>();
    let receiver = parking_lot::Mutex::new(receiver);
    std::thread::scope(|scope| {
        for index in 0..count {
            let receiver = &receiver;
            std::thread::Builder::new()
                .name(format!("fuse-blk-q{queue}h{index}"))
                .spawn_scoped(scope, move || help(session, queue, receiver))?;
        }
        run((count > 0).then_some(Helpers {
            jobs,
            reads,
            writes,
        }))
    })
}

impl<W: Wire> Helpers<W> {
    /// Hands the request in `sink`'s entry (of `opcode`, with header and
    /// argument `head` and `in_payload` bytes in the payload buffer) to a
    /// helper if it is a large READ or WRITE; returns whether it did.
    pub(super) fn take(
        &self,
        sink: &Arc<EntrySink<W>>,
        opcode: u32,
        head: &[u8; MAX_HEAD],
        in_payload: usize,
    ) -> bool {
        let Some(payload_len) = self.takes(opcode, head, in_payload) else {
            return false;
        };
        sink.commit.store(IN_HELPER, Ordering::Release);
        let job = Job {
            sink: sink.clone(),
            head: *head,
            payload_len,
        };
        if self.jobs.send(job).is_ok() {
            return true;
        }
        // The helpers are gone (one panicked): the worker handles it.
        sink.commit.store(COMMIT_NOW, Ordering::Release);
        false
    }

    /// Whether a request goes to the helpers: a large READ or WRITE of a
    /// kind they take. Returns the bytes of its data in the payload.
    fn takes(&self, opcode: u32, head: &[u8; MAX_HEAD], in_payload: usize) -> Option<usize> {
        // (bytes moved, bytes of it in the payload buffer)
        let (size, payload_len) = match opcode {
            opcode::WRITE if self.writes => (in_payload, in_payload),
            opcode::READ if self.reads => {
                let arg = &head[std::mem::size_of::<InHeader>()..];
                (ReadIn::read_from_prefix(arg).ok()?.0.size as usize, 0)
            }
            _ => return None,
        };
        (size >= OFFLOAD_MIN).then_some(payload_len)
    }
}

/// A helper thread: runs the handler for the jobs it takes until the
/// worker goes.
fn help<W: Wire>(session: &Session, queue: u16, jobs: &parking_lot::Mutex<mpsc::Receiver<Job<W>>>) {
    loop {
        // The guard goes at the end of the statement: one helper waits in
        // recv(), the others for the lock.
        let Ok(job) = jobs.lock().recv() else {
            return;
        };
        let sink = job.sink;
        // SAFETY: as in `Worker::dispatch`; the entry is committed only
        // after this call returns (`EntrySink::replied`), so the kernel
        // does not reuse the payload while the handler may still read it.
        let payload = unsafe {
            std::slice::from_raw_parts(sink.buffers.payload(sink.entry), job.payload_len)
        };
        session.dispatch_split(queue, &job.head, payload, sink.clone());
        if sink.commit.swap(COMMIT_NOW, Ordering::AcqRel) == REPLIED_IN_HELPER {
            sink.buffers.commit(sink.entry);
        }
    }
}
