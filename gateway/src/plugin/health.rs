//! Quarantine: a plugin whose events keep failing is stopped for a while, so a broken version
//! holds its routes' events back (HTTP answers 503, change capture waits) instead of sending
//! every one of them to the dead-letter subject and recycling an instance per event.
//!
//! One loaded version has one [`Health`]; a new file is a new version and starts healthy. After
//! the quarantine's time, one call is let through as a probe (the pipeline gives it one event):
//! an event handled lifts the quarantine, a failure doubles the time (up to [`MAX_QUARANTINE`] or
//! `quarantine_for`, the longer).

use super::PluginError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest a quarantine grows to by doubling, unless `quarantine_for` is longer.
pub const MAX_QUARANTINE: Duration = Duration::from_secs(300);
/// How long a probe may take to report before another call is let through as the probe (the
/// first one's caller may have gone away).
const PROBE_GRACE: Duration = Duration::from_secs(5);
/// The wait suggested while a probe runs: it usually takes milliseconds.
const PROBING_RETRY: Duration = Duration::from_secs(1);

/// When to quarantine and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// Failed events in a row that quarantine the plugin; 0: never.
    pub after: u32,
    /// How long the first quarantine lasts.
    pub duration: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        QuarantinePolicy { after: 50, duration: Duration::from_secs(10) }
    }
}

#[derive(Debug)]
enum State {
    Healthy { failed_in_a_row: u32 },
    Quarantined { until: Instant, duration: Duration, last_error: String },
    Probing { deadline: Instant, duration: Duration, last_error: String },
}

/// Why a quarantined plugin's events are held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// When to try again.
    pub retry_after: Duration,
    /// The failure that started (or renewed) the quarantine.
    pub last_error: String,
}

/// What recording a call's results changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing to report.
    None,
    /// The plugin was quarantined (or a probe failed and the quarantine renewed) for this long.
    Quarantined { duration: Duration, failed_in_a_row: u32, last_error: String },
    /// An event was handled: the quarantine is lifted.
    Lifted,
}

/// What [`Health::admit`] let through, handed back to [`Health::record`] with the call's
/// results, so results of calls admitted before the state last changed (a call still finishing
/// when the quarantine began, a probe replaced after its deadline) change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    probe: bool,
}

impl Ticket {
    /// Whether this call is a quarantine's probe (the caller gives it one event).
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The same admission as an ordinary call: for a plugin's second place in one chain, whose
    /// results must not settle the probe.
    pub fn ordinary(self) -> Ticket {
        Ticket { probe: false, ..self }
    }
}

#[derive(Debug)]
struct Record {
    state: State,
    /// Bumped at every change of state and every probe let through.
    generation: u64,
}

/// Longest quarantine, so times never overflow (`quarantine_for` is validated to stay below).
pub const LONGEST_QUARANTINE: Duration = Duration::from_secs(24 * 3600);

/// [`Health::clean`] when the record is not healthy with a count of zero.
const NOT_CLEAN: u64 = u64::MAX;

/// One plugin version's record of failures.
#[derive(Debug)]
pub struct Health {
    policy: QuarantinePolicy,
    /// Allowed for a probe call, on top of [`PROBE_GRACE`].
    call_timeout: Duration,
    record: Mutex<Record>,
    /// The generation while healthy with no failure counted, else [`NOT_CLEAN`]: the common
    /// case (every call admitted, every result good) reads this and takes no lock, so the two
    /// workers never wait on each other, nor on one the scheduler took the core from.
    clean: AtomicU64,
}

impl Health {
    /// A healthy record under `policy`; `call_timeout` is the plugin's time limit per call.
    pub fn new(mut policy: QuarantinePolicy, call_timeout: Duration) -> Health {
        policy.duration = policy.duration.min(LONGEST_QUARANTINE);
        let record = Record { state: State::Healthy { failed_in_a_row: 0 }, generation: 0 };
        Health {
            policy,
            call_timeout: call_timeout.min(LONGEST_QUARANTINE),
            record: Mutex::new(record),
            clean: AtomicU64::new(0),
        }
    }

    fn record_guard(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mirrors `record` into [`Health::clean`]; called under the lock after every change.
    fn publish(&self, record: &Record) {
        let clean = match record.state {
            State::Healthy { failed_in_a_row: 0 } => record.generation,
            _ => NOT_CLEAN,
        };
        self.clean.store(clean, Ordering::Release);
    }

    /// `Err` while a call may not run: quarantined and the time not up, or a probe under way.
    fn held(state: &State, now: Instant) -> Result<(), Quarantine> {
        match state {
            State::Quarantined { until, last_error, .. } if now < *until => {
                Err(Quarantine { retry_after: *until - now, last_error: last_error.clone() })
            }
            State::Probing { deadline, last_error, .. } if now < *deadline => {
                Err(Quarantine { retry_after: PROBING_RETRY, last_error: last_error.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Whether a call may run now, without taking the probe.
    pub fn check(&self) -> Result<(), Quarantine> {
        if self.clean.load(Ordering::Acquire) != NOT_CLEAN {
            return Ok(());
        }
        let record = self.record_guard();
        Self::held(&record.state, Instant::now())
    }

    /// Lets a call run, with the ticket to [`Health::record`] its results under; the ticket says
    /// whether this call is the probe (the quarantine's time is up). `Err` while the plugin is
    /// held back.
    pub fn admit(&self) -> Result<Ticket, Quarantine> {
        let clean = self.clean.load(Ordering::Acquire);
        if clean != NOT_CLEAN {
            return Ok(Ticket { generation: clean, probe: false });
        }
        let now = Instant::now();
        let mut record = self.record_guard();
        Self::held(&record.state, now)?;
        let (duration, last_error) = match &record.state {
            State::Healthy { .. } => return Ok(Ticket { generation: record.generation, probe: false }),
            State::Quarantined { duration, last_error, .. } | State::Probing { duration, last_error, .. } => {
                (*duration, last_error.clone())
            }
        };
        record.state = State::Probing { deadline: now + self.call_timeout + PROBE_GRACE, duration, last_error };
        record.generation += 1;
        self.publish(&record);
        Ok(Ticket { generation: record.generation, probe: true })
    }

    /// Gives back a probe that was admitted but not run (the chain could not run after all, or
    /// an earlier plugin left it no event), so the next caller can take it.
    pub fn release_probe(&self, ticket: Ticket) {
        if !ticket.probe {
            return;
        }
        let mut record = self.record_guard();
        if ticket.generation != record.generation {
            return;
        }
        if let State::Probing { duration, last_error, .. } = &record.state {
            let (duration, last_error) = (*duration, last_error.clone());
            record.state = State::Quarantined { until: Instant::now(), duration, last_error };
            record.generation += 1;
            self.publish(&record);
        }
    }

    /// Records the results of the call `ticket` let through, in order. An ordinary call's
    /// failures count towards a quarantine and anything else resets the count; the probe's
    /// result lifts the quarantine or renews it for twice as long. A probe with no results is
    /// given back. Results of calls admitted before the state last changed are ignored.
    pub fn record<T>(&self, ticket: Ticket, results: &[Result<T, PluginError>]) -> Change {
        if self.policy.after == 0 {
            return Change::None;
        }
        if results.is_empty() {
            self.release_probe(ticket);
            return Change::None;
        }
        // Healthy, nothing counted, nothing to count: no change.
        if !ticket.probe && self.clean.load(Ordering::Acquire) == ticket.generation && results.iter().all(Result::is_ok)
        {
            return Change::None;
        }
        let mut record = self.record_guard();
        if ticket.generation != record.generation {
            return Change::None;
        }
        let change = self.settle(&mut record, ticket, results);
        self.publish(&record);
        change
    }

    fn settle<T>(&self, record: &mut Record, ticket: Ticket, results: &[Result<T, PluginError>]) -> Change {
        let now = Instant::now();
        match (&mut record.state, ticket.probe) {
            (State::Probing { duration, .. }, true) => {
                let duration = *duration;
                match results.iter().find_map(|result| result.as_ref().err()) {
                    Some(error) if results.iter().all(Result::is_err) => {
                        let longest = MAX_QUARANTINE.max(self.policy.duration);
                        let duration = duration.saturating_mul(2).min(longest);
                        record.state =
                            State::Quarantined { until: now + duration, duration, last_error: error.to_string() };
                        record.generation += 1;
                        Change::Quarantined { duration, failed_in_a_row: 1, last_error: error.to_string() }
                    }
                    _ => {
                        record.state = State::Healthy { failed_in_a_row: 0 };
                        record.generation += 1;
                        Change::Lifted
                    }
                }
            }
            (State::Healthy { failed_in_a_row }, false) => {
                for result in results {
                    match result {
                        Ok(_) => *failed_in_a_row = 0,
                        Err(_) => *failed_in_a_row += 1,
                    }
                    if *failed_in_a_row >= self.policy.after
                        && let Err(error) = result
                    {
                        let (failed, duration) = (*failed_in_a_row, self.policy.duration);
                        record.state =
                            State::Quarantined { until: now + duration, duration, last_error: error.to_string() };
                        record.generation += 1;
                        return Change::Quarantined {
                            duration,
                            failed_in_a_row: failed,
                            last_error: error.to_string(),
                        };
                    }
                }
                Change::None
            }
            // A plugin listed twice in a chain: only the probe's own call decides.
            _ => Change::None,
        }
    }

    /// How many more failed events in a row would quarantine the plugin: a caller with many
    /// events to run may stop there and hold the rest back. `None` when none would (quarantine
    /// is off, or already in force).
    pub fn failures_to_quarantine(&self) -> Option<u32> {
        if self.policy.after == 0 {
            return None;
        }
        if self.clean.load(Ordering::Acquire) != NOT_CLEAN {
            return Some(self.policy.after);
        }
        match self.record_guard().state {
            State::Healthy { failed_in_a_row } => Some(self.policy.after.saturating_sub(failed_in_a_row).max(1)),
            _ => None,
        }
    }

    /// The quarantine in force, if any (a probe under way counts).
    pub fn quarantine(&self) -> Option<Quarantine> {
        if self.clean.load(Ordering::Acquire) != NOT_CLEAN {
            return None;
        }
        let record = self.record_guard();
        match &record.state {
            State::Healthy { .. } => None,
            State::Quarantined { until, last_error, .. } => Some(Quarantine {
                retry_after: until.saturating_duration_since(Instant::now()),
                last_error: last_error.clone(),
            }),
            State::Probing { last_error, .. } => {
                Some(Quarantine { retry_after: PROBING_RETRY, last_error: last_error.clone() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::ErrorKind;

    fn failure() -> Result<(), PluginError> {
        Err(PluginError::new(ErrorKind::Trap, "boom"))
    }

    fn health(after: u32, millis: u64) -> Health {
        Health::new(QuarantinePolicy { after, duration: Duration::from_millis(millis) }, Duration::from_millis(10))
    }

    /// Admits an ordinary call and records `results` under it.
    fn call(health: &Health, results: &[Result<(), PluginError>]) -> Change {
        let ticket = health.admit().unwrap();
        assert!(!ticket.is_probe());
        health.record(ticket, results)
    }

    #[test]
    fn failures_in_a_row_quarantine_and_a_success_between_resets_the_count() {
        let health = health(3, 60_000);
        assert_eq!(call(&health, &[failure(), failure(), Ok(()), failure(), failure()]), Change::None);
        let change = call(&health, &[failure()]);
        assert!(matches!(change, Change::Quarantined { failed_in_a_row: 3, .. }), "{change:?}");
        let held = health.admit().unwrap_err();
        assert!(held.retry_after > Duration::from_secs(59), "{held:?}");
        assert_eq!(held.last_error, "trap: boom");
    }

    #[test]
    fn a_failed_probe_doubles_the_quarantine_and_a_good_one_lifts_it() {
        let health = health(1, 20);
        assert!(matches!(call(&health, &[failure()]), Change::Quarantined { .. }));
        std::thread::sleep(Duration::from_millis(30));
        assert!(health.check().is_ok());
        let probe = health.admit().unwrap();
        assert!(probe.is_probe(), "the first caller after the time is the probe");
        let held = health.admit().unwrap_err();
        assert_eq!(held.retry_after, PROBING_RETRY, "others wait for the probe");
        let change = health.record(probe, &[failure()]);
        assert!(
            matches!(change, Change::Quarantined { duration, .. } if duration == Duration::from_millis(40)),
            "{change:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        let probe = health.admit().unwrap();
        assert_eq!(health.record(probe, &[Ok(())]), Change::Lifted);
        assert_eq!(call(&health, &[Ok(())]), Change::None);
        assert!(health.quarantine().is_none());
    }

    #[test]
    fn calls_admitted_before_a_change_of_state_change_nothing() {
        let health = health(1, 20);
        let late = health.admit().unwrap();
        assert!(matches!(call(&health, &[failure()]), Change::Quarantined { .. }));
        // A call that began before the quarantine and succeeds does not lift it.
        assert_eq!(health.record(late, &[Ok(())]), Change::None);
        assert!(health.check().is_err());
        std::thread::sleep(Duration::from_millis(30));
        let probe = health.admit().unwrap();
        // Nor does it fail the probe, or give the probe back.
        assert_eq!(health.record(late, &[failure()]), Change::None);
        assert_eq!(health.record::<()>(late, &[]), Change::None);
        assert!(health.admit().is_err(), "the probe is still out");
        assert_eq!(health.record(probe, &[Ok(())]), Change::Lifted);
    }

    #[test]
    fn a_probe_given_back_or_given_no_events_goes_to_the_next_caller() {
        let health = health(1, 1);
        call(&health, &[failure()]);
        std::thread::sleep(Duration::from_millis(5));
        let probe = health.admit().unwrap();
        health.release_probe(probe);
        let probe = health.admit().unwrap();
        assert!(probe.is_probe());
        assert_eq!(health.record::<()>(probe, &[]), Change::None);
        assert!(health.admit().unwrap().is_probe());
        assert!(health.admit().is_err());
    }

    #[test]
    fn zero_never_quarantines_and_long_times_do_not_overflow() {
        let health = health(0, 1000);
        assert_eq!(call(&health, &vec![failure(); 1000]), Change::None);
        assert!(health.admit().is_ok());
        let forever = Health::new(QuarantinePolicy { after: 1, duration: Duration::MAX }, Duration::MAX);
        assert!(
            matches!(call(&forever, &[failure()]), Change::Quarantined { duration, .. } if duration == LONGEST_QUARANTINE)
        );
    }
}
