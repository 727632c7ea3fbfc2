//! Agent configuration: the TOML file, its defaults, and environment overrides.
//!
//! Owns the *shape* of the configuration and how it is read (file, then
//! `RETAIL_AGENT__SECTION__KEY` environment variables, then validation). It does
//! not own the model manifest (see [`crate::manifest`]) nor any running
//! component: the rest of the agent receives plain values from here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override configuration keys:
/// `RETAIL_AGENT__BUS__HOST=broker.local` sets `bus.host`.
pub const ENV_PREFIX: &str = "RETAIL_AGENT__";

/// Smallest `bus.max_packet_bytes` accepted: below it no request fits.
pub const MIN_PACKET_BYTES: usize = 1024;

/// Longest `metrics.interval_s` accepted: one day.
pub const MAX_METRICS_INTERVAL_S: u64 = 86_400;
/// Largest `pipeline.max_batch`: far beyond what any provider gains from,
/// and it bounds the memory the pipeline sets aside for waiting crops.
pub const MAX_BATCH: usize = 1024;

/// Longest `bus.keep_alive_s` MQTT can carry (a 16-bit field).
pub const MAX_KEEP_ALIVE_S: u64 = u16::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML at all (a syntax error).
    #[error("config file {path} is not valid TOML: line {line}, column {column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file is TOML, but a key is unknown or its value has the wrong type.
    #[error("config file {path}: {key}: {message}")]
    Schema {
        path: PathBuf,
        /// Dotted path of the key, e.g. `bus.port`.
        key: String,
        message: String,
    },
    #[error("environment variable {var} does not name a config key: {message}")]
    Env { var: String, message: String },
    /// An environment override gives a key a value of the wrong type.
    #[error("environment variable {var} sets {key}: {message}")]
    EnvValue {
        var: String,
        key: String,
        message: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The configuration is well-formed but names files or directories this
    /// machine cannot use (see `crate::preflight`).
    #[error("unusable configuration: {key}: {message}")]
    Unusable { key: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Identifies this agent on the bus; defaults to the host name.
    pub device_id: String,
    /// Fleet this agent belongs to (reference-DB updates are addressed to it).
    pub fleet: String,
    /// Directory for the reference DB, TensorRT engine cache and other state.
    pub state_dir: PathBuf,
    pub model: ModelConfig,
    pub runtime: RuntimeConfig,
    pub limits: LimitsConfig,
    pub recognition: RecognitionConfig,
    pub refdb: RefDbConfig,
    pub pipeline: PipelineConfig,
    pub bus: BusConfig,
    pub metrics: MetricsConfig,
    pub fleet_updates: FleetConfig,
    pub log: LogConfig,
    pub supervision: SupervisionConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            device_id: default_device_id(),
            fleet: "default".into(),
            state_dir: PathBuf::from("/var/lib/retail-agent"),
            model: ModelConfig::default(),
            runtime: RuntimeConfig::default(),
            limits: LimitsConfig::default(),
            recognition: RecognitionConfig::default(),
            refdb: RefDbConfig::default(),
            pipeline: PipelineConfig::default(),
            bus: BusConfig::default(),
            metrics: MetricsConfig::default(),
            fleet_updates: FleetConfig::default(),
            log: LogConfig::default(),
            supervision: SupervisionConfig::default(),
        }
    }
}

/// The host name, or `retail-agent` when it cannot be read.
pub fn default_device_id() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_string();
    if name.is_empty() {
        "retail-agent".into()
    } else {
        name
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Path of the model manifest (TOML); relative paths are resolved against
    /// the directory of the config file.
    pub manifest: PathBuf,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            manifest: PathBuf::from("models/retail-test.toml"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProviderKind {
    Tensorrt,
    Cuda,
    Cpu,
}

impl ExecutionProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tensorrt => "tensorrt",
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so`. Empty: `ORT_DYLIB_PATH`, then well-known places.
    pub onnxruntime_library: Option<PathBuf>,
    /// Execution providers to try, in order. The first that registers is used.
    pub execution_providers: Vec<ExecutionProviderKind>,
    /// Let TensorRT build FP16 engines.
    pub tensorrt_fp16: bool,
    /// TensorRT's builder workspace in MiB (0: ONNX Runtime's default).
    pub tensorrt_workspace_mb: u64,
    /// Threads ONNX Runtime uses inside one operator, the calling thread
    /// included. 0: the daemon derives it from the core count
    /// ([`crate::pipeline::budget`]); the offline commands leave ONNX
    /// Runtime's default (one per physical core).
    pub intra_threads: usize,
    /// Whether ONNX Runtime's idle intra-op threads spin waiting for work.
    /// Unset: the daemon turns spinning off when the decode workers share
    /// the cores; the offline commands leave ONNX Runtime's default (on).
    pub allow_spinning: Option<bool>,
    /// Worker threads of the daemon's async runtime (MQTT I/O). 0: derived
    /// from the core count ([`crate::pipeline::budget`]).
    pub io_threads: usize,
    /// GPU to use for CUDA / TensorRT.
    pub device_index: i32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            onnxruntime_library: None,
            execution_providers: vec![
                ExecutionProviderKind::Tensorrt,
                ExecutionProviderKind::Cuda,
                ExecutionProviderKind::Cpu,
            ],
            tensorrt_fp16: true,
            tensorrt_workspace_mb: 1024,
            intra_threads: 0,
            allow_spinning: None,
            io_threads: 0,
            device_index: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest encoded image accepted, in bytes.
    pub max_image_bytes: usize,
    /// Largest width or height of a decoded image, in pixels.
    pub max_dimension: u32,
    /// Largest decoded image, in pixels (width x height): stops decompression bombs.
    pub max_pixels: u64,
    /// Most crops in one request.
    pub max_crops: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 16 * 1024 * 1024,
            max_dimension: 8192,
            max_pixels: 40_000_000,
            max_crops: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecognitionConfig {
    /// Candidates returned per crop (one per label), at most 20.
    pub top_k: usize,
    /// Best cosine similarity below which a crop is reported as "unknown".
    pub unknown_threshold: f32,
    /// 0 (default): every reference is searched, as NVIDIA's tools do. N > 0:
    /// each label is represented by at most N k-means prototypes (smaller,
    /// faster index for small devices; our addition).
    pub prototypes_per_class: usize,
    /// How the reference matrix is kept in memory: "f32" (default) or
    /// "f16" (half the memory; top-1 agreement with f32 measured by
    /// `retail-agent bench`).
    pub reference_precision: crate::refdb::index::Precision,
}

impl Default for RecognitionConfig {
    fn default() -> Self {
        Self {
            top_k: 5,
            unknown_threshold: 0.5,
            prototypes_per_class: 0,
            reference_precision: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefDbConfig {
    /// sled page-cache size in MiB (sled's own default of 1 GiB is too much for
    /// an 8 GB Orin Nano).
    pub cache_mb: u64,
    /// Keep the source image of each reference so it can be re-embedded when
    /// the model changes.
    pub store_images: bool,
    /// What to do when the DB cannot be opened because it is corrupt:
    /// `reset` moves it aside and starts empty (the fleet's next snapshot
    /// restores it), `fail` refuses to start.
    pub on_corrupt: OnCorrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorrupt {
    Fail,
    Reset,
}

impl Default for RefDbConfig {
    fn default() -> Self {
        Self {
            cache_mb: 64,
            store_images: true,
            on_corrupt: OnCorrupt::Reset,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    DropNewest,
    DropOldest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Requests waiting to be decoded; beyond it `overflow` applies to QoS 0
    /// requests (QoS 1 ones are held back at the broker instead).
    pub queue_capacity: usize,
    /// Payload bytes waiting to be decoded; beyond it, as `queue_capacity`.
    pub queue_max_bytes: usize,
    pub overflow: OverflowPolicy,
    /// Largest inference batch.
    pub max_batch: usize,
    /// Linger: how long waiting crops are held, while inference is idle, for
    /// a fuller batch. 0 (the default): none — an idle inference thread
    /// takes whatever is waiting at once and batches form only while it is
    /// busy (continuous batching). Worth a few milliseconds only on GPU
    /// providers, where a fuller batch costs little more than a small one.
    pub max_delay_ms: u64,
    /// Decode/preprocess worker threads. 0: derived from the core count
    /// ([`crate::pipeline::budget`]).
    pub decode_workers: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            queue_max_bytes: 64 * 1024 * 1024,
            overflow: OverflowPolicy::DropOldest,
            max_batch: 8,
            max_delay_ms: 0,
            decode_workers: 0,
        }
    }
}

/// The payload encodings of the contract (defined there).
pub use crate::protocol::Encoding;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub host: String,
    pub port: u16,
    /// MQTT client id; stable across restarts so the persistent session
    /// survives. Default: `retail-agent-{device_id}`.
    pub client_id: Option<String>,
    /// Topic root (`{root}/{device}/crops` …).
    pub root: String,
    /// When set, also consume `$share/{pool}/{root}/pool/{pool}/crops`.
    pub pool: Option<String>,
    /// Encoding of messages the agent originates (status, metrics, acks).
    pub encoding: Encoding,
    pub results_qos: u8,
    pub keep_alive_s: u64,
    /// Largest MQTT packet accepted or sent.
    pub max_packet_bytes: usize,
    /// Results kept while disconnected; older ones are dropped (and counted).
    pub outbox_capacity: usize,
    pub username: Option<String>,
    /// Prints as `********` in `Debug` output; `check-config` masks it too.
    pub password: Option<crate::secrets::Secret>,
    pub tls: Option<TlsConfig>,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            root: "ror".into(),
            pool: None,
            encoding: Encoding::Msgpack,
            results_qos: 1,
            keep_alive_s: 30,
            max_packet_bytes: 16 * 1024 * 1024,
            outbox_capacity: 1024,
            username: None,
            password: None,
            tls: None,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Seconds between two Metrics messages (1 to [`MAX_METRICS_INTERVAL_S`]).
    pub interval_s: u64,
    /// `host:port` of an optional Prometheus text endpoint (`GET /metrics`)
    /// with the same counters and latency histograms. Unset: none.
    pub prometheus_listen: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval_s: 10,
            prometheus_listen: None,
        }
    }
}

/// Longest `supervision.stall_timeout_s` accepted: one hour.
pub const MAX_STALL_TIMEOUT_S: u64 = 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Seconds a part (the inference thread, a decode worker, a bus task)
    /// may spend on one piece of work before the agent counts it as wedged:
    /// it then stops the systemd watchdog's pings, and exits after twice
    /// this time (1 to [`MAX_STALL_TIMEOUT_S`]).
    pub stall_timeout_s: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            stall_timeout_s: 30,
        }
    }
}

impl SupervisionConfig {
    pub fn stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_timeout_s.clamp(1, MAX_STALL_TIMEOUT_S))
    }
}

impl MetricsConfig {
    /// The period between Metrics messages: `interval_s` held within 1 s
    /// and [`MAX_METRICS_INTERVAL_S`], so that timers built on it cannot
    /// overflow even for a config that skipped validation.
    pub fn period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_s.clamp(1, MAX_METRICS_INTERVAL_S))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Ed25519 public keys trusted to sign reference-DB updates: key id ->
    /// hex or base64 of the 32-byte public key. Several at once allow a
    /// key rotation. Empty: every update is rejected.
    pub trusted_keys: std::collections::BTreeMap<String, String>,
    /// Applied update ids remembered to answer `duplicate`; the oldest are
    /// pruned beyond it (a replay that old is `stale` anyway).
    pub remember_updates: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            trusted_keys: Default::default(),
            remember_updates: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `retail_agent=debug`. `RUST_LOG` wins.
    pub filter: String,
    /// Log lines as JSON (for journald / log shippers).
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            json: false,
        }
    }
}

/// A configuration as loaded, with the directory relative paths refer to.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: AgentConfig,
    pub base_dir: PathBuf,
}

impl LoadedConfig {
    /// Reads `path`, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_toml(&text, path, base_dir, std::env::vars())
    }

    /// Parses `text` (read from `origin`), applies the overrides found in
    /// `env` and validates.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        base_dir: PathBuf,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| syntax_error(origin, text, &e))?;
        let mut overrides = Vec::new();
        for (var, raw) in env {
            if let Some(key) = var.strip_prefix(ENV_PREFIX) {
                match override_key(key) {
                    Ok(key) => overrides.push(EnvOverride { var, key, raw }),
                    Err(message) => return Err(ConfigError::Env { var, message }),
                }
            }
        }
        let config = deserialize_with_overrides(table, &overrides, origin)?;
        let loaded = Self { config, base_dir };
        loaded.validate()?;
        Ok(loaded)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.resolve(&self.config.model.manifest)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.config.state_dir)
    }

    pub fn refdb_dir(&self) -> PathBuf {
        self.state_dir().join("refdb")
    }

    pub fn engine_cache_dir(&self) -> PathBuf {
        self.state_dir().join("trt-engines")
    }

    /// Checks the values on their own (no file-system access): ranges,
    /// names, combinations.
    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if c.device_id.is_empty() || c.device_id.contains(['/', '+', '#']) {
            return bad("device_id must be non-empty and contain no '/', '+' or '#'");
        }
        if c.fleet.is_empty() || c.fleet.contains(['/', '+', '#']) {
            return bad("fleet must be non-empty and contain no '/', '+' or '#'");
        }
        if c.bus.root.is_empty() || c.bus.root.contains(['+', '#']) {
            return bad("bus.root must be non-empty and contain no '+' or '#'");
        }
        if let Some(pool) = &c.bus.pool {
            if pool.is_empty() || pool.contains(['/', '+', '#']) {
                return bad("bus.pool must be non-empty and contain no '/', '+' or '#'");
            }
        }
        if c.bus.results_qos > 2 {
            return bad("bus.results_qos must be 0, 1 or 2");
        }
        if c.runtime.execution_providers.is_empty() {
            return bad(
                "runtime.execution_providers must list at least one provider (e.g. [\"cpu\"])",
            );
        }
        if c.recognition.top_k == 0 || c.recognition.top_k > 20 {
            return bad("recognition.top_k must be between 1 and 20");
        }
        if !(-1.0..=1.0).contains(&c.recognition.unknown_threshold) {
            return bad("recognition.unknown_threshold is a cosine similarity: between -1 and 1");
        }
        if c.pipeline.max_batch == 0
            || c.pipeline.queue_capacity == 0
            || c.pipeline.queue_max_bytes == 0
        {
            return bad("pipeline.max_batch, pipeline.queue_capacity and pipeline.queue_max_bytes must be at least 1");
        }
        if c.pipeline.max_batch > MAX_BATCH {
            return bad(&format!(
                "pipeline.max_batch must be at most {MAX_BATCH} (got {})",
                c.pipeline.max_batch
            ));
        }
        if c.limits.max_crops == 0 || c.limits.max_dimension == 0 || c.limits.max_pixels == 0 {
            return bad("limits.* must be at least 1");
        }
        if c.fleet_updates.remember_updates == 0 {
            return bad("fleet_updates.remember_updates must be at least 1");
        }
        if c.metrics.interval_s == 0 {
            return bad("metrics.interval_s must be at least 1");
        }
        if c.metrics.interval_s > MAX_METRICS_INTERVAL_S {
            return Err(ConfigError::Invalid(format!(
                "metrics.interval_s must be at most {MAX_METRICS_INTERVAL_S} (one day)"
            )));
        }
        if let Some(listen) = &c.metrics.prometheus_listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "metrics.prometheus_listen must be an address and port such as \"127.0.0.1:9464\" (got {listen:?})"
                )));
            }
        }
        if c.supervision.stall_timeout_s == 0 || c.supervision.stall_timeout_s > MAX_STALL_TIMEOUT_S
        {
            return Err(ConfigError::Invalid(format!(
                "supervision.stall_timeout_s must be between 1 and {MAX_STALL_TIMEOUT_S}"
            )));
        }
        if c.bus.reconnect_min_ms == 0 || c.bus.reconnect_max_ms < c.bus.reconnect_min_ms {
            return bad("bus.reconnect_min_ms must be >= 1 and <= bus.reconnect_max_ms");
        }
        if c.bus.host.trim().is_empty() {
            return bad("bus.host must not be empty");
        }
        if c.bus.port == 0 {
            return bad("bus.port must be between 1 and 65535");
        }
        if c.bus.max_packet_bytes < MIN_PACKET_BYTES {
            return Err(ConfigError::Invalid(format!(
                "bus.max_packet_bytes must be at least {MIN_PACKET_BYTES} (no request fits in less)"
            )));
        }
        if c.bus.keep_alive_s > MAX_KEEP_ALIVE_S {
            return Err(ConfigError::Invalid(format!(
                "bus.keep_alive_s must be at most {MAX_KEEP_ALIVE_S} (MQTT's limit)"
            )));
        }
        if let Some(tls) = &c.bus.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return bad(
                    "bus.tls.cert_file and bus.tls.key_file go together: set both for mutual TLS, or neither",
                );
            }
        }
        Ok(())
    }

    /// The TLS settings with their paths resolved against the config
    /// file's directory.
    pub fn resolved_tls(&self) -> Option<TlsConfig> {
        self.config.bus.tls.as_ref().map(|tls| TlsConfig {
            ca_file: self.resolve(&tls.ca_file),
            cert_file: tls.cert_file.as_ref().map(|p| self.resolve(p)),
            key_file: tls.key_file.as_ref().map(|p| self.resolve(p)),
        })
    }

    /// Checks that the state directory is a directory that exists or can be
    /// created and is writable (part of `crate::preflight`; loading does not
    /// call it, so that parsing stays free of file-system access).
    pub fn check_state_dir(&self) -> Result<(), ConfigError> {
        check_writable_dir(&self.state_dir()).map_err(|message| ConfigError::Unusable {
            key: "state_dir".into(),
            message,
        })?;
        let refdb = self.refdb_dir();
        if refdb.exists() && !refdb.is_dir() {
            return Err(ConfigError::Unusable {
                key: "state_dir".into(),
                message: format!(
                    "{} is not a directory (the reference DB lives there)",
                    refdb.display()
                ),
            });
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.config.clone();
        if c.bus.password.is_some() {
            c.bus.password = Some(crate::secrets::Secret::new(crate::secrets::MASK));
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

/// Whether `dir` is a writable directory, or can be created: the nearest
/// existing ancestor must be a writable directory. Nothing is left behind.
fn check_writable_dir(dir: &Path) -> Result<(), String> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(if existing == dir {
            format!("{} exists and is not a directory", dir.display())
        } else {
            format!(
                "{} cannot be created: {} is not a directory",
                dir.display(),
                existing.display()
            )
        });
    }
    // A probe file tells the truth where mode bits do not (root, ACLs,
    // read-only mounts).
    tempfile::tempfile_in(existing).map_err(|e| {
        if existing == dir {
            format!("{} is not writable: {e}", dir.display())
        } else {
            format!(
                "{} cannot be created: {} is not writable: {e}",
                dir.display(),
                existing.display()
            )
        }
    })?;
    Ok(())
}

/// The location and line/column of a TOML syntax error.
fn syntax_error(origin: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column)
        }
        None => (1, 1),
    };
    ConfigError::Parse {
        path: origin.to_path_buf(),
        line,
        column,
        message: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// One `RETAIL_AGENT__…` environment variable.
struct EnvOverride {
    var: String,
    /// Lower-cased key path, e.g. `["bus", "port"]`.
    key: Vec<String>,
    raw: String,
}

/// The key path that `SECTION__KEY` names (lower-cased, `__`-separated).
fn override_key(key: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = key.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(String::is_empty) {
        return Err("empty key segment".into());
    }
    Ok(parts)
}

/// Keys whose values are secrets: errors about them never quote the value.
const SECRET_KEYS: &[&str] = &["bus.password"];

/// Applies `overrides` to `table` and deserializes the result. Each
/// override is first read as a TOML value (numbers, booleans, arrays); when
/// the configuration then fails to deserialize at exactly that key, it is
/// read again as the raw string (`RETAIL_AGENT__BUS__PASSWORD=123456` is a
/// password, not a number). Errors name the key that is wrong.
fn deserialize_with_overrides(
    table: toml::Table,
    overrides: &[EnvOverride],
    origin: &Path,
) -> Result<AgentConfig, ConfigError> {
    let mut as_string = vec![false; overrides.len()];
    loop {
        let mut value = table.clone();
        for (o, &raw) in overrides.iter().zip(&as_string) {
            let v = if raw {
                toml::Value::String(o.raw.clone())
            } else {
                parse_env_value(&o.raw)
            };
            set_key(&mut value, &o.key, v).map_err(|message| ConfigError::Env {
                var: o.var.clone(),
                message,
            })?;
        }
        let err = match serde_path_to_error::deserialize(toml::Value::Table(value)) {
            Ok(config) => return Ok(config),
            Err(err) => err,
        };
        let failed = map_keys(err.path());
        let key = display_key(err.path());
        let message = if SECRET_KEYS.contains(&key.as_str()) {
            // serde quotes the offending value ("invalid type: integer
            // `123456`"): never for a secret.
            "must be a string (the value is not shown: it is a secret)".to_string()
        } else {
            err.inner().message().trim_end().to_string()
        };
        // The last variable setting a key is the one that counts.
        let culprit = overrides
            .iter()
            .rposition(|o| failed.as_ref() == Some(&o.key));
        match culprit {
            Some(i) if !as_string[i] && !parse_env_value(&overrides[i].raw).is_str() => {
                as_string[i] = true;
            }
            Some(i) => {
                return Err(ConfigError::EnvValue {
                    var: overrides[i].var.clone(),
                    key,
                    message,
                })
            }
            None => {
                return Err(ConfigError::Schema {
                    path: origin.to_path_buf(),
                    key,
                    message,
                })
            }
        }
    }
}

/// The key names of `path` when it is made of map keys only.
fn map_keys(path: &serde_path_to_error::Path) -> Option<Vec<String>> {
    path.iter()
        .map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

/// `path` as a dotted key, e.g. `bus.port`; the top level as such.
fn display_key(path: &serde_path_to_error::Path) -> String {
    if path.iter().next().is_none() {
        "(top level)".into()
    } else {
        path.to_string()
    }
}

/// Sets the key at `path` in `table` to `value`, creating sections.
fn set_key(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, sections) = path.split_last().ok_or("empty key")?;
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{section}` is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// `raw` read as a TOML value when it parses as one, else as a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&probe) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<LoadedConfig, ConfigError> {
        LoadedConfig::from_toml(
            text,
            Path::new("test.toml"),
            PathBuf::from("/etc/retail-agent"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = load("", &[]).unwrap().config;
        assert_eq!(c.bus.port, 1883);
        assert_eq!(c.bus.root, "ror");
        assert_eq!(c.bus.max_packet_bytes, 16 * 1024 * 1024);
        assert_eq!(c.recognition.prototypes_per_class, 0);
        assert_eq!(c.device_id, default_device_id());
    }

    #[test]
    fn environment_overrides_nested_keys_with_typed_values() {
        let c = load(
            "[bus]\nport = 1883\n",
            &[
                ("RETAIL_AGENT__BUS__PORT", "1999"),
                ("RETAIL_AGENT__BUS__HOST", "broker.local"),
                ("RETAIL_AGENT__RUNTIME__EXECUTION_PROVIDERS", "[\"cpu\"]"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap()
        .config;
        assert_eq!(c.bus.port, 1999);
        assert_eq!(c.bus.host, "broker.local");
        assert_eq!(
            c.runtime.execution_providers,
            vec![ExecutionProviderKind::Cpu]
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load("[bus]\nhots = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("hots"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c = load("state_dir = \"state\"\n", &[]).unwrap();
        assert_eq!(c.state_dir(), PathBuf::from("/etc/retail-agent/state"));
    }

    #[test]
    fn masked_output_hides_the_password() {
        let c = load("[bus]\npassword = \"hunter2\"\n", &[]).unwrap();
        let shown = c.to_masked_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("********"));
    }

    #[test]
    fn the_password_never_appears_in_debug_output_or_errors() {
        let c = load("[bus]\npassword = \"hunter2\"\n", &[]).unwrap();
        let debug = format!("{c:?} {:?}", c.config.bus);
        assert!(!debug.contains("hunter2"), "{debug}");
        for text in [
            "[bus]\npassword = 7654321\n",
            "[bus]\npassword = [\"hunter2\"]\n",
            "[bus]\npassword = hunter2\n",
            "[bus]\npassword = \"hunter2\n",
        ] {
            let err = load(text, &[]).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains("7654321") && !shown.contains("hunter2"),
                "{text}: {shown}"
            );
        }
        let err = load("[bus]\npassword = 7654321\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bus.password"), "{err}");
    }

    #[test]
    fn syntax_errors_are_not_valid_toml_with_line_and_column() {
        let err = load("[bus]\nport = = 3\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("not valid TOML") && text.contains("line 2"),
            "{text}"
        );
    }

    #[test]
    fn type_errors_name_the_key_and_are_not_called_invalid_toml() {
        let err = load("[bus]\nport = \"18851\"\n", &[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Schema { key, .. } if key == "bus.port"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("bus.port: invalid type: string \"18851\", expected u16"),
            "{text}"
        );
        assert!(!text.contains("not valid TOML"), "{text}");
        let err = load("[bus.tls]\nca_file = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bus.tls.ca_file"), "{err}");
    }

    #[test]
    fn environment_overrides_fall_back_to_a_string_for_string_keys() {
        let c = load(
            "",
            &[
                ("RETAIL_AGENT__BUS__PASSWORD", "123456"),
                ("RETAIL_AGENT__DEVICE_ID", "42"),
                ("RETAIL_AGENT__BUS__USERNAME", "true"),
                ("RETAIL_AGENT__BUS__PORT", "1999"),
            ],
        )
        .unwrap()
        .config;
        assert_eq!(
            c.bus.password.as_ref().map(crate::secrets::Secret::expose),
            Some("123456")
        );
        assert_eq!(c.device_id, "42");
        assert_eq!(c.bus.username.as_deref(), Some("true"));
        assert_eq!(c.bus.port, 1999);
    }

    #[test]
    fn environment_overrides_of_the_wrong_type_name_the_variable_and_key() {
        let err = load("", &[("RETAIL_AGENT__BUS__PORT", "abc")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("RETAIL_AGENT__BUS__PORT") && text.contains("bus.port"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_prometheus_address_or_stall_timeout_is_rejected_naming_the_key() {
        let err = load("[metrics]\nprometheus_listen = \"localhost\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.prometheus_listen"), "{err}");
        load("[metrics]\nprometheus_listen = \"127.0.0.1:9464\"\n", &[]).unwrap();
        for bad in [0, MAX_STALL_TIMEOUT_S + 1] {
            let err = load(&format!("[supervision]\nstall_timeout_s = {bad}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("supervision.stall_timeout_s"), "{err}");
        }
    }

    #[test]
    fn a_zero_port_is_rejected() {
        let err = load("[bus]\nport = 0\n", &[]).unwrap_err().to_string();
        assert!(err.contains("bus.port"), "{err}");
    }

    #[test]
    fn a_packet_limit_too_small_for_a_request_is_rejected() {
        for bytes in [0, 1023] {
            let err = load(&format!("[bus]\nmax_packet_bytes = {bytes}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("bus.max_packet_bytes"), "{err}");
        }
        load("[bus]\nmax_packet_bytes = 1024\n", &[]).unwrap();
    }

    #[test]
    fn a_max_batch_beyond_the_bound_is_rejected() {
        let err = load("[pipeline]\nmax_batch = 1025\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pipeline.max_batch"), "{err}");
        load("[pipeline]\nmax_batch = 1024\n", &[]).unwrap();
    }

    #[test]
    fn a_metrics_interval_beyond_a_day_is_rejected() {
        let err = load("[metrics]\ninterval_s = 9223372036854775807\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.interval_s"), "{err}");
        load("[metrics]\ninterval_s = 86400\n", &[]).unwrap();
    }

    #[test]
    fn the_metrics_period_is_bounded_even_without_validation() {
        for interval_s in [0, 9_223_372_036_854_775_807, u64::MAX] {
            let period = MetricsConfig {
                interval_s,
                prometheus_listen: None,
            }
            .period();
            assert!(period >= std::time::Duration::from_secs(1));
            assert!(period <= std::time::Duration::from_secs(MAX_METRICS_INTERVAL_S));
            // What the metrics task does with it must not overflow.
            let _ = std::time::Instant::now() + period;
        }
    }

    #[test]
    fn a_client_certificate_without_a_key_is_rejected() {
        for tls in [
            "[bus.tls]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\n",
            "[bus.tls]\nca_file = \"ca.pem\"\nkey_file = \"c.key\"\n",
        ] {
            let err = load(tls, &[]).unwrap_err().to_string();
            assert!(
                err.contains("cert_file") && err.contains("key_file"),
                "{err}"
            );
        }
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = load("[recognition]\ntop_k = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_k"), "{err}");
    }
}
