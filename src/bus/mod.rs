//! MQTT in and out: the connection to the broker, subscriptions, the
//! retained Status and its Last Will, and publishing with an outbox that
//! survives disconnections.
//!
//! Two tasks: the event loop (writes our outgoing requests from the
//! [`Outbox`] to the socket itself, then polls rumqttc; reconnects with
//! capped exponential backoff; routes incoming messages; reads less while
//! the pipeline is full, see [`flow`]) and the publisher (places outgoing
//! messages on their topics and hands them to the outbox without ever
//! waiting on it, keeps what the outbox cannot take yet in a backlog,
//! bounded while disconnected; acknowledges each request after its answer).
//! The payload types are in [`crate::protocol`]; what happens to a request
//! is the pipeline's business.

pub mod acks;
pub mod client;
pub mod connection;
pub mod flow;
pub mod message;
pub mod tls;
pub mod topics;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet,
    Publish, QoS, Request, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::{BusConfig, Encoding, LoadedConfig};
use crate::metrics::Metrics;
use crate::protocol::{self, AgentState, ModelRef, RefDbState, Status, StatusPeek, Will};
use crate::refdb::RefDb;
pub use acks::AckSequencer;
pub use client::{BusClient, Outbox};
pub use connection::{ConnectionAction, ConnectionEvent, ConnectionState, HEALTHY_CONNECTION};
pub use flow::Intake;
use message::fits_packet;
pub use message::{AckToken, Incoming, Outbound, RequestSink, ToBus};
pub use topics::Topics;

/// Facts the Status message reports.
pub struct StatusSource {
    pub device_id: String,
    pub fleet: String,
    pub model: ModelRef,
    pub execution_provider: String,
    pub started_ms: u64,
    pub refdb: Arc<RefDb>,
    pub encoding: Encoding,
    /// Set when the DB was found corrupt at start-up and reset.
    pub refdb_reset: Option<protocol::RefDbReset>,
    boot_id: Mutex<String>,
}

impl StatusSource {
    pub fn new(
        device_id: String,
        fleet: String,
        model: ModelRef,
        execution_provider: String,
        refdb: Arc<RefDb>,
        encoding: Encoding,
    ) -> Self {
        Self {
            device_id,
            fleet,
            model,
            execution_provider,
            started_ms: crate::clock::now_ms(),
            refdb,
            encoding,
            refdb_reset: None,
            boot_id: Mutex::new(new_boot_id()),
        }
    }

    pub fn boot_id(&self) -> String {
        self.boot_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn renew_boot_id(&self) -> String {
        let id = new_boot_id();
        *self.boot_id.lock().unwrap_or_else(|p| p.into_inner()) = id.clone();
        id
    }

    pub fn status(&self, state: AgentState) -> Status {
        let meta = self.refdb.meta();
        Status {
            state,
            device_id: self.device_id.clone(),
            fleet: self.fleet.clone(),
            boot_id: self.boot_id(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            model: self.model.clone(),
            execution_provider: self.execution_provider.clone(),
            refdb: RefDbState {
                version: meta.version,
                digest: meta.digest,
                refs: meta.refs,
                labels: meta.labels,
            },
            started_ms: self.started_ms,
            ts_ms: crate::clock::now_ms(),
            refdb_reset: self.refdb_reset.clone(),
        }
    }

    pub fn status_payload(&self, state: AgentState) -> Vec<u8> {
        protocol::encode(&self.status(state), self.encoding)
    }

    fn will(&self, topic: &str) -> LastWill {
        let will = Will {
            state: AgentState::Offline,
            device_id: self.device_id.clone(),
            boot_id: self.boot_id(),
        };
        LastWill::new(
            topic,
            protocol::encode(&will, self.encoding),
            QoS::AtLeastOnce,
            true,
        )
    }
}

/// A random 128-bit id, hex.
fn new_boot_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    crate::manifest::hex(&b)
}

pub(crate) fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The agent's MQTT client id: `bus.client_id`, else
/// `retail-agent-{device_id}` (stable, so the persistent session survives).
pub fn client_id(cfg: &LoadedConfig) -> String {
    cfg.config
        .bus
        .client_id
        .clone()
        .unwrap_or_else(|| format!("retail-agent-{}", cfg.config.device_id))
}

/// MQTT options of the agent's main session: [`connection_options`] with
/// the Last Will of its Status.
pub fn mqtt_options(
    cfg: &LoadedConfig,
    status: &StatusSource,
    topics: &Topics,
) -> anyhow::Result<MqttOptions> {
    let mut o = connection_options(cfg, client_id(cfg))?;
    o.set_last_will(status.will(&topics.status));
    Ok(o)
}

/// Largest packet MQTT 3.1.1 can carry (its remaining-length field's
/// maximum). The agent reads any packet the broker can send, so that one
/// message never costs it its connection: rumqttc drops a connection on a
/// larger packet than it accepts, and the broker then delivers the same
/// message again on every reconnection. Messages over `bus.max_packet_bytes`
/// are refused after reading (see [`EventLoopTask`]); reading one costs its
/// size in memory once.
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// QoS 1 publishes of ours (results, reports, Status) awaiting PUBACK: at
/// least our publish rate times how late PUBACKs come. Under an overload
/// they wait behind everything the broker sent first, read only as the
/// pipeline drains (several seconds behind an overshooting broker), while
/// results and the reports of dropped QoS 0 requests go out at up to the
/// offered rate (about 1,000/s in the bench's 2 x soak here); with 4,096 the
/// agent's QoS 0 Metrics, queued behind window-held publishes, stopped
/// reaching the broker during that soak, which we read as the window
/// staying full. rumqttc keeps each one until its PUBACK (a few hundred
/// bytes for a single-crop answer) in a slot table sized to the window.
pub const OWN_INFLIGHT: u16 = 16384;

/// Most requests the event loop writes from the outbox before it polls
/// again, so that reading goes on between batches.
const WRITE_BATCH: usize = 256;

/// Requests the outbox takes before the publisher keeps the rest in its
/// backlog (about four batches).
pub const OUTBOX_CAPACITY: usize = 1024;

/// MQTT options from the config for a session named `client_id`:
/// persistent session, manual acknowledgements, packet limits,
/// credentials, TLS.
pub fn connection_options(cfg: &LoadedConfig, client_id: String) -> anyhow::Result<MqttOptions> {
    let bus: &BusConfig = &cfg.config.bus;
    let mut o = MqttOptions::new(client_id, bus.host.clone(), bus.port);
    o.set_keep_alive(Duration::from_secs(bus.keep_alive_s.max(5)));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_max_packet_size(MQTT_MAX_PACKET, bus.max_packet_bytes);
    // rumqttc's default of 100 capped the answers at about 100/s under a
    // flood; see OWN_INFLIGHT.
    o.set_inflight(OWN_INFLIGHT);
    if let Some(user) = &bus.username {
        let password = bus.password.as_ref().map_or("", |p| p.expose());
        o.set_credentials(user.clone(), password);
    }
    if let Some(resolved) = cfg.resolved_tls() {
        let client = tls::client_config(&resolved)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client)));
    }
    Ok(o)
}

/// Everything the event-loop task works with.
pub struct EventLoopTask {
    pub eventloop: EventLoop,
    pub client: BusClient,
    pub topics: Topics,
    pub status: Arc<StatusSource>,
    pub requests: Arc<dyn RequestSink>,
    pub metrics: Arc<Metrics>,
    pub acks: Arc<AckSequencer>,
    pub out: mpsc::Sender<ToBus>,
    pub connected: watch::Sender<bool>,
    /// Cleared on shutdown: crop requests are then left unacknowledged.
    pub accepting: Arc<AtomicBool>,
    /// Set on shutdown: a disconnection ends the task.
    pub stopping: watch::Receiver<bool>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `bus.max_packet_bytes`: larger requests are refused, not queued.
    pub max_request_bytes: usize,
    /// Set on each connection; cleared once the "duplicate device_id"
    /// error has been logged for it.
    pub warn_duplicate: AtomicBool,
    /// True while the broker has acknowledged this connection's
    /// subscriptions (the daemon says READY only then).
    pub subscribed: watch::Sender<bool>,
    /// Where the task registers its heartbeat.
    pub health: crate::health::Health,
    /// Pauses at the queue's hard limit, logged at most every few seconds.
    pub hard_limit_log: crate::log_summary::FloodLog,
}

/// Capped exponential reconnection backoff with jitter: each delay is drawn
/// uniformly from [base/2, base], and the base doubles up to the maximum, so
/// a fleet that lost its broker does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            base: min,
        }
    }

    /// The delay before the next attempt; doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let base = self.base;
        self.base = (self.base * 2).min(self.max);
        let low = base / 2;
        let spread = (base - low).as_micros() as u64;
        low + Duration::from_micros(rand::thread_rng().gen_range(0..=spread))
    }

    /// After a healthy connection: start from the minimum again.
    pub fn reset(&mut self) {
        self.base = self.min;
    }
}

impl EventLoopTask {
    fn subscriptions(&self) -> Vec<rumqttc::SubscribeFilter> {
        let mut subs = vec![
            rumqttc::SubscribeFilter::new(self.topics.crops.clone(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(self.topics.status.clone(), QoS::AtLeastOnce),
        ];
        if let Some(pool) = &self.topics.pool_subscription {
            subs.push(rumqttc::SubscribeFilter::new(
                pool.clone(),
                QoS::AtLeastOnce,
            ));
        }
        subs
    }

    /// Polls the connection until shutdown; reconnects after errors.
    pub async fn run(mut self) {
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(10);
        self.eventloop.set_network_options(network);
        let mut session = ConnectionState::new(self.reconnect_min, self.reconnect_max);
        let mut saved: Vec<Request> = Vec::new();
        // Shutdown: the broker has handled our offline Status (it came back
        // on our own status topic), and DISCONNECT has been requested.
        let mut offline_echoed = false;
        let mut disconnecting = false;
        let beat = self.health.register("bus-events");
        let keep_alive = self.eventloop.mqtt_options.keep_alive();
        // When this connection last sent a PINGREQ (or connected): a ping
        // falls due a keep-alive later, and the event loop must not hold
        // back while one is due or unanswered.
        let mut last_ping = Instant::now();
        // When a packet last came in: any packet after our PINGREQ shows
        // the connection alive (see `flow::alive_since_ping`).
        let mut last_read = Instant::now();
        let mut polls = 0u32;
        loop {
            // With data always ready (a flood), rumqttc's poll may not yield
            // for a long while; the publisher shares this runtime (often a
            // single thread) and must drain the pipeline's answers.
            polls = polls.wrapping_add(1);
            if polls % 32 == 0 {
                tokio::task::yield_now().await;
            }
            let state = &mut self.eventloop.state;
            if state.await_pingresp && flow::alive_since_ping(last_read, last_ping) {
                state.await_pingresp = false;
            }
            let mut written = self.write_ours().await;
            if written.is_ok() && !*self.stopping.borrow() {
                written = self.hold_back(keep_alive, last_ping).await;
            }
            let event = match written {
                Ok(()) if self.eventloop.network.is_some() => {
                    // rumqttc's poll waits for the socket (or a ping due);
                    // what the publisher queues meanwhile must not wait for
                    // the next incoming packet. Leaving a poll unfinished
                    // is safe here: it waits only in reading (a packet is
                    // taken whole or not at all) and in flushing (the
                    // buffer keeps what is not written yet). With manual
                    // acknowledgements it writes only a ping, or a publish
                    // held back by a packet-id collision, into the buffer
                    // that `write_ours` has just flushed, which takes them
                    // without waiting.
                    let outbox = self.client.outbox().clone();
                    tokio::select! {
                        biased;
                        event = self.eventloop.poll() => event,
                        _ = outbox.woken() => continue,
                    }
                }
                // Connecting: never interrupted.
                Ok(()) => self.eventloop.poll().await,
                Err(e) => Err(e),
            };
            match &event {
                Ok(Event::Outgoing(Outgoing::PingReq)) => last_ping = Instant::now(),
                Ok(Event::Incoming(_)) => last_read = Instant::now(),
                _ => {}
            }
            let busy = beat.busy();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    last_ping = Instant::now();
                    self.warn_duplicate.store(true, Ordering::Relaxed);
                    info!(session_present = ack.session_present, boot_id = %self.status.boot_id(), "connected to the broker");
                    let event = ConnectionEvent::Connected {
                        session_present: ack.session_present,
                    };
                    for action in session.on(event, Instant::now()) {
                        match action {
                            ConnectionAction::ResendInFlight if !saved.is_empty() => {
                                // rumqttc drops its in-flight messages when the
                                // broker has no session for us; send them again
                                // ourselves.
                                warn!(
                                    count = saved.len(),
                                    "broker had no session for us; re-sending in-flight messages"
                                );
                                self.eventloop.pending.extend(saved.drain(..));
                            }
                            ConnectionAction::Subscribe => {
                                if let Err(e) = self.client.try_subscribe_many(self.subscriptions())
                                {
                                    warn!("cannot queue subscriptions: {e}");
                                }
                                self.publish_status();
                            }
                            ConnectionAction::SetConnected(up) => {
                                let _ = self.connected.send(up);
                            }
                            _ => {}
                        }
                    }
                    saved.clear();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let own_offline = self.on_publish(p);
                    offline_echoed |= own_offline && *self.stopping.borrow();
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        tracing::error!(
                            refused,
                            "the broker refused {refused} of this agent's subscriptions: check that its ACL lets this client read {} (and the pool topic, if any)",
                            self.topics.crops
                        );
                    }
                    for action in
                        session.on(ConnectionEvent::Subscribed { refused }, Instant::now())
                    {
                        if let ConnectionAction::SetSubscribed(ok) = action {
                            let _ = self.subscribed.send(ok);
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = self.subscribed.send(false);
                    let _ = self.connected.send(false);
                    if *self.stopping.borrow() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    drop(busy);
                    let mut wait = None;
                    for action in session.on(ConnectionEvent::Lost, Instant::now()) {
                        match action {
                            ConnectionAction::SetSubscribed(ok) => {
                                let _ = self.subscribed.send(ok);
                            }
                            ConnectionAction::SetConnected(up) => {
                                let _ = self.connected.send(up);
                            }
                            ConnectionAction::WarnShortLived(n) if !*self.stopping.borrow() => {
                                tracing::error!(
                                    client_id = %self.eventloop.mqtt_options.client_id(),
                                    "the broker closed {n} connections in a row soon after accepting them: is another agent using this device_id / client id? Each device needs its own device_id"
                                );
                            }
                            ConnectionAction::Reconnect(d) => wait = Some(d),
                            _ => {}
                        }
                    }
                    self.acks.reset();
                    self.client.outbox().connection_lost();
                    if *self.stopping.borrow() {
                        debug!("connection closed during shutdown: {e}");
                        break;
                    }
                    saved = self
                        .eventloop
                        .pending
                        .iter()
                        .filter(|r| matches!(r, Request::Publish(_)))
                        .cloned()
                        .collect();
                    self.status.renew_boot_id();
                    self.eventloop
                        .mqtt_options
                        .set_last_will(self.status.will(&self.topics.status));
                    let wait = wait.unwrap_or(self.reconnect_min);
                    log_connection_error(&e, wait);
                    let mut stopping = self.stopping.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopping.changed() => {}
                    }
                    if *self.stopping.borrow() {
                        break;
                    }
                }
            }
            // Disconnect only once every QoS 1 publish, the offline Status
            // included, is acknowledged: a broker that still has a PUBACK to
            // write when the socket closes (Mosquitto 2.0 before 2.0.22)
            // takes it for a lost connection and publishes the Last Will over
            // the offline Status.
            if offline_echoed && !disconnecting && self.eventloop.state.inflight() == 0 {
                disconnecting = true;
                if let Err(e) = self.client.try_disconnect() {
                    warn!("cannot queue the disconnection: {e}");
                }
            }
        }
    }

    /// What of ours needs the connection's incoming side now.
    fn ours(&self, ping_due: bool) -> flow::Ours {
        let state = &self.eventloop.state;
        flow::Ours {
            awaiting_acks: state.inflight(),
            awaiting_pingresp: state.await_pingresp || ping_due,
            resending: self.eventloop.pending.len(),
        }
    }

    /// Writes what waits in the outbox (see [`client`]) to the socket
    /// through rumqttc's state, which numbers our QoS 1 publishes, keeps
    /// them for re-sending and enforces the in-flight window, then flushes.
    /// At most [`WRITE_BATCH`] requests, so that reading goes on between
    /// batches. Leaves nothing to write while rumqttc still re-sends an
    /// earlier connection's publishes (those go first, from `poll`). A
    /// failure ends the connection as a failed `poll` would.
    async fn write_ours(&mut self) -> Result<(), ConnectionError> {
        let el = &mut self.eventloop;
        if !el.pending.is_empty() {
            return Ok(());
        }
        let max_inflight = el.mqtt_options.inflight();
        let flush_timeout = Duration::from_secs(el.network_options().connection_timeout());
        let outbox = self.client.outbox();
        let Some(network) = el.network.as_mut() else {
            return Ok(());
        };
        let state = &mut el.state;
        let events_before = state.events.len();
        let mut written = 0;
        let result: Result<(), ConnectionError> = loop {
            if written >= WRITE_BATCH {
                break Ok(());
            }
            let window_open = state.collision.is_none() && state.inflight() < max_inflight;
            let Some(request) = outbox.pop(window_open) else {
                break Ok(());
            };
            match state.handle_outgoing_packet(request) {
                Ok(Some(packet)) => {
                    if let Err(e) = network.write(packet).await {
                        break Err(e.into());
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(e.into()),
            }
            written += 1;
        };
        let result = match result {
            Ok(()) if written > 0 => {
                match tokio::time::timeout(flush_timeout, network.flush()).await {
                    Ok(flushed) => flushed.map_err(ConnectionError::from),
                    Err(_) => Err(ConnectionError::FlushTimeout),
                }
            }
            other => other,
        };
        // rumqttc recorded an Outgoing event for each request; nothing reads
        // them, and left there they would pile up faster than `poll`
        // returns them (it returns one per call).
        state.events.truncate(events_before);
        if result.is_err() {
            el.clean();
        }
        result
    }

    /// Flow control (see [`flow`]): while the pipeline is full of held QoS 1
    /// requests, stop reading from the broker, which keeps the rest queued
    /// for us (TCP pushes back), but only as long as [`flow::hold`] allows,
    /// writing our own traffic all the while. Ends the moment something of
    /// ours needs a poll, the pipeline has room, or after half the
    /// keep-alive; a failed write ends it with the connection's error.
    async fn hold_back(
        &mut self,
        keep_alive: Duration,
        last_ping: Instant,
    ) -> Result<(), ConnectionError> {
        let started = Instant::now();
        let limit = keep_alive / 2;
        let mut stopping = self.stopping.clone();
        let mut held = None;
        let result = loop {
            let ping_due = last_ping.elapsed() >= keep_alive;
            let why = flow::hold(self.requests.intake(), &self.ours(ping_due));
            if why.is_none() || started.elapsed() >= limit || *stopping.borrow() {
                break Ok(());
            }
            held = why;
            let outbox = self.client.outbox().clone();
            tokio::select! {
                _ = outbox.woken() => {}
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = stopping.changed() => {}
            }
            if let Err(e) = self.write_ours().await {
                break Err(e);
            }
        };
        if let Some(why) = held {
            let waited = started.elapsed();
            self.metrics.add_read_hold(waited);
            if why == flow::Hold::HardLimit {
                self.hard_limit_log.event(
                    None,
                    &format!(
                        "the broker sent more unacknowledged QoS 1 requests than the queue's hard limit ({} x pipeline.queue_capacity or {} x queue_max_bytes); reading paused {} ms while the pipeline drained. Keep the broker's in-flight window (Mosquitto: max_inflight_messages) at or below pipeline.queue_capacity",
                        flow::HARD_LIMIT_COUNT_FACTOR,
                        flow::HARD_LIMIT_BYTES_FACTOR,
                        waited.as_millis()
                    ),
                );
            }
        }
        result
    }

    fn publish_status(&self) {
        let payload = self.status.status_payload(AgentState::Online);
        if let Err(e) =
            self.client
                .try_publish(&self.topics.status, QoS::AtLeastOnce, true, payload)
        {
            warn!("cannot queue the status message: {e}");
        }
    }

    /// Routes an incoming message; true when it was our own offline Status
    /// (of this boot) coming back.
    fn on_publish(&mut self, p: Publish) -> bool {
        let topic = p.topic.clone();
        if self.topics.is_crops(&topic) {
            if !self.accepting.load(Ordering::Acquire) {
                // Shutting down: leave it unacknowledged for redelivery.
                return false;
            }
            if crate::fault::ENABLED {
                let id = crate::protocol::peek_request_id(&p.payload).unwrap_or_default();
                crate::fault::inject(crate::fault::Site::Bus, crate::fault::Scope::Guarded, &id);
            }
            let ack = (p.qos != QoS::AtMostOnce).then(|| self.acks.register(p.pkid, p.qos as u8));
            let size = p.payload.len();
            let msg = Incoming {
                payload: p.payload,
                received: Instant::now(),
                ack,
            };
            if size > self.max_request_bytes {
                // Consumed, reported and acknowledged: never redelivered.
                let reason = format!(
                    "request of {size} bytes exceeds bus.max_packet_bytes ({})",
                    self.max_request_bytes
                );
                self.requests.refuse(msg, reason);
                return false;
            }
            // Full queue: the pipeline counts, reports and releases the drop.
            self.requests.submit(msg);
            return false;
        }
        let own_offline = topic == self.topics.status && self.check_own_status(&p.payload);
        if p.qos != QoS::AtMostOnce {
            let token = self.acks.register(p.pkid, p.qos as u8);
            self.acks.done(token, |t| self.client.try_ack(t));
        }
        own_offline
    }

    /// A stale Will (or any "offline" of another boot) on our own status
    /// topic while we run: publish "online" again. Our own offline Status
    /// (of this boot) is what a clean stop waits for: true for it.
    fn check_own_status(&self, payload: &[u8]) -> bool {
        let peek = protocol::detect_encoding(payload)
            .ok()
            .and_then(|enc| protocol::decode::<StatusPeek>(payload, enc).ok());
        let Some(peek) = peek else {
            return false;
        };
        let ours = self.status.boot_id();
        if peek.state == AgentState::Online {
            if let Some(other) = peek.boot_id.as_deref().filter(|b| *b != ours) {
                if self.warn_duplicate.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        other_boot_id = other,
                        "another agent is online with this device_id ({}): two devices share it, and the broker disconnects one whenever the other connects. Give each device its own device_id",
                        self.status.device_id
                    );
                }
            }
            return false;
        }
        if peek.boot_id.as_deref() == Some(ours.as_str()) {
            return true;
        }
        info!(
            stale_boot_id = peek.boot_id.as_deref().unwrap_or("-"),
            "a stale offline status was retained; publishing online again"
        );
        self.publish_status();
        false
    }
}

/// Whether rumqttc emits `o` when it takes one of our requests from its
/// queue (a collision's AwaitAck is not: the publish goes out later, as an
/// Outgoing::Publish of its own).
fn log_connection_error(e: &ConnectionError, backoff: Duration) {
    warn!(
        retry_in_ms = backoff.as_millis() as u64,
        "broker connection failed: {e}"
    );
}

/// Hands messages to the session's [`Outbox`] without ever waiting on it:
/// what the full outbox cannot take stays in a backlog, in order, and is handed
/// over as room appears (every few milliseconds), so the pipeline's answers
/// never wait on the socket and flow control can never block them (see
/// [`flow`]). While disconnected, keeps up to `capacity` messages (QoS > 0)
/// in the backlog, dropping the oldest beyond.
pub struct PublisherTask {
    pub client: BusClient,
    pub rx: mpsc::Receiver<ToBus>,
    pub connected: watch::Receiver<bool>,
    /// Where each kind of [`Outbound`] goes.
    pub topics: Topics,
    /// `bus.results_qos`.
    pub results_qos: u8,
    pub capacity: usize,
    pub metrics: Arc<Metrics>,
    pub acks: Arc<AckSequencer>,
    /// `bus.max_packet_bytes`: a larger message is never handed to the outbox
    /// (it would drop the connection, and re-send it after reconnecting).
    pub max_packet_bytes: usize,
    /// Where the task registers its heartbeat.
    pub health: crate::health::Health,
}

/// How often the publisher retries a backlog that the full outbox refused.
const BACKLOG_RETRY: Duration = Duration::from_millis(2);

/// An [`Outbound`] message placed: topic, QoS and retain chosen, size
/// checked.
#[derive(Debug)]
struct Publication {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    ack: Option<AckToken>,
}

/// The publisher's messages not yet handed to the outbox, and the flushes
/// waiting for them.
struct Backlog {
    messages: VecDeque<Publication>,
    /// Messages ever queued and ever handed over (or discarded).
    queued: u64,
    handed: u64,
    /// Flush requests, each answered once `handed` reaches its mark.
    flushes: VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl PublisherTask {
    pub async fn run(mut self) {
        let mut backlog = Backlog {
            messages: VecDeque::new(),
            queued: 0,
            handed: 0,
            flushes: VecDeque::new(),
        };
        let dropped_log = crate::log_summary::FloodLog::new("outgoing message dropped");
        let oversized_log = crate::log_summary::FloodLog::new("result replaced by an ErrorReport");
        let mut connected = self.connected.clone();
        let beat = self.health.register("bus-publisher");
        loop {
            let retry = !backlog.messages.is_empty() && *connected.borrow();
            tokio::select! {
                biased;
                changed = connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if *connected.borrow() && !backlog.messages.is_empty() {
                        info!(
                            count = backlog.messages.len(),
                            "publishing messages kept while disconnected"
                        );
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    None => break,
                    Some(ToBus::Send(m)) => {
                        let m = self.place(m, &oversized_log);
                        let online = *connected.borrow();
                        if !online && m.qos == 0 {
                            // Nobody expects a QoS 0 message to survive an outage.
                        } else {
                            if !online && backlog.messages.len() >= self.capacity {
                                backlog.messages.pop_front();
                                backlog.handed += 1;
                                self.metrics.add_dropped(1);
                                dropped_log.event(
                                    None,
                                    "the outbox kept while disconnected is full (bus.outbox_capacity): dropped the oldest message",
                                );
                            }
                            backlog.messages.push_back(m);
                            backlog.queued += 1;
                        }
                    }
                    Some(ToBus::Flush(done)) => {
                        if *connected.borrow() {
                            backlog.flushes.push_back((backlog.queued, done));
                        } else {
                            let _ = done.send(());
                        }
                    }
                },
                _ = tokio::time::sleep(BACKLOG_RETRY), if retry || self.acks.unsent() > 0 => {}
            }
            let _busy = beat.busy();
            if *connected.borrow() {
                self.hand_over(&mut backlog);
            }
            self.acks.retry(|t| self.client.try_ack(t));
            dropped_log.flush();
            oversized_log.flush();
            while backlog
                .flushes
                .front()
                .is_some_and(|(mark, _)| backlog.handed >= *mark || !*connected.borrow())
            {
                if let Some((_, done)) = backlog.flushes.pop_front() {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Chooses where `m` goes. A result too large for a packet becomes an
    /// ErrorReport for its request (echoed strings are bounded, so only a
    /// huge crop count with large candidate lists gets there).
    fn place(&self, m: Outbound, oversized: &crate::log_summary::FloodLog) -> Publication {
        let t = &self.topics;
        match m {
            Outbound::Result {
                payload,
                request_id,
                encoding,
                ack,
            } => {
                if fits_packet(&t.results, payload.len(), self.max_packet_bytes) {
                    return Publication {
                        topic: t.results.clone(),
                        payload,
                        qos: self.results_qos,
                        retain: false,
                        ack,
                    };
                }
                self.metrics.add_errors(1);
                let reason = format!(
                    "the result of {} bytes would exceed bus.max_packet_bytes ({}); send fewer crops per request or lower top_k",
                    payload.len(),
                    self.max_packet_bytes
                );
                oversized.event(Some(&request_id), &reason);
                let report = protocol::ErrorReport::now(Some(request_id), reason);
                Publication {
                    topic: t.errors.clone(),
                    payload: protocol::encode(&report, encoding),
                    qos: 1,
                    retain: false,
                    ack,
                }
            }
            Outbound::Error { payload, ack } => Publication {
                topic: t.errors.clone(),
                payload,
                qos: 1,
                retain: false,
                ack,
            },
            Outbound::Status { payload } => Publication {
                topic: t.status.clone(),
                payload,
                qos: 1,
                retain: true,
                ack: None,
            },
            Outbound::Metrics { payload } => Publication {
                topic: t.metrics.clone(),
                payload,
                qos: 0,
                retain: false,
                ack: None,
            },
        }
    }

    /// Hands the backlog to the outbox in order until it is full.
    fn hand_over(&self, backlog: &mut Backlog) {
        while let Some(mut m) = backlog.messages.pop_front() {
            if !fits_packet(&m.topic, m.payload.len(), self.max_packet_bytes) {
                // Results that do not fit were replaced in `place`; anything
                // else this large is a bug, reported here instead of looping.
                tracing::error!(
                    topic = %m.topic,
                    bytes = m.payload.len(),
                    limit = self.max_packet_bytes,
                    "outgoing message over bus.max_packet_bytes: not sent"
                );
                self.metrics.add_errors(1);
            } else {
                let payload = std::mem::take(&mut m.payload);
                if let Err(client::NotTaken(payload)) =
                    self.client
                        .try_publish(&m.topic, qos(m.qos), m.retain, payload)
                {
                    m.payload = payload;
                    backlog.messages.push_front(m);
                    return;
                }
            }
            backlog.handed += 1;
            if let Some(ack) = m.ack {
                self.acks.done(ack, |t| self.client.try_ack(t));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_maximum_with_jitter_and_starts_over_on_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, base) in delays.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            assert!(
                *d >= ms(base / 2) && *d <= ms(base),
                "{d:?} for base {base}"
            );
        }
        let spread: std::collections::HashSet<Duration> = (0..50)
            .map(|_| Backoff::new(ms(1000), ms(1000)).next_delay())
            .collect();
        assert!(spread.len() > 10, "delays are jittered");
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }
}
