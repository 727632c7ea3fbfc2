//! The agent's second MQTT session, for reference-DB updates only.
//!
//! MQTT acknowledges QoS 1 messages in arrival order per session, and the
//! agent acknowledges a message only once it is answered. On the crop
//! session a 500-image update would hold back every crop PUBACK behind it;
//! on a session of its own (client id `{client_id}-refdb`, persistent, so
//! updates published while the agent is offline still arrive) it holds
//! back only later updates, which must wait for it anyway. Updates are
//! handled one at a time, in arrival order; each is acknowledged to the
//! broker after its UpdateAck has been handed to the MQTT client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, NetworkOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::bus::{
    ConnectionAction, ConnectionEvent, ConnectionState, Outbound, StatusSource, ToBus, Topics,
};
use crate::config::{Encoding, LoadedConfig};
use crate::health::{Health, Heartbeat};
use crate::protocol::{self, AgentState};

use super::receiver::{Outcome, UpdateReceiver};

/// The running update session: its connection task and its worker.
pub struct UpdateSession {
    client: AsyncClient,
    subscribed: watch::Receiver<bool>,
    stopping: watch::Sender<bool>,
    event_loop: JoinHandle<()>,
    worker: JoinHandle<()>,
}

/// What the worker needs besides the receiver.
struct Worker {
    client: AsyncClient,
    receiver: Arc<UpdateReceiver>,
    ack_topic: String,
    status: Arc<StatusSource>,
    out: mpsc::Sender<ToBus>,
    encoding: Encoding,
    generation: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
    _beat: Heartbeat,
}

impl UpdateSession {
    /// Connects (in the background; an unreachable broker is retried) and
    /// starts handling updates.
    pub fn start(
        cfg: &LoadedConfig,
        topics: &Topics,
        receiver: Arc<UpdateReceiver>,
        status: Arc<StatusSource>,
        out: mpsc::Sender<ToBus>,
        health: &Health,
    ) -> anyhow::Result<Self> {
        let options =
            crate::bus::connection_options(cfg, format!("{}-refdb", crate::bus::client_id(cfg)))?;
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (stopping_tx, stopping_rx) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        let generation = Arc::new(AtomicU64::new(0));
        let (subscribed_tx, subscribed) = watch::channel(false);
        let subscriptions = vec![
            rumqttc::SubscribeFilter::new(topics.fleet_refdb.clone(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(topics.device_refdb.clone(), QoS::AtLeastOnce),
        ];
        let c = &cfg.config.bus;
        let event_loop = tokio::spawn(
            Connection {
                eventloop,
                client: client.clone(),
                subscriptions,
                tx,
                generation: generation.clone(),
                subscribed: subscribed_tx,
                stopping: stopping_rx.clone(),
                reconnect_min: Duration::from_millis(c.reconnect_min_ms),
                reconnect_max: Duration::from_millis(c.reconnect_max_ms),
                beat: health.register("fleet-events"),
            }
            .run(),
        );
        let worker = tokio::spawn(
            Worker {
                client: client.clone(),
                receiver,
                ack_topic: topics.refdb_ack.clone(),
                status,
                out,
                encoding: c.encoding,
                generation,
                stopping: stopping_rx,
                // Alive, never "busy": applying an update may rightly take
                // minutes (it embeds every new image).
                _beat: health.register("fleet-worker"),
            }
            .run(rx),
        );
        Ok(Self {
            client,
            subscribed,
            stopping: stopping_tx,
            event_loop,
            worker,
        })
    }

    /// Waits until the broker has acknowledged the update subscriptions
    /// (so updates published from now on reach this agent), at most
    /// `timeout`; false when it has not.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops taking updates, lets the one being handled finish and be
    /// acknowledged (up to `timeout`), then disconnects. Updates not
    /// acknowledged yet stay with the broker for the next start.
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stopping.send(true);
        let mut worker = self.worker;
        if tokio::time::timeout(timeout, &mut worker).await.is_err() {
            warn!("the reference-DB update in progress did not finish in time");
            worker.abort();
        }
        if let Err(e) = self.client.try_disconnect() {
            debug!("cannot queue the update session's disconnection: {e}");
        }
        let mut event_loop = self.event_loop;
        if tokio::time::timeout(Duration::from_secs(2), &mut event_loop)
            .await
            .is_err()
        {
            event_loop.abort();
        }
    }
}

/// The connection task: polls the session, (re)subscribes, and hands
/// updates to the worker with the connection they arrived on.
struct Connection {
    eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<rumqttc::SubscribeFilter>,
    tx: mpsc::UnboundedSender<(Publish, u64)>,
    generation: Arc<AtomicU64>,
    subscribed: watch::Sender<bool>,
    stopping: watch::Receiver<bool>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    beat: Heartbeat,
}

impl Connection {
    async fn run(mut self) {
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(10);
        self.eventloop.set_network_options(network);
        let mut session = ConnectionState::new(self.reconnect_min, self.reconnect_max);
        // Polled until the DISCONNECT that `stop` queues has gone out, so
        // the worker's last ack and PUBACK are written first.
        loop {
            let event = self.eventloop.poll().await;
            let busy = self.beat.busy();
            match event {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(
                        session_present = ack.session_present,
                        "update session connected"
                    );
                    let event = ConnectionEvent::Connected {
                        session_present: ack.session_present,
                    };
                    for action in session.on(event, Instant::now()) {
                        // The updates in flight are the broker's to send
                        // again; nothing of ours is kept to re-send.
                        if action == ConnectionAction::Subscribe {
                            if let Err(e) =
                                self.client.try_subscribe_many(self.subscriptions.clone())
                            {
                                warn!("cannot queue the update subscriptions: {e}");
                            }
                        }
                    }
                    self.generation
                        .store(session.generation(), Ordering::Release);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(
                            "the broker refused the reference-DB update subscriptions: check that its ACL lets this client read {}",
                            self.subscriptions
                                .iter()
                                .map(|s| s.path.as_str())
                                .collect::<Vec<_>>()
                                .join(" and ")
                        );
                    }
                    let event = ConnectionEvent::Subscribed {
                        refused: usize::from(refused),
                    };
                    for action in session.on(event, Instant::now()) {
                        if let ConnectionAction::SetSubscribed(ok) = action {
                            let _ = self.subscribed.send(ok);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if *self.stopping.borrow() {
                        continue;
                    }
                    let g = self.generation.load(Ordering::Acquire);
                    if self.tx.send((p, g)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    drop(busy);
                    let mut wait = self.reconnect_min;
                    for action in session.on(ConnectionEvent::Lost, Instant::now()) {
                        match action {
                            ConnectionAction::SetSubscribed(ok) => {
                                let _ = self.subscribed.send(ok);
                            }
                            ConnectionAction::Reconnect(d) => wait = d,
                            // The main session warns about a shared client id.
                            _ => {}
                        }
                    }
                    if *self.stopping.borrow() {
                        break;
                    }
                    warn!(
                        retry_in_ms = wait.as_millis() as u64,
                        "update session: broker connection failed: {e}"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
        debug!("update session closed");
    }
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(Publish, u64)>) {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.stopping.wait_for(|s| *s) => None,
                m = rx.recv() => m,
            };
            let Some((publish, generation)) = next else {
                break;
            };
            let receiver = self.receiver.clone();
            let payload = publish.payload.clone();
            let now = crate::clock::now_ms();
            let outcome =
                match tokio::task::spawn_blocking(move || receiver.handle(&payload, now)).await {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::error!("update handling panicked: {e}");
                        Outcome::Retry
                    }
                };
            match outcome {
                Outcome::Retry => continue,
                Outcome::Ignored => {}
                Outcome::Ack { ack, changed } => {
                    let payload = protocol::encode(&ack, self.encoding);
                    if let Err(e) = self
                        .client
                        .publish(&self.ack_topic, QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        warn!("cannot publish the update ack: {e}");
                        continue;
                    }
                    if changed {
                        let status = Outbound::Status {
                            payload: self.status.status_payload(AgentState::Online),
                        };
                        let _ = self.out.send(ToBus::Send(status)).await;
                    }
                }
            }
            if publish.qos != QoS::AtMostOnce
                && generation == self.generation.load(Ordering::Acquire)
            {
                if let Err(e) = self.client.ack(&publish).await {
                    warn!("cannot acknowledge the update to the broker: {e}");
                }
            }
        }
    }
}
