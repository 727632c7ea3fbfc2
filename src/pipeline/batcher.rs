//! Continuous batching for the inference thread.
//!
//! The [`Batcher`] owns the crops waiting for inference, grouped by request
//! in arrival order, and decides when a batch leaves and what it holds:
//!
//! - when inference is idle, whatever is waiting leaves at once, even a
//!   single crop (Triton's dynamic batcher with no queue delay);
//! - while inference is busy, crops accumulate, and the next batch takes
//!   them as soon as the current one is done;
//! - a batch holds at most `max_batch` crops;
//! - a request's crops stay together: a request joins a batch only whole
//!   (the oldest request always leads the next batch; a later one that
//!   fits may fill the room it leaves), and one with more crops than
//!   `max_batch` fills consecutive batches;
//! - an optional linger (`pipeline.max_delay_ms`) holds waiting crops while
//!   inference is idle until a batch's worth is waiting or the oldest has
//!   waited that long. Off by default: it pays only on GPU providers.
//!
//! It does no I/O and reads no clock: the caller passes the time, so the
//! tests drive it with a fake one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One request's crops, still to be batched.
struct Unit<T> {
    crops: VecDeque<T>,
    /// When its crops reached the batcher.
    arrived: Instant,
}

/// Decides when the inference thread runs a batch and which crops it
/// holds. `T` is one prepared crop.
pub struct Batcher<T> {
    waiting: VecDeque<Unit<T>>,
    /// Crops in `waiting`.
    len: usize,
    max_batch: usize,
    linger: Duration,
    /// A batch is running.
    busy: bool,
    /// No more crops will come: what is waiting leaves without lingering.
    closed: bool,
}

impl<T> Batcher<T> {
    /// A batcher for batches of at most `max_batch` crops (at least 1),
    /// holding crops up to `linger` for a fuller batch when inference is
    /// idle (`Duration::ZERO`: never).
    pub fn new(max_batch: usize, linger: Duration) -> Self {
        Self {
            waiting: VecDeque::new(),
            len: 0,
            max_batch: max_batch.max(1),
            linger,
            busy: false,
            closed: false,
        }
    }

    /// Adds one request's crops, which arrived `now`.
    pub fn push(&mut self, crops: Vec<T>, now: Instant) {
        if crops.is_empty() {
            return;
        }
        self.len += crops.len();
        self.waiting.push_back(Unit {
            crops: crops.into(),
            arrived: now,
        });
    }

    /// Crops waiting for a batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no crop is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a batch is running (between [`Batcher::next_batch`] and
    /// [`Batcher::finished`]).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// No more crops will be pushed: the rest leaves without lingering.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Whether a batch should leave at `now`: inference is idle, crops are
    /// waiting, and no linger holds them.
    pub fn due(&self, now: Instant) -> bool {
        !self.busy
            && !self.is_empty()
            && (self.len >= self.max_batch
                || self.closed
                || self.deadline().is_some_and(|d| now >= d))
    }

    /// When lingering crops become due without further arrivals: `None`
    /// when nothing waits. With no linger this is the oldest crop's
    /// arrival (due at once).
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|u| u.arrived + self.linger)
    }

    /// Moves the next batch into `batch` (cleared first) and marks
    /// inference busy, when one is due at `now`. Returns its size, 0 when
    /// none is due.
    pub fn next_batch(&mut self, now: Instant, batch: &mut Vec<T>) -> usize {
        batch.clear();
        if !self.due(now) {
            return 0;
        }
        // The oldest request leads, split only when it alone exceeds a batch.
        if let Some(front) = self.waiting.front_mut() {
            let take = front.crops.len().min(self.max_batch);
            batch.extend(front.crops.drain(..take));
            if front.crops.is_empty() {
                self.waiting.pop_front();
            }
        }
        // Later requests join whole, in arrival order, while they fit. (A
        // split leader filled the batch, so index 0 is a new request here.)
        let mut i = 0;
        while i < self.waiting.len() && batch.len() < self.max_batch {
            if self.waiting[i].crops.len() <= self.max_batch - batch.len() {
                if let Some(unit) = self.waiting.remove(i) {
                    batch.extend(unit.crops);
                }
            } else {
                i += 1;
            }
        }
        self.len -= batch.len();
        self.busy = true;
        batch.len()
    }

    /// The running batch is done: inference is idle again.
    pub fn finished(&mut self) {
        self.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: instants at fixed offsets from one origin.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn take(b: &mut Batcher<&'static str>, now: Instant) -> Vec<&'static str> {
        let mut batch = Vec::new();
        b.next_batch(now, &mut batch);
        batch
    }

    #[test]
    fn a_single_crop_leaves_at_once_when_inference_is_idle() {
        let clock = Clock::new();
        let mut b = Batcher::new(8, Duration::ZERO);
        assert!(take(&mut b, clock.at(0)).is_empty(), "nothing waits yet");
        b.push(vec!["a1"], clock.at(0));
        assert!(b.due(clock.at(0)));
        assert_eq!(take(&mut b, clock.at(0)), ["a1"]);
        assert!(b.busy());
        assert!(b.is_empty());
    }

    #[test]
    fn crops_accumulate_while_inference_is_busy_and_leave_together() {
        let clock = Clock::new();
        let mut b = Batcher::new(8, Duration::ZERO);
        b.push(vec!["a1"], clock.at(0));
        assert_eq!(take(&mut b, clock.at(0)), ["a1"]);
        b.push(vec!["b1"], clock.at(1));
        b.push(vec!["c1", "c2"], clock.at(2));
        assert!(!b.due(clock.at(3)), "busy: no second batch");
        assert!(take(&mut b, clock.at(3)).is_empty());
        assert_eq!(b.len(), 3);
        b.finished();
        assert_eq!(take(&mut b, clock.at(4)), ["b1", "c1", "c2"]);
        b.finished();
        assert!(take(&mut b, clock.at(5)).is_empty());
        assert!(!b.busy());
    }

    #[test]
    fn linger_holds_crops_until_the_delay_or_a_full_batch() {
        let clock = Clock::new();
        let mut b = Batcher::new(4, Duration::from_millis(5));
        b.push(vec!["a1"], clock.at(10));
        assert_eq!(b.deadline(), Some(clock.at(15)));
        assert!(take(&mut b, clock.at(10)).is_empty());
        b.push(vec!["b1"], clock.at(12));
        assert!(take(&mut b, clock.at(14)).is_empty());
        assert_eq!(b.deadline(), Some(clock.at(15)), "the oldest crop sets it");
        assert_eq!(take(&mut b, clock.at(15)), ["a1", "b1"]);
        b.finished();

        // A batch's worth leaves before the delay.
        b.push(vec!["c1", "c2"], clock.at(20));
        b.push(vec!["d1", "d2"], clock.at(21));
        assert!(b.due(clock.at(21)));
        assert_eq!(take(&mut b, clock.at(21)), ["c1", "c2", "d1", "d2"]);
        b.finished();

        // Once closed, nothing lingers.
        b.push(vec!["e1"], clock.at(30));
        b.close();
        assert_eq!(take(&mut b, clock.at(30)), ["e1"]);
    }

    #[test]
    fn no_linger_by_default_means_due_on_arrival() {
        let clock = Clock::new();
        let mut b: Batcher<&str> = Batcher::new(4, Duration::ZERO);
        b.push(vec!["a1"], clock.at(7));
        assert_eq!(b.deadline(), Some(clock.at(7)));
        assert!(b.due(clock.at(7)));
    }

    #[test]
    fn a_request_joins_a_batch_only_whole_and_leads_the_next_one() {
        let clock = Clock::new();
        let mut b = Batcher::new(4, Duration::ZERO);
        b.push(vec!["x1"], clock.at(0));
        assert_eq!(take(&mut b, clock.at(0)), ["x1"]);
        b.push(vec!["a1", "a2", "a3"], clock.at(1));
        b.push(vec!["b1", "b2"], clock.at(2));
        b.push(vec!["c1"], clock.at(3));
        b.finished();
        // b does not fit beside a; c, later and smaller, fills the room.
        assert_eq!(take(&mut b, clock.at(4)), ["a1", "a2", "a3", "c1"]);
        b.finished();
        assert_eq!(take(&mut b, clock.at(5)), ["b1", "b2"]);
    }

    #[test]
    fn batches_never_exceed_max_batch_and_a_large_request_spans_consecutive_batches() {
        let clock = Clock::new();
        let mut b = Batcher::new(4, Duration::ZERO);
        b.push(vec!["x1"], clock.at(0));
        assert_eq!(take(&mut b, clock.at(0)), ["x1"]);
        b.push(
            vec!["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10"],
            clock.at(1),
        );
        b.push(vec!["b1"], clock.at(2));
        b.push(vec!["c1", "c2", "c3"], clock.at(3));
        b.finished();
        assert_eq!(take(&mut b, clock.at(4)), ["a1", "a2", "a3", "a4"]);
        b.finished();
        assert_eq!(take(&mut b, clock.at(5)), ["a5", "a6", "a7", "a8"]);
        b.finished();
        // a's last two lead; b fits, c does not.
        assert_eq!(take(&mut b, clock.at(6)), ["a9", "a10", "b1"]);
        b.finished();
        assert_eq!(take(&mut b, clock.at(7)), ["c1", "c2", "c3"]);
        b.finished();
        assert!(b.is_empty());
    }

    #[test]
    fn max_batch_of_zero_is_treated_as_one() {
        let clock = Clock::new();
        let mut b = Batcher::new(0, Duration::ZERO);
        b.push(vec!["a1", "a2"], clock.at(0));
        assert_eq!(take(&mut b, clock.at(0)), ["a1"]);
        b.finished();
        assert_eq!(take(&mut b, clock.at(1)), ["a2"]);
    }
}
