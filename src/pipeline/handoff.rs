//! The hand-off from the decode workers to the inference thread.
//!
//! It carries whole requests (a request's prepared crops travel as one
//! parcel, so they can share a batch) and bounds what waits in it by crops,
//! not by parcels: a parcel may hold up to `limits.max_crops` crops, so a
//! bound in parcels would let many times more resized crops pile up. A
//! sender waits for room; a parcel larger than the whole capacity waits for
//! all of it. Dropping the receiver (the inference thread stopping) fails
//! every waiting and later send.

use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{self as channel, Receiver, Sender, TryRecvError};

/// One request's items, with the room it holds.
pub struct Parcel<T> {
    items: Vec<T>,
    credits: usize,
}

/// Room left in the hand-off, in items.
struct Credits {
    state: Mutex<CreditState>,
    freed: Condvar,
}

struct CreditState {
    free: usize,
    closed: bool,
}

impl Credits {
    fn lock(&self) -> std::sync::MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `n` items of room and takes it; false once closed.
    fn acquire(&self, n: usize) -> bool {
        let mut state = self.lock();
        while state.free < n && !state.closed {
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.closed {
            return false;
        }
        state.free -= n;
        true
    }

    fn release(&self, n: usize) {
        self.lock().free += n;
        self.freed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

/// A hand-off holding at most `capacity` items (at least 1) in flight.
pub fn handoff<T>(capacity: usize) -> (HandoffSender<T>, HandoffReceiver<T>) {
    let capacity = capacity.max(1);
    let credits = Arc::new(Credits {
        state: Mutex::new(CreditState {
            free: capacity,
            closed: false,
        }),
        freed: Condvar::new(),
    });
    let (tx, rx) = channel::unbounded();
    (
        HandoffSender {
            tx,
            credits: credits.clone(),
            capacity,
        },
        HandoffReceiver { rx, credits },
    )
}

/// The decode workers' side (cloned for each).
pub struct HandoffSender<T> {
    tx: Sender<Parcel<T>>,
    credits: Arc<Credits>,
    capacity: usize,
}

impl<T> Clone for HandoffSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            credits: self.credits.clone(),
            capacity: self.capacity,
        }
    }
}

/// The receiver is gone: the inference thread has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the inference thread has stopped")]
pub struct Stopped;

impl<T> HandoffSender<T> {
    /// Sends one request's items, waiting for room.
    pub fn send(&self, items: Vec<T>) -> Result<(), Stopped> {
        let credits = items.len().min(self.capacity);
        if !self.credits.acquire(credits) {
            return Err(Stopped);
        }
        self.tx.send(Parcel { items, credits }).map_err(|_| Stopped)
    }
}

/// The inference thread's side. Dropping it fails the senders.
pub struct HandoffReceiver<T> {
    rx: Receiver<Parcel<T>>,
    credits: Arc<Credits>,
}

impl<T> HandoffReceiver<T> {
    /// The next parcel's items if one is waiting; `Disconnected` once every
    /// sender is gone and nothing is left.
    pub fn try_recv(&self) -> Result<Vec<T>, TryRecvError> {
        self.rx.try_recv().map(|p| self.open(p))
    }

    /// The channel, to wait on it beside others; pass what it yields to
    /// [`HandoffReceiver::open`].
    pub fn channel(&self) -> &Receiver<Parcel<T>> {
        &self.rx
    }

    /// Takes a parcel's items out, freeing its room.
    pub fn open(&self, parcel: Parcel<T>) -> Vec<T> {
        self.credits.release(parcel.credits);
        parcel.items
    }

    /// Room left, in items.
    pub fn free(&self) -> usize {
        self.credits.lock().free
    }
}

impl<T> Drop for HandoffReceiver<T> {
    fn drop(&mut self) {
        self.credits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_counted_in_items_and_freed_when_a_parcel_is_taken() {
        let (tx, rx) = handoff::<u32>(4);
        tx.send(vec![1, 2, 3]).unwrap();
        assert_eq!(rx.free(), 1);
        tx.send(vec![4]).unwrap();
        assert_eq!(rx.free(), 0);
        assert_eq!(rx.try_recv(), Ok(vec![1, 2, 3]));
        assert_eq!(rx.free(), 3);
        assert_eq!(rx.try_recv(), Ok(vec![4]));
        assert_eq!(rx.free(), 4);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn a_parcel_larger_than_the_capacity_travels_whole_once_all_room_is_free() {
        let (tx, rx) = handoff::<u32>(2);
        tx.send((0..5).collect()).unwrap();
        assert_eq!(rx.free(), 0);
        assert_eq!(rx.try_recv(), Ok(vec![0, 1, 2, 3, 4]));
        assert_eq!(rx.free(), 2);
    }

    #[test]
    fn a_waiting_sender_fails_when_the_receiver_is_dropped() {
        let (tx, rx) = handoff::<u32>(1);
        tx.send(vec![1]).unwrap();
        let waiting = std::thread::spawn(move || tx.send(vec![2]));
        drop(rx);
        assert_eq!(waiting.join().unwrap(), Err(Stopped));
    }

    #[test]
    fn the_receiver_sees_disconnected_once_every_sender_is_gone() {
        let (tx, rx) = handoff::<u32>(1);
        tx.send(vec![1]).unwrap();
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(vec![1]));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }
}
