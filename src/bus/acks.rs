//! Acknowledging received QoS 1/2 messages in the order they arrived.
//!
//! The agent acknowledges a crop request only once its answer is handed to
//! the MQTT client, so a request that was acknowledged is never lost. MQTT
//! 3.1.1 (§4.6) wants PUBACKs in the order the PUBLISHes came, and some
//! brokers drop a client that breaks it, while requests finish out of order;
//! this sequencer holds each acknowledgement until all earlier ones are due.
//! After a reconnect the old connection's tokens are void (the broker sends
//! the unacknowledged messages again). An acknowledgement that the session's
//! outbox cannot take right now (it is full) is not lost: it waits,
//! with every later one behind it to keep the order, until [`AckSequencer::retry`]
//! or the next [`AckSequencer::done`] hands it over.

use std::collections::VecDeque;
use std::sync::Mutex;

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
    /// Due acknowledgements rumqttc did not take yet, in order.
    unsent: VecDeque<AckToken>,
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
    /// interleave). `send` returns false when it could not take one: that
    /// one and all later ones wait for the next call or [`Self::retry`].
    /// Tokens of an earlier connection are ignored.
    pub fn done(&self, token: AckToken, send: impl FnMut(AckToken) -> bool) {
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
                s.unsent.push_back(e.token);
            }
        }
        Self::hand_over(&mut s, send);
    }

    /// Hands waiting acknowledgements to `send` again, in order.
    pub fn retry(&self, send: impl FnMut(AckToken) -> bool) {
        Self::hand_over(&mut self.lock(), send);
    }

    /// Acknowledgements waiting because the outbox was full.
    pub fn unsent(&self) -> usize {
        self.lock().unsent.len()
    }

    fn hand_over(s: &mut State, mut send: impl FnMut(AckToken) -> bool) {
        while let Some(&t) = s.unsent.front() {
            if t.generation != s.generation {
                s.unsent.pop_front();
                continue;
            }
            if !send(t) {
                break;
            }
            s.unsent.pop_front();
        }
    }

    /// Forgets the tokens of the connection that just ended.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.generation = s.generation.wrapping_add(1);
        s.first_seq = s.next_seq;
        s.pending.clear();
        s.unsent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(seq: &AckSequencer, token: AckToken) -> Vec<u16> {
        let mut sent = Vec::new();
        seq.done(token, |t| {
            sent.push(t.pkid);
            true
        });
        sent
    }

    #[test]
    fn acknowledgements_the_client_cannot_take_wait_in_order_and_are_never_lost() {
        let seq = AckSequencer::default();
        let tokens: Vec<AckToken> = (1..=5).map(|p| seq.register(p, 1)).collect();
        let mut sent = Vec::new();
        // The client's queue takes two, then is full.
        let mut room = 2;
        for t in &tokens[..4] {
            seq.done(*t, |t| {
                if room == 0 {
                    return false;
                }
                room -= 1;
                sent.push(t.pkid);
                true
            });
        }
        assert_eq!(sent, vec![1, 2]);
        assert_eq!(seq.unsent(), 2);
        // Room again: the waiting ones go first, then the newest.
        seq.done(tokens[4], |t| {
            sent.push(t.pkid);
            true
        });
        assert_eq!(sent, vec![1, 2, 3, 4, 5]);
        assert_eq!(seq.unsent(), 0);
        // A reconnect voids what still waited.
        let t = seq.register(9, 1);
        seq.done(t, |_| false);
        assert_eq!(seq.unsent(), 1);
        seq.reset();
        assert_eq!(seq.unsent(), 0);
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
