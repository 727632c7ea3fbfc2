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

use rumqttc::{AsyncClient, Publish, QoS};

use crate::pipeline::AckToken;

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

    /// Marks `token` answered and sends every acknowledgement now due, in
    /// arrival order. Tokens of an earlier connection are ignored.
    pub fn done(&self, token: AckToken, client: &AsyncClient) {
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
                let mut p = Publish::new("", qos(e.token.qos), Vec::<u8>::new());
                p.pkid = e.token.pkid;
                // Sent under the lock so acknowledgements keep their order.
                if let Err(err) = client.try_ack(&p) {
                    tracing::warn!(
                        pkid = e.token.pkid,
                        "cannot queue an acknowledgement: {err}"
                    );
                }
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

    /// Acknowledgements waiting for an earlier message's answer.
    pub fn waiting(&self) -> usize {
        self.lock().pending.len()
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
