//! When a ring worker polls for its next requests instead of sleeping.

use std::time::Duration;

/// Decides whether a worker polls its ring for a while before it sleeps
/// on it, and for how long. Sleeping costs a wake-up per batch of requests
/// (the kernel's delivery has to wake the worker, on whichever CPU the
/// scheduler picks); polling costs CPU time. The worker polls while its
/// requests come at most `max_gap` apart on average, counting every
/// request a wait brought (a deep queue's requests come in batches, whose
/// gaps are longer than any one request's), for twice the average wait:
/// long enough to catch the next batch of a busy queue. Both scale with
/// how fast the machine turns requests around, so the same setting serves
/// real hardware and an emulated guest. A queue that is idle or sees
/// sparse requests never spins, no spin lasts over `GAP_CAP` times
/// `max_gap`, and the spin yields the CPU on every turn.
#[derive(Debug, Clone, Copy)]
pub(super) struct Poller {
    /// Poll only while the average gap is at most this; zero: never.
    max_gap: Duration,
    /// Moving average of the gap between requests: a wait's length over
    /// the requests it brought.
    typical_gap: Duration,
    /// Moving average of how long a wait took.
    typical_wait: Duration,
}

/// At most this many `max_gap`s of one wait count towards the averages,
/// so that one long pause is soon forgotten; no poll lasts longer.
const GAP_CAP: u32 = 4;

/// The shortest poll worth starting.
const MIN_POLL: Duration = Duration::from_micros(10);

impl Poller {
    pub(super) fn new(max_gap: Duration) -> Poller {
        Poller {
            max_gap,
            // Start asleep: polling begins once requests come close.
            typical_gap: max_gap * GAP_CAP,
            typical_wait: max_gap * GAP_CAP,
        }
    }

    /// How long to poll before sleeping, if at all.
    pub(super) fn poll_for(&self) -> Option<Duration> {
        (!self.max_gap.is_zero() && self.typical_gap <= self.max_gap).then(|| {
            (self.typical_wait * 2)
                .min(self.max_gap * GAP_CAP)
                .max(MIN_POLL)
        })
    }

    /// Records that a wait lasted `wait` (polling and sleeping) and brought
    /// `requests` requests.
    pub(super) fn waited(&mut self, wait: Duration, requests: usize) {
        let wait = wait.min(self.max_gap * GAP_CAP);
        let gap = wait / u32::try_from(requests.max(1)).unwrap_or(u32::MAX);
        // Weight 1/4: a few close requests start polling, a few far apart
        // stop it.
        self.typical_gap = (self.typical_gap * 3 + gap) / 4;
        self.typical_wait = (self.typical_wait * 3 + wait) / 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `poller` polls, for a number of microseconds in `range`.
    fn assert_polls_for(poller: &Poller, range: std::ops::RangeInclusive<u64>) {
        let poll = poller.poll_for().expect("polls");
        let (low, high) = (
            Duration::from_micros(*range.start()),
            Duration::from_micros(*range.end()),
        );
        assert!(poll >= low && poll <= high, "{poll:?}");
    }

    #[test]
    fn the_poller_polls_while_requests_come_close_for_twice_their_wait() {
        let max_gap = Duration::from_micros(100);
        let mut poller = Poller::new(max_gap);
        assert_eq!(poller.poll_for(), None, "a fresh worker sleeps");
        for _ in 0..16 {
            poller.waited(Duration::from_micros(20), 1);
        }
        assert_polls_for(&poller, 40..=60);
        // A pause of a second counts as four max_gaps: polling stops, and
        // a few close requests start it again.
        poller.waited(Duration::from_secs(1), 1);
        assert_eq!(poller.poll_for(), None);
        let mut waits = 0;
        while poller.poll_for().is_none() {
            poller.waited(Duration::from_micros(20), 1);
            waits += 1;
        }
        assert!(waits <= 4, "{waits} waits to poll again");
        // Requests that keep coming further apart than max_gap stop it.
        for _ in 0..8 {
            poller.waited(Duration::from_micros(300), 1);
        }
        assert_eq!(poller.poll_for(), None);
        // Back-to-back requests still poll for a little while.
        for _ in 0..16 {
            poller.waited(Duration::ZERO, 1);
        }
        assert_eq!(poller.poll_for(), Some(MIN_POLL));
    }

    #[test]
    fn the_poller_counts_every_request_of_a_batch() {
        let max_gap = Duration::from_micros(100);
        let mut poller = Poller::new(max_gap);
        // Waits longer than max_gap, each bringing 16 requests: 19 us
        // apart. It polls for twice such a wait, up to four max_gaps.
        for _ in 0..16 {
            poller.waited(Duration::from_micros(300), 16);
        }
        assert_polls_for(&poller, 380..=400);
        // Batches of one as far apart sleep; a wait that brought nothing
        // (the idle tick, a wake-up) counts as a gap of its own.
        for _ in 0..8 {
            poller.waited(Duration::from_micros(300), 1);
        }
        assert_eq!(poller.poll_for(), None);
        for _ in 0..16 {
            poller.waited(Duration::from_micros(30), 0);
        }
        assert_polls_for(&poller, 60..=70);
    }

    #[test]
    fn a_zero_window_never_polls() {
        let mut poller = Poller::new(Duration::ZERO);
        for _ in 0..8 {
            poller.waited(Duration::ZERO, 4);
        }
        assert_eq!(poller.poll_for(), None);
    }
}
