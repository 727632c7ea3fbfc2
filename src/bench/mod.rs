//! `retail-agent bench`: this machine's throughput, latency, stage costs,
//! search and memory figures for one model, all from one run so that their
//! ratios compare, and the performance targets checked against them.
//!
//! One file per section, each saying what it measures and what it does not:
//! [`inference`] (ONNX Runtime alone), [`stages`] (per-crop costs),
//! [`pipeline`] (the daemon's pipeline fed directly, no MQTT), [`search`]
//! (search next to a GEMM, and the f16 reference matrix), [`memory`]
//! (reference matrices, and the agent's memory and start-up with 31,500
//! references), [`end_to_end`] (the agent binary through a broker) and
//! [`sweep`] (`max_batch` x linger, end to end). [`report`] holds the
//! figures, the targets and their rendering.
//!
//! Nothing here touches the configured state directory: every reference DB
//! is made in a temporary directory. The one exception is the TensorRT
//! engine cache, which is shared (when it exists) so that no section pays
//! for an engine build.

pub mod end_to_end;
pub mod inference;
pub mod memory;
pub mod pipeline;
pub mod reference_sets;
pub mod report;
pub mod search;
pub mod soak;
pub mod stages;
pub mod sweep;

mod agent_process;
mod load_client;
mod resident;
mod workload;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{ExecutionProviderKind, LoadedConfig, RuntimeConfig};
use crate::engine::{Engine, EngineError};
use crate::manifest::{ManifestError, ModelManifest};
use crate::pipeline::ThreadBudget;
use crate::recognizer::{engine_options, open_refdb, Recognizer};
use crate::refdb::{RefDb, RefDbError};
use crate::vision::decode::{DecodeLimits, VisionError};

pub use report::BenchReport;
pub use resident::Resident;
pub use workload::Workload;

/// Why a bench could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    RefDb(#[from] RefDbError),
    #[error(transparent)]
    Vision(#[from] VisionError),
    #[error("making the bench's images: {0}")]
    Image(#[from] image::ImageError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding a crop request: {0}")]
    Encode(String),
    #[error("reading back a crop request: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
    #[error("enrolling the synthetic products: {0}")]
    Enrol(String),
    #[error("the pipeline: {0}")]
    Pipeline(String),
    #[error("the broker: {0}")]
    Broker(String),
    #[error("the agent under test: {0}")]
    Agent(String),
    #[error("the bench's MQTT client: {0}")]
    Client(String),
    #[error("the GEMM reference: {0}")]
    Gemm(String),
}

impl BenchError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The parts of a run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// ONNX Runtime alone at batch 1, 4, 8, 16.
    Inference,
    /// Per-crop decode, resize+normalise and search costs.
    Stages,
    /// The pipeline without MQTT, per thread split.
    Pipeline,
    /// Search against sgemm; the f16 reference matrix.
    Search,
    /// Reference matrices; the agent's memory and start-up with 31,500 references.
    Memory,
    /// The agent binary through a broker: throughput and latency.
    EndToEnd,
}

impl Section {
    pub const ALL: [Section; 6] = [
        Section::Inference,
        Section::Stages,
        Section::Pipeline,
        Section::Search,
        Section::Memory,
        Section::EndToEnd,
    ];
}

/// What to run and how long.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub sections: BTreeSet<Section>,
    /// Also sweep `max_batch` x linger end to end.
    pub sweep: bool,
    /// Shorter measurements (a smoke test; noisier figures).
    pub quick: bool,
    /// The `retail-agent` binary to run as the agent under test.
    pub agent_binary: PathBuf,
}

/// How long each kind of measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Durations {
    /// Run before a throughput or latency window, not counted.
    pub warmup: Duration,
    /// One throughput or loaded-latency window (end to end, sweep excepted).
    pub window: Duration,
    /// One raw-inference batch size.
    pub inference_window: Duration,
    /// One thread split of the offline pipeline.
    pub split_window: Duration,
    /// One per-crop stage cost.
    pub stage_window: Duration,
    /// Single-crop requests sent one at a time for the unloaded latency,
    /// at most (fewer when `unloaded_time` runs out first).
    pub unloaded_samples: usize,
    pub unloaded_time: Duration,
    /// One search or GEMM figure: at least this long and `search_runs` runs.
    pub search_time: Duration,
    pub search_runs: usize,
    /// Queries compared between the f32 and f16 reference matrices, per
    /// set (16 or fewer: the timed batch's queries and results).
    pub agreement_queries: usize,
    /// One throughput or latency window of a sweep point.
    pub sweep_window: Duration,
}

impl Durations {
    /// The default: a few seconds per section, about 3 minutes in all on
    /// 2 cores with the bundled test model.
    pub fn full() -> Self {
        Self {
            warmup: Duration::from_millis(500),
            window: Duration::from_secs(3),
            inference_window: Duration::from_secs(2),
            split_window: Duration::from_secs(2),
            stage_window: Duration::from_secs(1),
            unloaded_samples: 300,
            unloaded_time: Duration::from_secs(6),
            search_time: Duration::from_millis(500),
            search_runs: 3,
            agreement_queries: 1000,
            sweep_window: Duration::from_millis(1500),
        }
    }

    /// `--quick`: every figure, from much shorter measurements.
    pub fn quick() -> Self {
        Self {
            warmup: Duration::from_millis(100),
            window: Duration::from_millis(500),
            inference_window: Duration::from_millis(300),
            split_window: Duration::from_millis(300),
            stage_window: Duration::from_millis(150),
            unloaded_samples: 30,
            unloaded_time: Duration::from_secs(1),
            search_time: Duration::ZERO,
            search_runs: 1,
            agreement_queries: 16,
            sweep_window: Duration::from_millis(300),
        }
    }
}

/// What every section shares: the config, the model, the inputs and a
/// private working directory.
pub struct BenchSetup {
    /// The configuration as given (model possibly overridden); its
    /// `state_dir` is never written.
    pub cfg: LoadedConfig,
    pub manifest: ModelManifest,
    pub workload: Workload,
    pub durations: Durations,
    pub limits: DecodeLimits,
    /// The execution provider the model loads with here.
    pub provider: ExecutionProviderKind,
    pub dim: usize,
    pub classes: usize,
    agent_binary: PathBuf,
    work: tempfile::TempDir,
}

impl BenchSetup {
    /// Loads the model once (which provider it gets, its dimension) and
    /// makes the bench's images.
    pub fn new(cfg: LoadedConfig, options: &BenchOptions) -> Result<Self, BenchError> {
        let manifest = ModelManifest::load(&cfg.manifest_path())?;
        let work = tempfile::Builder::new()
            .prefix("retail-agent-bench-")
            .tempdir()
            .map_err(BenchError::io("creating the bench's working directory"))?;
        let limits = DecodeLimits::from(&cfg.config.limits);
        let mut setup = Self {
            cfg,
            manifest,
            workload: Workload::new()?,
            durations: if options.quick {
                Durations::quick()
            } else {
                Durations::full()
            },
            limits,
            provider: ExecutionProviderKind::Cpu,
            dim: 0,
            classes: 0,
            agent_binary: options.agent_binary.clone(),
            work,
        };
        let engine = setup.load_engine()?;
        setup.provider = engine.provider();
        setup.dim = engine.dim();
        setup.classes = engine.classes();
        Ok(setup)
    }

    /// Whether the model is the bundled test model (some targets are for
    /// it, others for a model of realistic compute).
    pub fn is_bundled_test_model(&self) -> bool {
        let bundled = crate::manifest::sha256_hex(crate::demo::TEST_MODEL_ONNX);
        self.manifest.sha256 == bundled
    }

    /// Bytes of the ONNX file.
    pub fn model_file_bytes(&self) -> u64 {
        std::fs::metadata(&self.manifest.onnx_path).map_or(0, |m| m.len())
    }

    /// The daemon's thread budget on this machine: ONNX Runtime's
    /// threading is derived for the CPU (as the daemon does before it
    /// knows the provider), the decode workers for the provider in use.
    pub fn budget(&self) -> ThreadBudget {
        let gpu = self.provider != ExecutionProviderKind::Cpu;
        let mut budget = ThreadBudget::for_this_machine(
            &self.cfg.config.runtime,
            &self.cfg.config.pipeline,
            false,
        );
        budget.decode_workers = ThreadBudget::for_this_machine(
            &self.cfg.config.runtime,
            &self.cfg.config.pipeline,
            gpu,
        )
        .decode_workers;
        budget
    }

    /// The model as the daemon loads it: ONNX Runtime threaded by the budget.
    pub fn load_engine(&self) -> Result<Engine, BenchError> {
        self.load_engine_with(&self.budget().apply(&self.cfg.config.runtime))
    }

    /// The model with ONNX Runtime settings `runtime`.
    pub fn load_engine_with(&self, runtime: &RuntimeConfig) -> Result<Engine, BenchError> {
        let mut options = engine_options(&self.cfg);
        options.runtime = RuntimeConfig {
            onnxruntime_library: options.runtime.onnxruntime_library.clone(),
            ..runtime.clone()
        };
        options.engine_cache_dir = self.engine_cache_dir();
        Ok(Engine::load(self.manifest.clone(), &options)?)
    }

    /// The configured TensorRT engine cache when it exists (an engine built
    /// there is not built again), else one in the working directory.
    fn engine_cache_dir(&self) -> PathBuf {
        let configured = self.cfg.engine_cache_dir();
        if configured.is_dir() {
            configured
        } else {
            self.work.path().join("trt-engines")
        }
    }

    /// A fresh state directory `name` in the working directory, sharing
    /// the engine cache.
    pub fn state_dir(&self, name: &str) -> Result<PathBuf, BenchError> {
        let dir = self.work.path().join(name).join("state");
        std::fs::create_dir_all(&dir).map_err(BenchError::io(format!(
            "creating the state directory {}",
            dir.display()
        )))?;
        let cache = self.engine_cache_dir();
        std::fs::create_dir_all(&cache).map_err(BenchError::io(format!(
            "creating the engine cache {}",
            cache.display()
        )))?;
        std::os::unix::fs::symlink(&cache, dir.join("trt-engines")).map_err(BenchError::io(
            format!("linking the engine cache into {}", dir.display()),
        ))?;
        Ok(dir)
    }

    /// A directory of the working directory for `name`'s other files.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The configuration with its state in `state_dir`.
    pub fn config_in(&self, state_dir: &Path) -> LoadedConfig {
        let mut cfg = self.cfg.clone();
        cfg.config.state_dir = state_dir.to_path_buf();
        cfg
    }

    /// Opens a reference DB in `state_dir` holding the synthetic products'
    /// references (testdata/synthetic/refs, 120 images of 12 products),
    /// embedded by the model under test: the DB the pipeline and the
    /// end-to-end sections serve.
    pub fn enrol_demo_references(
        &self,
        state_dir: &Path,
    ) -> Result<(RefDb, Recognizer), BenchError> {
        let cfg = self.config_in(state_dir);
        let mut recognizer = Recognizer::new(self.load_engine()?, self.limits);
        let db = open_refdb(&cfg, recognizer.engine())?;
        crate::demo::enroll_demo_refs(&mut recognizer, &db)
            .map_err(|e| BenchError::Enrol(format!("{e:#}")))?;
        Ok((db, recognizer))
    }

    pub fn agent_binary(&self) -> &Path {
        &self.agent_binary
    }
}

/// Runs `step` at least `min_runs` times and until `min_time` has passed;
/// returns how many runs and how long they took.
pub(crate) fn repeat_for<E>(
    min_time: Duration,
    min_runs: usize,
    mut step: impl FnMut() -> Result<(), E>,
) -> Result<(usize, Duration), E> {
    let start = Instant::now();
    let mut runs = 0;
    while runs < min_runs.max(1) || start.elapsed() < min_time {
        step()?;
        runs += 1;
    }
    Ok((runs, start.elapsed()))
}

/// Microseconds per run.
pub(crate) fn micros_per_run(runs: usize, elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6 / runs.max(1) as f64
}

/// The soak alone (see [`soak`]): `minutes` at each offered load
/// (multiples of the sustainable rate).
pub fn run_soak(
    cfg: LoadedConfig,
    options: &BenchOptions,
    minutes: f64,
    loads: &[f64],
    progress: &dyn Fn(&str),
) -> Result<soak::SoakFigures, BenchError> {
    progress("loading the model and making the inputs");
    let setup = BenchSetup::new(cfg, options)?;
    let broker = end_to_end::Broker::start(&setup, progress)?;
    soak::measure(&setup, &broker, minutes, loads, progress)
}

/// Runs the chosen sections (and the sweep) and checks the targets against
/// what was measured. `progress` hears what is being measured.
pub fn run(
    cfg: LoadedConfig,
    options: &BenchOptions,
    progress: &dyn Fn(&str),
) -> Result<BenchReport, BenchError> {
    progress("loading the model and making the inputs");
    let setup = BenchSetup::new(cfg, options)?;
    let mut report = BenchReport::new(&setup, options);
    let wants = |s: Section| options.sections.contains(&s);
    if wants(Section::Inference) {
        progress("raw inference");
        report.inference = Some(inference::measure(&setup)?);
    }
    if wants(Section::Stages) {
        progress("per-crop stage costs");
        report.stages = Some(stages::measure(&setup)?);
    }
    if wants(Section::Pipeline) {
        report.pipeline = Some(pipeline::measure(&setup, progress)?);
    }
    let mut measured_sets = None;
    if wants(Section::Search) {
        let (figures, sets) = search::measure(&setup, progress)?;
        report.search = Some(figures);
        measured_sets = Some(sets);
    }
    if wants(Section::Memory) || wants(Section::EndToEnd) || options.sweep {
        let broker = end_to_end::Broker::start(&setup, progress)?;
        report.broker = Some(broker.description.clone());
        if wants(Section::EndToEnd) {
            report.end_to_end = Some(end_to_end::measure(&setup, &broker, progress)?);
        }
        if wants(Section::Memory) {
            report.memory = Some(memory::measure(&setup, &broker, measured_sets, progress)?);
        }
        if options.sweep {
            report.sweep = Some(sweep::measure(&setup, &broker, progress)?);
        }
    }
    report.check_targets(&setup);
    Ok(report)
}
