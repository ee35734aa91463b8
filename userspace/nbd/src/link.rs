//! One connection slot to the server that survives the connection: a
//! request whose connection broke waits while the slot reconnects (with
//! backoff), then is reissued; only after the reconnect timeout do
//! requests fail, with EIO, and from then on each fails at once unless a
//! reconnection attempt is due.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::handle::{Error, Export, Handle};

/// How a link waits for the server to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// How long requests wait after the connection broke; after that they
    /// fail with EIO (0: at once, without a reconnection attempt).
    pub timeout: Duration,
    /// The wait before the second attempt (the first is at once); it
    /// doubles after every failed attempt, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            timeout: Duration::from_secs(30),
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// A link's state, as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// Connected, or not connected yet and never needed.
    Connected,
    /// The connection broke `for_` ago; requests wait.
    Reconnecting { for_: Duration },
    /// The connection broke `for_` ago, longer than the timeout: requests
    /// fail with EIO until an attempt succeeds.
    Down { for_: Duration },
}

/// `connected`, `reconnecting for 2.1s`, `down for 40.0s`: what `list`
/// shows.
impl std::fmt::Display for LinkStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkStatus::Connected => f.write_str("connected"),
            LinkStatus::Reconnecting { for_ } => {
                write!(f, "reconnecting for {:.1}s", for_.as_secs_f64())
            }
            LinkStatus::Down { for_ } => write!(f, "down for {:.1}s", for_.as_secs_f64()),
        }
    }
}

/// What a reconnection must find for requests to be reissued on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations {
    /// The export as first seen: its size must not change, nor may a
    /// capability the device advertised go away.
    pub export: Export,
    /// The device writes (so the export must stay writable).
    pub writable: bool,
    /// Several connections serve the device, which is only safe while the
    /// server advertises multi-conn.
    pub multi_conn: bool,
}

impl Expectations {
    /// Why `export` cannot stand in for the expected one, if it cannot.
    pub fn mismatch(&self, export: &Export) -> Option<String> {
        let expected = &self.export;
        if export.size != expected.size {
            return Some(format!(
                "the export's size changed from {} to {} bytes",
                expected.size, export.size
            ));
        }
        if self.writable && export.read_only {
            return Some("the export became read-only".to_owned());
        }
        if self.multi_conn && !export.can_multi_conn {
            return Some("the server no longer allows several connections (multi-conn)".to_owned());
        }
        let lost = [
            (expected.can_flush && !export.can_flush, "flush"),
            (expected.can_fua && !export.can_fua, "FUA"),
            (expected.can_trim && !export.can_trim, "trim"),
            (expected.can_zero && !export.can_zero, "write-zeroes"),
        ];
        lost.iter()
            .find(|(gone, _)| *gone)
            .map(|(_, what)| format!("the server no longer supports {what}"))
    }
}

/// Whether a failed command should be reissued on a new connection: the
/// connection broke under it, or the server said it is shutting down
/// (NBD_ESHUTDOWN, nbdkit's answer while it stops). Any other error is the
/// server's answer to this command and goes to the caller.
fn connection_lost(handle: &Handle, error: &Error) -> bool {
    error.errno == libc::ESHUTDOWN || !handle.is_connected()
}

struct Outage {
    since: Instant,
    next_attempt: Instant,
    /// The wait after the next failed attempt.
    delay: Duration,
    last_error: Option<String>,
    /// Whether the timeout's expiry has been logged.
    expiry_logged: bool,
}

impl Outage {
    /// An outage from `since`, with its first attempt due at once.
    fn new(since: Instant, first_delay: Duration) -> Outage {
        Outage {
            since,
            next_attempt: since,
            delay: first_delay,
            last_error: None,
            expiry_logged: false,
        }
    }
}

struct State {
    handle: Option<Arc<Handle>>,
    /// Counts connections, so a request that saw one break does not drop
    /// its successor.
    generation: u64,
    /// Set while there is no connection.
    outage: Option<Outage>,
}

pub struct Link {
    uri: String,
    /// Which link of the device, for the log.
    index: usize,
    policy: ReconnectPolicy,
    expectations: Expectations,
    state: Mutex<State>,
    connected: Condvar,
}

impl Link {
    /// A link that starts on `handle`, or, without one, connects when
    /// first used.
    pub fn new(
        uri: &str,
        index: usize,
        policy: ReconnectPolicy,
        expectations: Expectations,
        handle: Option<Handle>,
    ) -> Link {
        let generation = u64::from(handle.is_some());
        Link {
            uri: uri.to_owned(),
            index,
            policy,
            expectations,
            state: Mutex::new(State {
                handle: handle.map(Arc::new),
                generation,
                outage: None,
            }),
            connected: Condvar::new(),
        }
    }

    /// Runs `command` on the link's connection and returns its result or
    /// the server's errno. A command whose connection broke is run again
    /// on the next connection; when none comes within the timeout, EIO.
    pub fn run<T>(&self, mut command: impl FnMut(&Handle) -> Result<T, Error>) -> Result<T, i32> {
        loop {
            let (handle, generation) = self.connection()?;
            match command(&handle) {
                Ok(value) => return Ok(value),
                Err(e) if connection_lost(&handle, &e) => self.lost(generation, &e),
                Err(e) => {
                    log::debug!("{}: the server answered {}: {e}", self.uri, e.errno);
                    return Err(e.errno);
                }
            }
        }
    }

    pub fn status(&self) -> LinkStatus {
        let state = self.state.lock();
        match &state.outage {
            Some(outage) if state.generation > 0 => {
                let for_ = outage.since.elapsed();
                if for_ >= self.policy.timeout {
                    LinkStatus::Down { for_ }
                } else {
                    LinkStatus::Reconnecting { for_ }
                }
            }
            _ => LinkStatus::Connected,
        }
    }

    /// How many times the link connected again after losing its
    /// connection (its first connection not counted).
    pub fn reconnections(&self) -> u64 {
        self.state.lock().generation.saturating_sub(1)
    }

    /// Ends the connection politely, if there is one, without waiting
    /// for the server.
    pub fn shutdown(&self) {
        let handle = self.state.lock().handle.take();
        if let Some(handle) = handle {
            if let Err(e) = handle.disconnect() {
                log::debug!("{}: disconnect: {e}", self.uri);
            }
        }
    }

    /// The current connection, connecting first if there is none; EIO
    /// once the outage has outlasted the timeout and no attempt is due or
    /// the one due failed.
    fn connection(&self) -> Result<(Arc<Handle>, u64), i32> {
        let mut state = self.state.lock();
        loop {
            if let Some(handle) = &state.handle {
                return Ok((handle.clone(), state.generation));
            }
            let now = Instant::now();
            let outage = state
                .outage
                .get_or_insert(Outage::new(now, self.policy.first_delay));
            let since = outage.since;
            let deadline = since + self.policy.timeout;
            // Past the deadline too, so the device comes back with the
            // server: a request then makes the attempt that is due, if one
            // is, and fails at once otherwise.
            if now >= outage.next_attempt {
                // Attempted with the lock held: the other requests of this
                // link wait for the same connection anyway.
                match self.attempt() {
                    Ok(handle) => {
                        if state.generation > 0 {
                            log::warn!(
                                "{}: reconnected (link {}) after {:.1?}",
                                self.uri,
                                self.index,
                                since.elapsed()
                            );
                        }
                        state.handle = Some(Arc::new(handle));
                        state.generation += 1;
                        state.outage = None;
                        self.connected.notify_all();
                        continue;
                    }
                    Err(message) => {
                        log::debug!("{}: reconnection attempt: {message}", self.uri);
                        outage.next_attempt = Instant::now() + outage.delay;
                        outage.delay = (outage.delay * 2).min(self.policy.max_delay);
                        outage.last_error = Some(message);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if !outage.expiry_logged {
                    outage.expiry_logged = true;
                    log::error!(
                        "{}: no connection for {:.1?} (last attempt: {}); requests fail with EIO until the server is back",
                        self.uri,
                        self.policy.timeout,
                        outage.last_error.as_deref().unwrap_or("none yet")
                    );
                }
                return Err(libc::EIO);
            }
            let wake = outage.next_attempt.min(deadline);
            self.connected.wait_until(&mut state, wake);
        }
    }

    /// Connects and checks the export is still the one the device serves.
    fn attempt(&self) -> Result<Handle, String> {
        let handle = Handle::connect(&self.uri).map_err(|e| e.to_string())?;
        let export = handle.export().map_err(|e| e.to_string())?;
        match self.expectations.mismatch(&export) {
            Some(reason) => Err(reason),
            None => Ok(handle),
        }
    }

    /// Drops the connection of `generation`, which broke under a command,
    /// unless another request already did.
    fn lost(&self, generation: u64, error: &Error) {
        let mut state = self.state.lock();
        if state.generation != generation || state.handle.is_none() {
            return;
        }
        log::warn!(
            "{}: connection lost (link {}): {error}; reconnecting, requests wait up to {:.1?}",
            self.uri,
            self.index,
            self.policy.timeout
        );
        // Commands still running on it fail on their own and end here too;
        // the last of them closes it.
        state.handle = None;
        state.outage = Some(Outage::new(Instant::now(), self.policy.first_delay));
    }
}
