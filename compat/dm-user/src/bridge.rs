//! The bridge between block requests and dm-user messages: a queue of
//! messages for the character device, the descriptors open on it (what
//! each has read and not answered, what it is in the middle of reading or
//! answering), and the reads parked until a message comes. It does no I/O:
//! every call returns the [`Action`]s its caller performs (replies on
//! `/dev/cuse`, poll wake-ups) and completes block requests through their
//! [`Done`] callbacks after the lock is dropped.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::wire::{answer, Header, HEADER_LEN};

/// How a block request ends: `Ok(data)` (a READ's data, empty for every
/// other type) or `Err(errno)`.
pub type Done = Box<dyn FnOnce(Result<Vec<u8>, i32>) + Send>;

/// One block request on its way to a daemon.
pub struct Message {
    /// What the daemon reads first.
    pub header: Header,
    /// A WRITE's data.
    pub data: Vec<u8>,
    done: Done,
    queued: Instant,
}

impl Message {
    /// `header.seq` is assigned by [`Bridge::submit`].
    pub fn new(header: Header, data: Vec<u8>, done: Done) -> Message {
        Message {
            header,
            data,
            done,
            queued: Instant::now(),
        }
    }

    /// Bytes the daemon reads: the header, then a WRITE's data.
    fn wire_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Up to `max` of those bytes from `pos`.
    fn wire_bytes(&self, pos: usize, max: usize) -> Vec<u8> {
        let end = self.wire_len().min(pos + max);
        let mut out = Vec::with_capacity(end - pos);
        if pos < HEADER_LEN {
            out.extend_from_slice(&self.header.encode()[pos..HEADER_LEN.min(end)]);
        }
        if end > HEADER_LEN {
            out.extend_from_slice(&self.data[pos.max(HEADER_LEN) - HEADER_LEN..end - HEADER_LEN]);
        }
        out
    }
}

/// What the caller does on the character device's FUSE connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer FUSE request `unique`: data (a READ reply) or an errno.
    Reply {
        /// The FUSE request answered.
        unique: u64,
        /// Data, or an errno.
        result: Result<Vec<u8>, i32>,
    },
    /// Wake the poll waiters registered with this kernel handle.
    PollWakeup(u64),
}

/// What a `read(2)` chunk on the device gets.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// What the read returns.
    Data(Vec<u8>),
    /// The read fails with this errno.
    Error(i32),
    /// No message yet: answered later through an [`Action::Reply`].
    Parked,
}

/// A READ answer whose data is still coming.
struct Answering {
    seq: u64,
    data: Vec<u8>,
    want: usize,
}

#[derive(Default)]
struct Descriptor {
    /// The message this descriptor is reading, and how far.
    reading: Option<(u64, usize)>,
    /// Read (in part or whole) and not answered, by seq.
    inflight: HashMap<u64, Message>,
    answering: Option<Answering>,
}

struct Waiter {
    unique: u64,
    fh: u64,
    size: usize,
}

/// What happens to the messages a closed descriptor had read and not
/// answered (the recovery policy of `attach`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Fail them (EIO) instead of queueing them again for another
    /// descriptor or the next daemon.
    pub fail_inflight: bool,
    /// How long a queued message waits while no descriptor is open before
    /// it fails (EIO).
    pub no_daemon_timeout: Duration,
}

struct State {
    queue: VecDeque<Message>,
    descriptors: HashMap<u64, Descriptor>,
    waiters: VecDeque<Waiter>,
    poll_handles: Vec<u64>,
    next_fh: u64,
    next_seq: u64,
    removed: bool,
    /// Since when no descriptor has been open.
    no_daemon_since: Option<Instant>,
}

/// The messages and descriptors of one dm-user device.
pub struct Bridge {
    state: Mutex<State>,
    policy: Policy,
}

/// Block requests to complete once the lock is dropped.
type Completions = Vec<(Done, Result<Vec<u8>, i32>)>;

fn complete(completions: Completions) {
    for (done, result) in completions {
        done(result);
    }
}

impl Bridge {
    /// A bridge with no message and no descriptor yet.
    pub fn new(policy: Policy) -> Bridge {
        Bridge {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                descriptors: HashMap::new(),
                waiters: VecDeque::new(),
                poll_handles: Vec::new(),
                next_fh: 1,
                next_seq: 1,
                removed: false,
                no_daemon_since: Some(Instant::now()),
            }),
            policy,
        }
    }

    /// Queues a block request for the daemon; returns what to send.
    pub fn submit(&self, mut message: Message) -> Vec<Action> {
        let mut state = self.state.lock();
        if state.removed {
            drop(state);
            (message.done)(Err(libc::ENODEV));
            return Vec::new();
        }
        message.header.seq = state.next_seq;
        state.next_seq += 1;
        state.queue.push_back(message);
        state.dispatch()
    }

    /// A new descriptor (FUSE_OPEN); returns its handle.
    pub fn open(&self) -> u64 {
        let mut state = self.state.lock();
        let fh = state.next_fh;
        state.next_fh += 1;
        state.descriptors.insert(fh, Descriptor::default());
        state.no_daemon_since = None;
        fh
    }

    /// A chunk of `read(2)` on descriptor `fh`: `offset` bytes of the same
    /// call have been returned already, `size` more are wanted.
    pub fn read(
        &self,
        fh: u64,
        unique: u64,
        offset: u64,
        size: usize,
        nonblock: bool,
    ) -> ReadOutcome {
        let mut state = self.state.lock();
        if state.removed {
            return ReadOutcome::Error(libc::ENOTBLK);
        }
        let Some(descriptor) = state.descriptors.get_mut(&fh) else {
            return ReadOutcome::Error(libc::EBADF);
        };
        if descriptor.reading.is_some() {
            return ReadOutcome::Data(descriptor.continue_reading(size));
        }
        // One read never spans two messages: a chunk after the first of a
        // call ends the call where the last message ended.
        if offset > 0 {
            return ReadOutcome::Data(Vec::new());
        }
        if let Some(message) = state.queue.pop_front() {
            let descriptor = state.descriptors.get_mut(&fh).expect("looked up above");
            return ReadOutcome::Data(descriptor.start_reading(message, size));
        }
        if nonblock {
            return ReadOutcome::Error(libc::EAGAIN);
        }
        state.waiters.push_back(Waiter { unique, fh, size });
        ReadOutcome::Parked
    }

    /// A chunk of `write(2)` on descriptor `fh`: answers, or parts of
    /// them. Returns the bytes taken (all of them) or an errno: EINVAL for
    /// an answer that is not one (a short header, an unknown seq, a wrong
    /// type).
    pub fn write(&self, fh: u64, bytes: &[u8]) -> Result<usize, i32> {
        let mut completions = Completions::new();
        let result = {
            let mut state = self.state.lock();
            match state.descriptors.get_mut(&fh) {
                None => Err(libc::EBADF),
                Some(descriptor) => descriptor.take_answers(bytes, &mut completions),
            }
        };
        complete(completions);
        result.map(|()| bytes.len())
    }

    /// Descriptor `fh` is closed (FUSE_RELEASE): what it had read and not
    /// answered is queued again or failed, by the policy.
    pub fn release(&self, fh: u64) -> Vec<Action> {
        let mut completions = Completions::new();
        let actions = {
            let mut state = self.state.lock();
            let Some(descriptor) = state.descriptors.remove(&fh) else {
                return Vec::new();
            };
            if state.descriptors.is_empty() {
                state.no_daemon_since = Some(Instant::now());
            }
            let mut orphans: Vec<Message> = descriptor.inflight.into_values().collect();
            orphans.sort_by_key(|m| std::cmp::Reverse(m.header.seq));
            let requeue = !self.policy.fail_inflight && !state.removed;
            for message in orphans {
                if requeue {
                    state.queue.push_front(message);
                } else {
                    completions.push((message.done, Err(libc::EIO)));
                }
            }
            state.dispatch()
        };
        complete(completions);
        actions
    }

    /// FUSE_INTERRUPT of request `unique`: a parked read ends with EINTR.
    pub fn interrupt(&self, unique: u64) -> Vec<Action> {
        let mut state = self.state.lock();
        let before = state.waiters.len();
        state.waiters.retain(|w| w.unique != unique);
        if state.waiters.len() == before {
            return Vec::new();
        }
        vec![Action::Reply {
            unique,
            result: Err(libc::EINTR),
        }]
    }

    /// FUSE_POLL: the events ready now (`POLLIN` with a message to read or
    /// once removed, `POLLOUT` always); with `notify_handle`, the waiter is
    /// woken when that changes.
    pub fn poll(&self, fh: u64, notify_handle: Option<u64>) -> u32 {
        let mut state = self.state.lock();
        let readable = state.removed
            || !state.queue.is_empty()
            || state
                .descriptors
                .get(&fh)
                .is_some_and(|d| d.reading.is_some());
        if readable {
            return (libc::POLLIN | libc::POLLRDNORM | libc::POLLOUT | libc::POLLWRNORM) as u32;
        }
        if let Some(kh) = notify_handle {
            if !state.poll_handles.contains(&kh) {
                state.poll_handles.push(kh);
            }
        }
        (libc::POLLOUT | libc::POLLWRNORM) as u32
    }

    /// The target is gone: parked and later reads fail with ENOTBLK, queued
    /// and later block requests with ENODEV; what descriptors hold fails
    /// when they close.
    pub fn remove(&self) -> Vec<Action> {
        let mut completions = Completions::new();
        let actions = {
            let mut state = self.state.lock();
            state.removed = true;
            for message in state.queue.drain(..) {
                completions.push((message.done, Err(libc::ENODEV)));
            }
            let mut actions: Vec<Action> = state
                .waiters
                .drain(..)
                .map(|w| Action::Reply {
                    unique: w.unique,
                    result: Err(libc::ENOTBLK),
                })
                .collect();
            actions.extend(state.poll_handles.drain(..).map(Action::PollWakeup));
            actions
        };
        complete(completions);
        actions
    }

    /// Fails what has waited longer than the policy allows with no
    /// descriptor open; called about once a second.
    pub fn expire(&self, now: Instant) {
        let mut completions = Completions::new();
        {
            let mut state = self.state.lock();
            let Some(since) = state.no_daemon_since else {
                return;
            };
            let timeout = self.policy.no_daemon_timeout;
            while let Some(first) = state.queue.front() {
                if now.duration_since(first.queued.max(since)) < timeout {
                    break;
                }
                let message = state.queue.pop_front().expect("front exists");
                completions.push((message.done, Err(libc::EIO)));
            }
        }
        complete(completions);
    }

    /// Descriptors open on the device.
    pub fn descriptors(&self) -> usize {
        self.state.lock().descriptors.len()
    }

    /// Messages queued and not yet read.
    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }
}

impl State {
    /// Hands queued messages to parked reads; wakes poll waiters while
    /// messages are left.
    fn dispatch(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        while !self.queue.is_empty() {
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            let Some(descriptor) = self.descriptors.get_mut(&waiter.fh) else {
                actions.push(Action::Reply {
                    unique: waiter.unique,
                    result: Err(libc::EBADF),
                });
                continue;
            };
            let message = self.queue.pop_front().expect("not empty");
            actions.push(Action::Reply {
                unique: waiter.unique,
                result: Ok(descriptor.start_reading(message, waiter.size)),
            });
        }
        if !self.queue.is_empty() {
            actions.extend(self.poll_handles.drain(..).map(Action::PollWakeup));
        }
        actions
    }
}

impl Descriptor {
    fn start_reading(&mut self, message: Message, size: usize) -> Vec<u8> {
        let seq = message.header.seq;
        self.inflight.insert(seq, message);
        self.reading = Some((seq, 0));
        self.continue_reading(size)
    }

    fn continue_reading(&mut self, size: usize) -> Vec<u8> {
        let Some((seq, pos)) = self.reading else {
            return Vec::new();
        };
        let Some(message) = self.inflight.get(&seq) else {
            // Answered before it was read to the end.
            self.reading = None;
            return Vec::new();
        };
        let bytes = message.wire_bytes(pos, size);
        let pos = pos + bytes.len();
        self.reading = (pos < message.wire_len()).then_some((seq, pos));
        bytes
    }

    fn take_answers(&mut self, mut bytes: &[u8], completions: &mut Completions) -> Result<(), i32> {
        while !bytes.is_empty() {
            if let Some(answering) = &mut self.answering {
                let take = (answering.want - answering.data.len()).min(bytes.len());
                answering.data.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if answering.data.len() == answering.want {
                    let answering = self.answering.take().expect("is some");
                    if let Some(message) = self.inflight.remove(&answering.seq) {
                        completions.push((message.done, Ok(answering.data)));
                    }
                }
                continue;
            }
            // A header, whole, at the start of an answer.
            let header = Header::parse(bytes).ok_or(libc::EINVAL)?;
            let Some(message) = self.inflight.get(&header.seq) else {
                return Err(libc::EINVAL);
            };
            let result = match header.kind {
                answer::SUCCESS => Ok(()),
                answer::ERROR => Err(libc::EIO),
                answer::UNSUPPORTED => Err(libc::EOPNOTSUPP),
                _ => return Err(libc::EINVAL),
            };
            bytes = &bytes[HEADER_LEN..];
            if self.reading.is_some_and(|(seq, _)| seq == header.seq) {
                self.reading = None;
            }
            let wants_data = message.header.kind == crate::wire::kind::READ && result.is_ok();
            if wants_data && message.header.len > 0 {
                self.answering = Some(Answering {
                    seq: header.seq,
                    data: Vec::with_capacity(message.header.len as usize),
                    want: message.header.len as usize,
                });
                continue;
            }
            let message = self.inflight.remove(&header.seq).expect("looked up above");
            completions.push((message.done, result.map(|()| Vec::new())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::kind;
    use std::sync::mpsc;

    type Results = mpsc::Receiver<(u64, Result<Vec<u8>, i32>)>;

    fn bridge(fail_inflight: bool) -> Bridge {
        Bridge::new(Policy {
            fail_inflight,
            no_daemon_timeout: Duration::from_secs(30),
        })
    }

    /// A message whose completion is sent on a channel, tagged `tag`.
    fn message(kind: u64, sector: u64, len: u64, data: Vec<u8>, tag: u64) -> (Message, Results) {
        let (tx, rx) = mpsc::channel();
        let header = Header {
            seq: 0,
            kind,
            flags: 0,
            sector,
            len,
        };
        let done: Done = Box::new(move |result| tx.send((tag, result)).unwrap());
        (Message::new(header, data, done), rx)
    }

    fn answer_header(seq: u64, kind: u64) -> Vec<u8> {
        Header {
            seq,
            kind,
            ..Header::default()
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn a_write_is_read_in_pieces_and_answered() {
        let b = bridge(false);
        let fh = b.open();
        let (m, rx) = message(kind::WRITE, 8, 1024, vec![7; 1024], 1);
        assert!(b.submit(m).is_empty());
        // 10 bytes, then the rest of the header and some data...
        let ReadOutcome::Data(first) = b.read(fh, 10, 0, 10, false) else {
            panic!()
        };
        assert_eq!(first.len(), 10);
        let ReadOutcome::Data(second) = b.read(fh, 11, 0, 100, false) else {
            panic!()
        };
        let mut all = first;
        all.extend(second);
        // ...and a later chunk of the same call continues the message.
        let ReadOutcome::Data(rest) = b.read(fh, 11, 100, 10_000, false) else {
            panic!()
        };
        all.extend(rest);
        assert_eq!(all.len(), 40 + 1024);
        let header = Header::parse(&all).unwrap();
        assert_eq!(
            (header.seq, header.kind, header.sector, header.len),
            (1, 1, 8, 1024)
        );
        assert!(all[40..].iter().all(|&x| x == 7));
        // A next chunk of the same call gets nothing: no spanning.
        assert_eq!(b.read(fh, 11, 2000, 100, false), ReadOutcome::Data(vec![]));
        assert_eq!(b.write(fh, &answer_header(1, answer::SUCCESS)), Ok(40));
        assert_eq!(rx.try_recv().unwrap(), (1, Ok(vec![])));
    }

    #[test]
    fn a_read_answer_in_pieces_and_out_of_order() {
        let b = bridge(false);
        let fh = b.open();
        let (m1, rx1) = message(kind::READ, 0, 512, vec![], 1);
        let (m2, rx2) = message(kind::READ, 1, 512, vec![], 2);
        b.submit(m1);
        b.submit(m2);
        let ReadOutcome::Data(h1) = b.read(fh, 1, 0, 4096, false) else {
            panic!()
        };
        assert_eq!(h1.len(), 40, "a READ carries no data");
        let ReadOutcome::Data(h2) = b.read(fh, 2, 0, 4096, false) else {
            panic!()
        };
        assert_eq!(Header::parse(&h2).unwrap().seq, 2);
        // Second first: header with some data, then the rest in two.
        let mut answer = answer_header(2, answer::SUCCESS);
        answer.extend_from_slice(&[2; 100]);
        assert_eq!(b.write(fh, &answer), Ok(140));
        assert_eq!(b.write(fh, &[2; 400]), Ok(400));
        assert!(rx2.try_recv().is_err());
        assert_eq!(b.write(fh, &[2; 12]), Ok(12));
        assert_eq!(rx2.try_recv().unwrap(), (2, Ok(vec![2; 512])));
        assert_eq!(b.write(fh, &answer_header(1, answer::ERROR)), Ok(40));
        assert_eq!(rx1.try_recv().unwrap(), (1, Err(libc::EIO)));
    }

    #[test]
    fn garbage_answers_get_einval() {
        let b = bridge(false);
        let fh = b.open();
        let (m, rx) = message(kind::FLUSH, 0, 0, vec![], 1);
        b.submit(m);
        b.read(fh, 1, 0, 4096, false);
        assert_eq!(
            b.write(fh, &answer_header(99, answer::SUCCESS)),
            Err(libc::EINVAL)
        );
        assert_eq!(
            b.write(fh, &answer_header(1, answer::SUCCESS)[..39]),
            Err(libc::EINVAL)
        );
        assert_eq!(b.write(fh, &answer_header(1, 7)), Err(libc::EINVAL));
        // Another descriptor cannot answer it.
        let other = b.open();
        assert_eq!(
            b.write(other, &answer_header(1, answer::SUCCESS)),
            Err(libc::EINVAL)
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(b.write(fh, &answer_header(1, answer::UNSUPPORTED)), Ok(40));
        assert_eq!(rx.try_recv().unwrap(), (1, Err(libc::EOPNOTSUPP)));
        // Answered once: a second answer is for an unknown seq.
        assert_eq!(
            b.write(fh, &answer_header(1, answer::SUCCESS)),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn parked_reads_nonblocking_and_interrupts() {
        let b = bridge(false);
        let fh = b.open();
        assert_eq!(
            b.read(fh, 5, 0, 4096, true),
            ReadOutcome::Error(libc::EAGAIN)
        );
        assert_eq!(
            b.poll(fh, Some(77)),
            (libc::POLLOUT | libc::POLLWRNORM) as u32
        );
        assert_eq!(b.read(fh, 6, 0, 4096, false), ReadOutcome::Parked);
        assert_eq!(b.read(fh, 7, 0, 4096, false), ReadOutcome::Parked);
        assert_eq!(
            b.interrupt(7),
            vec![Action::Reply {
                unique: 7,
                result: Err(libc::EINTR)
            }]
        );
        assert!(b.interrupt(7).is_empty());
        let (m, _rx) = message(kind::DISCARD, 16, 4096, vec![], 1);
        let actions = b.submit(m);
        assert_eq!(actions.len(), 1);
        match &actions[0] {
            Action::Reply {
                unique: 6,
                result: Ok(bytes),
            } => assert_eq!(Header::parse(bytes).unwrap().kind, kind::DISCARD),
            other => panic!("{other:?}"),
        }
        // Queued with nobody reading: the poll waiter is woken.
        let (m, _rx2) = message(kind::READ, 0, 512, vec![], 2);
        assert_eq!(b.submit(m), vec![Action::PollWakeup(77)]);
        assert!(b.poll(fh, None) & libc::POLLIN as u32 != 0);
    }

    #[test]
    fn closing_requeues_or_fails_what_was_read() {
        for fail_inflight in [false, true] {
            let b = bridge(fail_inflight);
            let a = b.open();
            let (m, rx) = message(kind::WRITE, 0, 512, vec![1; 512], 1);
            b.submit(m);
            let ReadOutcome::Data(part) = b.read(a, 1, 0, 50, false) else {
                panic!()
            };
            assert_eq!(part.len(), 50);
            let other = b.open();
            assert_eq!(b.read(other, 2, 0, 4096, false), ReadOutcome::Parked);
            let actions = b.release(a);
            if fail_inflight {
                assert!(actions.is_empty());
                assert_eq!(rx.try_recv().unwrap(), (1, Err(libc::EIO)));
            } else {
                // The other descriptor gets it whole, same seq.
                let [Action::Reply {
                    unique: 2,
                    result: Ok(bytes),
                }] = &actions[..]
                else {
                    panic!("{actions:?}")
                };
                assert_eq!(bytes.len(), 40 + 512);
                assert_eq!(Header::parse(bytes).unwrap().seq, 1);
                assert_eq!(b.write(other, &answer_header(1, answer::SUCCESS)), Ok(40));
                assert_eq!(rx.try_recv().unwrap(), (1, Ok(vec![])));
            }
        }
    }

    #[test]
    fn removal_ends_reads_with_enotblk() {
        let b = bridge(false);
        let fh = b.open();
        assert_eq!(b.read(fh, 3, 0, 4096, false), ReadOutcome::Parked);
        let (m, rx) = message(kind::READ, 0, 512, vec![], 1);
        b.submit(m);
        let (m2, rx2) = message(kind::READ, 0, 512, vec![], 2);
        b.submit(m2);
        let actions = b.remove();
        assert!(actions.is_empty(), "the parked read had the first message");
        assert_eq!(rx2.try_recv().unwrap(), (2, Err(libc::ENODEV)));
        assert_eq!(
            b.read(fh, 4, 0, 4096, false),
            ReadOutcome::Error(libc::ENOTBLK)
        );
        assert_eq!(
            b.read(fh, 5, 0, 4096, true),
            ReadOutcome::Error(libc::ENOTBLK)
        );
        b.release(fh);
        assert_eq!(rx.try_recv().unwrap(), (1, Err(libc::EIO)));
        let (m3, rx3) = message(kind::READ, 0, 512, vec![], 3);
        b.submit(m3);
        assert_eq!(rx3.try_recv().unwrap(), (3, Err(libc::ENODEV)));
        let b = bridge(false);
        let fh = b.open();
        b.read(fh, 9, 0, 4096, false);
        assert_eq!(
            b.remove(),
            vec![Action::Reply {
                unique: 9,
                result: Err(libc::ENOTBLK)
            }]
        );
    }

    #[test]
    fn without_a_daemon_requests_wait_then_fail() {
        let b = Bridge::new(Policy {
            fail_inflight: false,
            no_daemon_timeout: Duration::from_secs(5),
        });
        let (m, rx) = message(kind::READ, 0, 512, vec![], 1);
        b.submit(m);
        let now = Instant::now();
        b.expire(now + Duration::from_secs(1));
        assert!(rx.try_recv().is_err());
        b.expire(now + Duration::from_secs(6));
        assert_eq!(rx.try_recv().unwrap(), (1, Err(libc::EIO)));
        // With a descriptor open nothing expires here.
        let (m, rx) = message(kind::READ, 0, 512, vec![], 2);
        b.open();
        b.submit(m);
        b.expire(now + Duration::from_secs(60));
        assert!(rx.try_recv().is_err());
        assert_eq!(b.queued(), 1);
        assert_eq!(b.descriptors(), 1);
    }
}
