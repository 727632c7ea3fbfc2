//! Acknowledging received QoS 1/2 messages in the order they arrived.
//!
//! The agent acknowledges a crop request only once its answer is handed to
//! the MQTT client, so a request that was acknowledged is never lost. MQTT
//! 3.1.1 (§4.6) wants PUBACKs in the order the PUBLISHes came, and some
//! brokers drop a client that breaks it, while requests finish out of order;
//! this sequencer holds each acknowledgement until all earlier ones are due.
//! After a reconnect the old connection's tokens are void (the broker sends
//! the unacknowledged messages again).

use std::collections::VecDeque;
use std::sync::Mutex;

use rumqttc::{AsyncClient, Publish};

use super::AckToken;

struct Entry {
    token: AckToken,
    done: bool,
}

#[derive(Default)]
struct State {
    generation: u32,
    next_seq: u64,
    /// Entries in arrival order; `pending[0]` has sequence `first_seq`.
    pending: VecDeque<Entry>,
    first_seq: u64,
}

/// Shared by the event loop (registers arrivals) and the publisher (marks
/// answers done).
#[derive(Default)]
pub struct AckSequencer {
    state: Mutex<State>,
}

impl AckSequencer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token for a message just received with `pkid` and `qos` (> 0).
    pub fn register(&self, pkid: u16, qos: u8) -> AckToken {
        let mut s = self.lock();
        let token = AckToken {
            pkid,
            qos,
            seq: s.next_seq,
            generation: s.generation,
        };
        s.next_seq += 1;
        s.pending.push_back(Entry { token, done: false });
        token
    }

    /// Marks `token` answered and hands every acknowledgement now due to
    /// `send`, in arrival order (under the lock, so two callers cannot
    /// interleave). Tokens of an earlier connection are ignored.
    pub fn done(&self, token: AckToken, mut send: impl FnMut(AckToken)) {
        let mut s = self.lock();
        if token.generation != s.generation || token.seq < s.first_seq {
            return;
        }
        let i = (token.seq - s.first_seq) as usize;
        if let Some(e) = s.pending.get_mut(i) {
            e.done = true;
        }
        while s.pending.front().is_some_and(|e| e.done) {
            if let Some(e) = s.pending.pop_front() {
                s.first_seq += 1;
                send(e.token);
            }
        }
    }

    /// Forgets the tokens of the connection that just ended.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.generation = s.generation.wrapping_add(1);
        s.first_seq = s.next_seq;
        s.pending.clear();
    }
}

/// Queues the PUBACK (or PUBREC) of `token` on the MQTT client.
pub fn send_ack(client: &AsyncClient, token: AckToken) {
    let mut p = Publish::new("", super::qos(token.qos), Vec::<u8>::new());
    p.pkid = token.pkid;
    if let Err(err) = client.try_ack(&p) {
        tracing::warn!(pkid = token.pkid, "cannot queue an acknowledgement: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(seq: &AckSequencer, token: AckToken) -> Vec<u16> {
        let mut sent = Vec::new();
        seq.done(token, |t| sent.push(t.pkid));
        sent
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order_whatever_order_answers_come_in() {
        let seq = AckSequencer::default();
        let (a, b, c) = (
            seq.register(10, 1),
            seq.register(11, 1),
            seq.register(12, 1),
        );
        assert!(drain(&seq, c).is_empty(), "12 waits for 10 and 11");
        assert!(drain(&seq, b).is_empty());
        assert_eq!(drain(&seq, a), vec![10, 11, 12]);
        let d = seq.register(13, 1);
        assert_eq!(drain(&seq, d), vec![13]);
    }

    #[test]
    fn tokens_of_a_previous_connection_are_ignored() {
        let seq = AckSequencer::default();
        let old = seq.register(1, 1);
        seq.reset();
        let new = seq.register(1, 1);
        assert!(drain(&seq, old).is_empty());
        assert_eq!(drain(&seq, new), vec![1]);
    }
}
