//! Memory and start-up. (1) Each synthetic reference set (315 labels x
//! {1, 20, 100} references x {448, 2048} dimensions) built into the
//! daemon's index, the code path of every DB snapshot: its reference
//! matrix's bytes, this process's resident memory growth while it is built
//! and held, and the build time (measured as the search section builds
//! them, when it runs). (2) The agent under test (its own
//! process, as `end_to_end` runs it) on a reference DB of 315 x 100 =
//! 31,500 references at the model's dimension, enrolled as embedding
//! upserts through `RefDb::apply`: the time from spawn to its Status
//! "online" and to a first answered request, and its resident memory once
//! it has served a few seconds of 8-crop requests.
//!
//! Not measured: a TensorRT engine build (the shared engine cache is
//! reused: the first agent of the run builds it), the DB's size on disk,
//! memory of other reference-set sizes in the agent.

use std::time::Instant;

use serde::Serialize;

use super::end_to_end::{AgentUnderTest, Broker};
use super::reference_sets::{ReferenceSet, DIMS, LABELS, REFS_PER_LABEL};
use super::search::{f32_matrix_bytes, set_seed};
use super::{BenchError, BenchSetup, Resident};
use crate::heap::release_free_memory;
use crate::recognizer::refdb_settings;
use crate::refdb::{Index, NewRef, RefDb, RefOp};

/// References per label of the agent's DB (315 x 100 = 31,500).
pub const AGENT_REFS_PER_LABEL: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceSetMemory {
    pub labels: usize,
    pub refs_per_label: usize,
    pub dim: usize,
    pub refs: usize,
    pub matrix_bytes: usize,
    pub rss_growth_bytes: u64,
    pub build_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentMemory {
    pub refs: usize,
    pub dim: usize,
    pub matrix_bytes: usize,
    pub model_file_bytes: u64,
    /// Seconds from spawn to the Status "online".
    pub ready_s: f64,
    /// Seconds from spawn to the answer of a request sent once online.
    pub first_answer_s: f64,
    /// Resident memory once "online", before any request.
    pub rss_at_ready_bytes: u64,
    /// Resident memory after serving 8-crop requests at saturation (what
    /// the target is checked against), and its peak.
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    pub reference_sets: Vec<ReferenceSetMemory>,
    pub agent: AgentMemory,
}

/// `measured_sets`: the sets' figures when the search section has built
/// and measured them already (they are not built twice).
pub fn measure(
    setup: &BenchSetup,
    broker: &Broker,
    measured_sets: Option<Vec<ReferenceSetMemory>>,
    progress: &dyn Fn(&str),
) -> Result<MemoryFigures, BenchError> {
    let reference_sets = match measured_sets {
        Some(sets) => sets,
        None => {
            progress("memory: reference matrices");
            measure_reference_sets()?
        }
    };
    progress("memory: the agent with 31,500 references");
    let agent = measure_agent(setup, broker)?;
    Ok(MemoryFigures {
        reference_sets,
        agent,
    })
}

/// Every set, smallest first (memory freed by one is given back before
/// the next is measured).
fn measure_reference_sets() -> Result<Vec<ReferenceSetMemory>, BenchError> {
    let mut sizes: Vec<(usize, usize)> = DIMS
        .iter()
        .flat_map(|&dim| REFS_PER_LABEL.iter().map(move |&r| (r, dim)))
        .collect();
    sizes.sort_by_key(|&(r, dim)| r * dim);
    let mut figures = Vec::new();
    for (refs_per_label, dim) in sizes {
        let set =
            ReferenceSet::generate(LABELS, refs_per_label, dim, set_seed(refs_per_label, dim));
        figures.push(build_index_measured(&set, refs_per_label)?.1);
    }
    release_free_memory();
    Ok(figures)
}

/// Builds the daemon's index over `set` and measures it: matrix bytes,
/// this process's resident memory growth, build time.
pub fn build_index_measured(
    set: &ReferenceSet,
    refs_per_label: usize,
) -> Result<(Index, ReferenceSetMemory), BenchError> {
    release_free_memory();
    let before = Resident::of_self()?.now;
    let started = Instant::now();
    let index = set.index();
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    let after = Resident::of_self()?.now;
    let figures = ReferenceSetMemory {
        labels: set.labels.len(),
        refs_per_label,
        dim: set.dim,
        refs: index.len(),
        matrix_bytes: f32_matrix_bytes(&index),
        rss_growth_bytes: after.saturating_sub(before),
        build_ms,
    };
    Ok((index, figures))
}

fn measure_agent(setup: &BenchSetup, broker: &Broker) -> Result<AgentMemory, BenchError> {
    let state = setup.state_dir("memory")?;
    let cfg = setup.config_in(&state);
    let dim = setup.dim;
    let refs = {
        let db = RefDb::open(&cfg.refdb_dir(), refdb_settings(&cfg, &setup.manifest, dim))?;
        let set = ReferenceSet::generate(
            LABELS,
            AGENT_REFS_PER_LABEL,
            dim,
            set_seed(AGENT_REFS_PER_LABEL, dim),
        );
        let fingerprint = setup.manifest.fingerprint().to_string();
        let mut ops = Vec::with_capacity(set.len() + 1);
        ops.push(RefOp::Clear);
        ops.extend(set.rows().map(|(ref_id, label, v)| {
            RefOp::Upsert(NewRef::from_embedding(
                ref_id.to_string(),
                label.to_string(),
                v.to_vec(),
                fingerprint.clone(),
            ))
        }));
        let meta = db.apply(ops, 1, None)?;
        db.flush()?;
        meta.refs as usize
    };
    release_free_memory();
    let mut agent = AgentUnderTest::start(setup, broker, &state, &cfg.config.pipeline, "memory")?;
    let ready_s = agent.ready_s;
    let at_ready = agent.resident()?;
    let first_answer_s = agent.first_answer_s(setup)?;
    agent.saturate(setup, 8, setup.durations.window)?;
    let resident = agent.resident()?;
    agent.stop()?;
    Ok(AgentMemory {
        refs,
        dim,
        matrix_bytes: refs * dim * std::mem::size_of::<f32>(),
        model_file_bytes: setup.model_file_bytes(),
        ready_s,
        first_answer_s,
        rss_at_ready_bytes: at_ready.now,
        rss_bytes: resident.now,
        peak_rss_bytes: resident.peak,
    })
}
