//! Counters of the block requests a session serves: how many of each kind,
//! their bytes, the errors answered, what is in flight, and the daemon's
//! own service time (request received to reply handed to the transport)
//! as a histogram.
//!
//! The data path takes no lock, no locked instruction, and shares no
//! cache line between threads: each thread that receives or answers
//! requests of a session (a queue's worker, a helper, a backend's own
//! thread answering later) counts into a shard of its own, made on its
//! first request and found again through a thread-local list. Only that
//! thread writes its shard, so a count is a plain load and store of a
//! relaxed atomic; readers add the shards up ([`Stats::snapshot`]). A
//! snapshot is not one instant across threads, but every counter in it
//! only grows.
//!
//! What the engine cannot see: a request the kernel module reissues to a
//! new daemon after its predecessor died looks like any other (the module
//! marks nothing, and a request's unique is reused per tag), so reissues
//! are not counted here; nor are a backend's own retries (an NBD link
//! resending commands after a reconnect). Reads and writes that the
//! kernel serves itself with passthrough never reach the engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The kinds of block request counted, in the order of [`Snapshot::kinds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `BlockDevice::read`.
    Read = 0,
    /// `BlockDevice::write`.
    Write = 1,
    /// `BlockDevice::flush`.
    Flush = 2,
    /// A punched hole (FALLOCATE `PUNCH_HOLE`): `BlockDevice::discard`, or
    /// on the stock path `write_zeroes(may_unmap = true)`, since the loop
    /// driver sends discards and unmapping write-zeroes alike this way.
    Discard = 3,
    /// FALLOCATE `ZERO_RANGE`: `BlockDevice::write_zeroes` keeping the
    /// blocks allocated.
    WriteZeroes = 4,
}

impl Kind {
    /// Every kind, in index order.
    pub const ALL: [Kind; KINDS] = [
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::Discard,
        Kind::WriteZeroes,
    ];

    /// The name used in JSON and Prometheus output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
        }
    }
}

/// How many kinds there are.
pub const KINDS: usize = 5;

/// Errors answered, by errno; the last class holds every other errno.
pub const ERROR_NAMES: [&str; ERROR_CLASSES] =
    ["EIO", "ENOSPC", "EINVAL", "EOPNOTSUPP", "EROFS", "other"];
/// How many error classes there are (see [`ERROR_NAMES`]).
pub const ERROR_CLASSES: usize = 6;

fn error_class(errno: i32) -> usize {
    match errno {
        libc::EIO => 0,
        libc::ENOSPC => 1,
        libc::EINVAL => 2,
        libc::EOPNOTSUPP | libc::ENOSYS => 3,
        libc::EROFS => 4,
        _ => 5,
    }
}

/// Histogram buckets: exact below 16 ns, then 16 per power of two (each
/// 1/16 of its octave wide, so a percentile read from the middle of its
/// bucket is within 3.2 % of the true value) up to 2^37 ns (137 s); the
/// last bucket also holds everything longer.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
const MAX_EXP: u32 = 36;
/// How many histogram buckets there are.
pub const BUCKETS: usize = (MAX_EXP - SUB_BITS + 2) as usize * SUB;

/// The bucket a service time of `ns` nanoseconds (or ticks) goes into.
pub fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (ns >> (exp - SUB_BITS)) as usize - SUB;
    (exp - SUB_BITS + 1) as usize * SUB + sub
}

/// The values bucket `index` holds: `[low, high)` nanoseconds.
pub fn bucket_bounds(index: usize) -> (u64, u64) {
    if index < SUB {
        return (index as u64, index as u64 + 1);
    }
    let octave = (index / SUB) as u32;
    let sub = (index % SUB) as u64;
    let shift = octave - 1;
    let low = (SUB as u64 + sub) << shift;
    (low, low + (1 << shift))
}

/// The `quantile` (0 to 1) of a histogram given as `(low, high, count)`
/// buckets in increasing order: the middle of the bucket the quantile
/// falls into, in nanoseconds; None if the histogram is empty.
pub fn quantile(buckets: &[(u64, u64, u64)], quantile: f64) -> Option<u64> {
    let total: u64 = buckets.iter().map(|&(_, _, count)| count).sum();
    if total == 0 {
        return None;
    }
    // The rank of the value asked for, counted from 1 (less a hair, so
    // that 0.999 of 10000 is rank 9990 however the product rounds).
    let rank = ((quantile * total as f64 - 1e-6).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for &(low, high, count) in buckets {
        seen += count;
        if seen >= rank {
            return Some(low + (high - low) / 2);
        }
    }
    None
}

/// Timestamps of the data path. Where the kernel keeps time with the
/// TSC (its clocksource is `tsc`: invariant and synchronised across CPUs),
/// a timestamp is one `rdtsc`, converted to nanoseconds only when counters
/// are read; elsewhere it is `clock_gettime` through `Instant`. Two
/// `Instant`s per request cost as much as every counter together (about
/// 60 ns and 90 instructions per request, measured with `dispatch_cost`).
mod clock {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    static TSC: AtomicBool = AtomicBool::new(false);
    /// A TSC reading and the time it was taken, as early as the first
    /// counters; the conversion is measured over everything since.
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();

    /// Decides how to take timestamps: before any is taken.
    pub(super) fn init() {
        ORIGIN.get_or_init(|| {
            let tsc = cfg!(target_arch = "x86_64")
                && std::fs::read_to_string(
                    "/sys/devices/system/clocksource/clocksource0/current_clocksource",
                )
                .is_ok_and(|source| source.trim() == "tsc");
            TSC.store(tsc, Ordering::Relaxed);
            if tsc {
                pair()
            } else {
                (Instant::now(), 0)
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    fn rdtsc() -> u64 {
        // SAFETY: rdtsc reads a register; it has no preconditions on any
        // x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn rdtsc() -> u64 {
        unreachable!("the TSC is used on x86_64 only")
    }

    /// A timestamp in ticks.
    #[inline]
    pub(super) fn now() -> u64 {
        if TSC.load(Ordering::Relaxed) {
            rdtsc()
        } else {
            let origin = ORIGIN
                .get()
                .map_or_else(Instant::now, |&(instant, _)| instant);
            u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
        }
    }

    /// An `Instant` and the TSC at that instant, read close together (a
    /// thread preempted between the two reads tries again).
    fn pair() -> (Instant, u64) {
        let mut best = None;
        for _ in 0..10 {
            let before = rdtsc();
            let instant = Instant::now();
            let after = rdtsc();
            let gap = after.wrapping_sub(before);
            if best.is_none_or(|(_, _, best_gap)| gap < best_gap) {
                best = Some((instant, before + gap / 2, gap));
            }
            if gap < 2_000 {
                break;
            }
        }
        let (instant, ticks, _) = best.expect("at least one reading");
        (instant, ticks)
    }

    /// Nanoseconds per tick, measured since the first counters were made.
    pub(super) fn ns_per_tick() -> f64 {
        match ORIGIN.get() {
            Some(&(origin, origin_ticks)) if TSC.load(Ordering::Relaxed) => {
                let (instant, ticks) = pair();
                let ns = instant.duration_since(origin).as_nanos() as f64;
                match ticks.saturating_sub(origin_ticks) {
                    0 => 1.0,
                    elapsed => ns / elapsed as f64,
                }
            }
            _ => 1.0,
        }
    }
}

/// One thread's counters for one session. Only that thread writes them
/// (so an increment is a plain load and store, no locked instruction);
/// readers load them. Aligned so that no two shards share a cache line (or
/// its prefetch neighbour).
#[repr(align(128))]
struct Shard {
    /// Requests received; those answered are the sum of `ops`.
    started: AtomicU64,
    ops: [AtomicU64; KINDS],
    /// Bytes of the requests answered successfully.
    bytes: [AtomicU64; KINDS],
    /// Service time of every request answered, in clock ticks.
    service_ticks: [AtomicU64; KINDS],
    errors: [AtomicU64; ERROR_CLASSES],
    /// Requests answered EIO because the handler dropped their reply.
    dropped: AtomicU64,
    /// Service times in clock ticks.
    histogram: [AtomicU64; BUCKETS],
}

/// Adds `by` to a counter that only the calling thread writes.
#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl Shard {
    fn new() -> Shard {
        Shard {
            started: AtomicU64::new(0),
            ops: Default::default(),
            bytes: Default::default(),
            service_ticks: Default::default(),
            errors: Default::default(),
            dropped: AtomicU64::new(0),
            histogram: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The counters of one session.
pub struct Stats {
    /// Tells this session's shards apart in each thread's list.
    id: u64,
    /// One per thread that has received or answered a request; locked
    /// only to add a thread and to read.
    shards: parking_lot::Mutex<Vec<Arc<Shard>>>,
    created: Instant,
    /// Messages that could not be parsed (answered EINVAL or ENOSYS where
    /// they had a header).
    malformed: AtomicU64,
}

/// Every live session's counters, for a daemon to report (one device per
/// daemon, usually one session; after a stock-path handoff of a retired
/// session, its successor's too), and for a thread to find the session
/// whose request it answers.
static REGISTRY: parking_lot::Mutex<Vec<Weak<Stats>>> = parking_lot::Mutex::new(Vec::new());

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A thread's shards, by session id: usually one entry (a worker serves one
/// session). Entries of sessions that are gone are dropped when the thread
/// next adds one.
struct LocalShard {
    stats_id: u64,
    stats: Weak<Stats>,
    shard: Arc<Shard>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Vec<LocalShard>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `count` on this thread's shard of session `stats_id`, made and
/// registered on the thread's first request of that session; not at all
/// if the session is gone.
#[inline]
fn with_local_shard(stats_id: u64, count: impl FnOnce(&Shard)) {
    // Not at all either from a thread-local destructor after this one's.
    let _ = LOCAL.try_with(|local| {
        let mut local = local.borrow_mut();
        if let Some(entry) = local.iter().find(|entry| entry.stats_id == stats_id) {
            return count(&entry.shard);
        }
        let Some(stats) = REGISTRY
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .find(|stats| stats.id == stats_id)
        else {
            return;
        };
        let shard = Arc::new(Shard::new());
        stats.shards.lock().push(shard.clone());
        local.retain(|entry| entry.stats.strong_count() > 0);
        local.push(LocalShard {
            stats_id,
            stats: Arc::downgrade(&stats),
            shard: shard.clone(),
        });
        count(&shard)
    });
}

impl Stats {
    /// New counters, registered for [`process_snapshot`].
    pub fn new() -> Arc<Stats> {
        clock::init();
        let stats = Arc::new(Stats {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shards: parking_lot::Mutex::new(Vec::new()),
            created: Instant::now(),
            malformed: AtomicU64::new(0),
        });
        let mut registry = REGISTRY.lock();
        registry.retain(|stats| stats.strong_count() > 0);
        registry.push(Arc::downgrade(&stats));
        stats
    }

    /// Counts a request of `kind` for `bytes` just received; the tracker
    /// counts its answer, on whichever thread that comes.
    pub(crate) fn track(&self, kind: Kind, bytes: u64) -> Tracker {
        with_local_shard(self.id, |shard| bump(&shard.started, 1));
        Tracker {
            stats_id: self.id,
            kind,
            bytes,
            start: clock::now(),
        }
    }

    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters summed over every thread.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::empty(self.created.elapsed());
        let ns_per_tick = clock::ns_per_tick();
        snapshot.malformed = self.malformed.load(Ordering::Relaxed);
        let shards = self.shards.lock().clone();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // Answers first, then requests received, so that in flight is
        // seldom below the truth (a request may be received on one thread
        // and answered on another, whose counts need not reach this
        // thread in that order: in flight is clamped at zero).
        for shard in &shards {
            for kind in 0..KINDS {
                snapshot.kinds[kind].ops += load(&shard.ops[kind]);
                snapshot.kinds[kind].bytes += load(&shard.bytes[kind]);
                snapshot.kinds[kind].service_ns +=
                    (load(&shard.service_ticks[kind]) as f64 * ns_per_tick) as u64;
            }
            for class in 0..ERROR_CLASSES {
                snapshot.errors[class] += load(&shard.errors[class]);
            }
            snapshot.dropped += load(&shard.dropped);
            for (sum, bucket) in snapshot.histogram.iter_mut().zip(&shard.histogram) {
                *sum += load(bucket);
            }
        }
        for shard in &shards {
            snapshot.started += load(&shard.started);
        }
        snapshot.ns_per_tick = ns_per_tick;
        snapshot
    }
}

/// Counters of every session of this process added up, with the uptime of
/// the oldest; None if there is none.
pub fn process_snapshot() -> Option<Snapshot> {
    let sessions: Vec<Arc<Stats>> = REGISTRY.lock().iter().filter_map(Weak::upgrade).collect();
    let mut snapshots = sessions.iter().map(|stats| stats.snapshot());
    let mut total = snapshots.next()?;
    for snapshot in snapshots {
        total.add(&snapshot);
    }
    Some(total)
}

/// Counts of one kind of request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Requests answered, successfully or not.
    pub ops: u64,
    /// Bytes of those answered successfully.
    pub bytes: u64,
    /// Their service time added up, in nanoseconds.
    pub service_ns: u64,
}

/// The counters of a session (or of several, added up) at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Since the counters were created (the session started).
    pub uptime: Duration,
    /// By [`Kind`].
    pub kinds: [KindCounts; KINDS],
    /// Requests received.
    pub started: u64,
    /// Errors answered, by [`ERROR_NAMES`].
    pub errors: [u64; ERROR_CLASSES],
    /// Requests answered EIO because the handler dropped the reply.
    pub dropped: u64,
    /// Messages that could not be parsed.
    pub malformed: u64,
    /// Service times of every request answered, by bucket (see
    /// [`bucket_bounds`]) of clock ticks: [`Snapshot::buckets`] has them in
    /// nanoseconds.
    pub histogram: Vec<u64>,
    /// Nanoseconds per clock tick.
    pub ns_per_tick: f64,
}

impl Snapshot {
    fn empty(uptime: Duration) -> Snapshot {
        Snapshot {
            uptime,
            kinds: [KindCounts::default(); KINDS],
            started: 0,
            errors: [0; ERROR_CLASSES],
            dropped: 0,
            malformed: 0,
            histogram: vec![0; BUCKETS],
            ns_per_tick: 1.0,
        }
    }

    /// Requests answered.
    pub fn completed(&self) -> u64 {
        self.kinds.iter().map(|kind| kind.ops).sum()
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.started.saturating_sub(self.completed())
    }

    /// The counts of one kind of request.
    pub fn kind(&self, kind: Kind) -> &KindCounts {
        &self.kinds[kind as usize]
    }

    /// The non-empty buckets of the histogram as `(low, high, count)`,
    /// in nanoseconds.
    pub fn buckets(&self) -> Vec<(u64, u64, u64)> {
        let ns = |ticks: u64| (ticks as f64 * self.ns_per_tick) as u64;
        self.histogram
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0)
            .map(|(index, &count)| {
                let (low, high) = bucket_bounds(index);
                (ns(low), ns(high).max(ns(low) + 1), count)
            })
            .collect()
    }

    /// The service time below which `q` (0 to 1) of the requests were
    /// answered, in nanoseconds.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        quantile(&self.buckets(), q)
    }

    fn add(&mut self, other: &Snapshot) {
        self.uptime = self.uptime.max(other.uptime);
        for (mine, theirs) in self.kinds.iter_mut().zip(&other.kinds) {
            mine.ops += theirs.ops;
            mine.bytes += theirs.bytes;
            mine.service_ns += theirs.service_ns;
        }
        self.started += other.started;
        for (mine, theirs) in self.errors.iter_mut().zip(&other.errors) {
            *mine += theirs;
        }
        self.dropped += other.dropped;
        self.malformed += other.malformed;
        for (mine, theirs) in self.histogram.iter_mut().zip(&other.histogram) {
            *mine += theirs;
        }
    }
}

/// A request being served: counts its answer into its queue's shard.
pub(crate) struct Tracker {
    stats_id: u64,
    kind: Kind,
    bytes: u64,
    /// `clock::now()` when the request was received.
    start: u64,
}

impl Tracker {
    /// The request was answered with `errno` (0: success); `dropped`: by
    /// the reply's drop, not the handler.
    pub(crate) fn finish(self, errno: i32, dropped: bool) {
        let ticks = clock::now().saturating_sub(self.start);
        let kind = self.kind as usize;
        with_local_shard(self.stats_id, |shard| {
            if errno == 0 {
                bump(&shard.bytes[kind], self.bytes);
            } else {
                bump(&shard.errors[error_class(errno)], 1);
                if dropped {
                    bump(&shard.dropped, 1);
                }
            }
            bump(&shard.service_ticks[kind], ticks);
            bump(&shard.histogram[bucket_of(ticks)], 1);
            bump(&shard.ops[kind], 1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_of(values: impl IntoIterator<Item = u64>) -> Vec<(u64, u64, u64)> {
        let mut counts = vec![0u64; BUCKETS];
        for value in values {
            counts[bucket_of(value)] += 1;
        }
        counts
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0)
            .map(|(index, &count)| {
                let (low, high) = bucket_bounds(index);
                (low, high, count)
            })
            .collect()
    }

    fn assert_near(actual: Option<u64>, expected: f64, what: &str) {
        let actual = actual.unwrap_or_else(|| panic!("{what}: empty")) as f64;
        let error = (actual - expected).abs() / expected;
        assert!(
            error <= 0.035,
            "{what}: {actual} against {expected} ({:.1} % off)",
            error * 100.0
        );
    }

    #[test]
    fn every_value_falls_into_the_bucket_whose_bounds_hold_it() {
        let mut values: Vec<u64> = (0..5000).collect();
        for exp in 4..64 {
            let power = 1u64 << exp;
            values.extend([power - 1, power, power + 1, power + power / 3]);
        }
        values.push(u64::MAX);
        for value in values {
            let index = bucket_of(value);
            assert!(index < BUCKETS, "{value}: bucket {index}");
            let (low, high) = bucket_bounds(index);
            if index == BUCKETS - 1 {
                assert!(value >= low, "{value} below the last bucket's {low}");
            } else {
                assert!(low <= value && value < high, "{value} in [{low}, {high})");
            }
        }
        // Buckets tile the range without gaps or overlaps.
        for index in 1..BUCKETS {
            assert_eq!(bucket_bounds(index - 1).1, bucket_bounds(index).0);
        }
        assert_eq!(bucket_bounds(BUCKETS - 1).1, 1 << (MAX_EXP + 1));
    }

    #[test]
    fn quantiles_of_a_uniform_distribution() {
        // 1 us to 1 ms in 1 ns steps.
        let histogram = histogram_of(1_000..=1_000_000);
        let count: f64 = 999_001.0;
        for q in [0.5, 0.9, 0.99, 0.999] {
            let expected = 1_000.0 + (q * count).ceil() - 1.0;
            assert_near(quantile(&histogram, q), expected, &format!("p{q}"));
        }
        assert_near(quantile(&histogram, 0.0), 1_000.0, "min");
        assert_near(quantile(&histogram, 1.0), 1_000_000.0, "max");
    }

    #[test]
    fn quantiles_of_a_long_tail() {
        // 98 % at 20 us, 1.9 % at 500 us, 0.1 % at 40 ms: the tail shows
        // where a mean would hide it.
        let values = std::iter::repeat_n(20_000, 9_800)
            .chain(std::iter::repeat_n(500_000, 190))
            .chain(std::iter::repeat_n(40_000_000, 10));
        let histogram = histogram_of(values);
        assert_near(quantile(&histogram, 0.5), 20_000.0, "p50");
        assert_near(quantile(&histogram, 0.98), 20_000.0, "p98");
        assert_near(quantile(&histogram, 0.99), 500_000.0, "p99");
        assert_near(quantile(&histogram, 0.999), 500_000.0, "p99.9");
        assert_near(quantile(&histogram, 0.9991), 40_000_000.0, "p99.91");
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn quantiles_of_an_exponential_distribution() {
        // Mean 100 us: the q quantile is -ln(1 - q) * mean. Values at the
        // midpoints of 100000 equal slices of probability.
        let mean = 100_000.0;
        let n = 100_000;
        let values =
            (0..n).map(|i| (-(1.0 - (i as f64 + 0.5) / n as f64).ln() * mean).round() as u64);
        let histogram = histogram_of(values);
        for q in [0.5, 0.99, 0.999] {
            let expected = -(1.0f64 - q).ln() * mean;
            assert_near(quantile(&histogram, q), expected, &format!("p{q}"));
        }
    }

    #[test]
    fn long_times_land_in_the_last_bucket() {
        let histogram = histogram_of([u64::MAX, 1 << 40]);
        assert_eq!(histogram.len(), 1);
        assert_eq!(histogram[0].2, 2);
    }

    #[test]
    fn shards_add_up_and_in_flight_counts_unanswered_requests() {
        let stats = Stats::new();
        let mut open = Vec::new();
        for _ in 0..5 {
            open.push(stats.track(Kind::Read, 4096));
            stats.track(Kind::Write, 512).finish(0, false);
        }
        stats.track(Kind::Flush, 0).finish(libc::EIO, true);
        stats
            .track(Kind::Discard, 8192)
            .finish(libc::EOPNOTSUPP, false);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.started, 12);
        assert_eq!(snapshot.in_flight(), 5);
        assert_eq!(*snapshot.kind(Kind::Write), {
            KindCounts {
                ops: 5,
                bytes: 5 * 512,
                service_ns: snapshot.kind(Kind::Write).service_ns,
            }
        });
        assert_eq!(
            (
                snapshot.kind(Kind::Flush).ops,
                snapshot.kind(Kind::Discard).ops
            ),
            (1, 1)
        );
        // Failed requests move no bytes.
        assert_eq!(snapshot.kind(Kind::Discard).bytes, 0);
        assert_eq!(snapshot.errors, [1, 0, 0, 1, 0, 0]);
        assert_eq!(snapshot.dropped, 1);
        assert_eq!(snapshot.histogram.iter().sum::<u64>(), 7);
        // Answered on other threads: their own shards.
        for tracker in open {
            std::thread::spawn(move || tracker.finish(0, false))
                .join()
                .unwrap();
        }
        assert_eq!(stats.shards.lock().len(), 6);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.in_flight(), 0);
        assert_eq!(*snapshot.kind(Kind::Read), {
            KindCounts {
                ops: 5,
                bytes: 5 * 4096,
                service_ns: snapshot.kind(Kind::Read).service_ns,
            }
        });
        assert!(process_snapshot().is_some_and(|all| all.started >= 12));
    }
}
