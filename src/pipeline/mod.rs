//! The recognition pipeline: bounded ingest queue → decode/preprocess
//! workers → continuous batcher and inference thread → search → results.
//!
//! Everything here runs on plain threads, never on the async reactor: the
//! bus hands messages in with [`Pipeline::submit`] (which never blocks) and
//! receives what to publish on an [`Outbound`] channel. A decode worker
//! hands a request's prepared crops to the inference thread as one unit;
//! the [`batcher::Batcher`] runs them at once when inference is idle and
//! keeps them together in a batch when they fit, beside other requests'
//! crops; each result still lists its own items in order. Crops are
//! normalised into slots of the [`slab`], from which a batch usually runs
//! in place. Thread counts come from the [`budget`]. The pipeline owns no
//! MQTT and no encoding choice beyond "answer in kind".

pub mod batcher;
pub mod budget;
pub mod handoff;
pub mod queue;
pub mod reports;
pub mod request;
pub mod slab;

use crossbeam_channel::{self as channel, Receiver, Select, Sender, TryRecvError};
use handoff::{HandoffReceiver, HandoffSender};
use slab::{Pixels, Slab};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbImage;
use tracing::{debug, warn};

use crate::bus::{AckToken, Incoming, Outbound, RequestSink, ToBus};
use crate::config::{Encoding, ExecutionProviderKind, PipelineConfig, RuntimeConfig};
use crate::engine::{Engine, EngineOutput};
use crate::fault::{self, Scope, Site};
use crate::health::{Health, Heartbeat};
use crate::log_summary::FloodLog;
use crate::metrics::{Metrics, Stage};
use crate::protocol::{
    self, CandidateOut, ClassifierOut, CropRequest, CropSource, ErrorReport, Item, ItemDecision,
    ModelRef, MAX_TOP_K,
};
use crate::recognizer::best_class;
use crate::refdb::{Decision, RefDb};
use crate::vision::decode::{clip_bbox, decode_image, raw_image, DecodeLimits, VisionError};
use crate::vision::preprocess::{InputGeometry, Normalizer, Preprocessor};

pub use batcher::Batcher;
pub use budget::ThreadBudget;
pub use queue::{IngestQueue, Pushed};
pub use reports::{Refusal, Report, ReportQueue};
pub use request::{RequestHeader, RequestState};

/// What the pipeline needs to know to answer requests.
pub struct PipelineContext {
    pub device_id: String,
    pub model: ModelRef,
    /// Encoding of error reports when the request's cannot be told.
    pub default_encoding: Encoding,
    pub limits: DecodeLimits,
    pub max_crops: usize,
    pub default_top_k: usize,
    pub unknown_threshold: f32,
    pub metrics: Arc<Metrics>,
    pub refdb: Arc<RefDb>,
    pub out: tokio::sync::mpsc::Sender<ToBus>,
    /// Where the pipeline's threads register their heartbeats.
    pub health: Health,
    /// Per-request warnings, logged as summaries under a flood.
    pub logs: PipelineLogs,
}

/// The pipeline's flood-prone log lines, one [`FloodLog`] per kind.
#[derive(Debug)]
pub struct PipelineLogs {
    /// QoS 0 requests dropped for room.
    pub dropped: FloodLog,
    /// Requests refused over a limit the bus checks.
    pub refused: FloodLog,
    /// Requests that could not be handled (unreadable, over a limit).
    pub rejected: FloodLog,
}

impl Default for PipelineLogs {
    fn default() -> Self {
        Self {
            dropped: FloodLog::new("request dropped"),
            refused: FloodLog::new("request refused"),
            rejected: FloodLog::new("request rejected"),
        }
    }
}

impl PipelineLogs {
    /// Writes the summaries that are due (the drop reporter calls this
    /// about once a second, so a flood's last summary is not held back).
    pub fn flush(&self) {
        for log in [&self.dropped, &self.refused, &self.rejected] {
            log.flush();
        }
    }
}

impl PipelineContext {
    fn send(&self, msg: Outbound) {
        if self.out.blocking_send(ToBus::Send(msg)).is_err() {
            warn!("the bus is gone; dropping an outgoing message");
        }
    }

    /// Reports a message that could not be handled at all and acknowledges it.
    pub fn reject(
        &self,
        payload: &[u8],
        ack: Option<AckToken>,
        request_id: Option<String>,
        reason: String,
    ) {
        self.metrics.add_errors(1);
        self.logs.rejected.event(request_id.as_deref(), &reason);
        self.report(payload, ack, request_id, reason);
    }

    /// Publishes an ErrorReport about `payload` (in its encoding when the
    /// first byte tells) and releases its acknowledgement.
    fn report(
        &self,
        payload: &[u8],
        ack: Option<AckToken>,
        request_id: Option<String>,
        reason: String,
    ) {
        let encoding = protocol::detect_encoding(payload).unwrap_or(self.default_encoding);
        self.send(error_message(encoding, request_id, reason, ack));
    }

    fn finish(&self, req: &RequestState) {
        let refdb_version = req.refdb_version(self.refdb.meta().version);
        let result = req.result(&self.device_id, &self.model, refdb_version);
        let payload = protocol::encode(&result, req.encoding);
        let t = result.timing_us;
        self.metrics.record(&[
            (Stage::Queue, Duration::from_micros(t.queue)),
            (Stage::Decode, Duration::from_micros(t.decode)),
            (Stage::Infer, Duration::from_micros(t.infer)),
            (Stage::Search, Duration::from_micros(t.search)),
            (Stage::Total, Duration::from_micros(t.total)),
        ]);
        debug!(parent: req.span(), total_us = t.total, batch = result.batch_size, "request answered");
        // The bus replaces a result too large for a packet with an
        // ErrorReport for its request.
        self.send(Outbound::Result {
            payload,
            request_id: req.request_id.clone(),
            encoding: req.encoding,
            ack: req.ack,
        });
    }
}

/// An ErrorReport message.
pub fn error_message(
    encoding: Encoding,
    request_id: Option<String>,
    reason: String,
    ack: Option<AckToken>,
) -> Outbound {
    Outbound::Error {
        payload: protocol::encode(&ErrorReport::now(request_id, reason), encoding),
        ack,
    }
}

/// A crop resized and normalised into the model's input layout (one image
/// of the NCHW batch), waiting for its batch.
struct Prepared {
    request: Arc<RequestState>,
    index: usize,
    id: String,
    pixels: Pixels,
}

/// Images to embed for a reference-DB update: the inference thread's
/// second kind of job (at most `max_batch` images, already resized).
struct EmbedJob {
    rgb: Vec<Vec<u8>>,
    /// `rgb.len() * dim` embeddings, or why inference failed.
    reply: Sender<Result<Vec<f32>, String>>,
}

pub struct Pipeline {
    queue: Arc<IngestQueue<Incoming>>,
    ctx: Arc<PipelineContext>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Dropped and refused messages on their way to the drop reporter.
    reports: Arc<ReportQueue>,
    /// Embedding jobs for the inference thread (closed on shutdown).
    jobs: Mutex<Option<Sender<EmbedJob>>>,
    geometry: InputGeometry,
    max_batch: usize,
    dim: usize,
}

/// Why a request was dropped for room.
const DROP_REASON: &str =
    "dropped: the ingest queue is full (pipeline.queue_capacity / queue_max_bytes, pipeline.overflow)";

/// Reports each dropped or refused message on the errors topic (reading
/// its request_id means parsing, kept off the bus's reactor thread) and
/// releases its acknowledgement.
fn drop_reporter(ctx: &PipelineContext, beat: &Heartbeat, reports: &ReportQueue) {
    loop {
        let report = match reports.next_within(Duration::from_secs(1)) {
            reports::Next::Report(r) => r,
            reports::Next::Idle => {
                ctx.logs.flush();
                continue;
            }
            reports::Next::Closed => break,
        };
        let _busy = beat.busy();
        match report {
            Report::One(r) => {
                let request_id = protocol::peek_request_id(&r.prefix);
                let log = if r.dropped {
                    &ctx.logs.dropped
                } else {
                    &ctx.logs.refused
                };
                log.event(request_id.as_deref(), &r.reason);
                ctx.report(&r.prefix, r.ack, request_id, r.reason);
            }
            Report::Aggregate(n) => {
                warn!(count = n, "requests dropped without a report of their own");
                ctx.send(error_message(
                    ctx.default_encoding,
                    None,
                    format!(
                        "dropped: {n} more QoS 0 requests while the ingest queue was full and over {} reports were waiting; their request_ids are not known",
                        reports::MAX_QUEUED
                    ),
                    None,
                ));
            }
        }
    }
}

impl Pipeline {
    /// Starts the decode workers and the inference thread, which takes
    /// ownership of `engine`. `cfg.decode_workers` 0: the [`budget`]'s
    /// figure for this machine with the default runtime settings (the
    /// daemon passes the figure of its own budget).
    pub fn start(
        ctx: PipelineContext,
        engine: Engine,
        cfg: &PipelineConfig,
    ) -> std::io::Result<Self> {
        let ctx = Arc::new(ctx);
        let queue = Arc::new(IngestQueue::new(
            cfg.queue_capacity,
            cfg.queue_max_bytes,
            cfg.overflow,
        ));
        let geometry = crate::recognizer::geometry(engine.manifest());
        let normalizer = Normalizer::new(&engine.manifest().file.preprocess);
        let max_batch = cfg.max_batch.max(1);
        // Room for the crops that wait in the hand-off, a batch being
        // gathered and one running.
        let slab = Slab::new(max_batch * 4, engine.image_len());
        // Room for a batch to accumulate while one runs.
        let (tx, rx) = handoff::handoff::<Prepared>(max_batch * 2);
        let (jobs_tx, jobs_rx) = channel::bounded::<EmbedJob>(1);
        let dim = engine.dim();
        let gpu = engine.provider() != ExecutionProviderKind::Cpu;
        let workers =
            ThreadBudget::for_this_machine(&RuntimeConfig::default(), cfg, gpu).decode_workers;
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 0..workers {
            let (ctx, queue, tx, slab) = (ctx.clone(), queue.clone(), tx.clone(), slab.clone());
            let prep = CropPrep::new(geometry.clone(), normalizer.clone(), max_batch);
            let beat = ctx.health.register(format!("decode-{i}"));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("decode-{i}"))
                    .spawn(move || {
                        // A local, so it drops (and reports this thread's
                        // end) before the channel it feeds closes and the
                        // next thread ends for that reason.
                        let beat = beat;
                        decode_worker(&ctx, &beat, &queue, &tx, &slab, prep)
                    })?,
            );
        }
        drop(tx);
        let reports = Arc::new(ReportQueue::default());
        let (reporter_ctx, reporter_queue) = (ctx.clone(), reports.clone());
        let beat = ctx.health.register("drop-reporter");
        threads.push(
            std::thread::Builder::new()
                .name("drop-reporter".into())
                .spawn(move || drop_reporter(&reporter_ctx, &beat, &reporter_queue))?,
        );
        // pipeline.max_delay_ms: the batcher's linger (0: none).
        let linger = Duration::from_millis(cfg.max_delay_ms);
        // Inference hands each batch's outputs to the finisher (search,
        // results, encoding, metrics) and goes on with the next batch; a few
        // output buffers circulate between them (back-pressure when the
        // finisher falls behind).
        let (ran_tx, ran_rx) = channel::bounded::<Ran>(OUTPUT_BUFFERS);
        let (free_tx, free_rx) = channel::bounded::<EngineOutput>(OUTPUT_BUFFERS);
        for _ in 0..OUTPUT_BUFFERS {
            let _ = free_tx.send(EngineOutput::default());
        }
        let finisher = Finisher {
            dim,
            classes: engine.classes(),
            labels: engine.manifest().classifier_labels.clone(),
        };
        let ctx3 = ctx.clone();
        let beat = ctx.health.register("finisher");
        threads.push(
            std::thread::Builder::new()
                .name("finisher".into())
                .spawn(move || {
                    let beat = beat; // dropped first, as in the decode workers
                    finisher.run(&ctx3, &beat, &ran_rx, &free_tx)
                })?,
        );
        let beat = ctx.health.register("inference");
        let inference_slab = slab.clone();
        threads.push(
            std::thread::Builder::new()
                .name("inference".into())
                .spawn(move || {
                    let outputs = Outputs {
                        ran: ran_tx,
                        free: free_rx,
                    };
                    // Declared after `outputs`, so dropped before it: the
                    // finisher must not see its input close (and end)
                    // before this thread's end is reported.
                    let beat = beat;
                    infer_loop(
                        &beat,
                        rx,
                        jobs_rx,
                        engine,
                        &outputs,
                        &inference_slab,
                        max_batch,
                        linger,
                    )
                })?,
        );
        Ok(Self {
            queue,
            ctx,
            threads: Mutex::new(threads),
            reports,
            jobs: Mutex::new(Some(jobs_tx)),
            geometry,
            max_batch,
            dim,
        })
    }

    /// Queues a message without blocking. When the queue is full, the
    /// overflow policy drops QoS 0 messages (the new one or older ones);
    /// QoS 1 messages are held (see [`queue`]). Every drop is counted and
    /// reported on the errors topic. Returns whether `msg` was queued.
    pub fn submit(&self, msg: Incoming) -> bool {
        let bytes = msg.payload.len();
        let droppable = msg.ack.is_none();
        let pushed = self.queue.push(msg, bytes, droppable);
        self.ctx.metrics.set_queue_depth(self.queue.len());
        for dropped in pushed.dropped.into_iter().chain(pushed.rejected) {
            self.ctx.metrics.add_dropped(1);
            let mut refusal = Refusal::of(dropped, DROP_REASON.into());
            refusal.dropped = true;
            self.reports.push(refusal);
        }
        pushed.queued
    }

    /// Refuses a message without queueing it (over a limit the bus
    /// checks): counted as an error and reported on the errors topic.
    pub fn refuse(&self, msg: Incoming, reason: String) {
        self.ctx.metrics.add_errors(1);
        self.reports.push(Refusal::of(msg, reason));
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    pub fn context(&self) -> &Arc<PipelineContext> {
        &self.ctx
    }

    /// Stops taking work, lets the requests already being decoded or
    /// inferred finish, and returns the ones never started (not
    /// acknowledged, so a QoS 1 sender's broker delivers them again).
    /// Blocks until the threads have exited.
    pub fn shutdown(&self) -> Vec<Incoming> {
        self.ctx.health.begin_stop();
        let left = self.queue.close();
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.reports.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        left
    }
}

/// A decode worker's tools: resizing into a scratch RGB8 image, then
/// normalising straight into the crop's slot-sized f32 buffer, so the
/// inference thread only copies it into the batch tensor.
struct CropPrep {
    pre: Preprocessor,
    normalizer: Normalizer,
    /// One resized RGB8 image per crop of the request being prepared.
    rgb: Vec<Vec<u8>>,
    /// Scratch images kept between requests (more are made for a larger
    /// request and dropped after it).
    keep: usize,
}

impl CropPrep {
    fn new(geometry: InputGeometry, normalizer: Normalizer, keep: usize) -> Self {
        Self {
            pre: Preprocessor::new(geometry),
            normalizer,
            rgb: Vec::new(),
            keep,
        }
    }

    /// The resizer and the scratch image for the request's `k`-th
    /// resized crop.
    fn resize_to(&mut self, k: usize) -> (&mut Preprocessor, &mut [u8]) {
        let len = self.pre.geometry().rgb_len();
        while self.rgb.len() <= k {
            self.rgb.push(vec![0u8; len]);
        }
        (&mut self.pre, &mut self.rgb[k])
    }

    /// After a panic the scratch state is not trusted.
    fn reset(&mut self) {
        *self = Self::new(
            self.pre.geometry().clone(),
            self.normalizer.clone(),
            self.keep,
        );
    }
}

fn decode_worker(
    ctx: &PipelineContext,
    beat: &Heartbeat,
    queue: &IngestQueue<Incoming>,
    tx: &HandoffSender<Prepared>,
    slab: &Arc<Slab>,
    mut prep: CropPrep,
) {
    while let Some(msg) = queue.pop() {
        let _busy = beat.busy();
        ctx.metrics.set_queue_depth(queue.len());
        if fault::ENABLED {
            let id = protocol::peek_request_id(&msg.payload).unwrap_or_default();
            fault::inject(Site::Decode, Scope::Unguarded, &id);
        }
        // A bug that panics on one message fails that message, not the
        // worker: it is reported (and acknowledged) like any bad input.
        let (payload, ack) = (msg.payload.clone(), msg.ack);
        let handled = catch_unwind(AssertUnwindSafe(|| {
            handle_message(ctx, &mut prep, slab, tx, msg);
        }));
        if let Err(panic) = handled {
            prep.reset();
            let id = protocol::peek_request_id(&payload);
            ctx.reject(
                &payload,
                ack,
                id,
                format!(
                    "internal error while handling this request ({}); it was not processed. This is a bug: please report it with the request",
                    panic_text(&panic)
                ),
            );
        }
    }
}

/// The message of a caught panic.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

fn handle_message(
    ctx: &PipelineContext,
    prep: &mut CropPrep,
    slab: &Arc<Slab>,
    tx: &HandoffSender<Prepared>,
    msg: Incoming,
) {
    let dequeued = Instant::now();
    let encoding = match protocol::detect_encoding(&msg.payload) {
        Ok(e) => e,
        Err(e) => return ctx.reject(&msg.payload, msg.ack, None, e.to_string()),
    };
    // Binary fields borrow from the payload, which outlives `req`.
    let req: CropRequest<'_> = match protocol::decode(&msg.payload, encoding) {
        Ok(r) => r,
        Err(e) => {
            let id = protocol::peek_request_id(&msg.payload);
            return ctx.reject(&msg.payload, msg.ack, id, e.to_string());
        }
    };
    if let Err(e) = req.validate(ctx.max_crops) {
        let id = (!req.request_id.is_empty() && req.request_id.len() <= protocol::MAX_REQUEST_ID)
            .then(|| req.request_id.clone());
        return ctx.reject(&msg.payload, msg.ack, id, e.to_string());
    }
    fault::inject(Site::Decode, Scope::Guarded, &req.request_id);
    let n = req.crops.len();
    ctx.metrics.add_requests(1);
    ctx.metrics.add_crops(n as u64);
    let span = tracing::info_span!("request", request_id = %req.request_id);
    let _entered = span.enter();
    let top_k = req
        .top_k
        .map_or(ctx.default_top_k, usize::from)
        .min(MAX_TOP_K);
    let state = Arc::new(RequestState::new(
        RequestHeader {
            request_id: req.request_id.clone(),
            camera_id: req.camera_id.clone(),
            frame_id: req.frame_id,
            encoding,
            top_k,
            received: msg.received,
            ack: msg.ack,
            queue: dequeued.duration_since(msg.received),
        },
        n,
        span.clone(),
    ));
    let frame: Option<Result<RgbImage, VisionError>> = req
        .crops
        .iter()
        .any(protocol::Crop::has_bbox)
        .then(|| match &req.frame {
            Some(f) => decode_image(f.as_slice(), &ctx.limits),
            None => Err(VisionError::NoFrame),
        });
    let mut finished = false;
    // Decode and resize every crop first (the slow part) ...
    let mut resized: Vec<(usize, String)> = Vec::with_capacity(n);
    for (i, crop) in req.crops.iter().enumerate() {
        let id = req.crop_id(i);
        let k = resized.len();
        let outcome = crop.source().and_then(|src| {
            let (pre, rgb) = prep.resize_to(k);
            prepare_crop(ctx, pre, src, frame.as_ref(), rgb).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(()) => resized.push((i, id)),
            Err(why) => {
                ctx.metrics.add_errors(1);
                debug!(crop = %id, "crop error: {why}");
                finished |= state.complete(i, Item::error(id, why));
            }
        }
    }
    // ... then normalise the good ones straight into consecutive slots,
    // where their batch usually runs them in place. Leased only now, slots
    // follow the order in which requests reach the inference thread, even
    // with several decode workers, and failed crops leave no gaps.
    let slots = slab.lease(resized.len());
    let mut prepared = Vec::with_capacity(resized.len());
    for (((index, id), mut pixels), rgb) in resized.into_iter().zip(slots).zip(&prep.rgb) {
        prep.normalizer.apply(rgb, pixels.as_mut_slice());
        prepared.push(Prepared {
            request: state.clone(),
            index,
            id,
            pixels,
        });
    }
    prep.rgb.truncate(prep.keep);
    state.set_decode(dequeued.elapsed());
    if finished {
        ctx.finish(&state);
        return;
    }
    // The request's crops travel as one unit, so they share a batch.
    if !prepared.is_empty() && tx.send(prepared).is_err() {
        warn!("the inference thread has stopped; request abandoned");
    }
}

fn prepare_crop(
    ctx: &PipelineContext,
    pre: &mut Preprocessor,
    src: CropSource<'_>,
    frame: Option<&Result<RgbImage, VisionError>>,
    rgb: &mut [u8],
) -> Result<(), VisionError> {
    match src {
        CropSource::Image(bytes) => {
            let img = decode_image(bytes, &ctx.limits)?;
            pre.resize_into(&img, None, rgb)
        }
        CropSource::Raw(r) => {
            let img = raw_image(r.width, r.height, r.format, r.data.as_slice(), &ctx.limits)?;
            pre.resize_into(&img, None, rgb)
        }
        CropSource::Bbox(b) => match frame {
            Some(Ok(img)) => {
                let rect = clip_bbox(b, img.width(), img.height())?;
                pre.resize_into(img, Some(rect), rgb)
            }
            Some(Err(e)) => Err(VisionError::Frame(e.to_string())),
            None => Err(VisionError::NoFrame),
        },
    }
}

/// What woke the inference thread while no batch was due.
enum Wake {
    /// A request's prepared crops.
    Unit(Vec<Prepared>),
    /// An embedding job for a reference-DB update.
    Embed(EmbedJob),
    /// The decode workers are gone.
    CropsClosed,
    /// The pipeline stopped taking embedding jobs.
    JobsClosed,
    /// The batcher's linger ran out.
    Deadline,
}

/// Blocks until a request's crops or an embedding job arrive, or until
/// `deadline` (the batcher's linger) passes.
fn wait(
    crops: &HandoffReceiver<Prepared>,
    jobs: Option<&Receiver<EmbedJob>>,
    deadline: Option<Instant>,
) -> Wake {
    let mut sel = Select::new();
    let crops_op = sel.recv(crops.channel());
    if let Some(jobs) = jobs {
        sel.recv(jobs);
    }
    let op = match deadline {
        Some(d) => match sel.select_deadline(d) {
            Ok(op) => op,
            Err(_) => return Wake::Deadline,
        },
        None => sel.select(),
    };
    if op.index() == crops_op {
        match op.recv(crops.channel()) {
            Ok(parcel) => Wake::Unit(crops.open(parcel)),
            Err(_) => Wake::CropsClosed,
        }
    } else {
        match jobs.map(|j| op.recv(j)) {
            Some(Ok(job)) => Wake::Embed(job),
            _ => Wake::JobsClosed,
        }
    }
}

/// Runs an embedding job (at most `max_batch` images) and answers it; a
/// panic fails the job, not the thread.
fn run_embed_job(
    job: EmbedJob,
    engine: &mut Engine,
    normalizer: &Normalizer,
    tensor: &mut [f32],
    out: &mut EngineOutput,
    max_batch: usize,
) {
    let reply = job.reply.clone();
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let per_image = engine.image_len();
        let dim = engine.dim();
        let n = job.rgb.len().min(max_batch);
        for (rgb, slot) in job.rgb.iter().zip(tensor.chunks_exact_mut(per_image)) {
            normalizer.apply(rgb, slot);
        }
        engine
            .run(&tensor[..n * per_image], n, out)
            .map(|()| out.embeddings[..n * dim].to_vec())
            .map_err(|e| e.to_string())
    }));
    let run = ran.unwrap_or_else(|panic| {
        Err(format!(
            "internal error while embedding ({}); this is a bug: please report it",
            panic_text(&panic)
        ))
    });
    let _ = reply.send(run);
}

/// Output buffers circulating between the inference thread and the finisher.
const OUTPUT_BUFFERS: usize = 3;

/// A batch that ran, on its way to the finisher.
struct Ran {
    batch: Vec<Prepared>,
    output: EngineOutput,
    infer: Duration,
    /// Whether the batch ran straight from the slab (no copy).
    in_place: bool,
    /// Why inference failed, if it did.
    error: Option<String>,
}

/// The inference thread's ends of the finisher's channels.
struct Outputs {
    ran: Sender<Ran>,
    free: Receiver<EngineOutput>,
}

/// The inference thread: feeds the [`Batcher`] with the decode workers'
/// units, runs each batch it releases from the [`Slab`] in place (or from
/// a copy in its own tensor when the crops' slots are not one stretch) and
/// hands the outputs to the finisher; runs embedding jobs when no batch is
/// due (so at most one update batch runs ahead of waiting crops). Returns
/// once the decode workers are gone and every crop has gone to the finisher.
#[allow(clippy::too_many_arguments)]
fn infer_loop(
    beat: &Heartbeat,
    rx: HandoffReceiver<Prepared>,
    jobs: Receiver<EmbedJob>,
    mut engine: Engine,
    outputs: &Outputs,
    slab: &Slab,
    max_batch: usize,
    linger: Duration,
) {
    let normalizer = Normalizer::new(&engine.manifest().file.preprocess);
    let per_image = engine.image_len();
    let mut tensor = vec![0f32; max_batch * per_image];
    let mut job_out = EngineOutput::default();
    let mut batch: Vec<Prepared> = Vec::with_capacity(max_batch);
    let mut batcher = Batcher::new(max_batch, linger);
    let (mut crops_open, mut jobs_open) = (true, true);
    loop {
        // Take in what the decode workers sent while inference ran, up to
        // a batch's worth (the rest waits in the channel: back-pressure).
        let now = Instant::now();
        while crops_open && batcher.len() < max_batch {
            match rx.try_recv() {
                Ok(unit) => batcher.push(unit, now),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    crops_open = false;
                    batcher.close();
                }
            }
        }
        if batcher.next_batch(now, &mut batch) == 0 {
            // No batch due: an embedding job if one waits, else sleep
            // until crops, a job or the linger's deadline.
            let mut job = None;
            if jobs_open {
                match jobs.try_recv() {
                    Ok(j) => job = Some(j),
                    Err(TryRecvError::Disconnected) => jobs_open = false,
                    Err(TryRecvError::Empty) => {}
                }
            }
            if job.is_none() {
                if !crops_open && batcher.is_empty() {
                    return;
                }
                match wait(&rx, jobs_open.then_some(&jobs), batcher.deadline()) {
                    Wake::Unit(unit) => batcher.push(unit, Instant::now()),
                    Wake::Embed(j) => job = Some(j),
                    Wake::CropsClosed => {
                        crops_open = false;
                        batcher.close();
                    }
                    Wake::JobsClosed => jobs_open = false,
                    Wake::Deadline => {}
                }
            }
            if let Some(job) = job {
                let _busy = beat.busy();
                run_embed_job(
                    job,
                    &mut engine,
                    &normalizer,
                    &mut tensor,
                    &mut job_out,
                    max_batch,
                );
            }
            continue;
        }
        // Waiting for a free output buffer (the finisher is behind) is
        // back-pressure, not work.
        let Ok(mut output) = outputs.free.recv() else {
            return;
        };
        let busy = beat.busy();
        if fault::ENABLED {
            for p in &batch {
                fault::inject(Site::Inference, Scope::Unguarded, &p.request.request_id);
            }
        }
        let n = batch.len();
        // In slot order, so that consecutive slots read as one stretch; the
        // order of crops in a batch is free (each carries its request).
        batch.sort_unstable_by_key(|p| p.pixels.slot());
        let mut in_place = false;
        let started = Instant::now();
        // A panic while running the batch fails its crops, not the thread.
        let ran = catch_unwind(AssertUnwindSafe(|| {
            for p in &batch {
                fault::inject(Site::Inference, Scope::Guarded, &p.request.request_id);
            }
            if let Some(input) = slab.contiguous(batch.iter().map(|p| &p.pixels)) {
                in_place = true;
                return engine.run(input, n, &mut output);
            }
            for (p, slot) in batch.iter().zip(tensor.chunks_exact_mut(per_image)) {
                slot.copy_from_slice(p.pixels.as_slice());
            }
            engine.run(&tensor[..n * per_image], n, &mut output)
        }));
        let infer = started.elapsed();
        drop(busy);
        let error = match ran {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("inference failed: {e}")),
            Err(panic) => {
                let why = format!(
                    "internal error during inference ({}); this is a bug: please report it",
                    panic_text(&panic)
                );
                tracing::error!("{why}");
                output = EngineOutput::default();
                Some(why)
            }
        };
        let ran = Ran {
            batch: std::mem::replace(&mut batch, Vec::with_capacity(max_batch)),
            output,
            infer,
            in_place,
            error,
        };
        if outputs.ran.send(ran).is_err() {
            warn!("the finisher has stopped; batch abandoned");
            return;
        }
        batcher.finished();
    }
}

/// The finisher thread: searches the reference DB for a batch's embeddings
/// (one matrix multiply for the batch), builds and publishes the results,
/// and records the metrics, while the inference thread runs the next batch.
struct Finisher {
    dim: usize,
    classes: usize,
    labels: Vec<String>,
}

impl Finisher {
    fn run(
        &self,
        ctx: &PipelineContext,
        beat: &Heartbeat,
        ran: &Receiver<Ran>,
        free: &Sender<EngineOutput>,
    ) {
        let mut queries: Vec<f32> = Vec::new();
        while let Ok(mut r) = ran.recv() {
            let _busy = beat.busy();
            // A panic while answering fails the crops not answered yet.
            let mut answered = 0;
            let done = catch_unwind(AssertUnwindSafe(|| {
                self.answer(ctx, &mut r, &mut queries, &mut answered)
            }));
            if let Err(panic) = done {
                let why = format!(
                    "internal error while answering ({}); this is a bug: please report it",
                    panic_text(&panic)
                );
                tracing::error!("{why}");
                for p in r.batch.iter_mut().skip(answered) {
                    ctx.metrics.add_errors(1);
                    let item = Item::error(std::mem::take(&mut p.id), why.clone());
                    if p.request.complete(p.index, item) {
                        ctx.finish(&p.request);
                    }
                }
            }
            // Their slots go back to the slab.
            r.batch.clear();
            let _ = free.send(r.output);
        }
    }

    /// Answers every crop of a batch, in order; `answered` counts those done.
    fn answer(
        &self,
        ctx: &PipelineContext,
        r: &mut Ran,
        queries: &mut Vec<f32>,
        answered: &mut usize,
    ) {
        let (dim, classes) = (self.dim, self.classes);
        let n = r.batch.len();
        ctx.metrics.add_batch(n, r.in_place);
        for p in &r.batch {
            p.request.rode_batch(n, r.infer);
        }
        if let Some(e) = &r.error {
            for p in r.batch.iter_mut() {
                ctx.metrics.add_errors(1);
                let item = Item::error(std::mem::take(&mut p.id), e.clone());
                *answered += 1;
                if p.request.complete(p.index, item) {
                    ctx.finish(&p.request);
                }
            }
            return;
        }
        // Crops of one request search the snapshot the request pinned (a
        // request split over batches sees one DB version); crops pinning
        // the same snapshot, normally the whole batch, are searched together.
        let current = ctx.refdb.snapshot();
        let mut results: Vec<Option<crate::refdb::Recognition>> = (0..n).map(|_| None).collect();
        let mut search_time = Duration::ZERO;
        let mut pending: Vec<usize> = (0..n).collect();
        while let Some(&first) = pending.first() {
            let snapshot = r.batch[first].request.pin_snapshot(&current).clone();
            let group: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|&i| Arc::ptr_eq(r.batch[i].request.pin_snapshot(&current), &snapshot))
                .collect();
            pending.retain(|i| !group.contains(i));
            let top_k = group
                .iter()
                .map(|&i| r.batch[i].request.top_k)
                .max()
                .unwrap_or(1);
            let t = Instant::now();
            let found = if group.len() == n {
                snapshot.index.search_batch(
                    &r.output.embeddings[..n * dim],
                    top_k,
                    ctx.unknown_threshold,
                )
            } else {
                queries.clear();
                for &i in &group {
                    queries.extend_from_slice(&r.output.embeddings[i * dim..(i + 1) * dim]);
                }
                snapshot
                    .index
                    .search_batch(queries, top_k, ctx.unknown_threshold)
            };
            search_time += t.elapsed();
            for (&i, rec) in group.iter().zip(found) {
                results[i] = Some(rec);
            }
        }
        let share = search_time / n.max(1) as u32;
        for (i, (p, rec)) in r.batch.iter_mut().zip(results).enumerate() {
            let Some(mut rec) = rec else { continue };
            rec.candidates.truncate(p.request.top_k);
            let classifier = (classes > 0).then(|| {
                let g = best_class(
                    &r.output.class_probs[i * classes..(i + 1) * classes],
                    &self.labels,
                );
                ClassifierOut {
                    label: g.label,
                    probability: g.probability,
                }
            });
            p.request.add_search(share);
            let item = Item {
                id: std::mem::take(&mut p.id),
                decision: match rec.decision {
                    Decision::Match => ItemDecision::Match,
                    Decision::Unknown => ItemDecision::Unknown,
                },
                label: rec.label,
                similarity: Some(rec.similarity),
                distance: Some(rec.distance),
                candidates: Some(
                    rec.candidates
                        .into_iter()
                        .map(|c| CandidateOut {
                            label: c.label,
                            similarity: c.similarity,
                            ref_id: c.ref_id,
                        })
                        .collect(),
                ),
                classifier,
                error: None,
            };
            // Taking the id and completing are adjacent: a panic before
            // this point leaves the crop (id intact) to the caller.
            *answered += 1;
            if p.request.complete(p.index, item) {
                ctx.finish(&p.request);
            }
        }
    }
}

/// Why images of an update could not be embedded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmbedError {
    /// This image does not decode (or is over the limits).
    #[error("{0}")]
    Image(String),
    /// The model failed on the batch.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The pipeline is shutting down: try again after the restart.
    #[error("the inference thread is stopping")]
    Stopped,
}

impl Pipeline {
    /// Decodes and resizes `images` on the calling (blocking) thread, then
    /// embeds them on the inference thread, `max_batch` at a time, each
    /// batch queued behind waiting crops. One result per image, in order.
    pub fn embed_encoded(&self, images: &[&[u8]]) -> Vec<Result<Vec<f32>, EmbedError>> {
        let mut pre = Preprocessor::new(self.geometry.clone());
        let mut results: Vec<Result<Vec<f32>, EmbedError>> = Vec::with_capacity(images.len());
        let mut ready: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, bytes) in images.iter().enumerate() {
            let mut rgb = vec![0u8; self.geometry.rgb_len()];
            match decode_image(bytes, &self.ctx.limits)
                .and_then(|img| pre.resize_into(&img, None, &mut rgb))
            {
                Ok(()) => {
                    ready.push((i, rgb));
                    results.push(Err(EmbedError::Stopped));
                }
                Err(e) => results.push(Err(EmbedError::Image(e.to_string()))),
            }
        }
        let Some(jobs) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return results;
        };
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let chunk: Vec<(usize, Vec<u8>)> = ready.by_ref().take(self.max_batch).collect();
            let (reply, answer) = channel::bounded(1);
            let (slots, rgb): (Vec<usize>, Vec<Vec<u8>>) = chunk.into_iter().unzip();
            if jobs.send(EmbedJob { rgb, reply }).is_err() {
                break;
            }
            let outcome = answer.recv().map_err(|_| EmbedError::Stopped);
            for (k, slot) in slots.into_iter().enumerate() {
                results[slot] = match &outcome {
                    Ok(Ok(emb)) => Ok(emb[k * self.dim..(k + 1) * self.dim].to_vec()),
                    Ok(Err(e)) => Err(EmbedError::Inference(e.clone())),
                    Err(e) => Err(e.clone()),
                };
            }
        }
        results
    }
}

impl RequestSink for Pipeline {
    fn submit(&self, msg: Incoming) {
        Pipeline::submit(self, msg);
    }

    fn refuse(&self, msg: Incoming, reason: String) {
        Pipeline::refuse(self, msg, reason);
    }

    fn intake(&self) -> crate::bus::Intake {
        self.queue.intake()
    }
}

impl crate::fleet::ImageEmbedder for Pipeline {
    fn embed(&self, images: &[&[u8]]) -> Vec<Result<Vec<f32>, Option<String>>> {
        self.embed_encoded(images)
            .into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    EmbedError::Stopped => None,
                    other => Some(other.to_string()),
                })
            })
            .collect()
    }
}
