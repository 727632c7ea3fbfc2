//! The command line: argument definitions, logging set-up and dispatch.
//!
//! Each command lives in its own file and turns errors into one clear line
//! on stderr and a non-zero exit status.

mod bench;
mod calibrate;
mod db;
mod enroll;
mod evaluate;
mod fleet;
mod recognize;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::LoadedConfig;

/// Recognise retail products in camera crops with an ONNX embedding model
/// and a local reference DB; serve recognitions over MQTT.
///
/// Quick start: `retail-agent demo` runs everything in-process. For a real
/// deployment, write a config (see agent-config/agent.toml), enrol reference
/// images with `enroll`, check them with `eval`, then `run` the daemon.
#[derive(Debug, Parser)]
#[command(name = "retail-agent", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Agent configuration file (TOML).
    #[arg(
        long,
        short = 'c',
        env = "RETAIL_AGENT_CONFIG",
        default_value = "/etc/retail-agent/agent.toml"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Self-contained demo: in-process broker, bundled test model, synthetic
    /// products; prints each recognition and a latency table.
    Demo {
        /// Show the agent's log (info level).
        #[arg(long)]
        verbose: bool,
        /// Use the MQTT broker on this host instead of an in-process one
        /// (builds without the `demo-broker` feature need it or --port).
        #[arg(long)]
        host: Option<String>,
        /// Port of that broker [default: 1883].
        #[arg(long)]
        port: Option<u16>,
    },
    /// Run the agent: serve the MQTT contract until SIGTERM/SIGINT.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Add reference images to the DB: REFS/<label>/*.jpg, one folder per product.
    Enroll {
        #[command(flatten)]
        config: ConfigArg,
        /// Folder with one sub-folder per label (TAO's layout).
        #[arg(long)]
        refs: PathBuf,
        /// Replace the DB's content instead of adding to it.
        #[arg(long)]
        replace: bool,
    },
    /// Recognise images against the reference DB and print the top-k per image.
    Recognize {
        #[command(flatten)]
        config: ConfigArg,
        /// Image files (JPEG, PNG, BMP, WebP).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Candidates per image (default: recognition.top_k).
        #[arg(long)]
        top_k: Option<usize>,
        /// Print one JSON object per image.
        #[arg(long)]
        json: bool,
    },
    /// Measure accuracy vs references per class, like the model card's table.
    Eval {
        #[command(flatten)]
        config: ConfigArg,
        /// Reference images: REFS/<label>/*.jpg.
        #[arg(long)]
        refs: PathBuf,
        /// Query images: QUERIES/<label>/*.jpg (the label is the truth).
        #[arg(long)]
        queries: PathBuf,
        /// Reference counts per class to evaluate, comma-separated; `all` uses every one.
        #[arg(long, default_value = "1,5,10,20,all")]
        refs_per_class: String,
        /// Seed of the random choice of references.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report with the accuracy curve.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Images of products that are NOT enrolled (any folder layout): adds
        /// the open-set report (AUROC, thresholds for false-unknown rates).
        #[arg(long)]
        unknown: Option<PathBuf>,
    },
    /// Pick recognition.unknown_threshold for a false-unknown target: the
    /// q-quantile of the enrolled queries' best similarities, so that at
    /// most that share of enrolled products is called unknown.
    Calibrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Reference images: REFS/<label>/*.jpg.
        #[arg(long)]
        refs: PathBuf,
        /// Query images of enrolled products: QUERIES/<label>/*.jpg.
        #[arg(long)]
        queries: PathBuf,
        /// Images of products that are NOT enrolled (any folder layout), to
        /// also measure how many the threshold catches.
        #[arg(long)]
        unknown: Option<PathBuf>,
        /// Share of enrolled products that may be called unknown (0.05 = 5%).
        #[arg(long, default_value_t = 0.05)]
        false_unknown: f64,
        /// Write the threshold into the config file (comments are kept).
        #[arg(long)]
        write: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, export or import the reference DB.
    Db {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: DbAction,
    },
    /// Fleet operator: sign and push reference-DB updates to the devices,
    /// wait for their acks, and show every device's state. Exit status: 0
    /// every targeted device applied everything, 2 one answered otherwise
    /// (gap, rejected, …; for `status`: a device diverges), 3 one did not
    /// answer in time, 1 any other error.
    Fleet {
        #[command(subcommand)]
        action: fleet::FleetAction,
    },
    /// Measure this machine: raw inference, per-crop stage costs, the
    /// offline pipeline, search against a GEMM, memory and start-up, and
    /// the agent end to end through a broker it starts; prints the figures
    /// and the performance targets with PASS/MISS. Takes about 75 s
    /// on 2 cores with the bundled test model (--quick: well under a minute).
    Bench(bench::BenchArgs),
    /// Validate a config file and print the effective configuration (secrets masked).
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbAction {
    /// Version, digest, counts per label, size on disk.
    Stats {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the whole DB to a portable file (format: retail-agent/refdb v1).
    Export { file: PathBuf },
    /// Re-embed references made by another model from their stored images
    /// (the daemon also does this at start-up).
    Reembed,
    /// Replace the DB's content with an export file's (re-embedding images
    /// when the file came from another model).
    Import { file: PathBuf },
}

/// Parses arguments, runs the command, and maps errors to exit status 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    run_command(cli.command)
}

/// Runs one command; every command but `fleet` exits 0 on success (the
/// fleet CLI's exit code says how the devices answered).
fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    let done: anyhow::Result<()> = match command {
        Command::Demo {
            verbose,
            host,
            port,
        } => {
            let broker = (host.is_some() || port.is_some()).then(|| {
                (
                    host.unwrap_or_else(|| "127.0.0.1".into()),
                    port.unwrap_or(1883),
                )
            });
            tokio_runtime()?.block_on(crate::demo::run(verbose, broker))
        }
        Command::Run { config } => {
            // 14-17 MiB less resident with the bench's realistic model.
            crate::heap::limit_arenas(crate::heap::DAEMON_ARENAS);
            let cfg = load_config(&config)?;
            let budget = crate::pipeline::budget::ThreadBudget::for_this_machine(
                &cfg.config.runtime,
                &cfg.config.pipeline,
                false,
            );
            runtime_with_workers(Some(budget.io_threads))?
                .block_on(crate::daemon::run_until_signal(cfg))
        }
        Command::Enroll {
            config,
            refs,
            replace,
        } => {
            let cfg = load_config(&config)?;
            enroll::run(&cfg, &refs, replace)
        }
        Command::Recognize {
            config,
            images,
            top_k,
            json,
        } => {
            let cfg = load_config(&config)?;
            recognize::run(&cfg, &images, top_k, json)
        }
        Command::Eval {
            config,
            refs,
            queries,
            refs_per_class,
            seed,
            json,
            html,
            unknown,
        } => {
            let cfg = load_config(&config)?;
            let counts = crate::eval::parse_refs_per_class(&refs_per_class)
                .map_err(|e| anyhow::anyhow!("--refs-per-class: {e}"))?;
            evaluate::run(
                &cfg,
                evaluate::EvalArgs {
                    refs: &refs,
                    queries: &queries,
                    unknown: unknown.as_deref(),
                    refs_per_class: counts,
                    seed,
                    as_json: json,
                    html: html.as_deref(),
                },
            )
        }
        Command::Calibrate {
            config,
            refs,
            queries,
            unknown,
            false_unknown,
            write,
            json,
        } => {
            let cfg = load_config(&config)?;
            calibrate::run(
                &cfg,
                calibrate::CalibrateArgs {
                    config_path: &config.config,
                    refs: &refs,
                    queries: &queries,
                    unknown: unknown.as_deref(),
                    false_unknown,
                    write,
                    as_json: json,
                },
            )
        }
        Command::Db { config, action } => {
            let cfg = load_config(&config)?;
            db::run(&cfg, action)
        }
        Command::CheckConfig { config } => {
            let cfg = LoadedConfig::load(&config.config)?;
            crate::preflight::check(&cfg)?;
            let manifest = crate::manifest::ModelManifest::load(&cfg.manifest_path())?;
            print!("{}", cfg.to_masked_toml());
            eprintln!(
                "config OK; model {} (fingerprint {})",
                manifest.id(),
                manifest.fingerprint()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Fleet { action } => return fleet::run(action),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// The async runtime of the daemon and the demo.
/// The async runtime, with one worker thread per core.
fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with_workers(None)
}

/// The async runtime, with `workers` threads (`None`: one per core; the
/// daemon's is small, from its thread budget).
fn runtime_with_workers(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.max(1));
    }
    builder
        .enable_all()
        .thread_name("retail-agent-io")
        .build()
        .context("starting the async runtime")
}

/// Loads the config and starts logging as it says (`RUST_LOG` wins).
pub fn load_config(arg: &ConfigArg) -> anyhow::Result<LoadedConfig> {
    let cfg = LoadedConfig::load(&arg.config)
        .with_context(|| format!("loading config {}", arg.config.display()))?;
    crate::logging::init(&cfg.config.log.filter, cfg.config.log.json);
    Ok(cfg)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// One dataset image after embedding: its bytes (for storing) and result.
struct EmbeddedFile {
    item: crate::dataset::LabeledImage,
    result: Result<(Vec<u8>, crate::recognizer::Embedded), String>,
}

/// Reads and embeds `items` in batches of the model's `max_batch`, with a
/// progress bar; a bad file fails alone.
fn embed_files(
    recognizer: &mut crate::recognizer::Recognizer,
    items: Vec<crate::dataset::LabeledImage>,
    what: &str,
) -> Vec<EmbeddedFile> {
    let bar = progress(items.len(), what);
    let batch = recognizer.engine().manifest().file.max_batch.max(1);
    let mut out = Vec::with_capacity(items.len());
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let chunk: Vec<_> = items.by_ref().take(batch).collect();
        let bytes: Vec<Result<Vec<u8>, String>> = chunk
            .iter()
            .map(|i| std::fs::read(&i.path).map_err(|e| e.to_string()))
            .collect();
        let readable: Vec<&[u8]> = bytes
            .iter()
            .filter_map(|b| b.as_ref().ok().map(Vec::as_slice))
            .collect();
        let mut embedded = recognizer.embed_encoded(&readable).into_iter();
        for (item, b) in chunk.into_iter().zip(bytes) {
            let result = match b {
                Err(e) => Err(format!("cannot read: {e}")),
                Ok(b) => match embedded.next() {
                    Some(Ok(e)) => Ok((b, e)),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("no result".into()),
                },
            };
            out.push(EmbeddedFile { item, result });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    out
}
