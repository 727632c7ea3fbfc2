//! The `--sweep`: `pipeline.max_batch` in {1, 4, 8, 16} x linger
//! (`pipeline.max_delay_ms`) in {0, 2, 5}, end to end (the agent binary
//! through the broker, as `end_to_end` runs it, one agent per setting, the
//! rest of the config as given). Per setting: saturated crops/s at 1 and 8
//! crops per request with the mean batch, the unloaded single-crop round
//! trip, and p50/p99 under Poisson arrivals at 50% of that setting's own
//! single-crop saturation. Shorter windows than `end_to_end`'s.
//!
//! Not measured: latency at 90% of saturation, memory, other settings.

use serde::Serialize;

use super::end_to_end::{AgentUnderTest, Broker};
use super::{BenchError, BenchSetup};
use crate::config::PipelineConfig;

pub const MAX_BATCHES: [usize; 4] = [1, 4, 8, 16];
pub const LINGERS_MS: [u64; 3] = [0, 2, 5];
/// Single-crop requests for one setting's unloaded latency, at most.
const UNLOADED_SAMPLES: usize = 100;
const SEED: u64 = 7;

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub max_batch: usize,
    pub max_delay_ms: u64,
    pub saturated_1_crop_per_s: f64,
    pub mean_batch_1_crop: f64,
    pub saturated_8_crops_per_s: f64,
    pub mean_batch_8_crops: f64,
    pub unloaded_p50_ms: f64,
    pub unloaded_p99_ms: f64,
    pub at_50_percent_p50_ms: f64,
    pub at_50_percent_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepFigures {
    pub points: Vec<SweepPoint>,
}

impl SweepFigures {
    /// The point with the highest 8-crop saturated throughput.
    pub fn highest_throughput(&self) -> Option<&SweepPoint> {
        self.points.iter().max_by(|a, b| {
            a.saturated_8_crops_per_s
                .total_cmp(&b.saturated_8_crops_per_s)
        })
    }

    /// The point with the lowest unloaded p50.
    pub fn lowest_unloaded_latency(&self) -> Option<&SweepPoint> {
        self.points
            .iter()
            .min_by(|a, b| a.unloaded_p50_ms.total_cmp(&b.unloaded_p50_ms))
    }
}

pub fn measure(
    setup: &BenchSetup,
    broker: &Broker,
    progress: &dyn Fn(&str),
) -> Result<SweepFigures, BenchError> {
    let window = setup.durations.sweep_window;
    let state = setup.state_dir("sweep")?;
    {
        let (db, _) = setup.enrol_demo_references(&state)?;
        db.flush()?;
    }
    let mut points = Vec::new();
    for max_batch in MAX_BATCHES {
        for max_delay_ms in LINGERS_MS {
            progress(&format!(
                "sweep: max_batch {max_batch}, max_delay_ms {max_delay_ms}"
            ));
            let pipeline = PipelineConfig {
                max_batch,
                max_delay_ms,
                ..setup.cfg.config.pipeline.clone()
            };
            let name = format!("sweep-{max_batch}-{max_delay_ms}");
            let mut agent = AgentUnderTest::start(setup, broker, &state, &pipeline, &name)?;
            let one = agent.saturate(setup, 1, window)?;
            let eight = agent.saturate(setup, 8, window)?;
            let unloaded = agent.unloaded(
                setup,
                UNLOADED_SAMPLES.min(setup.durations.unloaded_samples),
                window,
            )?;
            let loaded = agent.poisson(setup, 0.5 * one.crops_per_s, window, SEED)?;
            agent.stop()?;
            points.push(SweepPoint {
                max_batch,
                max_delay_ms,
                saturated_1_crop_per_s: one.crops_per_s,
                mean_batch_1_crop: one.mean_batch,
                saturated_8_crops_per_s: eight.crops_per_s,
                mean_batch_8_crops: eight.mean_batch,
                unloaded_p50_ms: unloaded.p50_ms,
                unloaded_p99_ms: unloaded.p99_ms,
                at_50_percent_p50_ms: loaded.p50_ms,
                at_50_percent_p99_ms: loaded.p99_ms,
            });
        }
    }
    Ok(SweepFigures { points })
}
