//! Live counters and per-stage latency histograms, and the periodic
//! Metrics message of the contract.
//!
//! Stages record into HDR histograms behind one short-lived lock; counters
//! are atomics. [`Metrics::take_interval`] returns the interval's figures and
//! starts a new interval. Each stage also keeps lifetime bucket counts
//! ([`StageBuckets`]) for cumulative exports (Prometheus). Publishing them
//! is the bus's job, and [`crate::prometheus`]'s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::protocol::{self, Percentiles, StageLatencies};

/// Latency stages of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queue,
    Decode,
    Infer,
    Search,
    Total,
}

struct Histograms {
    queue: Histogram<u64>,
    decode: Histogram<u64>,
    infer: Histogram<u64>,
    search: Histogram<u64>,
    total: Histogram<u64>,
}

impl Histograms {
    fn new() -> Self {
        // 1 µs .. 1 h, 3 significant digits.
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Self {
            queue: h(),
            decode: h(),
            infer: h(),
            search: h(),
            total: h(),
        }
    }

    fn get(&mut self, s: Stage) -> &mut Histogram<u64> {
        match s {
            Stage::Queue => &mut self.queue,
            Stage::Decode => &mut self.decode,
            Stage::Infer => &mut self.infer,
            Stage::Search => &mut self.search,
            Stage::Total => &mut self.total,
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.50),
        p95: h.value_at_quantile(0.95),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
    }
}

/// Upper bounds, in µs, of the lifetime latency buckets (an implicit
/// last bucket holds everything above).
pub const BUCKET_BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Lifetime latency counts of one stage in fixed buckets.
#[derive(Default)]
struct LifetimeBuckets {
    counts: [AtomicU64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LifetimeBuckets {
    fn record(&self, us: u64) {
        let i = BUCKET_BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn read(&self) -> StageBuckets {
        let mut counts = [0u64; BUCKET_BOUNDS_US.len() + 1];
        for (c, a) in counts.iter_mut().zip(&self.counts) {
            *c = a.load(Ordering::Relaxed);
        }
        StageBuckets {
            counts,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A stage's lifetime latency counts: `counts[i]` samples fell at or
/// below `BUCKET_BOUNDS_US[i]` and above the bound before; the last entry
/// counts those above every bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageBuckets {
    pub counts: [u64; BUCKET_BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl StageBuckets {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Every stage, in the order of [`Stage::ALL`].
pub const STAGE_COUNT: usize = 5;

impl Stage {
    pub const ALL: [Stage; STAGE_COUNT] = [
        Stage::Queue,
        Stage::Decode,
        Stage::Infer,
        Stage::Search,
        Stage::Total,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Decode => "decode",
            Stage::Infer => "infer",
            Stage::Search => "search",
            Stage::Total => "total",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one interval.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    crops: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    batched_crops: AtomicU64,
    batches_in_place: AtomicU64,
    read_holds: AtomicU64,
    read_hold_us: AtomicU64,
}

pub struct Metrics {
    interval: Counters,
    totals: Counters,
    histograms: Mutex<Histograms>,
    lifetime: [LifetimeBuckets; STAGE_COUNT],
    interval_start: Mutex<Instant>,
    queue_depth: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            interval: Counters::default(),
            totals: Counters::default(),
            histograms: Mutex::new(Histograms::new()),
            lifetime: Default::default(),
            interval_start: Mutex::new(Instant::now()),
            queue_depth: AtomicU64::new(0),
        }
    }
}

/// Lifetime totals, for the demo's summary and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub crops: u64,
    pub errors: u64,
    pub dropped: u64,
    pub batches: u64,
    pub batched_crops: u64,
    /// Batches run straight from the decode workers' slots, not copied.
    pub batches_in_place: u64,
    /// Times the bus stopped reading from the broker because the pipeline
    /// was full of held QoS 1 requests, and how long in all (flow control).
    pub read_holds: u64,
    pub read_hold_ms: u64,
}

macro_rules! counter {
    ($name:ident, $field:ident) => {
        pub fn $name(&self, n: u64) {
            self.interval.$field.fetch_add(n, Ordering::Relaxed);
            self.totals.$field.fetch_add(n, Ordering::Relaxed);
        }
    };
}

impl Metrics {
    counter!(add_requests, requests);
    counter!(add_crops, crops);
    counter!(add_errors, errors);
    counter!(add_dropped, dropped);

    /// One inference batch of `size` crops; `in_place`: run from the
    /// decode workers' slots without a copy.
    pub fn add_batch(&self, size: usize, in_place: bool) {
        for c in [&self.interval, &self.totals] {
            c.batches.fetch_add(1, Ordering::Relaxed);
            c.batched_crops.fetch_add(size as u64, Ordering::Relaxed);
        }
        // A lifetime total only (Prometheus, the bench): the Metrics
        // message carries no such field.
        self.totals
            .batches_in_place
            .fetch_add(u64::from(in_place), Ordering::Relaxed);
    }

    /// The bus stopped reading from the broker for `waited` (flow
    /// control); a lifetime total only, like `batches_in_place`.
    pub fn add_read_hold(&self, waited: Duration) {
        self.totals.read_holds.fetch_add(1, Ordering::Relaxed);
        self.totals
            .read_hold_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.store(depth as u64, Ordering::Relaxed);
    }

    /// Records one request's stage latencies.
    pub fn record(&self, samples: &[(Stage, Duration)]) {
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        for (stage, d) in samples {
            let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
            let _ = h.get(*stage).record(us);
            self.lifetime[stage.index()].record(us);
        }
    }

    /// Lifetime latency counts of `stage`.
    pub fn lifetime(&self, stage: Stage) -> StageBuckets {
        self.lifetime[stage.index()].read()
    }

    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    pub fn totals(&self) -> Totals {
        let t = &self.totals;
        Totals {
            requests: t.requests.load(Ordering::Relaxed),
            crops: t.crops.load(Ordering::Relaxed),
            errors: t.errors.load(Ordering::Relaxed),
            dropped: t.dropped.load(Ordering::Relaxed),
            batches: t.batches.load(Ordering::Relaxed),
            batched_crops: t.batched_crops.load(Ordering::Relaxed),
            batches_in_place: t.batches_in_place.load(Ordering::Relaxed),
            read_holds: t.read_holds.load(Ordering::Relaxed),
            read_hold_ms: t.read_hold_us.load(Ordering::Relaxed) / 1000,
        }
    }

    /// Latency percentiles since the last interval, without resetting.
    pub fn latencies(&self) -> StageLatencies {
        let h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        StageLatencies {
            total: percentiles(&h.total),
            queue: percentiles(&h.queue),
            decode: percentiles(&h.decode),
            infer: percentiles(&h.infer),
            search: percentiles(&h.search),
        }
    }

    /// The interval's Metrics message; starts the next interval.
    pub fn take_interval(&self, device_id: &str) -> protocol::Metrics {
        let latency_us = self.latencies();
        {
            let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
            *h = Histograms::new();
        }
        let elapsed = {
            let mut start = self
                .interval_start
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let e = start.elapsed();
            *start = Instant::now();
            e
        };
        let c = &self.interval;
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        let requests = take(&c.requests);
        let crops = take(&c.crops);
        let errors = take(&c.errors);
        let dropped = take(&c.dropped);
        let batches = take(&c.batches);
        let batched = take(&c.batched_crops);
        let secs = elapsed.as_secs_f64().max(1e-9);
        protocol::Metrics {
            device_id: device_id.to_string(),
            ts_ms: crate::clock::now_ms(),
            interval_ms: elapsed.as_millis() as u64,
            requests,
            crops,
            errors,
            dropped,
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            batches,
            mean_batch: if batches == 0 {
                0.0
            } else {
                batched as f64 / batches as f64
            },
            throughput_cps: crops as f64 / secs,
            latency_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_reports_counts_percentiles_and_then_resets() {
        let m = Metrics::default();
        m.add_requests(2);
        m.add_crops(5);
        m.add_batch(4, true);
        m.add_batch(1, false);
        for ms in [1u64, 2, 3, 100] {
            m.record(&[(Stage::Total, Duration::from_millis(ms))]);
        }
        let first = m.take_interval("dev");
        assert_eq!((first.requests, first.crops, first.batches), (2, 5, 2));
        assert_eq!(first.mean_batch, 2.5);
        assert!(first.latency_us.total.max >= 99_000);
        assert!(first.latency_us.total.p50 <= 3_100);
        let second = m.take_interval("dev");
        assert_eq!(second.requests, 0);
        assert_eq!(second.latency_us.total, Percentiles::default());
        assert_eq!(m.totals().crops, 5);
        assert_eq!(m.totals().batches_in_place, 1);
    }

    #[test]
    fn lifetime_buckets_survive_intervals_and_put_each_sample_under_its_bound() {
        let m = Metrics::default();
        for us in [1u64, 500, 501, 10_000_000, 10_000_001] {
            m.record(&[(Stage::Infer, Duration::from_micros(us))]);
        }
        let _ = m.take_interval("dev");
        let b = m.lifetime(Stage::Infer);
        assert_eq!(b.count(), 5);
        assert_eq!(b.counts[0], 2, "1 and 500 µs are <= 500 µs");
        assert_eq!(b.counts[1], 1, "501 µs is in (500, 1000]");
        assert_eq!(b.counts[BUCKET_BOUNDS_US.len() - 1], 1);
        assert_eq!(b.counts[BUCKET_BOUNDS_US.len()], 1, "above every bound");
        assert_eq!(b.sum_us, 1 + 500 + 501 + 10_000_000 + 10_000_001);
        assert_eq!(m.lifetime(Stage::Total).count(), 0);
    }
}
