//! The life of one MQTT session across connections, as a pure state
//! machine: events in (connected, subscriptions acknowledged, connection
//! lost), actions out (subscribe, say so, wait this long before the next
//! attempt, warn about a duplicate client id). The agent's main session
//! ([`super::EventLoopTask`]) and the update session (`fleet::session`)
//! both drive one, each doing the I/O its actions name; the central service
//! will too. Owns the reconnection backoff and the counting of connections
//! that closed soon after they opened; owns no socket, no timer and no
//! rumqttc state.

use std::time::{Duration, Instant};

use super::Backoff;

/// A connection up this long counts as healthy: the reconnection backoff
/// starts over after it ends.
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(30);
/// Connections in a row closed before [`HEALTHY_CONNECTION`] after which
/// the session says it suspects a duplicate client id.
pub const SHORT_LIVED_WARNING: u32 = 3;

/// What happened to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The broker accepted a connection (CONNACK).
    Connected { session_present: bool },
    /// The broker answered the subscriptions; `refused` of them failed.
    Subscribed { refused: usize },
    /// The connection ended (an error, or the broker closed it).
    Lost,
}

/// What the session's owner should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionAction {
    /// Queue the session's subscriptions (after every connection: a broker
    /// without our session has none).
    Subscribe,
    /// The broker had no session for us: send again what was in flight.
    ResendInFlight,
    /// Tell the rest of the agent whether it is connected / subscribed.
    SetConnected(bool),
    SetSubscribed(bool),
    /// Warn that the broker closed this many connections in a row soon
    /// after accepting them (another client with our id?).
    WarnShortLived(u32),
    /// Wait this long before connecting again.
    Reconnect(Duration),
}

/// The session's state between events.
#[derive(Debug)]
pub struct ConnectionState {
    backoff: Backoff,
    connected_at: Option<Instant>,
    short_lived: u32,
    /// Connections so far (a message's connection tells which acks are
    /// void after a reconnection).
    generation: u64,
}

impl ConnectionState {
    pub fn new(reconnect_min: Duration, reconnect_max: Duration) -> Self {
        Self {
            backoff: Backoff::new(reconnect_min, reconnect_max),
            connected_at: None,
            short_lived: 0,
            generation: 0,
        }
    }

    /// Connections made so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected_at.is_some()
    }

    /// Handles `event` at `now`; returns the actions, in order.
    pub fn on(&mut self, event: ConnectionEvent, now: Instant) -> Vec<ConnectionAction> {
        use ConnectionAction as A;
        match event {
            ConnectionEvent::Connected { session_present } => {
                self.connected_at = Some(now);
                self.generation += 1;
                let mut actions = Vec::with_capacity(3);
                if !session_present {
                    actions.push(A::ResendInFlight);
                }
                actions.push(A::Subscribe);
                actions.push(A::SetConnected(true));
                actions
            }
            ConnectionEvent::Subscribed { refused } => vec![A::SetSubscribed(refused == 0)],
            ConnectionEvent::Lost => {
                let mut actions = vec![A::SetSubscribed(false), A::SetConnected(false)];
                // The backoff starts over only after a connection that
                // stayed up: a broker that drops us right after CONNACK (a
                // duplicate client id, an oversized packet) must not make us
                // reconnect at full speed forever.
                match self
                    .connected_at
                    .take()
                    .map(|t| now.saturating_duration_since(t))
                {
                    Some(up) if up >= HEALTHY_CONNECTION => {
                        self.backoff.reset();
                        self.short_lived = 0;
                    }
                    Some(_) => {
                        self.short_lived += 1;
                        if self.short_lived == SHORT_LIVED_WARNING {
                            actions.push(A::WarnShortLived(self.short_lived));
                        }
                    }
                    None => {}
                }
                actions.push(A::Reconnect(self.backoff.next_delay()));
                actions
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectionAction as A;
    use super::ConnectionEvent as E;
    use super::*;

    fn state() -> ConnectionState {
        ConnectionState::new(Duration::from_millis(100), Duration::from_millis(800))
    }

    fn reconnect_delay(actions: &[ConnectionAction]) -> Duration {
        match actions.last() {
            Some(A::Reconnect(d)) => *d,
            other => panic!("no reconnection: {other:?}"),
        }
    }

    #[test]
    fn a_connection_subscribes_and_says_connected_and_a_fresh_session_resends_what_was_in_flight() {
        let mut s = state();
        let t = Instant::now();
        assert_eq!(
            s.on(
                E::Connected {
                    session_present: true
                },
                t
            ),
            vec![A::Subscribe, A::SetConnected(true)]
        );
        assert_eq!(s.generation(), 1);
        assert!(s.is_connected());
        s.on(E::Lost, t);
        assert_eq!(
            s.on(
                E::Connected {
                    session_present: false
                },
                t
            ),
            vec![A::ResendInFlight, A::Subscribe, A::SetConnected(true)]
        );
        assert_eq!(s.generation(), 2);
        assert_eq!(
            s.on(E::Subscribed { refused: 0 }, t),
            vec![A::SetSubscribed(true)]
        );
        assert_eq!(
            s.on(E::Subscribed { refused: 2 }, t),
            vec![A::SetSubscribed(false)]
        );
    }

    #[test]
    fn short_lived_connections_back_off_further_and_the_third_in_a_row_is_reported_once() {
        let mut s = state();
        let t0 = Instant::now();
        let mut delays = Vec::new();
        let mut warnings = Vec::new();
        for i in 0..5u32 {
            let at = t0 + Duration::from_secs(u64::from(i));
            s.on(
                E::Connected {
                    session_present: true,
                },
                at,
            );
            let actions = s.on(E::Lost, at + Duration::from_millis(10));
            assert_eq!(
                &actions[..2],
                &[A::SetSubscribed(false), A::SetConnected(false)]
            );
            warnings.extend(actions.iter().filter_map(|a| match a {
                A::WarnShortLived(n) => Some(*n),
                _ => None,
            }));
            delays.push(reconnect_delay(&actions));
        }
        assert_eq!(warnings, vec![SHORT_LIVED_WARNING]);
        // Bases 100, 200, 400, 800, 800 ms; each delay in [base/2, base].
        for (d, base) in delays.iter().zip([100u64, 200, 400, 800, 800]) {
            let ms = d.as_millis() as u64;
            assert!(ms >= base / 2 && ms <= base, "{ms} ms for base {base}");
        }
    }

    #[test]
    fn a_healthy_connection_starts_the_backoff_over() {
        let mut s = state();
        let t0 = Instant::now();
        for _ in 0..4 {
            s.on(
                E::Connected {
                    session_present: true,
                },
                t0,
            );
            s.on(E::Lost, t0);
        }
        s.on(
            E::Connected {
                session_present: true,
            },
            t0,
        );
        let actions = s.on(E::Lost, t0 + HEALTHY_CONNECTION);
        assert!(reconnect_delay(&actions) <= Duration::from_millis(100));
        assert!(!actions.iter().any(|a| matches!(a, A::WarnShortLived(_))));
    }

    #[test]
    fn a_failed_attempt_without_a_connection_only_backs_off() {
        let mut s = state();
        let t = Instant::now();
        let first = s.on(E::Lost, t);
        assert_eq!(
            &first[..2],
            &[A::SetSubscribed(false), A::SetConnected(false)]
        );
        assert!(reconnect_delay(&first) <= Duration::from_millis(100));
        let second = s.on(E::Lost, t);
        assert!(reconnect_delay(&second) <= Duration::from_millis(200));
        assert_eq!(s.generation(), 0);
    }
}
