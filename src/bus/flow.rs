//! Flow control on the agent's main MQTT session: when the event loop may
//! stop reading from the broker, and when it must not.
//!
//! MQTT 3.1.1 has no way to tell a broker "send less" other than leaving
//! deliveries unacknowledged (the broker's in-flight window) and reading
//! less. Reading less also stops what comes in for us: the PUBACKs of our
//! own results and the PINGRESPs sit in the same byte stream as the
//! requests. Writing does not depend on reading: the event loop writes our
//! answers, acknowledgements and subscriptions from the outbox
//! (`super::client::Outbox`) itself, before every poll and all through a
//! hold, and the publisher never waits on it (it keeps a backlog instead),
//! so the pipeline always drains its queue and a hold always ends. The
//! event loop holds back only while nothing of ours needs a poll
//! ([`Ours::needs_poll`]). The one exception is [`Intake::Full`]: requests
//! held past the queue's hard limit mean the broker ignores its own window
//! (Mosquitto 2.0 re-sends a persistent session's whole backlog at once on
//! reconnection); reading then stops even while we await PUBACKs, until the
//! pipeline, whose answers and acknowledgements keep going out, drains
//! below the limit. Memory stays bounded and nothing acknowledged is lost.
//!
//! This module is pure: it decides from a snapshot. The event loop in
//! [`super`] does the waiting and the writing.

use std::time::Instant;

/// How far held requests' count may fill the sink past its bound before
/// [`Intake::Full`] (2,048 with the default queue of 256). Held requests
/// are most of what an overshooting broker costs in memory; stopping to
/// read at the limit costs only the delay of the PUBACKs for our results,
/// since our traffic keeps going out and a late PINGRESP is excused.
pub const HARD_LIMIT_COUNT_FACTOR: usize = 8;
/// How far held requests' bytes may fill the sink past its byte bound
/// before [`Intake::Full`] (128 MiB with the defaults).
pub const HARD_LIMIT_BYTES_FACTOR: usize = 2;

/// How full the request sink is of requests whose acknowledgement it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Below its bounds: read freely.
    Open,
    /// Held requests fill the bounds: read only while our own traffic
    /// needs the connection.
    Saturated,
    /// Held requests reach the hard limit (a broker past its window): stop
    /// reading until the pipeline drains below it.
    Full,
}

/// What of ours needs the connection's incoming side right now. What waits
/// to be written (the outbox, unsent acknowledgements, the publisher's
/// backlog) is no input: the event loop writes it during a hold too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ours {
    /// Our QoS 1 publishes awaiting the broker's PUBACK.
    pub awaiting_acks: u16,
    /// A PINGREQ due, or awaiting its PINGRESP.
    pub awaiting_pingresp: bool,
    /// Requests rumqttc re-sends from an earlier connection.
    pub resending: usize,
}

impl Ours {
    /// Whether anything of ours needs rumqttc's `poll`: a packet to read
    /// (a PUBACK for our publishes, a PINGRESP), a ping to send, or
    /// rumqttc's re-sends after a reconnection. What waits to be written
    /// does not: the event loop writes the outbox itself, during a hold too.
    pub fn needs_poll(&self) -> bool {
        self.awaiting_acks > 0 || self.awaiting_pingresp || self.resending > 0
    }
}

/// Why the event loop stops reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The sink is saturated and nothing of ours needs a poll.
    Saturated,
    /// The sink reached its hard limit.
    HardLimit,
}

/// Whether a packet read since our last PINGREQ shows the connection
/// alive, so that a PINGRESP not read yet is no reason to drop it. rumqttc
/// takes a ping still unanswered when the next falls due for a dead
/// connection; but while flow control reads less, the PINGRESP waits
/// behind everything the broker sent first (an overshooting broker's
/// backlog can take longer than a keep-alive to read), and any packet that
/// arrives after the PINGREQ went out proves the broker and the path alive.
/// A half-open connection delivers nothing and is still detected; a broker
/// that stops reading ours is detected by the flush timeout.
pub fn alive_since_ping(last_read: Instant, last_ping: Instant) -> bool {
    last_read > last_ping
}

/// Whether the event loop may stop reading now, and why.
pub fn hold(intake: Intake, ours: &Ours) -> Option<Hold> {
    match intake {
        Intake::Open => None,
        Intake::Saturated if ours.needs_poll() => None,
        Intake::Saturated => Some(Hold::Saturated),
        Intake::Full => Some(Hold::HardLimit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_intake_never_holds_back() {
        assert_eq!(hold(Intake::Open, &Ours::default()), None);
        let busy = Ours {
            awaiting_acks: 3,
            ..Ours::default()
        };
        assert_eq!(hold(Intake::Open, &busy), None);
    }

    #[test]
    fn a_saturated_intake_holds_back_only_while_nothing_of_ours_needs_a_poll() {
        assert_eq!(
            hold(Intake::Saturated, &Ours::default()),
            Some(Hold::Saturated)
        );
        let polled: [Ours; 3] = [
            Ours {
                awaiting_acks: 1,
                ..Ours::default()
            },
            Ours {
                awaiting_pingresp: true,
                ..Ours::default()
            },
            Ours {
                resending: 1,
                ..Ours::default()
            },
        ];
        for ours in polled {
            assert!(ours.needs_poll());
            assert_eq!(hold(Intake::Saturated, &ours), None, "{ours:?}");
        }
    }

    #[test]
    fn only_a_packet_read_after_the_ping_excuses_a_missing_pingresp() {
        let ping = Instant::now();
        let before = ping - std::time::Duration::from_millis(5);
        let after = ping + std::time::Duration::from_millis(5);
        assert!(!alive_since_ping(before, ping), "nothing since the ping");
        assert!(!alive_since_ping(ping, ping));
        assert!(alive_since_ping(after, ping));
    }

    #[test]
    fn the_hard_limit_holds_back_even_while_we_await_acknowledgements() {
        let results_waiting = Ours {
            awaiting_acks: 100,
            awaiting_pingresp: true,
            resending: 5,
        };
        assert_eq!(hold(Intake::Full, &results_waiting), Some(Hold::HardLimit));
    }
}
