//! Raw inference: the ONNX Runtime session alone on ready tensors (the
//! bench's crops, preprocessed once), in images/s at batch 1, 4, 8 and 16
//! (and at `pipeline.max_batch` if it is none of those), threaded as the
//! daemon threads it (its thread budget).
//!
//! Not measured: decoding, preprocessing, batching, search or encoding the
//! result; nor ONNX Runtime with settings the daemon does not use (e.g.
//! spinning threads beside decode workers).

use serde::Serialize;

use super::{repeat_for, BenchError, BenchSetup};
use crate::engine::{Engine, EngineOutput};
use crate::recognizer::geometry;
use crate::vision::decode::decode_image;
use crate::vision::preprocess::Preprocessor;

/// Batch sizes always measured.
pub const BATCH_SIZES: [usize; 4] = [1, 4, 8, 16];

#[derive(Debug, Clone, Serialize)]
pub struct InferenceFigures {
    pub provider: String,
    pub intra_threads: usize,
    pub allow_spinning: bool,
    pub batches: Vec<BatchThroughput>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchThroughput {
    pub batch: usize,
    pub images_per_s: f64,
    /// Milliseconds per run of the whole batch.
    pub ms_per_batch: f64,
}

impl InferenceFigures {
    /// The figure at batch size `batch`, if measured.
    pub fn at(&self, batch: usize) -> Option<&BatchThroughput> {
        self.batches.iter().find(|b| b.batch == batch)
    }
}

pub fn measure(setup: &BenchSetup) -> Result<InferenceFigures, BenchError> {
    let budget = setup.budget();
    let mut engine = setup.load_engine()?;
    let mut sizes = BATCH_SIZES.to_vec();
    let max_batch = setup.cfg.config.pipeline.max_batch;
    if !sizes.contains(&max_batch) {
        sizes.push(max_batch);
        sizes.sort_unstable();
    }
    let largest = sizes.iter().copied().max().unwrap_or(1);
    let tensors = crop_tensors(setup, &engine, largest)?;
    let per_image = engine.image_len();
    let mut out = EngineOutput::default();
    let mut batches = Vec::new();
    for batch in sizes {
        let input = &tensors[..batch * per_image];
        // The first runs of a shape allocate; keep them out of the figure.
        for _ in 0..2 {
            engine.run(input, batch, &mut out)?;
        }
        let d = setup.durations;
        let (runs, elapsed) =
            repeat_for(d.inference_window, 3, || engine.run(input, batch, &mut out))?;
        let seconds = elapsed.as_secs_f64();
        batches.push(BatchThroughput {
            batch,
            images_per_s: (runs * batch) as f64 / seconds,
            ms_per_batch: seconds * 1e3 / runs as f64,
        });
    }
    Ok(InferenceFigures {
        provider: engine.provider().name().to_string(),
        intra_threads: budget.intra_threads,
        allow_spinning: budget.allow_spinning,
        batches,
    })
}

/// `n` of the bench's crops decoded and preprocessed for `engine`, NCHW.
pub fn crop_tensors(setup: &BenchSetup, engine: &Engine, n: usize) -> Result<Vec<f32>, BenchError> {
    let per_image = engine.image_len();
    let mut pre = Preprocessor::new(geometry(engine.manifest()));
    let mut tensors = vec![0f32; n * per_image];
    let mut rgb = Vec::new();
    let crops = &setup.workload.crops;
    for (i, slot) in tensors.chunks_exact_mut(per_image).enumerate() {
        let img = decode_image(&crops[i % crops.len()], &setup.limits)?;
        pre.prepare(&img, None, &mut rgb, slot)?;
    }
    Ok(tensors)
}
