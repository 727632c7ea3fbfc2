//! Shared set-up for integration tests: a state directory with the bundled
//! test model, agent configs, brokers (in-process rumqttd or a real
//! Mosquitto started on a free loopback port) and an MQTT test client that
//! knows only the contract.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use retail_agent::config::LoadedConfig;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

/// A temporary agent home: models/, state/, agent.toml.
pub struct AgentHome {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl AgentHome {
    /// Writes the bundled model and a config with `extra` TOML appended
    /// (sections must come after the top-level keys it writes).
    pub fn new(top_level: &str, sections: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest =
            retail_agent::demo::write_test_model(&dir.path().join("models")).expect("model");
        let text = format!(
            "state_dir = {state:?}\n{top_level}\n[model]\nmanifest = {manifest:?}\n[runtime]\nexecution_providers = [\"cpu\"]\n{sections}\n",
            state = dir.path().join("state").display().to_string(),
            manifest = manifest.display().to_string(),
        );
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, text).expect("write config");
        Self { dir, config_path }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn load(&self) -> LoadedConfig {
        LoadedConfig::load(&self.config_path).expect("config loads")
    }

    /// Runs the real binary with `args` (the config is passed with -c).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retail-agent"));
        let (first, rest) = args.split_first().expect("a subcommand");
        cmd.arg(first);
        if *first == "db" {
            cmd.arg("-c").arg(&self.config_path).args(rest);
        } else {
            cmd.args(rest).arg("-c").arg(&self.config_path);
        }
        cmd.env("RUST_LOG", "warn")
            .output()
            .expect("run retail-agent")
    }

    /// Enrols the synthetic references with the real binary.
    pub fn enroll_synthetic(&self) {
        let out = self.cli(&[
            "enroll",
            "--refs",
            repo_path("testdata/synthetic/refs").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn free_port() -> u16 {
    retail_agent::demo::free_port().expect("free port")
}

/// Starts the in-process broker (rumqttd) on a free port.
pub fn inprocess_broker() -> u16 {
    let port = free_port();
    retail_agent::demo::start_broker(port).expect("broker starts");
    port
}

/// A real Mosquitto on a free loopback port, killed on drop. Panics when
/// mosquitto is not installed: these tests must not silently skip.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra: String,
    /// The whole configuration, when the test wrote it (see
    /// [`Mosquitto::start_with_config`]).
    config: Option<String>,
}

pub fn mosquitto_binary() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "mosquitto is not installed (scripts/test.sh installs it): these tests need a real broker"
    );
}

impl Mosquitto {
    /// Starts Mosquitto with persistence; `extra` is appended to its config
    /// (e.g. TLS listener settings).
    pub fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Self {
            port: free_port(),
            dir,
            child: None,
            extra: extra.to_string(),
            config: None,
        };
        m.spawn();
        m
    }

    /// Starts Mosquitto with exactly the configuration `make(port, dir)`
    /// returns: `port` is a free loopback port for its one listener, `dir`
    /// the broker's private directory (log, persistence, other files the
    /// test writes there). `log()` reads `dir/mosquitto.log`.
    pub fn start_with_config(make: impl FnOnce(u16, &Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = make(port, dir.path());
        let mut m = Self {
            port,
            dir,
            child: None,
            extra: String::new(),
            config: Some(config),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        // `user root`: as root, Mosquitto otherwise switches to the
        // `mosquitto` user, which cannot write its log and persistence file
        // (kept across `restart`) in this private temporary directory.
        // Ignored when the tests do not run as root.
        let conf = self.dir.path().join("mosquitto.conf");
        let text = self.config.clone().unwrap_or_else(|| format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\nset_tcp_nodelay true\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 100\nmax_packet_size 20000000\nlog_dest file {dir}/mosquitto.log\n{extra}\n",
            port = self.port,
            dir = self.dir.path().display(),
            extra = self.extra,
        ));
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_for_port(self.port);
    }

    /// Stops the broker (SIGTERM, so it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_sigterm(c.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped broker again (same port, same persistence).
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Restarts on the same port with the same persistence.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is
    /// answered.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-STOP")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Kills the broker without letting it save anything and starts a new
    /// one on the same port that knows no session; its log starts empty.
    pub fn restart_losing_sessions(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("mosquitto.db"));
        let _ = std::fs::remove_file(self.dir.path().join("mosquitto.log"));
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to a process.
pub fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain MQTT client for tests: subscribes, publishes, collects messages.
pub struct TestClient {
    pub client: rumqttc::AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
}

impl TestClient {
    pub async fn connect(port: u16, id: &str, subscriptions: &[&str]) -> Self {
        Self::connect_with(port, id, subscriptions, true).await
    }

    /// A client with a persistent session (clean session off).
    pub async fn connect_persistent(port: u16, id: &str, subscriptions: &[&str]) -> Self {
        Self::connect_with(port, id, subscriptions, false).await
    }

    /// A client connecting over TLS with `tls` (e.g. a client certificate
    /// for a broker that requires one).
    pub async fn connect_tls(
        port: u16,
        id: &str,
        subscriptions: &[&str],
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Self {
        Self::connect_with_transport(port, id, subscriptions, true, Some(tls)).await
    }

    async fn connect_with(
        port: u16,
        id: &str,
        subscriptions: &[&str],
        clean_session: bool,
    ) -> Self {
        Self::connect_with_transport(port, id, subscriptions, clean_session, None).await
    }

    async fn connect_with_transport(
        port: u16,
        id: &str,
        subscriptions: &[&str],
        clean_session: bool,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(20 << 20, 20 << 20);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(clean_session);
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 1024);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let subs: Vec<String> = subscriptions.iter().map(|s| s.to_string()).collect();
        let sub_client = client.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for s in &subs {
                            let _ = sub_client
                                .subscribe(s.clone(), rumqttc::QoS::AtLeastOnce)
                                .await;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec(), p.retain));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        if !subscriptions.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
            // Every SUBACK is in once the last one is; give the rest a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { client, rx }
    }

    pub async fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) {
        let q = match qos {
            0 => rumqttc::QoS::AtMostOnce,
            _ => rumqttc::QoS::AtLeastOnce,
        };
        self.client
            .publish(topic, q, false, payload)
            .await
            .expect("publish");
    }

    /// The next message, or None after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Vec<u8>, bool)> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message on `topic` (others are skipped).
    pub async fn next_on(&mut self, topic: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (t, payload, _) = self.next(left).await?;
            if t == topic {
                return Some(payload);
            }
        }
    }
}

/// Decodes a payload of either encoding into a JSON value (bin → array of
/// numbers), the way a consumer written from the contract would inspect it.
pub fn to_json(payload: &[u8]) -> serde_json::Value {
    if payload.first() == Some(&b'{') {
        serde_json::from_slice(payload).expect("valid JSON")
    } else {
        let v: rmpv::Value =
            rmpv::decode::read_value(&mut &payload[..]).expect("valid MessagePack");
        assert!(v.is_map(), "MessagePack payloads are maps, got {v}");
        msgpack_to_json(&v)
    }
}

fn msgpack_to_json(v: &rmpv::Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        rmpv::Value::Nil => serde_json::Value::Null,
        rmpv::Value::Boolean(b) => json!(b),
        rmpv::Value::Integer(i) => i
            .as_u64()
            .map(|u| json!(u))
            .unwrap_or_else(|| json!(i.as_i64())),
        rmpv::Value::F32(f) => json!(f),
        rmpv::Value::F64(f) => json!(f),
        rmpv::Value::String(s) => json!(s.as_str()),
        rmpv::Value::Binary(b) => json!({ "$bin_len": b.len() }),
        rmpv::Value::Array(a) => serde_json::Value::Array(a.iter().map(msgpack_to_json).collect()),
        rmpv::Value::Map(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("string keys").to_string(),
                        msgpack_to_json(v),
                    )
                })
                .collect(),
        ),
        rmpv::Value::Ext(_, _) => serde_json::Value::Null,
    }
}

/// Query images of the synthetic set: (label, bytes).
pub fn queries() -> Vec<(String, Vec<u8>)> {
    let items =
        retail_agent::dataset::scan(&repo_path("testdata/synthetic/queries")).expect("queries");
    items
        .into_iter()
        .map(|i| (i.label, std::fs::read(i.path).expect("read query")))
        .collect()
}

/// A JSON crop request with encoded images.
pub fn json_request(request_id: &str, images: &[&[u8]]) -> Vec<u8> {
    use base64::Engine;
    let crops: Vec<_> = images
        .iter()
        .map(
            |b| serde_json::json!({ "image": base64::engine::general_purpose::STANDARD.encode(b) }),
        )
        .collect();
    serde_json::to_vec(&serde_json::json!({ "request_id": request_id, "crops": crops })).unwrap()
}

/// A MessagePack crop request (a map; images as `bin`).
pub fn msgpack_request(request_id: &str, images: &[&[u8]]) -> Vec<u8> {
    use retail_testkit::{crops::image_crop, msgpack};
    use rmpv::Value;
    let crops: Vec<Value> = images.iter().copied().map(image_crop).collect();
    msgpack::encode(&msgpack::map(vec![
        ("request_id", Value::from(request_id)),
        ("crops", Value::Array(crops)),
    ]))
}

/// A CA, a server certificate for 127.0.0.1 and client certificates whose
/// Common Names are the given names, as PEM files (keys mode 0600).
pub struct TestPki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN → (certificate, key).
    pub clients: std::collections::BTreeMap<String, (PathBuf, PathBuf)>,
}

impl TestPki {
    pub fn new(client_names: &[&str]) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| -> PathBuf {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            if name.ends_with(".key") {
                std::fs::set_permissions(
                    &p,
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
                )
                .unwrap();
            }
            p
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "retail-agent test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

        let mut clients = std::collections::BTreeMap::new();
        for name in client_names {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, *name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            clients.insert(
                name.to_string(),
                (
                    write(&format!("{name}.pem"), cert.pem()),
                    write(&format!("{name}.key"), key.serialize_pem()),
                ),
            );
        }
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            clients,
            _dir: dir,
        }
    }

    /// The agent's `[bus.tls]` settings for client `name`.
    pub fn tls(&self, name: &str) -> retail_agent::config::TlsConfig {
        let (cert, key) = &self.clients[name];
        retail_agent::config::TlsConfig {
            ca_file: self.ca.clone(),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        }
    }

    /// A rustls client configuration presenting `name`'s certificate.
    pub fn client(&self, name: &str) -> std::sync::Arc<rustls::ClientConfig> {
        retail_agent::bus::tls::client_config(&self.tls(name)).expect("client TLS config")
    }

    /// One that trusts the CA but presents no certificate.
    pub fn anonymous_client(&self) -> std::sync::Arc<rustls::ClientConfig> {
        retail_agent::bus::tls::client_config(&retail_agent::config::TlsConfig {
            ca_file: self.ca.clone(),
            cert_file: None,
            key_file: None,
        })
        .expect("client TLS config")
    }
}
