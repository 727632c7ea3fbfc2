//! The bounded ingest queue between the bus and the decode workers.
//!
//! Pushing never blocks (the MQTT event loop must keep polling). The queue
//! is bounded by messages and by payload bytes. Only *droppable* messages
//! (QoS 0: nobody sends them again) are ever dropped for room: when the
//! queue is full the overflow policy picks which to drop and hands them back
//! so the caller can count and report them. A message that is not droppable
//! (QoS 1: the agent holds its acknowledgement, so the broker holds back
//! further messages once its in-flight window is full) is never dropped: it
//! is queued past the bounds. [`IngestQueue::intake`] tells the bus how
//! full of held messages the queue is: at the bounds it reads from the
//! broker only for its own traffic, at the hard limit ([`HARD_LIMIT_COUNT_FACTOR`]
//! times the count or [`HARD_LIMIT_BYTES_FACTOR`] times the bytes, reached only when
//! a broker ignores its in-flight window) it stops reading until the workers drain the queue below it (see
//! `bus::flow`). Workers block on `pop`.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

use crate::bus::flow::{HARD_LIMIT_BYTES_FACTOR, HARD_LIMIT_COUNT_FACTOR};
use crate::bus::Intake;
use crate::config::OverflowPolicy;

pub struct IngestQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
    max_bytes: usize,
    policy: OverflowPolicy,
}

struct Entry<T> {
    item: T,
    bytes: usize,
    droppable: bool,
}

struct State<T> {
    items: VecDeque<Entry<T>>,
    bytes: usize,
    /// Non-droppable items and their bytes.
    held: usize,
    held_bytes: usize,
    closed: bool,
}

impl<T> State<T> {
    /// Whether `bytes` more fit within `factor` times the bounds (a message
    /// alone always fits the byte bound: the packet limit caps it).
    fn fits(&self, bytes: usize, capacity: usize, max_bytes: usize, factor: usize) -> bool {
        self.items.len() < capacity * factor
            && (self.items.is_empty() || self.bytes + bytes <= max_bytes.saturating_mul(factor))
    }
}

/// What `push` did.
#[derive(Debug)]
pub struct Pushed<T> {
    /// Whether the new item was queued; when not, it is returned in
    /// `rejected`.
    pub queued: bool,
    pub rejected: Option<T>,
    /// Older droppable items dropped to make room.
    pub dropped: Vec<T>,
}

impl<T> IngestQueue<T> {
    pub fn new(capacity: usize, max_bytes: usize, policy: OverflowPolicy) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(4096)),
                bytes: 0,
                held: 0,
                held_bytes: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` of `bytes` payload bytes; see the module docs for what
    /// `droppable` changes.
    pub fn push(&self, item: T, bytes: usize, droppable: bool) -> Pushed<T> {
        let rejected = |item| Pushed {
            queued: false,
            rejected: Some(item),
            dropped: Vec::new(),
        };
        let mut s = self.lock();
        if s.closed {
            return rejected(item);
        }
        let (cap, max) = (self.capacity, self.max_bytes);
        let mut dropped = Vec::new();
        if !s.fits(bytes, cap, max, 1) {
            if !droppable {
                // Held: its sender's broker keeps no copy we could ask for
                // again, so it is queued whatever the bounds.
            } else if self.policy == OverflowPolicy::DropNewest {
                return rejected(item);
            } else {
                // Drop-oldest: make room from the oldest droppable items;
                // if they are not enough, the new one goes too.
                let mut would_free = (0usize, 0usize);
                let mut enough = false;
                for e in s.items.iter().filter(|e| e.droppable) {
                    would_free.0 += 1;
                    would_free.1 += e.bytes;
                    let len = s.items.len() - would_free.0;
                    let b = s.bytes - would_free.1;
                    if len < cap && (len == 0 || b + bytes <= max) {
                        enough = true;
                        break;
                    }
                }
                if !enough {
                    return rejected(item);
                }
                let mut to_drop = would_free.0;
                let mut kept = VecDeque::with_capacity(s.items.len());
                for e in s.items.drain(..) {
                    if e.droppable && to_drop > 0 {
                        to_drop -= 1;
                        dropped.push(e);
                    } else {
                        kept.push_back(e);
                    }
                }
                s.items = kept;
                s.bytes -= dropped.iter().map(|e| e.bytes).sum::<usize>();
            }
        }
        s.bytes += bytes;
        if !droppable {
            s.held += 1;
            s.held_bytes += bytes;
        }
        s.items.push_back(Entry {
            item,
            bytes,
            droppable,
        });
        drop(s);
        self.ready.notify_one();
        Pushed {
            queued: true,
            rejected: None,
            dropped: dropped.into_iter().map(|e| e.item).collect(),
        }
    }

    /// Waits for an item; `None` once the queue is closed.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(e) = s.items.pop_front() {
                s.bytes -= e.bytes;
                if !e.droppable {
                    s.held -= 1;
                    s.held_bytes -= e.bytes;
                }
                return Some(e.item);
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops the queue: waiting workers wake up and get `None`; the items
    /// still queued are returned (never started, so never acknowledged).
    pub fn close(&self) -> Vec<T> {
        let mut s = self.lock();
        s.closed = true;
        s.bytes = 0;
        s.held = 0;
        s.held_bytes = 0;
        let left = s.items.drain(..).map(|e| e.item).collect();
        drop(s);
        self.ready.notify_all();
        left
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Payload bytes queued.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// How full of held (non-droppable) messages the queue is: at its
    /// bounds, [`Intake::Saturated`]; at [`HARD_LIMIT_COUNT_FACTOR`] times
    /// the count or [`HARD_LIMIT_BYTES_FACTOR`] times the bytes, [`Intake::Full`].
    pub fn intake(&self) -> Intake {
        let s = self.lock();
        let over = |count_factor: usize, bytes_factor: usize| {
            s.held >= self.capacity.saturating_mul(count_factor)
                || (s.held > 0 && s.held_bytes >= self.max_bytes.saturating_mul(bytes_factor))
        };
        if over(HARD_LIMIT_COUNT_FACTOR, HARD_LIMIT_BYTES_FACTOR) {
            Intake::Full
        } else if over(1, 1) {
            Intake::Saturated
        } else {
            Intake::Open
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_oldest(cap: usize, max_bytes: usize) -> IngestQueue<u32> {
        IngestQueue::new(cap, max_bytes, OverflowPolicy::DropOldest)
    }

    #[test]
    fn drop_oldest_keeps_the_newest_items() {
        let q = drop_oldest(2, 1000);
        assert!(q.push(1, 1, true).queued);
        assert!(q.push(2, 1, true).queued);
        let p = q.push(3, 1, true);
        assert!(p.queued);
        assert_eq!(p.dropped, vec![1]);
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), Some(3));
    }

    #[test]
    fn drop_newest_rejects_when_full() {
        let q = IngestQueue::new(1, 1000, OverflowPolicy::DropNewest);
        assert!(q.push(1, 1, true).queued);
        let p = q.push(2, 1, true);
        assert_eq!((p.queued, p.rejected), (false, Some(2)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn the_byte_bound_drops_as_many_old_items_as_needed() {
        let q = drop_oldest(100, 100);
        for i in 0..4 {
            assert!(q.push(i, 25, true).queued);
        }
        assert_eq!(q.bytes(), 100);
        let p = q.push(9, 60, true);
        assert!(p.queued);
        assert_eq!(p.dropped, vec![0, 1, 2], "60 more bytes need 3 of 25 freed");
        assert_eq!(q.bytes(), 85);
        // One message larger than the bound alone is still taken.
        let q = drop_oldest(10, 100);
        assert!(q.push(1, 500, true).queued);
        assert_eq!(q.push(2, 1, true).dropped, vec![1]);
    }

    #[test]
    fn held_messages_are_never_dropped_and_queue_past_the_bounds_and_the_hard_limit() {
        let q = drop_oldest(2, 1000);
        assert!(q.push(1, 1, false).queued);
        assert_eq!(q.intake(), Intake::Open);
        assert!(q.push(2, 1, false).queued);
        assert_eq!(q.intake(), Intake::Saturated);
        // Full of held messages: a droppable one has nothing to evict.
        let p = q.push(3, 1, true);
        assert_eq!((p.queued, p.rejected), (false, Some(3)));
        // A held one goes past the bound; at the hard limit the bus stops
        // reading, and what a broker still sends is queued all the same.
        for i in 0..(2 * HARD_LIMIT_COUNT_FACTOR - 3) {
            assert!(q.push(10 + i as u32, 1, false).queued);
            assert_eq!(q.intake(), Intake::Saturated);
        }
        assert!(q.push(98, 1, false).queued);
        assert_eq!(q.len(), 2 * HARD_LIMIT_COUNT_FACTOR);
        assert_eq!(q.intake(), Intake::Full);
        let p = q.push(99, 1, false);
        assert!(p.queued && p.dropped.is_empty(), "never dropped");
        assert_eq!(q.len(), 2 * HARD_LIMIT_COUNT_FACTOR + 1);
        // Draining below the hard limit opens the intake again step by step.
        q.pop();
        q.pop();
        assert_eq!(q.intake(), Intake::Saturated);
        while q.len() > 1 {
            q.pop();
        }
        assert_eq!(q.intake(), Intake::Open);
        // A droppable arrival evicts droppable ones only.
        let q = drop_oldest(2, 1000);
        assert!(q.push(1, 1, false).queued);
        assert!(q.push(2, 1, true).queued);
        assert_eq!(q.intake(), Intake::Open, "one held of two");
        assert_eq!(q.push(3, 1, true).dropped, vec![2]);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), Some(3));
        // Held bytes fill the bound too.
        let q = drop_oldest(100, 10);
        assert!(q.push(1, 10, false).queued);
        assert_eq!(q.intake(), Intake::Saturated);
        assert!(q.push(2, 10 * HARD_LIMIT_BYTES_FACTOR - 10, false).queued);
        assert_eq!(q.intake(), Intake::Full);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.intake(), Intake::Open);
    }

    #[test]
    fn close_wakes_workers_and_returns_what_was_left() {
        let q = std::sync::Arc::new(drop_oldest(4, 1000));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(q.close().is_empty());
        assert_eq!(worker.join().unwrap(), None);
        assert!(!q.push(9, 1, true).queued);
    }
}
