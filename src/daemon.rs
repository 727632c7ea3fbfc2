//! The running agent: wires config → engine → reference DB → pipeline →
//! bus, and shuts it all down once, in order.
//!
//! [`Agent::start`] returns when the agent is serving (or has failed to
//! load); [`Agent::stop`] is the one graceful shutdown path, used for
//! SIGTERM/SIGINT, by the demo and by tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::bus::{self, EventLoopTask, PublisherTask, StatusSource, Topics};
use crate::bus::{Outbound, ToBus};
use crate::config::{ExecutionProviderKind, LoadedConfig, PipelineConfig};
use crate::fleet::rules::{Identity, ModelIdentity};
use crate::fleet::session::UpdateSession;
use crate::fleet::UpdateReceiver;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::budget::ThreadBudget;
use crate::pipeline::{Pipeline, PipelineContext};
use crate::protocol::{self, AgentState, ModelRef};
use crate::recognizer::{engine_options, open_refdb_recovering, Recognizer};
use crate::refdb::RefDb;
use crate::supervisor::{runtime_pulse, Supervisor};
use crate::vision::DecodeLimits;
use crate::watchdog::{Notifier, EXTEND_BY, EXTEND_EVERY};

/// Longest a graceful stop waits for in-flight work and the broker.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Agent {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    refdb: Arc<RefDb>,
    status: Arc<StatusSource>,
    topics: Topics,
    client: bus::BusClient,
    out: mpsc::Sender<ToBus>,
    accepting: Arc<AtomicBool>,
    stopping: watch::Sender<bool>,
    connected: watch::Receiver<bool>,
    subscribed: watch::Receiver<bool>,
    health: Health,
    updates: UpdateSession,
    event_loop: JoinHandle<()>,
    publisher: JoinHandle<()>,
    metrics_task: JoinHandle<()>,
    prometheus: Option<JoinHandle<()>>,
    pulse: JoinHandle<()>,
}

/// Waits (up to 5 s) until the publisher has handed everything sent to the
/// bus so far to the MQTT client.
async fn flush_bus(out: &mpsc::Sender<ToBus>) {
    let (done_tx, done_rx) = oneshot::channel();
    if out.send(ToBus::Flush(done_tx)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
    }
}

impl Agent {
    /// Loads the model and the reference DB, starts the pipeline and
    /// connects to the broker (in the background: an unreachable broker is
    /// retried, not fatal).
    pub async fn start(cfg: LoadedConfig) -> anyhow::Result<Self> {
        let checked = crate::preflight::check(&cfg)?;
        // Bound first: a port in use fails the start before anything runs.
        let prometheus_listener = match &cfg.config.metrics.prometheus_listen {
            Some(addr) => Some(crate::prometheus::bind(addr).await?),
            None => None,
        };
        let cfg = Arc::new(cfg);
        let keys = checked.trusted_keys;
        // ONNX Runtime's threading does not depend on the provider; the
        // decode workers' share does, so it is derived again once known.
        let cpu_budget =
            ThreadBudget::for_this_machine(&cfg.config.runtime, &cfg.config.pipeline, false);
        let (engine, refdb, refdb_reset) = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut options = engine_options(&cfg);
                options.runtime = cpu_budget.apply(&options.runtime);
                let mut recognizer = Recognizer::with_options(&cfg, &options)?;
                let (refdb, reset) = open_refdb_recovering(&cfg, &mut recognizer)
                    .context("opening the reference DB")?;
                Ok((recognizer.into_engine(), refdb, reset))
            })
            .await
            .context("loading the model")??
        };
        let c = &cfg.config;
        let refdb = Arc::new(refdb);
        let meta = refdb.meta();
        let model = ModelRef {
            id: engine.manifest().id().to_string(),
            fingerprint: engine.manifest().fingerprint().to_string(),
        };
        let engine_model = model.clone();
        let provider_name = engine.provider().name();
        info!(
            device_id = %c.device_id,
            model = %model.id,
            fingerprint = %model.fingerprint,
            provider = engine.provider().name(),
            refdb_version = meta.version,
            refs = meta.refs,
            labels = meta.labels,
            "agent starting"
        );
        let topics = bus::topics::for_agent(c);
        let metrics = Arc::new(Metrics::default());
        let health = Health::new(c.supervision.stall_timeout());
        let (out_tx, out_rx) = mpsc::channel::<ToBus>(1024);
        let mut status = StatusSource::new(
            c.device_id.clone(),
            c.fleet.clone(),
            model.clone(),
            engine.provider().name().to_string(),
            refdb.clone(),
            c.bus.encoding,
        );
        status.refdb_reset = refdb_reset;
        let status = Arc::new(status);
        let update_model = ModelIdentity {
            fingerprint: model.fingerprint.clone(),
            dim: engine.dim(),
            max_image_bytes: c.limits.max_image_bytes,
        };
        let ctx = PipelineContext {
            device_id: c.device_id.clone(),
            model,
            default_encoding: c.bus.encoding,
            limits: DecodeLimits::from(&c.limits),
            max_crops: c.limits.max_crops,
            default_top_k: c.recognition.top_k,
            unknown_threshold: c.recognition.unknown_threshold,
            metrics: metrics.clone(),
            refdb: refdb.clone(),
            out: out_tx.clone(),
            health: health.clone(),
            logs: Default::default(),
        };
        let gpu = engine.provider() != ExecutionProviderKind::Cpu;
        let budget = ThreadBudget::for_this_machine(&c.runtime, &c.pipeline, gpu);
        info!(
            cores = budget.cores,
            intra_threads = budget.intra_threads,
            allow_spinning = budget.allow_spinning,
            decode_workers = budget.decode_workers,
            io_threads = budget.io_threads,
            "thread budget"
        );
        let pipeline_cfg = PipelineConfig {
            decode_workers: budget.decode_workers,
            ..c.pipeline.clone()
        };
        let pipeline =
            Arc::new(Pipeline::start(ctx, engine, &pipeline_cfg).context("starting the pipeline")?);
        if keys.is_empty() {
            warn!(
                "fleet_updates.trusted_keys is empty: every reference-DB update will be rejected"
            );
        }
        let updates = UpdateSession::start(
            &cfg,
            &topics,
            Arc::new(UpdateReceiver::new(
                keys,
                Identity {
                    fleet: c.fleet.clone(),
                    device_id: c.device_id.clone(),
                },
                update_model,
                refdb.clone(),
                pipeline.clone(),
            )),
            status.clone(),
            out_tx.clone(),
            &health,
        )?;
        // Subscribed to updates before the Status says "online": an update
        // a back end sends on seeing it must reach this agent even on its
        // first connection (later ones have a persistent session). An
        // unreachable broker is not waited for.
        if !updates.wait_subscribed(Duration::from_secs(5)).await {
            warn!("the update session is not subscribed yet; going on");
        }
        let options = bus::mqtt_options(&cfg, &status, &topics)?;
        // rumqttc's own request channel carries only the DISCONNECT at
        // shutdown; everything else goes through the outbox (bus::client).
        let (client, eventloop) = rumqttc::AsyncClient::new(options, 16);
        let client = bus::BusClient::new(client, Arc::new(bus::Outbox::new(bus::OUTBOX_CAPACITY)));
        let (connected_tx, connected_rx) = watch::channel(false);
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let (stopping_tx, stopping_rx) = watch::channel(false);
        let pulse = tokio::spawn(runtime_pulse(health.clone()));
        let prometheus = match prometheus_listener {
            Some(listener) => {
                let exported = Arc::new(crate::prometheus::Exported {
                    metrics: metrics.clone(),
                    refdb: refdb.clone(),
                    health: health.clone(),
                    device_id: c.device_id.clone(),
                    model_id: engine_model.id.clone(),
                    fingerprint: engine_model.fingerprint.clone(),
                    provider: provider_name.to_string(),
                });
                Some(tokio::spawn(crate::prometheus::serve(
                    listener,
                    exported,
                    stopping_rx.clone(),
                )))
            }
            None => None,
        };
        let accepting = Arc::new(AtomicBool::new(true));
        let acks = Arc::new(bus::AckSequencer::default());
        let event_loop = tokio::spawn(
            EventLoopTask {
                eventloop,
                client: client.clone(),
                topics: topics.clone(),
                status: status.clone(),
                requests: pipeline.clone(),
                metrics: metrics.clone(),
                acks: acks.clone(),
                out: out_tx.clone(),
                connected: connected_tx,
                accepting: accepting.clone(),
                stopping: stopping_rx,
                reconnect_min: Duration::from_millis(c.bus.reconnect_min_ms),
                reconnect_max: Duration::from_millis(c.bus.reconnect_max_ms),
                max_request_bytes: c.bus.max_packet_bytes,
                warn_duplicate: AtomicBool::new(true),
                subscribed: subscribed_tx,
                health: health.clone(),
                hard_limit_log: crate::log_summary::FloodLog::new(
                    "reading from the broker paused at the queue's hard limit",
                ),
            }
            .run(),
        );
        let publisher = tokio::spawn(
            PublisherTask {
                client: client.clone(),
                rx: out_rx,
                connected: connected_rx.clone(),
                topics: topics.clone(),
                results_qos: c.bus.results_qos,
                capacity: c.bus.outbox_capacity,
                metrics: metrics.clone(),
                acks,
                max_packet_bytes: c.bus.max_packet_bytes,
                health: health.clone(),
            }
            .run(),
        );
        let metrics_task = {
            let (metrics, out, device, encoding) = (
                metrics.clone(),
                out_tx.clone(),
                c.device_id.clone(),
                c.bus.encoding,
            );
            let every = c.metrics.period();
            let beat = health.register("metrics");
            tokio::spawn(async move {
                let _beat = beat;
                let start = tokio::time::Instant::now();
                let first = start.checked_add(every).unwrap_or(start);
                let mut tick = tokio::time::interval_at(first, every);
                loop {
                    tick.tick().await;
                    let m = metrics.take_interval(&device);
                    let msg = Outbound::Metrics {
                        payload: protocol::encode(&m, encoding),
                    };
                    if out.send(ToBus::Send(msg)).await.is_err() {
                        break;
                    }
                }
            })
        };
        Ok(Self {
            pipeline,
            metrics,
            refdb,
            status,
            topics,
            client,
            out: out_tx,
            accepting,
            stopping: stopping_tx,
            connected: connected_rx,
            subscribed: subscribed_rx,
            health,
            updates,
            event_loop,
            publisher,
            metrics_task,
            prometheus,
            pulse,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn refdb(&self) -> &Arc<RefDb> {
        &self.refdb
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn boot_id(&self) -> String {
        self.status.boot_id()
    }

    /// Waits until the agent is connected to the broker.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the broker has acknowledged the subscriptions of both
    /// connections (requests, and reference-DB updates): from then on the
    /// agent receives everything addressed to it.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribed.clone();
        let both = async {
            rx.wait_for(|s| *s).await.is_ok() && self.updates.wait_subscribed(timeout).await
        };
        tokio::time::timeout(timeout, both).await.unwrap_or(false)
    }

    /// The liveness of the agent's threads and tasks.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Graceful stop: stop taking requests, finish the in-flight ones,
    /// publish them and the offline Status, disconnect, flush the DB.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.health.begin_stop();
        info!("stopping: no new requests; finishing in-flight ones");
        self.accepting.store(false, Ordering::Release);
        // The update in progress needs the inference thread: finish it first.
        self.updates.stop(STOP_TIMEOUT).await;
        let pipeline = self.pipeline.clone();
        let left = tokio::time::timeout(
            STOP_TIMEOUT,
            tokio::task::spawn_blocking(move || pipeline.shutdown()),
        )
        .await;
        match left {
            Ok(Ok(left)) if !left.is_empty() => {
                info!(
                    count = left.len(),
                    "requests never started are left unacknowledged for redelivery"
                );
            }
            Ok(_) => {}
            Err(_) => warn!("in-flight requests did not finish within {STOP_TIMEOUT:?}"),
        }
        drop(self.pipeline);
        self.metrics_task.abort();
        self.pulse.abort();
        if let Some(p) = &self.prometheus {
            p.abort();
        }
        flush_bus(&self.out).await;
        let connected = *self.connected.borrow();
        // Set first: the event loop watches for the offline Status's echo.
        let _ = self.stopping.send(true);
        if connected {
            let payload = self.status.status_payload(AgentState::Offline);
            let status = ToBus::Send(Outbound::Status { payload });
            if self.out.send(status).await.is_ok() {
                flush_bus(&self.out).await;
            }
        }
        // The event loop disconnects once the broker has acknowledged the
        // offline Status; if that does not happen in time, disconnect anyway.
        let mut event_loop = self.event_loop;
        if tokio::time::timeout(Duration::from_secs(5), &mut event_loop)
            .await
            .is_err()
        {
            if connected {
                warn!("the broker did not acknowledge the offline status in time");
                let _ = self.client.try_disconnect();
            }
            if tokio::time::timeout(Duration::from_secs(2), &mut event_loop)
                .await
                .is_err()
            {
                warn!("the broker connection did not close in time");
                event_loop.abort();
            }
        }
        drop(self.out);
        self.publisher.abort();
        self.refdb.flush().context("flushing the reference DB")?;
        info!("stopped");
        Ok(())
    }
}

/// `retail-agent run`: serve until SIGTERM or SIGINT, then stop gracefully.
///
/// Under systemd (`Type=notify`): while the model loads (a first TensorRT
/// engine build takes minutes) and until the broker has acknowledged the
/// subscriptions, the start timeout is extended every [`EXTEND_EVERY`];
/// `READY=1` follows. From then on the [`Supervisor`] pings the watchdog only
/// while every part of the agent is healthy, and exits when one dies or
/// stays wedged.
pub async fn run_until_signal(cfg: LoadedConfig) -> anyhow::Result<()> {
    let notifier = Notifier::from_env();
    let broker = format!("{}:{}", cfg.config.bus.host, cfg.config.bus.port);
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let start = Agent::start(cfg);
    tokio::pin!(start);
    let mut extend = tokio::time::interval(EXTEND_EVERY);
    let agent = loop {
        tokio::select! {
            agent = &mut start => break agent?,
            _ = extend.tick() => notifier.extend_start(
                EXTEND_BY,
                "loading the model and the reference DB (a first TensorRT engine build takes minutes)",
            ),
            _ = &mut signal => {
                notifier.stopping();
                info!("stopped while loading");
                return Ok(());
            }
        }
    };
    let waiting = format!("waiting for the broker at {broker} to acknowledge the subscriptions");
    loop {
        notifier.extend_start(EXTEND_BY, &waiting);
        tokio::select! {
            ready = agent.wait_ready(EXTEND_EVERY) => if ready { break },
            _ = &mut signal => {
                notifier.stopping();
                return agent.stop().await;
            }
        }
    }
    notifier.ready("serving");
    info!(
        watchdog_s = notifier.watchdog_timeout().map(|t| t.as_secs_f64()),
        "ready"
    );
    let supervisor = Supervisor::spawn(agent.health().clone(), notifier.clone())
        .context("starting the supervision thread")?;
    signal.await;
    supervisor.stop();
    notifier.stopping();
    agent.stop().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
