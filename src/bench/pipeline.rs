//! The offline pipeline: crop requests (MessagePack, 224x224 JPEG crops)
//! handed straight to the daemon's pipeline — ingest queue, decode workers,
//! batcher, inference, search in the served DB, result encoding — with no
//! MQTT. Saturated crops/s (a fixed number of requests in flight: each
//! answer sends the next) at 1 and 8 crops per request, for each split of
//! the cores between ONNX Runtime's intra-op threads and the decode workers
//! (the daemon's own split first), and the best of them.
//!
//! Not measured: MQTT, the broker, acknowledgements, latency (see
//! `end_to_end`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::Receiver;

use super::{BenchError, BenchSetup};
use crate::bus::{Incoming, Outbound, ToBus};
use crate::config::{ExecutionProviderKind, PipelineConfig, RuntimeConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::budget::available_cores;
use crate::pipeline::{Pipeline, PipelineContext, ThreadBudget};
use crate::protocol::ModelRef;
use crate::refdb::RefDb;

/// Crops per request measured.
pub const CROPS_PER_REQUEST: [usize; 2] = [1, 8];

/// Longest wait for one answer before the pipeline counts as stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests kept in flight to saturate the pipeline: four batches' worth
/// of crops, at least two requests.
pub fn in_flight(crops_per_request: usize, max_batch: usize) -> usize {
    (4 * max_batch.max(1))
        .div_ceil(crops_per_request.max(1))
        .max(2)
}

/// How the cores are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ThreadSplit {
    pub intra_threads: usize,
    pub decode_workers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitThroughput {
    pub intra_threads: usize,
    pub decode_workers: usize,
    pub allow_spinning: bool,
    pub crops_per_request: usize,
    pub in_flight: usize,
    pub crops_per_s: f64,
    /// Mean crops per inference batch.
    pub mean_batch: f64,
    /// Share of batches run from the decode workers' slots without a copy.
    pub in_place: f64,
}

/// What one saturated run answered in its window.
struct Saturated {
    crops_per_s: f64,
    mean_batch: f64,
    in_place: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineFigures {
    /// The daemon's split on this machine (its thread budget).
    pub production: ThreadSplit,
    pub max_batch: usize,
    pub max_delay_ms: u64,
    pub splits: Vec<SplitThroughput>,
    /// The highest crops/s of all splits and request sizes.
    pub best: SplitThroughput,
}

/// The splits tried on `cores` cores, `production` first: intra-op threads
/// of every core, one less, half; decode workers 1, a quarter, half, all.
pub fn thread_splits(cores: usize, production: ThreadSplit) -> Vec<ThreadSplit> {
    let intra: BTreeSet<usize> = [cores, cores.saturating_sub(1), cores / 2]
        .into_iter()
        .filter(|&n| n >= 1)
        .collect();
    let decode: BTreeSet<usize> = [1, cores / 4, cores / 2, cores]
        .into_iter()
        .filter(|&n| n >= 1)
        .collect();
    let mut splits = vec![production];
    for &intra_threads in intra.iter().rev() {
        for &decode_workers in &decode {
            let split = ThreadSplit {
                intra_threads,
                decode_workers,
            };
            if !splits.contains(&split) {
                splits.push(split);
            }
        }
    }
    splits
}

pub fn measure(setup: &BenchSetup, progress: &dyn Fn(&str)) -> Result<PipelineFigures, BenchError> {
    let state = setup.state_dir("pipeline")?;
    let (db, recognizer) = setup.enrol_demo_references(&state)?;
    drop(recognizer);
    let refdb = Arc::new(db);
    let production = setup.budget();
    let production = ThreadSplit {
        intra_threads: production.intra_threads,
        decode_workers: production.decode_workers,
    };
    let pipeline_cfg = &setup.cfg.config.pipeline;
    let mut splits = Vec::new();
    for split in thread_splits(available_cores(), production) {
        let budget = split_budget(setup, split);
        for crops in CROPS_PER_REQUEST {
            progress(&format!(
                "offline pipeline: {} intra-op thread(s), {} decode worker(s), {crops} crop(s) per request",
                split.intra_threads, split.decode_workers
            ));
            let mut running = OfflinePipeline::start(setup, &refdb, &budget)?;
            let in_flight = in_flight(crops, pipeline_cfg.max_batch);
            let measured = running.saturate(setup, crops, in_flight, setup.durations.split_window);
            running.stop();
            let Saturated {
                crops_per_s,
                mean_batch,
                in_place,
            } = measured?;
            splits.push(SplitThroughput {
                intra_threads: split.intra_threads,
                decode_workers: split.decode_workers,
                allow_spinning: budget.allow_spinning,
                crops_per_request: crops,
                in_flight,
                crops_per_s,
                mean_batch,
                in_place,
            });
        }
    }
    let best = splits
        .iter()
        .max_by(|a, b| a.crops_per_s.total_cmp(&b.crops_per_s))
        .cloned()
        .ok_or_else(|| BenchError::Pipeline("no split was measured".into()))?;
    Ok(PipelineFigures {
        production,
        max_batch: pipeline_cfg.max_batch,
        max_delay_ms: pipeline_cfg.max_delay_ms,
        splits,
        best,
    })
}

/// The daemon's budget with `split`'s thread counts (spinning and the rest
/// derived as the daemon derives them).
fn split_budget(setup: &BenchSetup, split: ThreadSplit) -> ThreadBudget {
    let runtime = RuntimeConfig {
        intra_threads: split.intra_threads,
        ..setup.cfg.config.runtime.clone()
    };
    let pipeline = PipelineConfig {
        decode_workers: split.decode_workers,
        ..setup.cfg.config.pipeline.clone()
    };
    ThreadBudget::for_this_machine(
        &runtime,
        &pipeline,
        setup.provider != ExecutionProviderKind::Cpu,
    )
}

/// A pipeline started as the daemon starts it, answering into a channel.
struct OfflinePipeline {
    pipeline: Pipeline,
    answers: Receiver<ToBus>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Runtime,
}

impl OfflinePipeline {
    fn start(
        setup: &BenchSetup,
        refdb: &Arc<RefDb>,
        budget: &ThreadBudget,
    ) -> Result<Self, BenchError> {
        let engine = setup.load_engine_with(&budget.apply(&setup.cfg.config.runtime))?;
        let c = &setup.cfg.config;
        let (out, answers) = tokio::sync::mpsc::channel::<ToBus>(1024);
        let metrics = Arc::new(Metrics::default());
        let ctx = PipelineContext {
            device_id: "bench".into(),
            model: ModelRef {
                id: engine.manifest().id().into(),
                fingerprint: engine.manifest().fingerprint().into(),
            },
            default_encoding: c.bus.encoding,
            limits: setup.limits,
            max_crops: c.limits.max_crops,
            default_top_k: c.recognition.top_k,
            unknown_threshold: c.recognition.unknown_threshold,
            metrics: metrics.clone(),
            refdb: refdb.clone(),
            out,
            health: Health::new(c.supervision.stall_timeout()),
            logs: Default::default(),
        };
        let pipeline_cfg = PipelineConfig {
            decode_workers: budget.decode_workers,
            ..c.pipeline.clone()
        };
        let pipeline = Pipeline::start(ctx, engine, &pipeline_cfg)
            .map_err(|e| BenchError::Pipeline(format!("cannot start: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(BenchError::io("starting a timer runtime"))?;
        Ok(Self {
            pipeline,
            answers,
            metrics,
            runtime,
        })
    }

    /// Keeps `in_flight` requests of `crops` crops in the pipeline for a
    /// warm-up and `window`: what was answered in the window.
    fn saturate(
        &mut self,
        setup: &BenchSetup,
        crops: usize,
        in_flight: usize,
        window: Duration,
    ) -> Result<Saturated, BenchError> {
        let mut sent = 0usize;
        let mut submit = |pipeline: &Pipeline| -> Result<(), BenchError> {
            let payload = setup
                .workload
                .request(&format!("r{sent}"), sent * crops, crops)?;
            sent += 1;
            let accepted = pipeline.submit(Incoming {
                payload: bytes::Bytes::from(payload),
                received: Instant::now(),
                ack: None,
            });
            if accepted {
                Ok(())
            } else {
                Err(BenchError::Pipeline(
                    "the queue refused a request (raise pipeline.queue_capacity)".into(),
                ))
            }
        };
        for _ in 0..in_flight {
            submit(&self.pipeline)?;
        }
        let from = Instant::now() + setup.durations.warmup;
        let until = from + window;
        let (mut outstanding, mut counted, mut errors) = (in_flight, 0usize, 0usize);
        let mut batches_at_start = None;
        let mut batches_at_end = None;
        while outstanding > 0 {
            let answers = &mut self.answers;
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(ANSWER_TIMEOUT, answers.recv()).await });
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) => return Err(BenchError::Pipeline("it stopped answering".into())),
                Err(_) => {
                    return Err(BenchError::Pipeline(format!(
                        "no answer within {ANSWER_TIMEOUT:?}"
                    )))
                }
            };
            let ToBus::Send(answer) = message else {
                continue;
            };
            outstanding -= 1;
            if matches!(answer, Outbound::Error { .. }) {
                errors += 1;
            }
            let now = Instant::now();
            if now >= from && batches_at_start.is_none() {
                batches_at_start = Some(self.metrics.totals());
            }
            if now >= from && now < until {
                counted += crops;
            }
            if now >= until && batches_at_end.is_none() {
                batches_at_end = Some(self.metrics.totals());
            }
            if now < until {
                submit(&self.pipeline)?;
                outstanding += 1;
            }
        }
        if errors > 0 {
            return Err(BenchError::Pipeline(format!(
                "{errors} requests were answered with an error report"
            )));
        }
        let (mean_batch, in_place) = match (batches_at_start, batches_at_end) {
            (Some(a), Some(b)) if b.batches > a.batches => {
                let batches = (b.batches - a.batches) as f64;
                (
                    (b.batched_crops - a.batched_crops) as f64 / batches,
                    (b.batches_in_place - a.batches_in_place) as f64 / batches,
                )
            }
            _ => (0.0, 0.0),
        };
        Ok(Saturated {
            crops_per_s: counted as f64 / window.as_secs_f64(),
            mean_batch,
            in_place,
        })
    }

    fn stop(self) {
        self.pipeline.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_split_comes_first_and_none_repeats() {
        let production = ThreadSplit {
            intra_threads: 2,
            decode_workers: 1,
        };
        let splits = thread_splits(2, production);
        assert_eq!(splits[0], production);
        assert_eq!(splits.len(), 4, "{splits:?}");
        let unique: std::collections::HashSet<_> = splits
            .iter()
            .map(|s| (s.intra_threads, s.decode_workers))
            .collect();
        assert_eq!(unique.len(), splits.len());
    }

    #[test]
    fn enough_requests_are_in_flight_for_four_batches() {
        assert_eq!(in_flight(1, 8), 32);
        assert_eq!(in_flight(8, 8), 4);
        assert_eq!(in_flight(8, 1), 2);
    }
}
