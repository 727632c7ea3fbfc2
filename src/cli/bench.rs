//! `retail-agent bench`: runs the measurements of [`crate::bench`] with
//! the model, runtime and pipeline settings of a config file and prints
//! them as tables (or one JSON object) with the performance targets.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::ConfigArg;
use crate::bench::{BenchOptions, Section};
use crate::config::LoadedConfig;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the figures and the targets as one JSON object (progress goes
    /// to stderr).
    #[arg(long)]
    pub json: bool,
    /// Much shorter measurements (well under a minute): every figure, but
    /// noisier; for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// Sweep pipeline.max_batch {1,4,8,16} x pipeline.max_delay_ms {0,2,5}
    /// end to end. Alone, it runs only the sweep; with --sections, those
    /// sections too.
    #[arg(long)]
    pub sweep: bool,
    /// Run only the soak: MINUTES at twice the sustainable request rate
    /// (half QoS 0, half QoS 1), then MINUTES at 80% of it, each on a fresh
    /// agent; prints what was answered, dropped and reported, and resident
    /// memory over time (the figure: 10).
    #[arg(long, value_name = "MINUTES")]
    pub soak: Option<f64>,
    /// The soak's offered loads, as multiples of the sustainable rate,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', requires = "soak", default_values_t = crate::bench::soak::LOADS)]
    pub soak_loads: Vec<f64>,
    /// Sections to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub sections: Option<Vec<Section>>,
    /// Bench this model manifest instead of the config's model.manifest
    /// (e.g. target/bench-model/retail-bench.toml, made by
    /// scripts/gen_bench_model.py).
    #[arg(long)]
    pub model_manifest: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut cfg = LoadedConfig::load(&args.config.config)
        .with_context(|| format!("loading config {}", args.config.config.display()))?;
    // The bench's own messages are its progress lines; the agent's
    // warnings still show (RUST_LOG wins).
    crate::logging::init("warn", false);
    if let Some(manifest) = &args.model_manifest {
        cfg.config.model.manifest = std::path::absolute(manifest)
            .with_context(|| format!("--model-manifest {}", manifest.display()))?;
    }
    let sections: BTreeSet<Section> = match &args.sections {
        Some(chosen) => chosen.iter().copied().collect(),
        None if args.sweep => BTreeSet::new(),
        None => Section::ALL.into_iter().collect(),
    };
    let options = BenchOptions {
        sections,
        sweep: args.sweep,
        quick: args.quick,
        agent_binary: std::env::current_exe()
            .context("finding this binary (it runs the agent under test)")?,
    };
    let started = std::time::Instant::now();
    let progress =
        |what: &str| eprintln!("bench [{:>6.1} s]: {what}", started.elapsed().as_secs_f64());
    if let Some(minutes) = args.soak {
        anyhow::ensure!(
            minutes.is_finite() && minutes > 0.0,
            "--soak takes a positive number of minutes"
        );
        anyhow::ensure!(
            args.soak_loads.iter().all(|l| l.is_finite() && *l > 0.0),
            "--soak-loads takes positive multiples of the sustainable rate"
        );
        let figures = crate::bench::run_soak(cfg, &options, minutes, &args.soak_loads, &progress)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&figures)?);
        } else {
            print!("{}", figures.to_text());
        }
        return Ok(());
    }
    let report = crate::bench::run(cfg, &options, &progress)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
