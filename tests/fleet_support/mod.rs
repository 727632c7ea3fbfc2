//! Support for the fleet tests, written from the contract alone: signed
//! updates built with rmpv and ring (never through the crate's types) and
//! agents run as real processes of the binary. The contract's content
//! digest, computed independently, is `retail_testkit::digest::Content`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use retail_testkit::msgpack::encode;
use retail_testkit::msgpack::map;
use retail_testkit::topics::topic;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rmpv::Value;

use crate::common::{to_json, AgentHome, TestClient};

/// An Ed25519 key of the fleet operator.
pub struct FleetKey {
    pub pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl FleetKey {
    pub fn generate() -> Self {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pkcs8 = doc.as_ref().to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        Self { pkcs8, pair }
    }

    pub fn public_hex(&self) -> String {
        self.pair
            .public_key()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn sign(&self, body: &[u8]) -> Vec<u8> {
        self.pair.sign(body).as_ref().to_vec()
    }

    /// Writes the private key where `--key` can read it (mode 0600, as
    /// `fleet keygen` does: a key others can read is refused).
    pub fn write(&self, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, &self.pkcs8).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

fn s(v: &str) -> Value {
    Value::from(v)
}

pub fn upsert_image(ref_id: &str, label: &str, image: &[u8]) -> Value {
    map(vec![
        ("op", s("upsert")),
        ("ref_id", s(ref_id)),
        ("label", s(label)),
        ("image", Value::Binary(image.to_vec())),
    ])
}

pub fn upsert_embedding(ref_id: &str, label: &str, embedding: &[f32], fingerprint: &str) -> Value {
    map(vec![
        ("op", s("upsert")),
        ("ref_id", s(ref_id)),
        ("label", s(label)),
        (
            "embedding",
            Value::Array(embedding.iter().map(|v| Value::F32(*v)).collect()),
        ),
        ("model_fingerprint", s(fingerprint)),
    ])
}

pub fn delete(ref_id: &str) -> Value {
    map(vec![("op", s("delete")), ("ref_id", s(ref_id))])
}

pub fn delete_label(label: &str) -> Value {
    map(vec![("op", s("delete_label")), ("label", s(label))])
}

pub fn clear() -> Value {
    map(vec![("op", s("clear"))])
}

/// A RefUpdate body.
#[derive(Clone)]
pub struct Update {
    pub update_id: String,
    pub fleet: String,
    pub target: Option<String>,
    pub base_version: Option<u64>,
    pub version: u64,
    pub expires_ms: Option<u64>,
    pub ops: Vec<Value>,
}

impl Update {
    pub fn new(id: &str, fleet: &str, base: Option<u64>, version: u64, ops: Vec<Value>) -> Self {
        Self {
            update_id: id.into(),
            fleet: fleet.into(),
            target: None,
            base_version: base,
            version,
            expires_ms: None,
            ops,
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let mut m = vec![
            ("update_id", s(&self.update_id)),
            ("fleet", s(&self.fleet)),
            (
                "base_version",
                self.base_version.map_or(Value::Nil, Value::from),
            ),
            ("version", Value::from(self.version)),
            ("issued_ms", Value::from(crate::daemon_support::now_ms())),
            ("ops", Value::Array(self.ops.clone())),
        ];
        if let Some(t) = &self.target {
            m.push(("target", s(t)));
        }
        if let Some(e) = self.expires_ms {
            m.push(("expires_ms", Value::from(e)));
        }
        encode(&map(m))
    }

    /// The MessagePack SignedUpdate of this update signed by `key` as `key_id`.
    pub fn signed(&self, key: &FleetKey, key_id: &str) -> Vec<u8> {
        let body = self.body();
        envelope(key_id, &key.sign(&body), &body)
    }
}

pub fn envelope(key_id: &str, sig: &[u8], body: &[u8]) -> Vec<u8> {
    encode(&map(vec![
        ("key_id", s(key_id)),
        ("sig", Value::Binary(sig.to_vec())),
        ("body", Value::Binary(body.to_vec())),
    ]))
}

/// The same envelope in JSON (binary fields base64).
pub fn envelope_json(key_id: &str, sig: &[u8], body: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::to_vec(&serde_json::json!({"key_id": key_id, "sig": b64(sig), "body": b64(body)}))
        .unwrap()
}

/// The synthetic reference images: (label, file name, bytes), sorted.
pub fn reference_images() -> Vec<(String, String, Vec<u8>)> {
    retail_agent::dataset::scan(&crate::common::repo_path("testdata/synthetic/refs"))
        .unwrap()
        .into_iter()
        .map(|i| {
            let name = i.path.file_name().unwrap().to_string_lossy().into_owned();
            (i.label, name, std::fs::read(&i.path).unwrap())
        })
        .collect()
}

/// An agent home for a fleet device on `port`, trusting `keys`.
pub fn device_home(
    device: &str,
    fleet: &str,
    port: u16,
    keys: &[(&str, &FleetKey)],
    extra: &str,
) -> AgentHome {
    let trusted: String = keys
        .iter()
        .map(|(id, k)| format!("{id} = \"{}\"\n", k.public_hex()))
        .collect();
    AgentHome::new(
        &format!("device_id = \"{device}\"\nfleet = \"{fleet}\""),
        &format!(
            "[bus]\nport = {port}\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n[metrics]\ninterval_s = 1\n{extra}\n[fleet_updates.trusted_keys]\n{trusted}"
        ),
    )
}

/// The agent binary running `run` on a home; killed on drop.
pub struct AgentProcess {
    pub child: Child,
    log: std::path::PathBuf,
}

impl AgentProcess {
    pub fn start(home: &AgentHome) -> Self {
        let log_path = home.path().join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_retail-agent"))
            .args(["run", "-c"])
            .arg(&home.config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start retail-agent run");
        Self {
            child,
            log: log_path,
        }
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- agent log ({}), last lines:", self.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Waits for an `online` Status of `device` on a client subscribed to
/// `ror/+/status`; returns it.
pub async fn wait_online(
    client: &mut TestClient,
    device: &str,
    timeout: Duration,
) -> serde_json::Value {
    let topic = topic(device, "status");
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("{device} did not come online"));
        let payload = client
            .next_on(&topic, left)
            .await
            .unwrap_or_else(|| panic!("{device} did not come online"));
        let v = to_json(&payload);
        if v["state"] == "online" {
            return v;
        }
    }
}

/// Waits for the next UpdateAck of `device`.
pub async fn next_ack(
    client: &mut TestClient,
    device: &str,
    timeout: Duration,
) -> Option<serde_json::Value> {
    client
        .next_on(&topic(device, "refdb/ack"), timeout)
        .await
        .map(|p| to_json(&p))
}

/// The agent's `db stats --json` (run on a stopped agent's home).
pub fn db_stats(home: &AgentHome) -> serde_json::Value {
    let out = home.cli(&["db", "stats", "--json"]);
    assert!(
        out.status.success(),
        "db stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The retained Status of `device`, read by a new subscriber.
pub async fn retained_status(port: u16, device: &str) -> serde_json::Value {
    let topic = topic(device, "status");
    let mut c = TestClient::connect(
        port,
        &format!("peek-{device}-{}", crate::daemon_support::now_ms()),
        &[&topic],
    )
    .await;
    let payload = c
        .next_on(&topic, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no retained Status for {device}"));
    to_json(&payload)
}

/// Polls the retained Status of `device` until its DB is at `version`.
pub async fn wait_status_version(port: u16, device: &str, version: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = retained_status(port, device).await;
        if st["refdb"]["version"] == version {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{device} never reported version {version}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every device in `devices` has published an `online` Status
/// (on a client subscribed to `ror/+/status`).
pub async fn wait_all_online(client: &mut TestClient, devices: &[&str], timeout: Duration) {
    let mut missing: std::collections::BTreeSet<String> =
        devices.iter().map(|d| topic(d, "status")).collect();
    let deadline = Instant::now() + timeout;
    while !missing.is_empty() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("not online in time: {missing:?}"));
        let (topic, payload, _) = client
            .next(left)
            .await
            .unwrap_or_else(|| panic!("not online in time: {missing:?}"));
        if to_json(&payload)["state"] == "online" {
            missing.remove(&topic);
        }
    }
}
