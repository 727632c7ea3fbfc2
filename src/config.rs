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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var} does not name a config key: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
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
    /// Threads ONNX Runtime uses inside one operator (0: its default).
    pub intra_threads: usize,
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
            intra_threads: 0,
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
}

impl Default for RecognitionConfig {
    fn default() -> Self {
        Self {
            top_k: 5,
            unknown_threshold: 0.5,
            prototypes_per_class: 0,
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
    /// Requests waiting to be decoded; beyond it `overflow` applies.
    pub queue_capacity: usize,
    pub overflow: OverflowPolicy,
    /// Largest inference batch.
    pub max_batch: usize,
    /// Longest time a crop waits for its batch to fill.
    pub max_delay_ms: u64,
    /// Decode/preprocess worker threads (0: number of CPUs).
    pub decode_workers: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            overflow: OverflowPolicy::DropOldest,
            max_batch: 8,
            max_delay_ms: 5,
            decode_workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Msgpack,
    Json,
}

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
    pub password: Option<String>,
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
    pub interval_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { interval_s: 10 }
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
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.message().to_string(),
        })?;
        for (var, raw) in env {
            if let Some(key) = var.strip_prefix(ENV_PREFIX) {
                apply_override(&mut value, key, &raw).map_err(|message| ConfigError::Env {
                    var: var.clone(),
                    message,
                })?;
            }
        }
        let config: AgentConfig =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin.to_path_buf(),
                    message: e.message().to_string(),
                })?;
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
        if c.pipeline.max_batch == 0 || c.pipeline.queue_capacity == 0 {
            return bad("pipeline.max_batch and pipeline.queue_capacity must be at least 1");
        }
        if c.limits.max_crops == 0 || c.limits.max_dimension == 0 || c.limits.max_pixels == 0 {
            return bad("limits.* must be at least 1");
        }
        if let Err(e) = crate::fleet::keys::TrustedKeys::parse(&c.fleet_updates.trusted_keys) {
            return Err(ConfigError::Invalid(format!(
                "fleet_updates.trusted_keys: {e}"
            )));
        }
        if c.fleet_updates.remember_updates == 0 {
            return bad("fleet_updates.remember_updates must be at least 1");
        }
        if c.metrics.interval_s == 0 {
            return bad("metrics.interval_s must be at least 1");
        }
        if c.bus.reconnect_min_ms == 0 || c.bus.reconnect_max_ms < c.bus.reconnect_min_ms {
            return bad("bus.reconnect_min_ms must be >= 1 and <= bus.reconnect_max_ms");
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.config.clone();
        if c.bus.password.is_some() {
            c.bus.password = Some("********".into());
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

/// Sets `section__key` (lower-cased, `__`-separated) to `raw`, read as a TOML
/// value when it parses as one (numbers, booleans, arrays) and as a string
/// otherwise.
fn apply_override(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), String> {
    let parts: Vec<String> = key.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(String::is_empty) {
        return Err("empty key segment".into());
    }
    let value = parse_env_value(raw);
    let (last, sections) = parts.split_last().ok_or("empty key")?;
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
    fn invalid_values_are_explained() {
        let err = load("[recognition]\ntop_k = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_k"), "{err}");
    }
}
