//! The messages the bus exchanges with the rest of the agent: what arrives
//! ([`Incoming`], with the [`AckToken`] that acknowledges it), what leaves
//! ([`Outbound`], via [`ToBus`]), and where crop requests go
//! ([`RequestSink`]). The bus owns these so that nothing it depends on has
//! to know the bus.

use std::time::Instant;

/// How to acknowledge a received message once it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub pkid: u16,
    pub qos: u8,
    /// Arrival order on this connection.
    pub seq: u64,
    /// Which connection it arrived on.
    pub generation: u32,
}

/// A message as received from the bus.
#[derive(Debug)]
pub struct Incoming {
    pub payload: bytes::Bytes,
    pub received: Instant,
    /// Set for QoS 1/2 messages: acknowledged once answered (or dropped).
    pub ack: Option<AckToken>,
}

/// Room kept in a packet for the fixed header, the topic's length prefix
/// and the packet id.
const PACKET_OVERHEAD: usize = 64;

/// Whether a message of `payload_len` bytes for `topic` fits one packet of
/// at most `max_packet_bytes` (`bus.max_packet_bytes`).
pub(crate) fn fits_packet(topic: &str, payload_len: usize, max_packet_bytes: usize) -> bool {
    payload_len + topic.len() + PACKET_OVERHEAD <= max_packet_bytes
}

/// What the rest of the agent hands the bus to publish, already encoded,
/// with the request to acknowledge once it is handed to the MQTT client.
/// The bus alone chooses each kind's topic, QoS and retain flag, and checks
/// its size.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A RecognitionResult, for the results topic at `bus.results_qos`.
    /// One that would not fit a packet is replaced by an ErrorReport for
    /// `request_id`, in `encoding`.
    Result {
        payload: Vec<u8>,
        request_id: String,
        encoding: crate::protocol::Encoding,
        ack: Option<AckToken>,
    },
    /// An ErrorReport, for the errors topic at QoS 1.
    Error {
        payload: Vec<u8>,
        ack: Option<AckToken>,
    },
    /// The Status, retained, at QoS 1.
    Status { payload: Vec<u8> },
    /// A Metrics message, at QoS 0.
    Metrics { payload: Vec<u8> },
}

/// What the bus's publisher is asked to do, in order.
#[derive(Debug)]
pub enum ToBus {
    Send(Outbound),
    /// Answered once every earlier message was handed to the MQTT client.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Takes crop requests from the bus without blocking it (the pipeline).
pub trait RequestSink: Send + Sync {
    /// Queues `msg`; a message that cannot be queued is the sink's to
    /// report and acknowledge.
    fn submit(&self, msg: Incoming);
    /// Reports `msg` as not handled for `reason` (over a limit) and
    /// acknowledges it; never queues it.
    fn refuse(&self, msg: Incoming, reason: String);
    /// How full the sink is of acknowledged-later (QoS 1) requests: the
    /// bus reads less from the broker as it fills, which keeps the rest
    /// (flow control instead of drops; see [`super::flow`]).
    fn intake(&self) -> super::Intake {
        super::Intake::Open
    }
}
