//! The bench's load client: a plain MQTT client (rumqttc) that knows only
//! the contract. rumqttc's event loop runs on one thread of its own (a
//! current-thread async runtime) and stamps each answer's arrival; the
//! bench's thread sends requests (QoS 1, MessagePack, JPEG crops) and
//! matches answers to them by `request_id`. Three ways to load the agent:
//! a fixed number of requests in flight (saturation), one request at a
//! time (unloaded latency), and Poisson arrivals at a set rate (latency
//! under load, measured from each request's scheduled send time, so a
//! slow client does not hide queueing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, NetworkOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};

use super::{BenchError, Workload};
use crate::bus::Topics;
use crate::config::LoadedConfig;
use crate::protocol::{self, AgentState, StatusPeek};

/// Longest time without any answer while requests are outstanding.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a wait looks at whether the agent still runs.
const POLL: Duration = Duration::from_millis(100);
/// Largest packet in either direction.
const MAX_PACKET: usize = 32 << 20;
/// Requests the client may have unacknowledged (more than any load here).
const CLIENT_INFLIGHT: u16 = 4096;

/// What the event-loop thread passes on.
enum ClientEvent {
    Answer {
        request_id: String,
        at: Instant,
        batch_size: u32,
        failed: bool,
    },
    Online {
        at: Instant,
    },
    /// The agent's Metrics: requests it finished in one interval.
    Metrics {
        at: Instant,
        requests: u64,
    },
    /// An aggregate ErrorReport: this many requests dropped without a
    /// report of their own.
    DroppedUnnamed {
        count: u64,
    },
}

#[derive(Deserialize)]
struct ResultPeek {
    request_id: String,
    #[serde(default)]
    batch_size: u32,
    #[serde(default)]
    items: Vec<ItemPeek>,
}

#[derive(Deserialize)]
struct ItemPeek {
    decision: String,
}

#[derive(Deserialize)]
struct ErrorPeek {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    reason: String,
}

fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Option<T> {
    let encoding = protocol::detect_encoding(payload).ok()?;
    protocol::decode(payload, encoding).ok()
}

/// Reads a message on one of the agent's topics.
fn read_message(topics: &Topics, topic: &str, payload: &[u8], at: Instant) -> Option<ClientEvent> {
    if topic == topics.results {
        let r: ResultPeek = decode(payload)?;
        Some(ClientEvent::Answer {
            failed: r.items.iter().any(|i| i.decision == "error"),
            request_id: r.request_id,
            at,
            batch_size: r.batch_size,
        })
    } else if topic == topics.errors {
        let e: ErrorPeek = decode(payload)?;
        if e.request_id.is_none() {
            // "dropped: N more QoS 0 requests ...": the agent's aggregate.
            let count = e
                .reason
                .strip_prefix("dropped: ")
                .and_then(|r| r.split_whitespace().next().and_then(|n| n.parse().ok()));
            if let Some(count) = count {
                return Some(ClientEvent::DroppedUnnamed { count });
            }
        }
        Some(ClientEvent::Answer {
            request_id: e.request_id.unwrap_or_default(),
            at,
            batch_size: 0,
            failed: true,
        })
    } else if topic == topics.status {
        let s: StatusPeek = decode(payload)?;
        (s.state == AgentState::Online).then_some(ClientEvent::Online { at })
    } else if topic == topics.metrics {
        let m: protocol::Metrics = decode(payload)?;
        Some(ClientEvent::Metrics {
            at,
            requests: m.requests,
        })
    } else {
        None
    }
}

/// What one soak sent and got back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakTally {
    pub sent_qos0: u64,
    pub sent_qos1: u64,
    /// Requests answered with a result (all items fine), in all and within
    /// the sending window.
    pub answered: u64,
    pub answered_in_window: u64,
    /// Requests answered with an ErrorReport of their own (a drop, for
    /// this workload), by QoS.
    pub reported_qos0: u64,
    pub reported_qos1: u64,
    /// Requests counted in the agent's aggregate drop reports.
    pub dropped_unnamed: u64,
    /// Requests the agent finished within the sending window, by its own
    /// Metrics (what it had the CPU for, next to the load client and the
    /// broker on the same machine).
    pub processed_in_window: u64,
    /// QoS 1 requests neither answered nor reported by the end.
    pub unanswered_qos1: u64,
    /// Requests neither answered, reported, nor counted in an aggregate.
    pub unaccounted: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Throughput with a fixed number of requests in flight.
#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    pub crops_per_request: usize,
    pub in_flight: usize,
    pub crops_per_s: f64,
    pub requests_per_s: f64,
    /// Mean inference batch the answered requests rode.
    pub mean_batch: f64,
}

/// Round trips (request published to its result received), in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    /// Requests per second offered (none: one request at a time).
    pub offered_per_s: Option<f64>,
    pub achieved_per_s: f64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyFigures {
    fn from_samples(
        mut ms: Vec<f64>,
        offered_per_s: Option<f64>,
        elapsed: Duration,
    ) -> Result<Self, BenchError> {
        if ms.is_empty() {
            return Err(BenchError::Client("no request was answered".into()));
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Ok(Self {
            offered_per_s,
            achieved_per_s: ms.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            samples: ms.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

/// A connected, subscribed client for one agent's topics.
pub struct LoadClient {
    client: AsyncClient,
    events: Receiver<ClientEvent>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    crops_topic: String,
    next_request: usize,
}

impl LoadClient {
    /// Connects to the broker `cfg.config.bus` names (with its TLS and
    /// credentials) as `client_id` and subscribes to the results, errors
    /// and status topics of `topics`; returns once subscribed.
    pub fn connect(
        cfg: &LoadedConfig,
        topics: &Topics,
        client_id: String,
    ) -> Result<Self, BenchError> {
        let mut options = crate::bus::connection_options(cfg, client_id)
            .map_err(|e| BenchError::Client(format!("{e:#}")))?;
        options.set_clean_session(true);
        options.set_manual_acks(false);
        options.set_inflight(CLIENT_INFLIGHT);
        options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let (client, mut eventloop) = AsyncClient::new(options, 8192);
        // As the agent does: without it, a small request can wait for the
        // broker's delayed ACK (40 ms on Linux) before it leaves.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (events_tx, events): (Sender<ClientEvent>, Receiver<ClientEvent>) =
            crossbeam_channel::unbounded();
        let (subscribed_tx, subscribed) = crossbeam_channel::bounded::<()>(1);
        let stopping = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(BenchError::io("starting the client's runtime"))?;
        let subscriptions = [
            topics.results.clone(),
            topics.errors.clone(),
            topics.status.clone(),
            topics.metrics.clone(),
        ];
        let (thread_topics, thread_client, thread_stopping) =
            (topics.clone(), client.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("bench-mqtt".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut subacks = 0;
                    loop {
                        match eventloop.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                subacks = 0;
                                for topic in &subscriptions {
                                    let _ = thread_client.try_subscribe(topic, QoS::AtLeastOnce);
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                subacks += 1;
                                if subacks == subscriptions.len() {
                                    let _ = subscribed_tx.try_send(());
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let at = Instant::now();
                                if let Some(event) =
                                    read_message(&thread_topics, &p.topic, &p.payload, at)
                                {
                                    if events_tx.send(event).is_err() {
                                        break;
                                    }
                                }
                            }
                            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                            Ok(_) => {}
                            Err(_) => {
                                if thread_stopping.load(Ordering::Acquire) {
                                    break;
                                }
                                tokio::time::sleep(POLL).await;
                            }
                        }
                    }
                });
            })
            .map_err(BenchError::io("starting the client's thread"))?;
        let client = Self {
            client,
            events,
            stopping,
            thread: Some(thread),
            crops_topic: topics.crops.clone(),
            next_request: 0,
        };
        let bus = &cfg.config.bus;
        subscribed
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| {
                BenchError::Client(format!(
                    "could not connect to {}:{} and subscribe within 10 s",
                    bus.host, bus.port
                ))
            })?;
        Ok(client)
    }

    /// Publishes a request of `crops` crops: its id and when it was sent.
    fn send(&mut self, workload: &Workload, crops: usize) -> Result<(String, Instant), BenchError> {
        self.send_at(workload, crops, QoS::AtLeastOnce)
    }

    fn send_at(
        &mut self,
        workload: &Workload,
        crops: usize,
        qos: QoS,
    ) -> Result<(String, Instant), BenchError> {
        let n = self.next_request;
        self.next_request += 1;
        let request_id = format!("r{n}");
        let payload = workload.request(&request_id, n * crops, crops)?;
        let sent = Instant::now();
        self.client
            .try_publish(&self.crops_topic, qos, false, payload)
            .map_err(|e| BenchError::Client(format!("cannot publish: {e}")))?;
        Ok((request_id, sent))
    }

    /// Single-crop requests at a steady `rate` per second for `duration`,
    /// alternately QoS 0 and QoS 1; then waits (up to `drain`) for every
    /// request to be answered or reported. `sample` runs about once a
    /// second with the time since the start.
    pub fn soak(
        &mut self,
        workload: &Workload,
        rate: f64,
        (duration, drain): (Duration, Duration),
        sample: &mut dyn FnMut(Duration) -> Result<(), BenchError>,
    ) -> Result<SoakTally, BenchError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(BenchError::Client(format!(
                "cannot offer {rate} requests/s"
            )));
        }
        let gap = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        let until = start + duration;
        let mut next = start;
        let mut next_sample = start;
        // Outstanding request ids, with whether each was QoS 1.
        let mut pending: HashMap<String, bool> = HashMap::new();
        let mut t = SoakTally::default();
        loop {
            let now = Instant::now();
            if now >= next_sample {
                sample(now.duration_since(start))?;
                next_sample += Duration::from_secs(1);
            }
            if next < until && now >= next {
                let qos1 = (t.sent_qos0 + t.sent_qos1) % 2 == 1;
                let qos = if qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                let (id, _) = self.send_at(workload, 1, qos)?;
                pending.insert(id, qos1);
                if qos1 {
                    t.sent_qos1 += 1;
                } else {
                    t.sent_qos0 += 1;
                }
                next += gap;
                continue;
            }
            let settled = pending.len() as u64 <= t.dropped_unnamed;
            if next >= until && (settled || now > until + drain) {
                break;
            }
            let wait = if next < until {
                next.saturating_duration_since(now).min(POLL)
            } else {
                POLL
            };
            match self.next_event(wait)? {
                Some(ClientEvent::Answer {
                    request_id, failed, ..
                }) => {
                    let Some(qos1) = pending.remove(&request_id) else {
                        continue;
                    };
                    let in_window = Instant::now() <= until;
                    match (failed, qos1) {
                        (false, _) => {
                            t.answered += 1;
                            t.answered_in_window += u64::from(in_window);
                        }
                        (true, false) => t.reported_qos0 += 1,
                        (true, true) => t.reported_qos1 += 1,
                    }
                }
                Some(ClientEvent::DroppedUnnamed { count }) => t.dropped_unnamed += count,
                Some(ClientEvent::Metrics { at, requests }) => {
                    if at <= until {
                        t.processed_in_window += requests;
                    }
                }
                Some(ClientEvent::Online { .. }) | None => {}
            }
        }
        t.elapsed = start.elapsed();
        t.unanswered_qos1 = pending.values().filter(|q| **q).count() as u64;
        t.unaccounted = (pending.len() as u64).saturating_sub(t.dropped_unnamed);
        Ok(t)
    }

    fn next_event(&self, timeout: Duration) -> Result<Option<ClientEvent>, BenchError> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(BenchError::Client("its event loop stopped".into()))
            }
        }
    }

    /// Waits for the agent's Status "online"; `alive` fails when the agent
    /// has exited. Returns when it arrived.
    pub fn wait_online(
        &mut self,
        timeout: Duration,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ClientEvent::Online { at }) = self.next_event(POLL)? {
                return Ok(at);
            }
            alive()?;
            if Instant::now() > deadline {
                return Err(BenchError::Agent(format!(
                    "it did not say \"online\" within {timeout:?}"
                )));
            }
        }
    }

    /// Waits for the answer to `request_id`: when it arrived.
    fn answer_to(
        &mut self,
        request_id: &str,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.next_event(POLL)? {
                Some(ClientEvent::Answer {
                    request_id: id,
                    at,
                    failed,
                    ..
                }) if id == request_id => {
                    return if failed {
                        Err(BenchError::Agent(format!(
                            "request {request_id} was answered with an error"
                        )))
                    } else {
                        Ok(at)
                    };
                }
                Some(_) => {}
                None => {
                    alive()?;
                    if Instant::now() > deadline {
                        return Err(BenchError::Client(format!(
                            "no answer to {request_id} within {ANSWER_TIMEOUT:?}"
                        )));
                    }
                }
            }
        }
    }

    /// One single-crop request: when its answer arrived.
    pub fn round_trip(
        &mut self,
        workload: &Workload,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<Instant, BenchError> {
        let (id, _) = self.send(workload, 1)?;
        self.answer_to(&id, alive)
    }

    /// Keeps `in_flight` requests of `crops` crops outstanding (each answer
    /// sends the next) for `warmup`, then counts the answers of `window`.
    pub fn saturate(
        &mut self,
        workload: &Workload,
        crops: usize,
        in_flight: usize,
        (warmup, window): (Duration, Duration),
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<Saturation, BenchError> {
        let mut pending: HashMap<String, Instant> = HashMap::new();
        for _ in 0..in_flight {
            let (id, sent) = self.send(workload, crops)?;
            pending.insert(id, sent);
        }
        let from = Instant::now() + warmup;
        let until = from + window;
        let (mut answered, mut batch_sum, mut failed_requests) = (0usize, 0u64, 0usize);
        let mut last_answer = Instant::now();
        while !pending.is_empty() {
            match self.next_event(POLL)? {
                Some(ClientEvent::Answer {
                    request_id,
                    at,
                    batch_size,
                    failed,
                }) => {
                    if pending.remove(&request_id).is_none() {
                        continue;
                    }
                    last_answer = Instant::now();
                    failed_requests += usize::from(failed);
                    if at >= from && at < until {
                        answered += 1;
                        batch_sum += u64::from(batch_size);
                    }
                    if Instant::now() < until {
                        let (id, sent) = self.send(workload, crops)?;
                        pending.insert(id, sent);
                    }
                }
                Some(
                    ClientEvent::Online { .. }
                    | ClientEvent::DroppedUnnamed { .. }
                    | ClientEvent::Metrics { .. },
                ) => {}
                None => {
                    alive()?;
                    if last_answer.elapsed() > ANSWER_TIMEOUT {
                        return Err(BenchError::Client(format!(
                            "no answer within {ANSWER_TIMEOUT:?}; {} requests outstanding",
                            pending.len()
                        )));
                    }
                }
            }
        }
        if failed_requests > 0 {
            return Err(BenchError::Agent(format!(
                "{failed_requests} requests were answered with errors"
            )));
        }
        let seconds = window.as_secs_f64();
        Ok(Saturation {
            crops_per_request: crops,
            in_flight,
            crops_per_s: (answered * crops) as f64 / seconds,
            requests_per_s: answered as f64 / seconds,
            mean_batch: batch_sum as f64 / answered.max(1) as f64,
        })
    }

    /// Single-crop requests one at a time, each sent once the previous is
    /// answered, up to `samples` or `max_time` (after 5 not counted).
    pub fn one_at_a_time(
        &mut self,
        workload: &Workload,
        samples: usize,
        max_time: Duration,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<LatencyFigures, BenchError> {
        for _ in 0..5 {
            self.round_trip(workload, alive)?;
        }
        let start = Instant::now();
        let mut ms = Vec::with_capacity(samples);
        while ms.len() < samples.max(1) && (ms.len() < 5 || start.elapsed() < max_time) {
            let (id, sent) = self.send(workload, 1)?;
            let at = self.answer_to(&id, alive)?;
            ms.push(at.duration_since(sent).as_secs_f64() * 1e3);
        }
        LatencyFigures::from_samples(ms, None, start.elapsed())
    }

    /// Single-crop requests arriving as a Poisson process of `rate` per
    /// second for `warmup` and `window`; the round trips of the window's
    /// requests, each from its scheduled send time.
    pub fn poisson(
        &mut self,
        workload: &Workload,
        rate: f64,
        (warmup, window): (Duration, Duration),
        seed: u64,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<LatencyFigures, BenchError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(BenchError::Client(format!(
                "cannot offer {rate} requests/s"
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut gap = || {
            // Exponential inter-arrival times: -ln(U) / rate, U in (0, 1].
            let u: f64 = 1.0 - rng.gen::<f64>();
            Duration::from_secs_f64(-u.ln() / rate)
        };
        let start = Instant::now();
        let from = start + warmup;
        let until = from + window;
        let mut next = start;
        let mut pending: HashMap<String, Instant> = HashMap::new();
        let mut ms = Vec::new();
        let (mut failed_requests, mut last_answer) = (0usize, Instant::now());
        loop {
            let now = Instant::now();
            if next < until && now >= next {
                let (id, _) = self.send(workload, 1)?;
                pending.insert(id, next);
                next += gap();
                continue;
            }
            if next >= until && pending.is_empty() {
                break;
            }
            let wait = if next < until {
                next.saturating_duration_since(now)
            } else {
                POLL
            };
            match self.next_event(wait)? {
                Some(ClientEvent::Answer {
                    request_id,
                    at,
                    failed,
                    ..
                }) => {
                    if let Some(scheduled) = pending.remove(&request_id) {
                        last_answer = Instant::now();
                        failed_requests += usize::from(failed);
                        if scheduled >= from {
                            ms.push(at.saturating_duration_since(scheduled).as_secs_f64() * 1e3);
                        }
                    }
                }
                Some(
                    ClientEvent::Online { .. }
                    | ClientEvent::DroppedUnnamed { .. }
                    | ClientEvent::Metrics { .. },
                ) => {}
                None if next >= until => {
                    alive()?;
                    if last_answer.elapsed() > ANSWER_TIMEOUT {
                        return Err(BenchError::Client(format!(
                            "no answer within {ANSWER_TIMEOUT:?}; {} requests outstanding",
                            pending.len()
                        )));
                    }
                }
                None => {}
            }
        }
        if failed_requests > 0 {
            return Err(BenchError::Agent(format!(
                "{failed_requests} requests were answered with errors"
            )));
        }
        LatencyFigures::from_samples(ms, Some(rate), window)
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.client.try_disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = LatencyFigures::from_samples(ms, None, Duration::from_secs(1)).expect("samples");
        assert_eq!(
            (l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(l.achieved_per_s, 100.0);
        assert!(LatencyFigures::from_samples(Vec::new(), None, Duration::from_secs(1)).is_err());
    }
}
