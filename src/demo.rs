//! `retail-agent demo`: the whole agent in one process, on embedded data.
//!
//! Starts an MQTT broker (rumqttd) on a free loopback port (or uses the
//! broker given with `--host`/`--port`), writes the bundled test model to a
//! temporary directory, enrols the synthetic product references, runs the
//! agent, publishes sample crop requests as a checkout client would (JSON
//! and MessagePack, encoded crops, raw pixels, a frame with boxes, bad
//! inputs), prints each recognition and a latency table, and stops the agent
//! gracefully. Nothing here is used by `run`.
//!
//! The in-process broker is the `demo-broker` cargo feature (on by default;
//! the Debian packages are built without it).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use image::{ImageFormat, RgbImage};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::config::{Encoding, LoadedConfig};
use crate::daemon::Agent;
use crate::protocol::{self, ErrorReport, ItemDecision, RecognitionResult};
use crate::recognizer::{open_refdb, Recognizer};
use crate::refdb::{DbMeta, NewRef, RefDb, RefOp};

include!(concat!(env!("OUT_DIR"), "/demo_assets.rs"));

/// The bundled test model, its labels and its manifest.
pub const TEST_MODEL_ONNX: &[u8] = include_bytes!("../agent-config/models/retail-test.onnx");
pub const TEST_MODEL_LABELS: &str = include_str!("../agent-config/models/retail-test.labels.txt");
pub const TEST_MODEL_MANIFEST: &str = include_str!("../agent-config/models/retail-test.toml");

/// Writes the bundled test model and its manifest into `dir`; returns the
/// manifest's path.
pub fn write_test_model(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("retail-test.onnx"), TEST_MODEL_ONNX)?;
    std::fs::write(dir.join("retail-test.labels.txt"), TEST_MODEL_LABELS)?;
    let manifest = dir.join("retail-test.toml");
    std::fs::write(&manifest, TEST_MODEL_MANIFEST)?;
    Ok(manifest)
}

/// Replaces `db`'s content with the embedded synthetic references.
pub fn enroll_demo_refs(recognizer: &mut Recognizer, db: &RefDb) -> anyhow::Result<DbMeta> {
    let fp = recognizer.engine().manifest().fingerprint().to_string();
    let images: Vec<&[u8]> = DEMO_REFS.iter().map(|(_, _, b)| *b).collect();
    let mut ops = vec![RefOp::Clear];
    for ((label, file, bytes), e) in DEMO_REFS.iter().zip(recognizer.embed_encoded(&images)) {
        let e = e.with_context(|| format!("embedding {label}/{file}"))?;
        ops.push(RefOp::Upsert(NewRef::from_image(
            format!("{label}/{file}"),
            label.to_string(),
            bytes.to_vec(),
            e.embedding,
            &fp,
        )));
    }
    Ok(db.apply(ops, db.meta().version + 1, None)?)
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts an in-process MQTT broker on `127.0.0.1:port` (runs until exit).
#[cfg(feature = "demo-broker")]
pub fn start_broker(port: u16) -> anyhow::Result<()> {
    let text = format!(
        r#"id = 0
[router]
max_connections = 100
max_outgoing_packet_count = 500
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "demo"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 16777216
max_inflight_count = 200
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text).context("broker config")?;
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("demo broker stopped: {e}");
            }
        })?;
    // Wait until it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the in-process broker did not start on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Without the `demo-broker` feature there is no in-process broker.
#[cfg(not(feature = "demo-broker"))]
pub fn start_broker(_port: u16) -> anyhow::Result<()> {
    bail!(
        "this build of retail-agent has no embedded MQTT broker (built without the \
         `demo-broker` feature, as the Debian packages are); run the demo against a \
         broker instead: retail-agent demo --host HOST --port PORT"
    )
}

/// A demo request and what it should come back as.
struct Sample {
    request_id: String,
    encoding: Encoding,
    payload: Vec<u8>,
    /// Truth per crop (`None`: the crop is bad and must be an item error).
    truth: Vec<Option<String>>,
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg);
    out
}

/// Binary field: a base64 string in JSON; in MessagePack a `bin`, which a
/// serde_json Value cannot express, so MessagePack samples use `Bin`.
fn bin(bytes: &[u8], enc: Encoding) -> serde_json::Value {
    use base64::Engine;
    match enc {
        Encoding::Json => json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
        Encoding::Msgpack => {
            json!({ "$bin": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
    }
}

/// Re-encodes a JSON description as MessagePack, turning `{"$bin": b64}`
/// into real `bin` values.
fn to_msgpack(v: &serde_json::Value) -> Vec<u8> {
    fn convert(v: &serde_json::Value) -> rmpv::Value {
        match v {
            serde_json::Value::Null => rmpv::Value::Nil,
            serde_json::Value::Bool(b) => rmpv::Value::Boolean(*b),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => rmpv::Value::from(u),
                (_, Some(i), _) => rmpv::Value::from(i),
                (_, _, Some(f)) => rmpv::Value::from(f),
                _ => rmpv::Value::Nil,
            },
            serde_json::Value::String(s) => rmpv::Value::from(s.as_str()),
            serde_json::Value::Array(a) => rmpv::Value::Array(a.iter().map(convert).collect()),
            serde_json::Value::Object(o) => {
                if let (1, Some(serde_json::Value::String(b64))) = (o.len(), o.get("$bin")) {
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap_or_default();
                    return rmpv::Value::Binary(bytes);
                }
                rmpv::Value::Map(
                    o.iter()
                        .map(|(k, v)| (rmpv::Value::from(k.as_str()), convert(v)))
                        .collect(),
                )
            }
        }
    }
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &convert(v));
    out
}

fn request(id: &str, enc: Encoding, body: serde_json::Value, truth: Vec<Option<String>>) -> Sample {
    let mut body = body;
    body["request_id"] = json!(id);
    let payload = match enc {
        Encoding::Json => protocol::encode(&body, enc),
        Encoding::Msgpack => to_msgpack(&body),
    };
    Sample {
        request_id: id.to_string(),
        encoding: enc,
        payload,
        truth,
    }
}

/// The sample requests: one per label (alternating encodings), a frame
/// with boxes, raw pixels, and bad inputs.
fn samples() -> anyhow::Result<Vec<Sample>> {
    let mut by_label: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
    for (label, _, bytes) in DEMO_QUERIES {
        by_label.entry(label).or_default().push(bytes);
    }
    if by_label.is_empty() {
        bail!("this binary was built without the synthetic demo images (testdata/synthetic)");
    }
    let mut out = Vec::new();
    for (i, (label, images)) in by_label.iter().enumerate() {
        let enc = if i % 2 == 0 {
            Encoding::Json
        } else {
            Encoding::Msgpack
        };
        let crops: Vec<_> = images
            .iter()
            .take(2)
            .enumerate()
            .map(|(k, b)| json!({"id": format!("{label}-{k}"), "image": bin(b, enc)}))
            .collect();
        let truth = vec![Some(label.to_string()); crops.len()];
        out.push(request(
            &format!("demo-{i:02}"),
            enc,
            json!({"camera_id": "lane-1", "frame_id": i, "ts_ms": crate::clock::now_ms(), "crops": crops}),
            truth,
        ));
    }
    // A frame with three products and one box that misses the frame.
    let mut frame = RgbImage::from_pixel(640, 360, image::Rgb([90, 90, 90]));
    let mut boxes = Vec::new();
    let mut truth = Vec::new();
    for (slot, (label, images)) in by_label.iter().take(3).enumerate() {
        let img = image::load_from_memory(images[0])?.to_rgb8();
        let (x, y) = (20 + slot as u32 * 210, 40);
        image::imageops::overlay(&mut frame, &img, i64::from(x), i64::from(y));
        boxes.push(json!({"id": format!("box-{slot}"), "bbox": [x, y, img.width(), img.height()]}));
        truth.push(Some(label.to_string()));
    }
    boxes.push(json!({"id": "box-outside", "bbox": [900, 500, 40, 40]}));
    truth.push(None);
    let frame_jpeg = jpeg(&frame);
    out.push(request(
        "demo-frame",
        Encoding::Msgpack,
        json!({"camera_id": "lane-1", "frame": bin(&frame_jpeg, Encoding::Msgpack), "crops": boxes}),
        truth,
    ));
    // Raw pixels, plus an undecodable crop next to a good one.
    if let Some((label, first)) = by_label
        .iter()
        .last()
        .and_then(|(l, i)| i.first().map(|f| (*l, *f)))
    {
        let img = image::load_from_memory(first)?.to_rgb8();
        out.push(request(
            "demo-raw-and-bad",
            Encoding::Json,
            json!({"crops": [
                {"id": "raw", "raw": {"width": img.width(), "height": img.height(), "format": "rgb8", "data": bin(img.as_raw(), Encoding::Json)}},
                {"id": "garbage", "image": bin(b"this is not an image", Encoding::Json)}
            ]}),
            vec![Some(label.to_string()), None],
        ));
    }
    Ok(out)
}

/// Runs the demo against `broker` (host, port), or an in-process broker
/// when `None`; returns an error if any answer is missing or malformed.
pub async fn run(verbose: bool, broker: Option<(String, u16)>) -> anyhow::Result<()> {
    let (host, port, where_) = match broker {
        Some((host, port)) => (host, port, "external"),
        None => {
            let port = free_port()?;
            start_broker(port)?;
            ("127.0.0.1".to_string(), port, "in-process")
        }
    };
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let manifest = write_test_model(&dir.path().join("models"))?;
    let config_text = format!(
        "device_id = \"demo-agent\"\nfleet = \"demo\"\nstate_dir = {state:?}\n[model]\nmanifest = {manifest:?}\n[runtime]\nexecution_providers = [\"cpu\"]\n[bus]\nhost = {host:?}\nport = {port}\n[pipeline]\nmax_batch = 8\n[log]\nfilter = \"{filter}\"\n",
        state = dir.path().join("state").display().to_string(),
        manifest = manifest.display().to_string(),
        filter = if verbose { "info" } else { "warn,rumqttd=off" },
    );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, &config_text)?;
    let cfg = LoadedConfig::load(&config_path)?;
    crate::logging::init(&cfg.config.log.filter, false);
    println!(
        "retail-agent demo: {where_} broker on {host}:{port}, state in {}",
        dir.path().display()
    );

    // Enrol the synthetic references (the agent opens the DB afterwards).
    let enrolled = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
            let mut recognizer = Recognizer::from_config(&cfg)?;
            let db = open_refdb(&cfg, recognizer.engine())?;
            let meta = enroll_demo_refs(&mut recognizer, &db)?;
            Ok((meta.refs, meta.labels))
        })
        .await??
    };
    println!(
        "enrolled {} reference images of {} products",
        enrolled.0, enrolled.1
    );

    let agent = Agent::start(cfg.clone()).await?;
    if !agent.wait_connected(Duration::from_secs(10)).await {
        bail!("the agent did not connect to the broker on {host}:{port}");
    }
    let topics = agent.topics().clone();

    // The checkout client.
    let mut opts = MqttOptions::new("demo-checkout-client", host.as_str(), port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 256);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>, Instant)>();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec(), Instant::now()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client.subscribe(&topics.results, QoS::AtLeastOnce).await?;
    client.subscribe(&topics.errors, QoS::AtLeastOnce).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let samples = samples()?;
    let mut sent: BTreeMap<String, (Instant, &Sample)> = BTreeMap::new();
    for s in &samples {
        sent.insert(s.request_id.clone(), (Instant::now(), s));
        client
            .publish(&topics.crops, QoS::AtLeastOnce, false, s.payload.clone())
            .await?;
    }
    client
        .publish(
            &topics.crops,
            QoS::AtLeastOnce,
            false,
            b"\x00\x01 not a request".to_vec(),
        )
        .await?;
    println!(
        "published {} requests (+1 undecodable payload) to {}\n",
        samples.len(),
        topics.crops
    );

    let mut answered = 0;
    let (mut correct, mut scored, mut error_reports) = (0, 0, 0);
    let mut rtts = Vec::new();
    let mut timings = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered < samples.len() || error_reports == 0 {
        let Ok(Some((topic, payload, at))) = tokio::time::timeout_at(deadline, rx.recv()).await
        else {
            bail!(
                "timed out: {answered} of {} results and {error_reports} error reports arrived",
                samples.len()
            );
        };
        let enc = protocol::detect_encoding(&payload)?;
        if topic == topics.errors {
            let report: ErrorReport = protocol::decode(&payload, enc)?;
            error_reports += 1;
            println!(
                "error report: {} (request_id {:?})\n",
                report.reason, report.request_id
            );
            continue;
        }
        let result: RecognitionResult = protocol::decode(&payload, enc)?;
        let Some((t0, sample)) = sent.remove(&result.request_id) else {
            continue; // a repeat (answers are at-least-once)
        };
        if enc != sample.encoding {
            bail!(
                "{} was sent as {:?} but answered as {enc:?}",
                result.request_id,
                sample.encoding
            );
        }
        answered += 1;
        rtts.push(at.duration_since(t0));
        timings.push(result.timing_us);
        println!(
            "{} [{:?}] model {} db v{} batch {} total {:.1} ms",
            result.request_id,
            enc,
            result.model.id,
            result.refdb_version,
            result.batch_size,
            result.timing_us.total as f64 / 1000.0
        );
        for (item, truth) in result.items.iter().zip(&sample.truth) {
            let verdict = match (item.decision, truth) {
                (ItemDecision::Error, None) => "expected error".to_string(),
                (_, Some(t)) => {
                    scored += 1;
                    if item.label.as_deref() == Some(t.as_str()) {
                        correct += 1;
                        "correct".to_string()
                    } else {
                        format!("WRONG (truth {t})")
                    }
                }
                (_, None) => "should have been an error".to_string(),
            };
            match item.decision {
                ItemDecision::Error => println!(
                    "  {:<22} error: {}  [{verdict}]",
                    item.id,
                    item.error.as_deref().unwrap_or("")
                ),
                _ => println!(
                    "  {:<22} {:<8} {:<22} similarity {:.3}  classifier {}  [{verdict}]",
                    item.id,
                    format!("{:?}", item.decision).to_lowercase(),
                    item.label.as_deref().unwrap_or("-"),
                    item.similarity.unwrap_or(-1.0),
                    item.classifier
                        .as_ref()
                        .map(|c| format!("{} ({:.2})", c.label, c.probability))
                        .unwrap_or_else(|| "-".into()),
                ),
            }
        }
    }

    println!("\n{correct} of {scored} crops recognised correctly; {answered} results, {error_reports} error report(s)");
    print_latency_table(&timings, &rtts);
    let totals = agent.metrics().totals();
    println!(
        "\nagent totals: {} requests, {} crops, {} batches (mean batch {:.2}), {} errors, {} dropped",
        totals.requests,
        totals.crops,
        totals.batches,
        if totals.batches == 0 { 0.0 } else { totals.batched_crops as f64 / totals.batches as f64 },
        totals.errors,
        totals.dropped
    );
    let _ = client.disconnect().await;
    agent.stop().await?;
    println!("agent stopped cleanly");
    if correct != scored {
        bail!("{} crops were recognised wrongly", scored - correct);
    }
    Ok(())
}

fn print_latency_table(timings: &[protocol::TimingUs], rtts: &[Duration]) {
    fn pct(mut v: Vec<u64>) -> (u64, u64, u64) {
        v.sort_unstable();
        if v.is_empty() {
            return (0, 0, 0);
        }
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.95), *v.last().unwrap_or(&0))
    }
    println!("\nlatency per request (ms)      p50      p95      max");
    let rows: [(&str, Vec<u64>); 6] = [
        ("queue", timings.iter().map(|t| t.queue).collect()),
        ("decode", timings.iter().map(|t| t.decode).collect()),
        ("infer (batch)", timings.iter().map(|t| t.infer).collect()),
        ("search", timings.iter().map(|t| t.search).collect()),
        ("agent total", timings.iter().map(|t| t.total).collect()),
        (
            "client round trip",
            rtts.iter().map(|d| d.as_micros() as u64).collect(),
        ),
    ];
    for (name, v) in rows {
        let (p50, p95, max) = pct(v);
        println!(
            "  {name:<26} {:>8.2} {:>8.2} {:>8.2}",
            p50 as f64 / 1000.0,
            p95 as f64 / 1000.0,
            max as f64 / 1000.0
        );
    }
}
