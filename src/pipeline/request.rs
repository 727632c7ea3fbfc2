//! One request on its way through the pipeline: its items as they complete,
//! its timings, and the assembly of its RecognitionResult once the last
//! crop is done (whichever thread finishes it).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::AckToken;
use crate::config::Encoding;
use crate::protocol::{Item, ModelRef, RecognitionResult, TimingUs};
use crate::refdb::Snapshot;

/// Per-request state shared by the decode worker and the inference thread.
pub struct RequestState {
    pub request_id: String,
    pub camera_id: Option<String>,
    pub frame_id: Option<u64>,
    pub encoding: Encoding,
    pub top_k: usize,
    pub received: Instant,
    pub ack: Option<AckToken>,
    pub queue: Duration,
    decode_us: AtomicU64,
    infer_us: AtomicU64,
    search_us: AtomicU64,
    batch_size: AtomicU32,
    items: Mutex<Vec<Option<Item>>>,
    remaining: AtomicUsize,
    /// The DB snapshot every crop of this request is searched in, pinned by
    /// its first batch: a request never sees two versions of the DB.
    snapshot: OnceLock<Arc<Snapshot>>,
    span: tracing::Span,
}

pub struct RequestHeader {
    pub request_id: String,
    pub camera_id: Option<String>,
    pub frame_id: Option<u64>,
    pub encoding: Encoding,
    pub top_k: usize,
    pub received: Instant,
    pub ack: Option<AckToken>,
    pub queue: Duration,
}

impl RequestState {
    /// A request with `crops` items, all pending.
    pub fn new(h: RequestHeader, crops: usize, span: tracing::Span) -> Self {
        Self {
            request_id: h.request_id,
            camera_id: h.camera_id,
            frame_id: h.frame_id,
            encoding: h.encoding,
            top_k: h.top_k,
            received: h.received,
            ack: h.ack,
            queue: h.queue,
            decode_us: AtomicU64::new(0),
            infer_us: AtomicU64::new(0),
            search_us: AtomicU64::new(0),
            batch_size: AtomicU32::new(0),
            items: Mutex::new(vec![None; crops]),
            remaining: AtomicUsize::new(crops),
            snapshot: OnceLock::new(),
            span,
        }
    }

    /// The snapshot this request is searched in: the first one offered.
    pub fn pin_snapshot(&self, current: &Arc<Snapshot>) -> &Arc<Snapshot> {
        self.snapshot.get_or_init(|| current.clone())
    }

    /// The version of the DB that answered: the pinned snapshot's, or
    /// `current` when no crop was searched.
    pub fn refdb_version(&self, current: u64) -> u64 {
        self.snapshot.get().map_or(current, |s| s.meta.version)
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub fn set_decode(&self, d: Duration) {
        self.decode_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records the batch a crop rode in.
    pub fn rode_batch(&self, size: usize, infer: Duration) {
        self.batch_size.fetch_max(size as u32, Ordering::Relaxed);
        self.infer_us
            .fetch_max(infer.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn add_search(&self, d: Duration) {
        self.search_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Sets item `index`; returns true when it was the last one pending.
    pub fn complete(&self, index: usize, item: Item) -> bool {
        {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = items.get_mut(index) {
                *slot = Some(item);
            }
        }
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn timing(&self) -> TimingUs {
        TimingUs {
            queue: self.queue.as_micros() as u64,
            decode: self.decode_us.load(Ordering::Relaxed),
            infer: self.infer_us.load(Ordering::Relaxed),
            search: self.search_us.load(Ordering::Relaxed),
            total: self.received.elapsed().as_micros() as u64,
        }
    }

    /// The result, once every item is set.
    pub fn result(
        &self,
        device_id: &str,
        model: &ModelRef,
        refdb_version: u64,
    ) -> RecognitionResult {
        let items = self
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .map(|(i, it)| {
                it.clone()
                    .unwrap_or_else(|| Item::error(i.to_string(), "not processed".into()))
            })
            .collect();
        RecognitionResult {
            request_id: self.request_id.clone(),
            camera_id: self.camera_id.clone(),
            frame_id: self.frame_id,
            device_id: device_id.to_string(),
            model: model.clone(),
            refdb_version,
            items,
            timing_us: self.timing(),
            batch_size: self.batch_size.load(Ordering::Relaxed),
            ts_ms: crate::clock::now_ms(),
        }
    }
}
