//! Throughput and latency figures, printed (not asserted): raw inference of
//! the engine at several batch sizes, preprocessing per crop, and the whole
//! pipeline (decode → batch → infer → search → encoded result) fed directly:
//! unloaded latency (one single-crop request at a time) and saturated
//! throughput at 1 and 8 crops per request, all in one run so their ratios
//! are comparable. `cargo bench --bench throughput` (set ORT_DYLIB_PATH or
//! run scripts/demo.sh once first). `BENCH_MAX_DELAY_MS`,
//! `BENCH_DECODE_WORKERS`, `BENCH_MAX_BATCH`, `BENCH_INTRA_THREADS` and
//! `BENCH_SPINNING` (0/1) override the defaults and the thread budget, to
//! compare settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use retail_agent::bus::{Incoming, ToBus};
use retail_agent::config::{Encoding, LoadedConfig, OverflowPolicy, PipelineConfig};
use retail_agent::engine::{Engine, EngineOutput};
use retail_agent::metrics::Metrics;
use retail_agent::pipeline::{Pipeline, PipelineContext, ThreadBudget};
use retail_agent::protocol::ModelRef;
use retail_agent::recognizer::{engine_options, open_refdb, Recognizer};
use retail_agent::vision::decode::{decode_image, DecodeLimits};
use retail_agent::vision::preprocess::Preprocessor;
use tokio::sync::mpsc::Receiver;

fn setup() -> (tempfile::TempDir, LoadedConfig) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = retail_agent::demo::write_test_model(&dir.path().join("models")).unwrap();
    let text = format!(
        "state_dir = {:?}\n[model]\nmanifest = {:?}\n[runtime]\nexecution_providers = [\"cpu\"]\n",
        dir.path().join("state").display().to_string(),
        manifest.display().to_string()
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = LoadedConfig::load(&path).unwrap();
    (dir, cfg)
}

/// The engine as the daemon loads it: ONNX Runtime threaded by the budget.
fn load_engine(cfg: &LoadedConfig) -> Engine {
    let manifest = retail_agent::manifest::ModelManifest::load(&cfg.manifest_path()).unwrap();
    let mut options = engine_options(cfg);
    options.runtime = budget(cfg).apply(&options.runtime);
    Engine::load(manifest, &options).unwrap()
}

/// The daemon's thread budget on this machine (CPU provider).
fn budget(cfg: &LoadedConfig) -> ThreadBudget {
    ThreadBudget::for_this_machine(&cfg.config.runtime, &bench_pipeline_config(), false)
}

fn main() {
    let (_dir, mut cfg) = setup();
    if let Some(v) = env_usize("BENCH_INTRA_THREADS") {
        cfg.config.runtime.intra_threads = v;
    }
    if let Some(v) = env_usize("BENCH_SPINNING") {
        cfg.config.runtime.allow_spinning = Some(v != 0);
    }
    let b = budget(&cfg);
    println!(
        "thread budget: {} cores, {} intra-op thread(s), spinning {}, {} decode worker(s)",
        b.cores, b.intra_threads, b.allow_spinning, b.decode_workers
    );
    let queries: Vec<Vec<u8>> = retail_agent::demo::DEMO_QUERIES
        .iter()
        .map(|(_, _, b)| b.to_vec())
        .collect();

    // Raw inference.
    let mut engine = load_engine(&cfg);
    let per = engine.image_len();
    let mut out = EngineOutput::default();
    let mut raw_best = 0f64;
    let mut raw_at_8 = 0f64;
    println!("raw inference (provider {}):", engine.provider().name());
    for batch in [1usize, 4, 8, 16] {
        let input = vec![0.1f32; batch * per];
        engine.run(&input, batch, &mut out).unwrap();
        let (mut n, t) = (0, Instant::now());
        while t.elapsed() < Duration::from_secs(2) {
            engine.run(&input, batch, &mut out).unwrap();
            n += batch;
        }
        let ips = n as f64 / t.elapsed().as_secs_f64();
        raw_best = raw_best.max(ips);
        if batch == 8 {
            raw_at_8 = ips;
        }
        println!("  batch {batch:>2}: {ips:>8.1} img/s");
    }

    // Decode + resize + normalise, one thread.
    let geometry = retail_agent::recognizer::geometry(engine.manifest());
    let mut pre = Preprocessor::new(geometry);
    let limits = DecodeLimits::default();
    let (mut rgb, mut tensor) = (Vec::new(), vec![0f32; per]);
    let (mut n, t) = (0, Instant::now());
    while t.elapsed() < Duration::from_secs(2) {
        let img = decode_image(&queries[n % queries.len()], &limits).unwrap();
        pre.prepare(&img, None, &mut rgb, &mut tensor).unwrap();
        n += 1;
    }
    let prep = n as f64 / t.elapsed().as_secs_f64();
    println!("decode + resize + normalise (1 thread): {prep:.1} crops/s");

    // The pipeline, fed directly (no broker), results encoded and collected.
    let refdb = {
        let mut rec = Recognizer::new(load_engine(&cfg), limits);
        let db = open_refdb(&cfg, rec.engine()).unwrap();
        retail_agent::demo::enroll_demo_refs(&mut rec, &db).unwrap();
        Arc::new(db)
    };
    let fixture = Fixture {
        cfg,
        refdb,
        queries,
    };
    drop(engine);
    let pcfg = PipelineConfig {
        decode_workers: b.decode_workers,
        ..bench_pipeline_config()
    };
    println!(
        "pipeline (max_batch {}, max_delay_ms {}):",
        pcfg.max_batch, pcfg.max_delay_ms
    );
    let lat = fixture.idle_latency(&pcfg, 300);
    println!(
        "  unloaded, 1 crop, 1 in flight: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us (submit to encoded result)",
        lat.0, lat.1, lat.2
    );
    let mut e2e_1 = 0.0;
    for crops in [1usize, 8] {
        let (e2e, mean_batch, p50) = fixture.saturated(&pcfg, crops, 4800 / crops);
        println!(
            "  saturated, {crops} crop(s) per request: {e2e:.1} crops/s (mean batch {mean_batch:.2}, total latency p50 {p50} us)"
        );
        if crops == 1 {
            e2e_1 = e2e;
        }
    }
    println!(
        "end-to-end (1 crop per request) / raw inference: {:.2} at batch 8, {:.2} against the best batch size",
        e2e_1 / raw_at_8,
        e2e_1 / raw_best
    );
}

/// Pipeline settings for the bench: the defaults, with `BENCH_MAX_DELAY_MS`,
/// `BENCH_DECODE_WORKERS` and `BENCH_MAX_BATCH` overriding them.
fn bench_pipeline_config() -> PipelineConfig {
    let mut pcfg = PipelineConfig {
        queue_capacity: 64,
        overflow: OverflowPolicy::DropNewest,
        ..PipelineConfig::default()
    };
    if let Some(v) = env_usize("BENCH_MAX_DELAY_MS") {
        pcfg.max_delay_ms = v as u64;
    }
    if let Some(v) = env_usize("BENCH_DECODE_WORKERS") {
        pcfg.decode_workers = v;
    }
    if let Some(v) = env_usize("BENCH_MAX_BATCH") {
        pcfg.max_batch = v;
    }
    pcfg
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

struct Fixture {
    cfg: LoadedConfig,
    refdb: Arc<retail_agent::refdb::RefDb>,
    queries: Vec<Vec<u8>>,
}

impl Fixture {
    /// Starts a pipeline as the daemon does, with its own engine.
    fn start(&self, pcfg: &PipelineConfig) -> (Pipeline, Receiver<ToBus>, Arc<Metrics>) {
        let engine = load_engine(&self.cfg);
        let (tx, rx) = tokio::sync::mpsc::channel::<ToBus>(1024);
        let metrics = Arc::new(Metrics::default());
        let ctx = PipelineContext {
            device_id: "bench".into(),
            model: ModelRef {
                id: engine.manifest().id().into(),
                fingerprint: engine.manifest().fingerprint().into(),
            },
            results_topic: "r".into(),
            errors_topic: "e".into(),
            results_qos: 1,
            default_encoding: Encoding::Msgpack,
            limits: DecodeLimits::default(),
            max_crops: 64,
            default_top_k: 5,
            unknown_threshold: 0.5,
            metrics: metrics.clone(),
            refdb: self.refdb.clone(),
            out: tx,
            max_packet_bytes: 16 << 20,
            health: retail_agent::health::Health::new(std::time::Duration::from_secs(30)),
        };
        let pipeline = Pipeline::start(ctx, engine, pcfg).unwrap();
        (pipeline, rx, metrics)
    }

    /// MessagePack requests of `crops` crops each, cycling through the queries.
    fn requests(&self, crops: usize) -> Vec<bytes::Bytes> {
        (0..self.queries.len())
            .map(|i| {
                let crops = (0..crops)
                    .map(|k| {
                        let q = &self.queries[(i + k) % self.queries.len()];
                        rmpv::Value::Map(vec![(
                            rmpv::Value::from("image"),
                            rmpv::Value::Binary(q.clone()),
                        )])
                    })
                    .collect();
                let v = rmpv::Value::Map(vec![
                    (
                        rmpv::Value::from("request_id"),
                        rmpv::Value::from(format!("b{i}")),
                    ),
                    (rmpv::Value::from("crops"), rmpv::Value::Array(crops)),
                ]);
                let mut buf = Vec::new();
                rmpv::encode::write_value(&mut buf, &v).unwrap();
                bytes::Bytes::from(buf)
            })
            .collect()
    }

    /// One single-crop request at a time, each sent once the previous one
    /// is answered: p50, p90, p99 of submit-to-result in microseconds.
    fn idle_latency(&self, pcfg: &PipelineConfig, n: usize) -> (f64, f64, f64) {
        let (pipeline, mut rx, _) = self.start(pcfg);
        let requests = self.requests(1);
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let t = Instant::now();
            assert!(pipeline.submit(Incoming {
                payload: requests[i % requests.len()].clone(),
                received: t,
                ack: None,
            }));
            loop {
                match rx.blocking_recv() {
                    Some(ToBus::Send(_)) => break,
                    Some(_) => {}
                    None => panic!("the pipeline stopped"),
                }
            }
            if i >= 20 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        pipeline.shutdown();
        lat.sort_by(f64::total_cmp);
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.9), at(0.99))
    }

    /// Keeps the queue fed with `total` requests of `crops` crops: crops/s,
    /// mean batch and the p50 total latency in microseconds.
    fn saturated(&self, pcfg: &PipelineConfig, crops: usize, total: usize) -> (f64, f64, u64) {
        let (pipeline, mut rx, metrics) = self.start(pcfg);
        let requests = self.requests(crops);
        let t = Instant::now();
        let consumer = std::thread::spawn(move || {
            let mut got = 0;
            while got < total {
                match rx.blocking_recv() {
                    Some(ToBus::Send(_)) => got += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            got
        });
        let mut sent = 0;
        while sent < total {
            let msg = Incoming {
                payload: requests[sent % requests.len()].clone(),
                received: Instant::now(),
                ack: None,
            };
            // Back off before the queue is full: this measures throughput, not drops.
            while pipeline.queue_depth() + 1 >= pcfg.queue_capacity {
                std::thread::sleep(Duration::from_micros(200));
            }
            if pipeline.submit(msg) {
                sent += 1;
            }
        }
        let got = consumer.join().unwrap();
        let crops_per_s = (got * crops) as f64 / t.elapsed().as_secs_f64();
        pipeline.shutdown();
        let totals = metrics.totals();
        let mean_batch = totals.batched_crops as f64 / totals.batches.max(1) as f64;
        (crops_per_s, mean_batch, metrics.latencies().total.p50)
    }
}
