//! Throughput figures, printed (not asserted): raw inference of the engine
//! at several batch sizes, preprocessing per crop, and the whole pipeline
//! (decode → batch → infer → search → encoded result) fed directly, all in
//! one run so their ratios are comparable. `cargo bench --bench throughput`
//! (set ORT_DYLIB_PATH or run scripts/demo.sh once first).

use std::sync::Arc;
use std::time::{Duration, Instant};

use retail_agent::bus::{Incoming, ToBus};
use retail_agent::config::{Encoding, LoadedConfig, OverflowPolicy, PipelineConfig};
use retail_agent::engine::{Engine, EngineOutput};
use retail_agent::metrics::Metrics;
use retail_agent::pipeline::{Pipeline, PipelineContext};
use retail_agent::protocol::ModelRef;
use retail_agent::recognizer::{engine_options, open_refdb, Recognizer};
use retail_agent::vision::decode::{decode_image, DecodeLimits};
use retail_agent::vision::preprocess::Preprocessor;

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

fn load_engine(cfg: &LoadedConfig) -> Engine {
    let manifest = retail_agent::manifest::ModelManifest::load(&cfg.manifest_path()).unwrap();
    Engine::load(manifest, &engine_options(cfg)).unwrap()
}

fn main() {
    let (_dir, cfg) = setup();
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ToBus>(1024);
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
        limits,
        max_crops: 64,
        default_top_k: 5,
        unknown_threshold: 0.5,
        metrics: metrics.clone(),
        refdb,
        out: tx,
        max_packet_bytes: 16 << 20,
    };
    let pcfg = PipelineConfig {
        queue_capacity: 64,
        overflow: OverflowPolicy::DropNewest,
        max_batch: 8,
        max_delay_ms: 5,
        decode_workers: 0,
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::start(ctx, engine, &pcfg).unwrap();
    let requests: Vec<bytes::Bytes> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let v = rmpv::Value::Map(vec![
                (
                    rmpv::Value::from("request_id"),
                    rmpv::Value::from(format!("b{i}")),
                ),
                (
                    rmpv::Value::from("crops"),
                    rmpv::Value::Array(vec![rmpv::Value::Map(vec![(
                        rmpv::Value::from("image"),
                        rmpv::Value::Binary(q.clone()),
                    )])]),
                ),
            ]);
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &v).unwrap();
            bytes::Bytes::from(buf)
        })
        .collect();
    let total = 600;
    let t = Instant::now();
    let consumer = rt.spawn(async move {
        let mut got = 0;
        while got < total {
            match rx.recv().await {
                Some(ToBus::Send(_)) => got += 1,
                Some(ToBus::Flush(_)) => {}
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
    let got = rt.block_on(consumer).unwrap();
    let e2e = got as f64 / t.elapsed().as_secs_f64();
    pipeline.shutdown();
    let totals = metrics.totals();
    let lat = metrics.latencies();
    println!(
        "pipeline end to end: {e2e:.1} crops/s ({} batches, mean batch {:.2}); total latency p50 {} us, p99 {} us",
        totals.batches,
        totals.batched_crops as f64 / totals.batches.max(1) as f64,
        lat.total.p50,
        lat.total.p99
    );
    println!(
        "end-to-end / raw inference: {:.2} at the pipeline's max_batch 8, {:.2} against the best batch size",
        e2e / raw_at_8,
        e2e / raw_best
    );
}
