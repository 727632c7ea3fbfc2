//! Requests the pipeline could not take (dropped for room, refused as over
//! a limit) on their way to the errors topic.
//!
//! Every such request is reported. A report keeps only the first
//! [`PEEK_PREFIX`] bytes of its payload (enough to read a `request_id` sent
//! near the start), so a flood of large messages costs little memory. A
//! report that releases an acknowledgement (QoS 1) is always queued: the
//! broker's in-flight window bounds those. Reports of QoS 0 messages beyond
//! [`MAX_QUEUED`] waiting are counted instead and reported together in one
//! ErrorReport once the backlog clears. Publishing them is the drop
//! reporter thread's job (see [`super`]).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

use crate::bus::{AckToken, Incoming};

/// Payload bytes a report keeps to read the request_id from.
pub const PEEK_PREFIX: usize = 1024;
/// QoS 0 reports that may wait; beyond, drops are reported in aggregate.
pub const MAX_QUEUED: usize = 16_384;

/// One request to report.
#[derive(Debug)]
pub struct Refusal {
    /// The payload's first bytes.
    pub prefix: bytes::Bytes,
    pub ack: Option<AckToken>,
    pub reason: String,
    /// Dropped for room (else refused over a limit): logged apart.
    pub dropped: bool,
}

impl Refusal {
    /// A refusal of `msg`: copies the payload's first bytes and lets the
    /// rest go.
    pub fn of(msg: Incoming, reason: String) -> Self {
        let keep = msg.payload.len().min(PEEK_PREFIX);
        Self {
            prefix: bytes::Bytes::copy_from_slice(&msg.payload[..keep]),
            ack: msg.ack,
            reason,
            dropped: false,
        }
    }
}

/// What the reporter publishes next.
#[derive(Debug)]
pub enum Report {
    One(Refusal),
    /// This many QoS 0 requests were dropped without a report of their own.
    Aggregate(u64),
}

/// What [`ReportQueue::next_within`] found.
#[derive(Debug)]
pub enum Next {
    Report(Report),
    /// Nothing within the wait.
    Idle,
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<Refusal>,
    unreported: u64,
    closed: bool,
}

#[derive(Default)]
pub struct ReportQueue {
    state: Mutex<State>,
    ready: Condvar,
}

impl ReportQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a report (never blocks); a QoS 0 one over the backlog is
    /// counted for the aggregate report instead. Returns whether it was
    /// queued on its own.
    pub fn push(&self, r: Refusal) -> bool {
        let mut s = self.lock();
        let alone = r.ack.is_some() || s.items.len() < MAX_QUEUED;
        if alone {
            s.items.push_back(r);
        } else {
            s.unreported += 1;
        }
        drop(s);
        self.ready.notify_one();
        alone
    }

    /// Waits for the next report; after `close`, returns what is left and
    /// then `None`.
    pub fn pop(&self) -> Option<Report> {
        loop {
            match self.next_within(std::time::Duration::from_secs(3600)) {
                Next::Report(r) => return Some(r),
                Next::Closed => return None,
                Next::Idle => {}
            }
        }
    }

    /// Waits at most `wait` for the next report.
    pub fn next_within(&self, wait: std::time::Duration) -> Next {
        let deadline = std::time::Instant::now() + wait;
        let mut s = self.lock();
        loop {
            if let Some(r) = s.items.pop_front() {
                return Next::Report(Report::One(r));
            }
            if s.unreported > 0 {
                return Next::Report(Report::Aggregate(std::mem::take(&mut s.unreported)));
            }
            if s.closed {
                return Next::Closed;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Next::Idle;
            }
            s = self
                .ready
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets the reporter finish what is queued, then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: usize, ack: bool) -> Incoming {
        Incoming {
            payload: bytes::Bytes::from(vec![b'{'; len]),
            received: std::time::Instant::now(),
            ack: ack.then_some(AckToken {
                pkid: 1,
                qos: 1,
                seq: 0,
                generation: 0,
            }),
        }
    }

    #[test]
    fn a_report_keeps_only_the_start_of_the_payload() {
        let r = Refusal::of(msg(10 << 20, false), "x".into());
        assert_eq!(r.prefix.len(), PEEK_PREFIX);
    }

    #[test]
    fn qos0_reports_over_the_backlog_become_one_aggregate_and_held_ones_never_do() {
        let q = ReportQueue::default();
        for _ in 0..MAX_QUEUED {
            assert!(q.push(Refusal::of(msg(10, false), "d".into())));
        }
        assert!(!q.push(Refusal::of(msg(10, false), "d".into())));
        assert!(!q.push(Refusal::of(msg(10, false), "d".into())));
        assert!(q.push(Refusal::of(msg(10, true), "held".into())));
        q.close();
        let mut ones = 0;
        let mut aggregate = 0;
        while let Some(r) = q.pop() {
            match r {
                Report::One(_) => ones += 1,
                Report::Aggregate(n) => aggregate += n,
            }
        }
        assert_eq!((ones, aggregate), (MAX_QUEUED + 1, 2));
    }
}
