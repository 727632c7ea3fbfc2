//! Flow control on the agent's main MQTT session: when the event loop may
//! stop reading from the broker, and when it must not.
//!
//! MQTT 3.1.1 has no way to tell a broker "send less" other than leaving
//! deliveries unacknowledged (the broker's in-flight window) and reading
//! less. Reading less stops everything on the connection: the PUBACKs of
//! our own results and the PINGRESPs sit in the same byte stream as the
//! requests, and rumqttc writes only from inside `poll`. So the event loop
//! holds back only while nothing of ours waits to go out or come in
//! ([`Ours`]), and the publisher never waits on rumqttc (it keeps a backlog
//! instead), so the pipeline always drains its queue and a hold always
//! ends. The one exception is [`Intake::Full`]: requests held past the
//! queue's hard limit mean the broker ignores its own window (Mosquitto 2.0
//! re-sends a persistent session's whole backlog at once on reconnection);
//! reading then stops even with our traffic waiting, until the pipeline,
//! which no longer depends on the socket, drains below the limit. Our
//! PUBACKs and PINGRESPs sit behind everything the broker sent first, so
//! such a broker may cost a reconnection per keep-alive until its backlog is
//! worked off; memory stays bounded and nothing acknowledged is lost.
//!
//! This module is pure: it decides from a snapshot, and counts what was
//! handed to rumqttc against what rumqttc took ([`OutgoingGauge`]). The
//! event loop in [`super`] does the waiting.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// How far held requests' count may fill the sink past its bound before
/// [`Intake::Full`] (16,384 with the default queue of 256): high, because
/// until then the event loop keeps reading its own PUBACKs and PINGRESPs
/// through whatever an overshooting broker sent first.
pub const HARD_LIMIT_COUNT_FACTOR: usize = 64;
/// How far held requests' bytes may fill the sink past its byte bound
/// before [`Intake::Full`] (256 MiB with the defaults).
pub const HARD_LIMIT_BYTES_FACTOR: usize = 4;

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

/// What of ours is on the connection right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ours {
    /// Requests handed to rumqttc that it has not taken yet.
    pub queued_in_client: u64,
    /// Our QoS 1 publishes awaiting the broker's PUBACK.
    pub awaiting_acks: u16,
    /// A PINGREQ due, or awaiting its PINGRESP.
    pub awaiting_pingresp: bool,
    /// Requests rumqttc re-sends from an earlier connection.
    pub resending: usize,
    /// Acknowledgements due that rumqttc's queue did not take yet.
    pub unsent_acks: usize,
    /// Messages the publisher keeps because rumqttc's queue was full.
    pub backlog: usize,
}

impl Ours {
    /// Whether anything of ours needs the event loop to poll.
    pub fn waiting(&self) -> bool {
        self.queued_in_client > 0
            || self.awaiting_acks > 0
            || self.awaiting_pingresp
            || self.resending > 0
            || self.unsent_acks > 0
            || self.backlog > 0
    }
}

/// Why the event loop stops reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The sink is saturated and nothing of ours needs the connection.
    Saturated,
    /// The sink reached its hard limit.
    HardLimit,
}

/// Whether the event loop may stop reading now, and why.
pub fn hold(intake: Intake, ours: &Ours) -> Option<Hold> {
    match intake {
        Intake::Open => None,
        Intake::Saturated if ours.waiting() => None,
        Intake::Saturated => Some(Hold::Saturated),
        Intake::Full => Some(Hold::HardLimit),
    }
}

/// Counts requests handed to rumqttc's request queue against those its
/// event loop took, so that the event loop knows whether anything of ours
/// still waits in a queue it cannot look into. Also wakes a holding event
/// loop the moment something is handed over or put aside.
#[derive(Debug, Default)]
pub struct OutgoingGauge {
    handed: AtomicU64,
    taken: AtomicU64,
    backlog: AtomicUsize,
    wake: Notify,
}

impl OutgoingGauge {
    /// After a request was put on rumqttc's queue.
    pub fn handed(&self) {
        self.handed.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// The event loop saw rumqttc take one of our requests. Never counts
    /// past what was handed (a request sent around the gauge, such as the
    /// offline Status at shutdown, must not hide a later one).
    pub fn taken(&self) {
        let handed = self.handed.load(Ordering::Acquire);
        let _ = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < handed).then_some(t + 1)
            });
    }

    /// Requests handed and not taken yet.
    pub fn queued(&self) -> u64 {
        let taken = self.taken.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(taken)
    }

    /// The connection ended: rumqttc moved what its queue held into its
    /// re-send list (which the event loop sees) or dropped it.
    pub fn connection_lost(&self) {
        self.taken
            .store(self.handed.load(Ordering::Acquire), Ordering::Release);
    }

    /// The publisher's backlog changed size.
    pub fn set_backlog(&self, len: usize) {
        let before = self.backlog.swap(len, Ordering::AcqRel);
        if len > before {
            self.wake.notify_one();
        }
    }

    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Acquire)
    }

    /// Wakes a holding event loop (something of ours is waiting).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when something was handed over or put aside since the last
    /// call (a wake-up is kept if nobody waited for it).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_intake_never_holds_back() {
        assert_eq!(hold(Intake::Open, &Ours::default()), None);
        let busy = Ours {
            backlog: 3,
            ..Ours::default()
        };
        assert_eq!(hold(Intake::Open, &busy), None);
    }

    #[test]
    fn a_saturated_intake_holds_back_only_while_nothing_of_ours_waits() {
        assert_eq!(
            hold(Intake::Saturated, &Ours::default()),
            Some(Hold::Saturated)
        );
        let each: [Ours; 6] = [
            Ours {
                queued_in_client: 1,
                ..Ours::default()
            },
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
            Ours {
                unsent_acks: 1,
                ..Ours::default()
            },
            Ours {
                backlog: 1,
                ..Ours::default()
            },
        ];
        for ours in each {
            assert!(ours.waiting());
            assert_eq!(hold(Intake::Saturated, &ours), None, "{ours:?}");
        }
    }

    #[test]
    fn the_hard_limit_holds_back_even_with_our_traffic_waiting() {
        let results_waiting = Ours {
            awaiting_acks: 100,
            awaiting_pingresp: true,
            backlog: 500,
            unsent_acks: 20,
            ..Ours::default()
        };
        assert_eq!(hold(Intake::Full, &results_waiting), Some(Hold::HardLimit));
    }

    #[test]
    fn the_gauge_counts_what_rumqttc_has_not_taken_and_never_goes_below_zero() {
        let g = OutgoingGauge::default();
        g.handed();
        g.handed();
        assert_eq!(g.queued(), 2);
        g.taken();
        assert_eq!(g.queued(), 1);
        g.taken();
        g.taken(); // one sent around the gauge
        assert_eq!(g.queued(), 0);
        g.handed();
        assert_eq!(g.queued(), 1, "a later request is still seen");
        g.connection_lost();
        assert_eq!(g.queued(), 0);
    }

    #[tokio::test]
    async fn a_handoff_or_a_growing_backlog_wakes_the_event_loop() {
        let g = std::sync::Arc::new(OutgoingGauge::default());
        g.handed();
        // The wake-up was kept for the next wait.
        tokio::time::timeout(std::time::Duration::from_secs(1), g.woken())
            .await
            .expect("woken by the handoff");
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.woken().await });
        tokio::task::yield_now().await;
        g.set_backlog(4);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken by the backlog")
            .unwrap();
        assert_eq!(g.backlog(), 4);
    }
}
