//! The agent's handle on its main MQTT session: rumqttc's client, with
//! every request it hands over counted in the [`OutgoingGauge`] so that
//! flow control knows when something of ours waits in rumqttc's queue
//! (see [`super::flow`]). Never waits on rumqttc: a request its full queue
//! cannot take is given back to the caller. The update session
//! (`fleet::session`) has its own connection and does not use this.

use std::sync::Arc;

use rumqttc::{AsyncClient, ClientError, Publish, QoS, Request, SubscribeFilter};

use super::flow::OutgoingGauge;
use super::AckToken;

/// rumqttc's client plus the gauge of what it has not sent yet.
#[derive(Clone)]
pub struct BusClient {
    client: AsyncClient,
    gauge: Arc<OutgoingGauge>,
}

/// A publish rumqttc's queue could not take: its payload, given back.
#[derive(Debug)]
pub struct NotTaken(pub Vec<u8>);

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the MQTT client's request queue is full")
    }
}

impl BusClient {
    pub fn new(client: AsyncClient, gauge: Arc<OutgoingGauge>) -> Self {
        Self { client, gauge }
    }

    pub fn gauge(&self) -> &Arc<OutgoingGauge> {
        &self.gauge
    }

    /// Puts a publish on rumqttc's queue, or gives its payload back when
    /// the queue is full.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotTaken> {
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.gauge.handed();
                Ok(())
            }
            Err(ClientError::TryRequest(Request::Publish(p)))
            | Err(ClientError::Request(Request::Publish(p))) => Err(NotTaken(Vec::from(p.payload))),
            // rumqttc only refuses a publish by handing it back.
            Err(_) => Err(NotTaken(Vec::new())),
        }
    }

    /// Queues the PUBACK (or PUBREC) of `token`; false when rumqttc's queue
    /// is full (the [`super::AckSequencer`] keeps the token for later).
    pub fn try_ack(&self, token: AckToken) -> bool {
        let mut p = Publish::new("", super::qos(token.qos), Vec::<u8>::new());
        p.pkid = token.pkid;
        match self.client.try_ack(&p) {
            Ok(()) => {
                if token.qos > 0 {
                    self.gauge.handed();
                }
                true
            }
            Err(err) => {
                tracing::debug!(pkid = token.pkid, "acknowledgement waits: {err}");
                false
            }
        }
    }

    pub fn try_subscribe_many(&self, subs: Vec<SubscribeFilter>) -> Result<(), ClientError> {
        self.client.try_subscribe_many(subs)?;
        self.gauge.handed();
        Ok(())
    }

    pub fn try_disconnect(&self) -> Result<(), ClientError> {
        self.client.try_disconnect()?;
        self.gauge.handed();
        Ok(())
    }

    /// Publishes, waiting for room in rumqttc's queue (shutdown only: the
    /// event loop does not hold back then).
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.client.publish(topic, qos, retain, payload).await?;
        self.gauge.handed();
        Ok(())
    }
}
