//! The agent's handle on its main MQTT session, and the queue of what the
//! agent sends on it ([`Outbox`]).
//!
//! Publishes, acknowledgements and subscriptions do not go through
//! rumqttc's request channel: rumqttc takes from that channel only inside
//! `poll`, in a random race with reading the socket, one request per ten
//! packets read, so under a flood our answers and PUBACKs left at a
//! fraction of the rate they were made, and not at all while flow control
//! held reading back. They go into the [`Outbox`] instead, which the event
//! loop (`super::EventLoopTask`) writes to the socket itself, before every
//! poll and all through a hold, through rumqttc's own state (packet ids,
//! the in-flight window, re-sending after a reconnection). Only the
//! DISCONNECT at shutdown goes through rumqttc's channel, when nothing is
//! held back. Never waits: a request the full outbox cannot take is given
//! back to the caller. The update session (`fleet::session`) has its own
//! connection and does not use this.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, ClientError, PubAck, PubRec, Publish, QoS, Request, Subscribe};
use tokio::sync::Notify;

use super::AckToken;

/// Requests the agent wants written on its main session: acknowledgements
/// and subscriptions in their order, publishes in theirs. Acknowledgements
/// never wait behind publishes held back by the in-flight window: the
/// broker's window for our deliveries must keep moving while ours is full.
/// (An answer is already ours to send when its request is acknowledged:
/// it stays queued across reconnections.)
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queues>,
    capacity: usize,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Queues {
    control: VecDeque<Request>,
    publishes: VecDeque<Request>,
}

impl Queues {
    fn len(&self) -> usize {
        self.control.len() + self.publishes.len()
    }
}

impl Outbox {
    /// An outbox taking up to `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(Queues::default()),
            capacity: capacity.max(1),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request`, or gives it back when the outbox is full.
    pub fn push(&self, request: Request) -> Result<(), Request> {
        {
            let mut q = self.lock();
            if q.len() >= self.capacity {
                return Err(request);
            }
            match request {
                Request::Publish(_) => q.publishes.push_back(request),
                _ => q.control.push_back(request),
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The next request to write: acknowledgements and subscriptions
    /// first, then publishes in order. A QoS 1/2 publish at the front waits
    /// (and every publish behind it) while `publish_allowed` is false:
    /// rumqttc's in-flight window is full or a packet id collided.
    pub fn pop(&self, publish_allowed: bool) -> Option<Request> {
        let mut q = self.lock();
        if let Some(r) = q.control.pop_front() {
            return Some(r);
        }
        match q.publishes.front() {
            Some(Request::Publish(p)) if p.qos != QoS::AtMostOnce && !publish_allowed => None,
            _ => q.publishes.pop_front(),
        }
    }

    /// Requests queued and not written yet.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection ended. Acknowledgements of its deliveries are void
    /// (the broker delivers those messages again, and a PUBACK the new
    /// connection did not ask for confuses some brokers), and subscriptions
    /// are made again on connecting; publishes stay for the next connection.
    pub fn connection_lost(&self) {
        self.lock().control.retain(|r| {
            !matches!(
                r,
                Request::PubAck(_) | Request::PubRec(_) | Request::Subscribe(_)
            )
        });
    }

    /// Resolves when something was queued since the last call
    /// (a wake-up is kept if nobody waited for it).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// rumqttc's client (for the DISCONNECT, and to keep rumqttc's request
/// channel open) plus the [`Outbox`] everything else goes through.
#[derive(Clone)]
pub struct BusClient {
    client: AsyncClient,
    outbox: Arc<Outbox>,
}

/// A publish the outbox could not take: its payload, given back.
#[derive(Debug)]
pub struct NotTaken(pub Vec<u8>);

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the MQTT session's outbox is full")
    }
}

impl BusClient {
    /// `client` must be the one created with the session's event loop.
    pub fn new(client: AsyncClient, outbox: Arc<Outbox>) -> Self {
        Self { client, outbox }
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Queues a publish, or gives its payload back when the outbox is full.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotTaken> {
        let mut p = Publish::new(topic, qos, payload);
        p.retain = retain;
        self.outbox.push(Request::Publish(p)).map_err(|r| match r {
            Request::Publish(p) => NotTaken(Vec::from(p.payload)),
            _ => NotTaken(Vec::new()),
        })
    }

    /// Queues the PUBACK (or PUBREC) of `token`; false when the outbox is
    /// full (the [`super::AckSequencer`] keeps the token for later).
    pub fn try_ack(&self, token: AckToken) -> bool {
        let request = match token.qos {
            0 => return true,
            1 => Request::PubAck(PubAck::new(token.pkid)),
            _ => Request::PubRec(PubRec::new(token.pkid)),
        };
        match self.outbox.push(request) {
            Ok(()) => true,
            Err(_) => {
                tracing::debug!(pkid = token.pkid, "acknowledgement waits: outbox full");
                false
            }
        }
    }

    /// Queues the subscriptions made on each connection.
    pub fn try_subscribe_many(&self, subs: Vec<rumqttc::SubscribeFilter>) -> Result<(), String> {
        if subs.is_empty() {
            return Ok(());
        }
        self.outbox
            .push(Request::Subscribe(Subscribe::new_many(subs)))
            .map_err(|_| "the MQTT session's outbox is full".to_string())
    }

    /// Asks rumqttc to disconnect (shutdown only: the event loop does not
    /// hold back then, so rumqttc's `poll` takes it).
    pub fn try_disconnect(&self) -> Result<(), ClientError> {
        self.client.try_disconnect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: QoS) -> Request {
        Request::Publish(Publish::new("t", qos, vec![1]))
    }

    #[test]
    fn a_full_outbox_gives_the_request_back() {
        let o = Outbox::new(2);
        assert!(o.push(publish(QoS::AtLeastOnce)).is_ok());
        assert!(o.push(Request::PubAck(PubAck::new(7))).is_ok());
        assert!(matches!(
            o.push(publish(QoS::AtMostOnce)),
            Err(Request::Publish(_))
        ));
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_qos1_publish_waits_for_the_window_but_acknowledgements_never_wait_behind_it() {
        let o = Outbox::new(8);
        o.push(publish(QoS::AtLeastOnce)).unwrap();
        o.push(publish(QoS::AtMostOnce)).unwrap();
        o.push(Request::PubAck(PubAck::new(7))).unwrap();
        o.push(Request::PubAck(PubAck::new(8))).unwrap();
        assert!(
            matches!(o.pop(false), Some(Request::PubAck(a)) if a.pkid == 7),
            "acknowledgements go first, in order"
        );
        assert!(matches!(o.pop(false), Some(Request::PubAck(a)) if a.pkid == 8));
        assert!(
            o.pop(false).is_none(),
            "window full: the QoS 0 publish does not overtake the QoS 1 one"
        );
        assert!(matches!(o.pop(true), Some(Request::Publish(p)) if p.qos == QoS::AtLeastOnce));
        assert!(
            matches!(o.pop(false), Some(Request::Publish(p)) if p.qos == QoS::AtMostOnce),
            "QoS 0 needs no window"
        );
        assert!(o.pop(true).is_none());
    }

    #[test]
    fn a_lost_connection_voids_its_acknowledgements_and_subscriptions_but_keeps_publishes() {
        let o = Outbox::new(8);
        o.push(Request::PubAck(PubAck::new(1))).unwrap();
        o.push(publish(QoS::AtLeastOnce)).unwrap();
        o.push(Request::PubRec(PubRec::new(2))).unwrap();
        o.push(Request::Subscribe(Subscribe::new("t", QoS::AtLeastOnce)))
            .unwrap();
        o.connection_lost();
        assert_eq!(o.len(), 1);
        assert!(matches!(o.pop(true), Some(Request::Publish(_))));
    }

    #[tokio::test]
    async fn queueing_wakes_the_event_loop() {
        let o = Arc::new(Outbox::new(4));
        o.push(Request::PubAck(PubAck::new(1))).unwrap();
        // The wake-up was kept for the next wait.
        tokio::time::timeout(std::time::Duration::from_secs(1), o.woken())
            .await
            .expect("woken by the push");
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.woken().await });
        tokio::task::yield_now().await;
        o.push(Request::PubAck(PubAck::new(2))).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("a waiting event loop is woken by the push")
            .unwrap();
    }
}
