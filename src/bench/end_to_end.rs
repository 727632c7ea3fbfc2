//! The daemon end to end: the agent binary (`retail-agent run`) in its own
//! process, with the production thread budget, serving a Mosquitto that
//! the bench starts on a free loopback port (the configured broker when
//! Mosquitto is not installed), loaded by the bench's own MQTT client (one
//! thread; see `load_client`), with the synthetic products' 120 references.
//! Saturated crops/s at 1 and 8 crops per request (a fixed number in
//! flight), and round trips (publish to result received) p50/p95/p99 with
//! one single-crop request at a time, and under Poisson arrivals at 50% and
//! 90% of the single-crop saturation; the agent's resident memory
//! afterwards and its time from spawn to "online".
//!
//! Not measured: TLS (unless the configured broker uses it), QoS 0
//! overflow, several agents sharing a pool, large reference DBs (see
//! `memory`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::agent_process::{AgentProcess, Mosquitto};
use super::load_client::{LatencyFigures, LoadClient, Saturation};
use super::pipeline::{in_flight, CROPS_PER_REQUEST};
use super::{BenchError, BenchSetup, Resident};
use crate::config::{AgentConfig, BusConfig, LoadedConfig, PipelineConfig};

/// Longest wait for the agent to say "online" (model and DB loading).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Seeds of the Poisson arrivals at 50% and 90% of saturation.
const SEED_AT_50: u64 = 50;
const SEED_AT_90: u64 = 90;

/// The broker the agents under test use.
pub struct Broker {
    /// `[bus]` settings that reach it.
    pub bus: BusConfig,
    pub description: String,
    _mosquitto: Option<Mosquitto>,
}

impl Broker {
    /// Starts a Mosquitto of the bench's own, or falls back to the
    /// configured broker (with a warning) when Mosquitto is not installed.
    pub fn start(setup: &BenchSetup, progress: &dyn Fn(&str)) -> Result<Self, BenchError> {
        let configured = &setup.cfg.config.bus;
        match Mosquitto::binary() {
            Some(binary) => {
                let mosquitto = Mosquitto::start(&binary, &setup.work_dir("mosquitto"))?;
                let bus = BusConfig {
                    host: "127.0.0.1".into(),
                    port: mosquitto.port,
                    client_id: None,
                    pool: None,
                    username: None,
                    password: None,
                    tls: None,
                    ..configured.clone()
                };
                Ok(Self {
                    description: format!(
                        "Mosquitto on 127.0.0.1:{} (started by the bench: {})",
                        mosquitto.port,
                        binary.display()
                    ),
                    bus,
                    _mosquitto: Some(mosquitto),
                })
            }
            None => {
                let description = format!(
                    "the configured broker at {}:{} (Mosquitto is not installed: figures include that broker and its network)",
                    configured.host, configured.port
                );
                progress(&format!("warning: using {description}"));
                Ok(Self {
                    bus: BusConfig {
                        client_id: None,
                        pool: None,
                        tls: setup.cfg.resolved_tls(),
                        ..configured.clone()
                    },
                    description,
                    _mosquitto: None,
                })
            }
        }
    }

    /// The bench's config pointed at this broker (for its client).
    fn client_config(&self, setup: &BenchSetup) -> LoadedConfig {
        let mut cfg = setup.cfg.clone();
        cfg.config.bus = self.bus.clone();
        cfg
    }
}

/// `path` made absolute against the working directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The config of an agent under test: the bench's config with its own
/// device id, state directory, broker and pipeline settings, absolute
/// paths, quiet logs and no Prometheus endpoint.
fn agent_config(
    setup: &BenchSetup,
    broker: &Broker,
    state_dir: &Path,
    pipeline: &PipelineConfig,
    device_id: &str,
) -> AgentConfig {
    let mut c = setup.cfg.config.clone();
    c.device_id = device_id.to_string();
    c.state_dir = absolute(state_dir);
    c.model.manifest = absolute(&setup.manifest.manifest_path);
    c.runtime.onnxruntime_library = c
        .runtime
        .onnxruntime_library
        .map(|p| absolute(&setup.cfg.resolve(&p)));
    c.bus = broker.bus.clone();
    if let Some(tls) = &mut c.bus.tls {
        tls.ca_file = absolute(&tls.ca_file);
        tls.cert_file = tls.cert_file.as_deref().map(absolute);
        tls.key_file = tls.key_file.as_deref().map(absolute);
    }
    c.pipeline = pipeline.clone();
    c.metrics.prometheus_listen = None;
    c.log.filter = "warn".into();
    c.log.json = false;
    c
}

/// An agent process serving the broker, and a client subscribed to it.
pub struct AgentUnderTest {
    process: AgentProcess,
    client: LoadClient,
    /// Its `pipeline.max_batch`.
    max_batch: usize,
    /// Seconds from spawn to its Status "online" (model and DB loaded,
    /// subscriptions acknowledged).
    pub ready_s: f64,
}

impl AgentUnderTest {
    /// Writes its config, connects the client, spawns the agent and waits
    /// until it says "online". `name` names its files and device id.
    pub fn start(
        setup: &BenchSetup,
        broker: &Broker,
        state_dir: &Path,
        pipeline: &PipelineConfig,
        name: &str,
    ) -> Result<Self, BenchError> {
        let device_id = format!("bench-{}-{name}", std::process::id());
        let config = agent_config(setup, broker, state_dir, pipeline, &device_id);
        let dir = setup.work_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(BenchError::io(format!("creating {}", dir.display())))?;
        let config_path = dir.join("agent.toml");
        let text = toml::to_string(&config)
            .map_err(|e| BenchError::Agent(format!("cannot write its config: {e}")))?;
        // It may hold the broker's password: readable by its owner only.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&config_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(BenchError::io(format!("writing {}", config_path.display())))?;
        let topics = crate::bus::topics::for_agent(&config);
        let mut client = LoadClient::connect(
            &broker.client_config(setup),
            &topics,
            format!("{device_id}-load"),
        )?;
        let mut process =
            AgentProcess::spawn(setup.agent_binary(), &config_path, &dir.join("agent.log"))?;
        let online = client.wait_online(READY_TIMEOUT, &mut || process.check_running())?;
        let ready_s = online.duration_since(process.spawned).as_secs_f64();
        Ok(Self {
            process,
            client,
            max_batch: pipeline.max_batch,
            ready_s,
        })
    }

    /// `e`, with the end of the agent's log when it says something.
    fn explain(&self, e: BenchError) -> BenchError {
        let tail = self.process.log_tail();
        match e {
            BenchError::Client(m) if !tail.is_empty() => {
                BenchError::Client(format!("{m}; the agent's log ends:\n{tail}"))
            }
            other => other,
        }
    }

    pub fn saturate(
        &mut self,
        setup: &BenchSetup,
        crops: usize,
        window: Duration,
    ) -> Result<Saturation, BenchError> {
        let in_flight = in_flight(crops, self.max_batch);
        let Self {
            process, client, ..
        } = &mut *self;
        let measured = client.saturate(
            &setup.workload,
            crops,
            in_flight,
            (setup.durations.warmup, window),
            &mut || process.check_running(),
        );
        measured.map_err(|e| self.explain(e))
    }

    pub fn unloaded(
        &mut self,
        setup: &BenchSetup,
        samples: usize,
        max_time: Duration,
    ) -> Result<LatencyFigures, BenchError> {
        let Self {
            process, client, ..
        } = &mut *self;
        let measured = client.one_at_a_time(&setup.workload, samples, max_time, &mut || {
            process.check_running()
        });
        measured.map_err(|e| self.explain(e))
    }

    pub fn poisson(
        &mut self,
        setup: &BenchSetup,
        rate: f64,
        window: Duration,
        seed: u64,
    ) -> Result<LatencyFigures, BenchError> {
        let Self {
            process, client, ..
        } = &mut *self;
        let measured = client.poisson(
            &setup.workload,
            rate,
            (setup.durations.warmup, window),
            seed,
            &mut || process.check_running(),
        );
        measured.map_err(|e| self.explain(e))
    }

    /// A steady overload (see [`super::soak`]); `on_memory` gets the
    /// agent's resident memory about once a second.
    pub fn soak(
        &mut self,
        setup: &BenchSetup,
        rate: f64,
        window_and_drain: (Duration, Duration),
        on_memory: &mut dyn FnMut(Resident),
    ) -> Result<super::load_client::SoakTally, BenchError> {
        let Self {
            process, client, ..
        } = &mut *self;
        let measured = client.soak(&setup.workload, rate, window_and_drain, &mut |_| {
            process.check_running()?;
            on_memory(process.resident()?);
            Ok(())
        });
        measured.map_err(|e| self.explain(e))
    }

    /// Seconds from spawn to the answer of one single-crop request sent now.
    pub fn first_answer_s(&mut self, setup: &BenchSetup) -> Result<f64, BenchError> {
        let Self {
            process, client, ..
        } = &mut *self;
        let answered = client.round_trip(&setup.workload, &mut || process.check_running());
        let at = answered.map_err(|e| self.explain(e))?;
        Ok(at.duration_since(self.process.spawned).as_secs_f64())
    }

    pub fn resident(&self) -> Result<Resident, BenchError> {
        self.process.resident()
    }

    /// Stops the agent with SIGTERM (its graceful path), then the client.
    pub fn stop(self) -> Result<(), BenchError> {
        let Self {
            process, client, ..
        } = self;
        let stopped = process.stop();
        drop(client);
        stopped
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EndToEndFigures {
    pub max_batch: usize,
    pub max_delay_ms: u64,
    /// References in the served DB.
    pub refs: usize,
    /// Seconds from spawn to "online".
    pub ready_s: f64,
    pub saturated: Vec<Saturation>,
    /// One single-crop request at a time.
    pub unloaded: LatencyFigures,
    /// Poisson arrivals at 50% of the single-crop saturation.
    pub at_50_percent: LatencyFigures,
    /// Poisson arrivals at 90% of the single-crop saturation.
    pub at_90_percent: LatencyFigures,
    /// The agent's resident memory after all of it, and its peak.
    pub agent_rss_bytes: u64,
    pub agent_peak_rss_bytes: u64,
}

impl EndToEndFigures {
    pub fn saturated_at(&self, crops_per_request: usize) -> Option<&Saturation> {
        self.saturated
            .iter()
            .find(|s| s.crops_per_request == crops_per_request)
    }

    /// The highest saturated crops/s.
    pub fn best_crops_per_s(&self) -> f64 {
        self.saturated
            .iter()
            .map(|s| s.crops_per_s)
            .fold(0.0, f64::max)
    }
}

pub fn measure(
    setup: &BenchSetup,
    broker: &Broker,
    progress: &dyn Fn(&str),
) -> Result<EndToEndFigures, BenchError> {
    let d = setup.durations;
    let state = setup.state_dir("end-to-end")?;
    let refs = {
        let (db, _) = setup.enrol_demo_references(&state)?;
        db.flush()?;
        db.meta().refs as usize
    };
    let pipeline = &setup.cfg.config.pipeline;
    progress("end to end: starting the agent");
    let mut agent = AgentUnderTest::start(setup, broker, &state, pipeline, "end-to-end")?;
    let mut saturated = Vec::new();
    for crops in CROPS_PER_REQUEST {
        progress(&format!(
            "end to end: saturated, {crops} crop(s) per request"
        ));
        saturated.push(agent.saturate(setup, crops, d.window)?);
    }
    let single = saturated
        .iter()
        .find(|s| s.crops_per_request == 1)
        .map_or(0.0, |s| s.crops_per_s);
    progress("end to end: unloaded latency");
    let unloaded = agent.unloaded(setup, d.unloaded_samples, d.unloaded_time)?;
    progress("end to end: latency at 50% of saturation");
    let at_50_percent = agent.poisson(setup, 0.5 * single, d.window, SEED_AT_50)?;
    progress("end to end: latency at 90% of saturation");
    let at_90_percent = agent.poisson(setup, 0.9 * single, d.window, SEED_AT_90)?;
    let resident = agent.resident()?;
    let ready_s = agent.ready_s;
    agent.stop()?;
    Ok(EndToEndFigures {
        max_batch: pipeline.max_batch,
        max_delay_ms: pipeline.max_delay_ms,
        refs,
        ready_s,
        saturated,
        unloaded,
        at_50_percent,
        at_90_percent,
        agent_rss_bytes: resident.now,
        agent_peak_rss_bytes: resident.peak,
    })
}
