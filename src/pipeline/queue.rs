//! The bounded ingest queue between the bus and the decode workers.
//!
//! Pushing never blocks (the MQTT event loop must keep polling): when the
//! queue is full the overflow policy picks the message to drop and hands it
//! back so the caller can count and report it. Workers block on `pop`.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

use crate::config::OverflowPolicy;

pub struct IngestQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
    policy: OverflowPolicy,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// What `push` did.
#[derive(Debug)]
pub enum Pushed<T> {
    Queued,
    /// Queued, and this older item was dropped to make room.
    DroppedOldest(T),
    /// Not queued: the queue was full (drop-newest) or closed.
    Rejected(T),
}

impl<T> IngestQueue<T> {
    pub fn new(capacity: usize, policy: OverflowPolicy) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(4096)),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, item: T) -> Pushed<T> {
        let mut s = self.lock();
        if s.closed {
            return Pushed::Rejected(item);
        }
        let outcome = if s.items.len() < self.capacity {
            s.items.push_back(item);
            Pushed::Queued
        } else {
            match self.policy {
                OverflowPolicy::DropNewest => return Pushed::Rejected(item),
                OverflowPolicy::DropOldest => {
                    let old = s.items.pop_front();
                    s.items.push_back(item);
                    match old {
                        Some(old) => Pushed::DroppedOldest(old),
                        None => Pushed::Queued,
                    }
                }
            }
        };
        drop(s);
        self.ready.notify_one();
        outcome
    }

    /// Waits for an item; `None` once the queue is closed.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(item) = s.items.pop_front() {
                return Some(item);
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops the queue: waiting workers wake up and get `None`; the items
    /// still queued are returned (never started, so never acknowledged).
    pub fn close(&self) -> Vec<T> {
        let mut s = self.lock();
        s.closed = true;
        let left = s.items.drain(..).collect();
        drop(s);
        self.ready.notify_all();
        left
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_oldest_keeps_the_newest_items() {
        let q = IngestQueue::new(2, OverflowPolicy::DropOldest);
        assert!(matches!(q.push(1), Pushed::Queued));
        assert!(matches!(q.push(2), Pushed::Queued));
        assert!(matches!(q.push(3), Pushed::DroppedOldest(1)));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), Some(3));
    }

    #[test]
    fn drop_newest_rejects_when_full() {
        let q = IngestQueue::new(1, OverflowPolicy::DropNewest);
        assert!(matches!(q.push(1), Pushed::Queued));
        assert!(matches!(q.push(2), Pushed::Rejected(2)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn close_wakes_workers_and_returns_what_was_left() {
        let q = std::sync::Arc::new(IngestQueue::new(4, OverflowPolicy::DropOldest));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(q.close().is_empty());
        assert_eq!(worker.join().unwrap(), None);
        assert!(matches!(q.push(9), Pushed::Rejected(9)));
    }
}
