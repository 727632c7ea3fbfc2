//! Support for the daemon tests: checks of the MQTT contract
//! (`shared/spec/PROTOCOL.md`) written from the document alone (payloads are
//! built with serde_json / rmpv and answers are inspected as plain JSON
//! values, see `common::to_json`, never through the crate's protocol types),
//! waiting for answers, and agent homes with the synthetic references.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::AgentHome;

// ---------------------------------------------------------------- set-up

/// An agent home (see `AgentHome::new`) whose reference DB holds the
/// synthetic references. They are enrolled once per test binary with the
/// real CLI (`AgentHome::enroll_synthetic`) and the closed DB is copied into
/// each home: every agent needs its own (sled locks its directory), and
/// enrolling 120 references takes seconds of CPU each time.
pub fn enrolled_home(top_level: &str, sections: &str) -> AgentHome {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(concat!(env!("CARGO_CRATE_NAME"), "-synthetic-state"));
        let _ = std::fs::remove_dir_all(&dir);
        let enrolled = AgentHome::new("", "");
        enrolled.enroll_synthetic();
        copy_dir(&enrolled.path().join("state"), &dir);
        dir
    });
    let home = AgentHome::new(top_level, sections);
    copy_dir(template, &home.path().join("state"));
    home
}

/// An enrolled agent home of `device` in fleet `store-9` for a broker on
/// `port`, reconnecting fast (100 to 500 ms). `bus` lines go into the
/// `[bus]` section; `sections` follow it.
pub fn broker_home(device: &str, port: u16, bus: &str, sections: &str) -> AgentHome {
    enrolled_home(
        &format!("device_id = {device:?}\nfleet = \"store-9\""),
        &format!(
            "[bus]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n{bus}\n{sections}"
        ),
    )
}

/// Starts the agent of `home` in-process and waits until it is connected.
pub async fn start_connected(home: &AgentHome) -> retail_agent::daemon::Agent {
    let agent = retail_agent::daemon::Agent::start(home.load())
        .await
        .expect("agent starts");
    assert!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "agent did not connect to the broker"
    );
    agent
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

use serde_json::Value;

/// The labels of the synthetic reference set.
pub const LABELS: usize = 12;
/// References enrolled from `testdata/synthetic/refs`.
pub const REFS: u64 = 120;
/// `top_k` values above this are clamped.
pub const MAX_TOP_K: usize = 20;
/// `recognition.top_k` default.
pub const DEFAULT_TOP_K: usize = 5;
/// The bundled test model's id.
pub const MODEL_ID: &str = "retail-test-v1";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// First 16 hex digits of the SHA-256 of the bundled model file.
pub fn model_fingerprint() -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, retail_agent::demo::TEST_MODEL_ONNX);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..16]
        .to_string()
}

pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether the first byte says MessagePack map (0x80–0x8f, 0xde, 0xdf).
pub fn is_msgpack_map(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

pub fn is_json(payload: &[u8]) -> bool {
    payload.first() == Some(&b'{')
}

// ---------------------------------------------------------------- fields

fn field<'a>(v: &'a Value, key: &str, what: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("{what}: field `{key}` is missing in {v}"))
}

pub fn u64_of(v: &Value, key: &str, what: &str) -> u64 {
    field(v, key, what).as_u64().unwrap_or_else(|| {
        panic!(
            "{what}: `{key}` must be an unsigned integer, got {}",
            v[key]
        )
    })
}

pub fn f64_of(v: &Value, key: &str, what: &str) -> f64 {
    field(v, key, what)
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: `{key}` must be a number, got {}", v[key]))
}

pub fn str_of<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    field(v, key, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{key}` must be a string, got {}", v[key]))
}

pub fn obj_of<'a>(v: &'a Value, key: &str, what: &str) -> &'a Value {
    let o = field(v, key, what);
    assert!(o.is_object(), "{what}: `{key}` must be a map, got {o}");
    o
}

pub fn arr_of<'a>(v: &'a Value, key: &str, what: &str) -> &'a Vec<Value> {
    field(v, key, what)
        .as_array()
        .unwrap_or_else(|| panic!("{what}: `{key}` must be an array, got {}", v[key]))
}

/// A recent Unix time in ms (within a minute of now).
pub fn assert_recent_ms(v: &Value, key: &str, what: &str) -> u64 {
    let t = u64_of(v, key, what);
    let now = now_ms();
    assert!(
        t + 60_000 >= now && t <= now + 60_000,
        "{what}: `{key}` = {t} is not a current Unix time in ms (now {now})"
    );
    t
}

/// `model: {id, fingerprint}` of the bundled model.
pub fn check_model(v: &Value, what: &str) {
    let m = obj_of(v, "model", what);
    assert_eq!(str_of(m, "id", what), MODEL_ID, "{what}: model.id");
    let fp = str_of(m, "fingerprint", what);
    assert!(
        is_lower_hex(fp, 16),
        "{what}: model.fingerprint must be 16 lower-case hex digits, got {fp:?}"
    );
    assert_eq!(
        fp,
        model_fingerprint(),
        "{what}: fingerprint is not the model file's SHA-256 prefix"
    );
}

// ---------------------------------------------------------------- results

/// What one crop should come back as.
#[derive(Debug, Clone)]
pub enum Want {
    /// Recognised as this label (decision "match").
    Label(String),
    /// An item error.
    Error,
}

/// What a RecognitionResult must hold.
#[derive(Debug, Clone)]
pub struct Expect {
    pub request_id: String,
    pub camera_id: Option<String>,
    pub frame_id: Option<u64>,
    pub device_id: String,
    /// Item ids in crop order.
    pub ids: Vec<String>,
    pub want: Vec<Want>,
    /// Candidates per item: min(effective top_k, labels in the DB).
    pub candidates: usize,
}

impl Expect {
    /// Crops without ids (so ids are "0", "1", …), all matching `labels`,
    /// default top_k.
    pub fn labels(request_id: &str, device_id: &str, labels: &[&str]) -> Self {
        Self {
            request_id: request_id.into(),
            camera_id: None,
            frame_id: None,
            device_id: device_id.into(),
            ids: (0..labels.len()).map(|i| i.to_string()).collect(),
            want: labels.iter().map(|l| Want::Label(l.to_string())).collect(),
            candidates: DEFAULT_TOP_K.min(LABELS),
        }
    }
}

/// Checks a RecognitionResult field by field against the contract and `e`.
pub fn check_result(v: &Value, e: &Expect) {
    let what = format!("result {}", e.request_id);
    let what = what.as_str();
    assert!(v.is_object(), "{what}: not a map: {v}");
    assert_eq!(
        str_of(v, "request_id", what),
        e.request_id,
        "{what}: request_id"
    );
    match &e.camera_id {
        Some(c) => assert_eq!(str_of(v, "camera_id", what), c, "{what}: camera_id echoed"),
        None => assert!(
            v.get("camera_id").is_none_or(Value::is_null),
            "{what}: camera_id was not sent but came back as {}",
            v["camera_id"]
        ),
    }
    match e.frame_id {
        Some(f) => assert_eq!(u64_of(v, "frame_id", what), f, "{what}: frame_id echoed"),
        None => assert!(
            v.get("frame_id").is_none_or(Value::is_null),
            "{what}: frame_id was not sent but came back as {}",
            v["frame_id"]
        ),
    }
    assert_eq!(
        str_of(v, "device_id", what),
        e.device_id,
        "{what}: device_id"
    );
    check_model(v, what);
    u64_of(v, "refdb_version", what);
    let t = obj_of(v, "timing_us", what);
    let mut timing = std::collections::BTreeMap::new();
    for k in ["queue", "decode", "infer", "search", "total"] {
        timing.insert(k, u64_of(t, k, &format!("{what}: timing_us")));
    }
    let embedded = e.want.iter().any(|w| matches!(w, Want::Label(_)));
    if embedded {
        assert!(timing["total"] > 0, "{what}: timing_us.total is 0");
        assert!(
            timing["infer"] > 0,
            "{what}: timing_us.infer is 0 though crops were embedded"
        );
        assert!(
            timing["total"] >= timing["infer"],
            "{what}: total {} < infer {}",
            timing["total"],
            timing["infer"]
        );
    }
    let batch = u64_of(v, "batch_size", what);
    if embedded {
        assert!(
            batch >= 1,
            "{what}: batch_size {batch} but crops were embedded"
        );
    }
    assert_recent_ms(v, "ts_ms", what);

    let items = arr_of(v, "items", what);
    assert_eq!(
        items.len(),
        e.want.len(),
        "{what}: one item per crop, got {items:?}"
    );
    for (i, (item, want)) in items.iter().zip(&e.want).enumerate() {
        let what = format!("{what} item {i}");
        let what = what.as_str();
        assert_eq!(
            str_of(item, "id", what),
            e.ids[i],
            "{what}: id (crop order)"
        );
        let decision = str_of(item, "decision", what);
        assert!(
            item.get("label").is_some(),
            "{what}: `label` must be present (null when not a match): {item}"
        );
        match want {
            Want::Error => {
                assert_eq!(decision, "error", "{what}: decision; item {item}");
                assert!(
                    item["label"].is_null(),
                    "{what}: label of an error must be null"
                );
                let err = str_of(item, "error", what);
                assert!(!err.is_empty(), "{what}: error string is empty");
            }
            Want::Label(label) => {
                assert_eq!(decision, "match", "{what}: decision; item {item}");
                assert_eq!(
                    item["label"].as_str(),
                    Some(label.as_str()),
                    "{what}: recognised label; item {item}"
                );
                assert!(
                    item.get("error").is_none_or(Value::is_null),
                    "{what}: a match carries no error"
                );
                check_scores(item, e.candidates, what);
                let c = obj_of(item, "classifier", what);
                str_of(c, "label", &format!("{what}: classifier"));
                let p = f64_of(c, "probability", &format!("{what}: classifier"));
                assert!(
                    (0.0..=1.0 + 1e-6).contains(&p),
                    "{what}: classifier probability {p}"
                );
            }
        }
    }
}

/// similarity, distance and candidates of a non-error item.
pub fn check_scores(item: &Value, want_candidates: usize, what: &str) {
    let s = f64_of(item, "similarity", what);
    assert!(
        (-1.0..=1.0 + 1e-6).contains(&s),
        "{what}: similarity {s} is not a cosine"
    );
    let d = f64_of(item, "distance", what);
    let expected = (2.0 - 2.0 * s).max(0.0).sqrt();
    assert!(
        (d - expected).abs() <= 1e-4,
        "{what}: distance {d} != sqrt(2 - 2*{s}) = {expected}"
    );
    let cands = arr_of(item, "candidates", what);
    assert_eq!(
        cands.len(),
        want_candidates,
        "{what}: candidates must be min(top_k, labels) = {want_candidates}: {cands:?}"
    );
    let mut seen = HashSet::new();
    let mut prev = f64::INFINITY;
    for (k, c) in cands.iter().enumerate() {
        let w = format!("{what} candidate {k}");
        let label = str_of(c, "label", &w);
        assert!(
            seen.insert(label.to_string()),
            "{w}: label {label} given twice"
        );
        let cs = f64_of(c, "similarity", &w);
        assert!(
            cs <= prev + 1e-6,
            "{w}: candidates are not best first ({cs} after {prev})"
        );
        prev = cs;
        assert!(!str_of(c, "ref_id", &w).is_empty(), "{w}: empty ref_id");
    }
    if let Some(first) = cands.first() {
        assert!(
            (first["similarity"].as_f64().unwrap() - s).abs() <= 1e-5,
            "{what}: best candidate's similarity is not the item's"
        );
        if let Some(label) = item["label"].as_str() {
            assert_eq!(
                first["label"].as_str(),
                Some(label),
                "{what}: best candidate is the label"
            );
        }
    }
}

// ---------------------------------------------------------------- status

/// Checks a full Status (`state` is "online" or "offline").
pub fn check_status(v: &Value, state: &str, device_id: &str, fleet: &str) -> String {
    let what = format!("status ({state})");
    let what = what.as_str();
    assert_eq!(str_of(v, "state", what), state, "{what}: state in {v}");
    assert_eq!(str_of(v, "device_id", what), device_id, "{what}: device_id");
    assert_eq!(str_of(v, "fleet", what), fleet, "{what}: fleet");
    let boot = str_of(v, "boot_id", what).to_string();
    assert!(!boot.is_empty(), "{what}: empty boot_id");
    assert_eq!(
        str_of(v, "agent_version", what),
        env!("CARGO_PKG_VERSION"),
        "{what}: agent_version"
    );
    check_model(v, what);
    assert_eq!(
        str_of(v, "execution_provider", what),
        "cpu",
        "{what}: execution_provider"
    );
    let r = obj_of(v, "refdb", what);
    let w = format!("{what}: refdb");
    u64_of(r, "version", &w);
    let digest = str_of(r, "digest", &w);
    assert!(
        is_lower_hex(digest, 64),
        "{w}: digest must be 64 lower-case hex, got {digest:?}"
    );
    assert_eq!(u64_of(r, "refs", &w), REFS, "{w}: refs");
    assert_eq!(u64_of(r, "labels", &w), LABELS as u64, "{w}: labels");
    let started = assert_recent_ms(v, "started_ms", what);
    let ts = assert_recent_ms(v, "ts_ms", what);
    assert!(
        started <= ts,
        "{what}: started_ms {started} after ts_ms {ts}"
    );
    boot
}

// ---------------------------------------------------------------- metrics

/// Checks a Metrics message's shape; returns (requests, crops).
pub fn check_metrics(v: &Value, device_id: &str) -> (u64, u64) {
    let what = "metrics";
    assert_eq!(str_of(v, "device_id", what), device_id, "metrics device_id");
    assert_recent_ms(v, "ts_ms", what);
    let interval = u64_of(v, "interval_ms", what);
    assert!(
        (200..=10_000).contains(&interval),
        "metrics interval_ms {interval} does not fit metrics.interval_s = 1"
    );
    let requests = u64_of(v, "requests", what);
    let crops = u64_of(v, "crops", what);
    for k in ["errors", "dropped", "queue_depth", "batches"] {
        u64_of(v, k, what);
    }
    let mean = f64_of(v, "mean_batch", what);
    let cps = f64_of(v, "throughput_cps", what);
    assert!(
        mean >= 0.0 && cps >= 0.0,
        "metrics mean_batch {mean} / throughput_cps {cps}"
    );
    if u64_of(v, "batches", what) > 0 {
        assert!(mean >= 1.0, "mean_batch {mean} with batches > 0");
    }
    if crops > 0 {
        assert!(
            cps > 0.0,
            "throughput_cps is 0 with {crops} crops in the interval"
        );
    }
    let lat = obj_of(v, "latency_us", what);
    for stage in ["total", "queue", "decode", "infer", "search"] {
        let w = format!("metrics latency_us.{stage}");
        let p = obj_of(lat, stage, &w);
        let (p50, p95, p99, max) = (
            u64_of(p, "p50", &w),
            u64_of(p, "p95", &w),
            u64_of(p, "p99", &w),
            u64_of(p, "max", &w),
        );
        assert!(p50 <= p95 && p95 <= p99 && p99 <= max, "{w}: {p}");
    }
    (requests, crops)
}

// ---------------------------------------------------------------- errors

/// Checks an ErrorReport; returns its reason.
pub fn check_error_report(v: &Value, request_id: Option<&str>) -> String {
    let what = "error report";
    match request_id {
        Some(id) => assert_eq!(
            str_of(v, "request_id", what),
            id,
            "error report request_id: {v}"
        ),
        None => assert!(
            v.get("request_id").is_none_or(Value::is_null),
            "error report for an unreadable request has request_id {}",
            v["request_id"]
        ),
    }
    let reason = str_of(v, "reason", what).to_string();
    assert!(!reason.is_empty(), "error report with an empty reason");
    assert_recent_ms(v, "ts_ms", what);
    reason
}

// ---------------------------------------------------------------- payloads

// A MessagePack map with string keys (`mp_map`) and its encoding
// (`mp_encode`); not every test binary uses them.
#[allow(unused_imports)]
pub use retail_testkit::msgpack::{encode as mp_encode, map as mp_map};

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One query image per label, in label order: (label, bytes).
pub fn one_query_per_label(queries: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut seen = HashSet::new();
    let mut out: Vec<_> = queries
        .iter()
        .filter(|(l, _)| seen.insert(l.clone()))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), LABELS, "the synthetic set has {LABELS} labels");
    out
}

pub const SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- waiting

/// Reads messages until every id in `ids` has a result on `results`;
/// returns the first result payload per id and every message seen on
/// `errors`. Panics (listing what is missing) after `timeout`.
pub async fn collect_results(
    c: &mut crate::common::TestClient,
    results: &str,
    errors: &str,
    ids: &[&str],
    timeout: Duration,
) -> (std::collections::HashMap<String, Vec<u8>>, Vec<Vec<u8>>) {
    let deadline = std::time::Instant::now() + timeout;
    let mut got = std::collections::HashMap::new();
    let mut errs = Vec::new();
    while ids.iter().any(|id| !got.contains_key(*id)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some((topic, payload, _)) = c.next(left).await else {
            let missing: Vec<_> = ids.iter().filter(|id| !got.contains_key(**id)).collect();
            let errs: Vec<_> = errs
                .iter()
                .map(|e: &Vec<u8>| crate::common::to_json(e))
                .collect();
            panic!(
                "timed out after {timeout:?}: no result for {missing:?}; error reports: {errs:?}"
            );
        };
        if topic == results {
            let v = crate::common::to_json(&payload);
            let id = v["request_id"].as_str().unwrap_or_default().to_string();
            got.entry(id).or_insert(payload);
        } else if topic == errors {
            errs.push(payload);
        }
    }
    (got, errs)
}
