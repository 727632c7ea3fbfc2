//! Log lines for events that come by the thousand under a flood: requests
//! dropped for room, refused over a limit, rejected as unreadable, answers
//! too large to send. The first event of a kind after a quiet period is
//! logged on its own, with its reason; the ones after it are counted and
//! logged as one summary line (count, the first request ids, the latest
//! reason) at most once every [`SUMMARY_INTERVAL`]. Each request's own
//! detail stays where a client reads it: its ErrorReport and the metrics.
//!
//! [`Throttle`] is the pure rule (time passed in, unit-tested);
//! [`FloodLog`] wraps it for threads that share one kind.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest time between two log lines of one kind.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// Request ids a summary names.
pub const FIRST_IDS: usize = 5;

/// What was held back during one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    /// The first request ids (up to [`FIRST_IDS`]; "-" where unknown).
    pub first_ids: Vec<String>,
    pub last_reason: String,
}

/// Whether an event gets a line of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Alone,
    Counted,
}

/// The rule for one kind of event.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// Until then, events are counted, not logged.
    quiet_until: Option<Instant>,
    held: Option<Summary>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            quiet_until: None,
            held: None,
        }
    }

    /// Records one event at `now`.
    pub fn record(&mut self, now: Instant, request_id: Option<&str>, reason: &str) -> Logged {
        if self.quiet_until.is_none_or(|t| now >= t) && self.held.is_none() {
            self.quiet_until = Some(now + self.interval);
            return Logged::Alone;
        }
        let held = self.held.get_or_insert_with(|| Summary {
            count: 0,
            first_ids: Vec::new(),
            last_reason: String::new(),
        });
        held.count += 1;
        if held.first_ids.len() < FIRST_IDS {
            held.first_ids.push(request_id.unwrap_or("-").to_string());
        }
        reason.clone_into(&mut held.last_reason);
        Logged::Counted
    }

    /// The events counted since the last line, once the interval has
    /// passed; the next line waits another interval.
    pub fn due(&mut self, now: Instant) -> Option<Summary> {
        if self.quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        let held = self.held.take()?;
        self.quiet_until = Some(now + self.interval);
        Some(held)
    }
}

/// One kind of flood-prone event, logged through [`Throttle`] at WARN.
#[derive(Debug)]
pub struct FloodLog {
    /// What happened, as the log line starts ("request dropped").
    what: &'static str,
    throttle: Mutex<Throttle>,
}

impl FloodLog {
    pub fn new(what: &'static str) -> Self {
        Self::with_interval(what, SUMMARY_INTERVAL)
    }

    pub fn with_interval(what: &'static str, interval: Duration) -> Self {
        Self {
            what,
            throttle: Mutex::new(Throttle::new(interval)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs one event, or counts it for the next summary.
    pub fn event(&self, request_id: Option<&str>, reason: &str) {
        let now = Instant::now();
        let (logged, due, interval) = {
            let mut t = self.lock();
            let due = t.due(now);
            (t.record(now, request_id, reason), due, t.interval)
        };
        if let Some(s) = due {
            self.write_summary(&s);
        }
        if logged == Logged::Alone {
            tracing::warn!(
                request_id = request_id.unwrap_or("-"),
                "{}: {reason} (repeats within {} s are counted into one summary line)",
                self.what,
                interval.as_secs()
            );
        }
    }

    /// Logs the summary of counted events once it is due (called
    /// periodically, so that the last ones of a flood are logged too).
    pub fn flush(&self) {
        let due = self.lock().due(Instant::now());
        if let Some(s) = due {
            self.write_summary(&s);
        }
    }

    fn write_summary(&self, s: &Summary) {
        tracing::warn!(
            count = s.count,
            first_request_ids = %s.first_ids.join(","),
            "{}: {} more since the last line; latest: {}",
            self.what,
            s.count,
            s.last_reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_alone_and_the_rest_of_a_flood_as_one_summary_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Throttle::new(s(5));
        assert_eq!(t.record(t0, Some("a"), "full"), Logged::Alone);
        for i in 0..10_000u32 {
            let id = format!("r{i}");
            assert_eq!(t.record(t0 + s(1), Some(&id), "full"), Logged::Counted);
        }
        assert_eq!(t.due(t0 + s(4)), None, "not before the interval");
        let summary = t.due(t0 + s(5)).expect("due");
        assert_eq!(summary.count, 10_000);
        assert_eq!(summary.first_ids, vec!["r0", "r1", "r2", "r3", "r4"]);
        assert_eq!(summary.last_reason, "full");
        assert_eq!(t.due(t0 + s(6)), None, "nothing counted since");
        // Still within the interval after the summary: counted.
        assert_eq!(t.record(t0 + s(7), None, "late"), Logged::Counted);
        assert_eq!(t.due(t0 + s(9)), None);
        let late = t.due(t0 + s(10)).expect("due");
        assert_eq!((late.count, late.first_ids), (1, vec!["-".to_string()]));
        // A quiet period: the next one is logged alone again.
        assert_eq!(t.record(t0 + s(60), Some("b"), "x"), Logged::Alone);
    }

    #[test]
    fn a_flood_of_any_length_makes_at_most_one_line_per_interval_plus_the_first() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(5));
        let mut lines = 0;
        // 20,000 events over 60 s, with a summary check at each one.
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_millis(i * 3);
            lines += usize::from(t.due(now).is_some());
            lines += usize::from(t.record(now, Some("x"), "r") == Logged::Alone);
        }
        lines += usize::from(t.due(t0 + Duration::from_secs(70)).is_some());
        assert!(lines <= 1 + 60 / 5 + 1, "{lines} lines");
    }
}
