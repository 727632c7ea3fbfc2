//! Where prepared crops live until their batch has run: slots of one
//! contiguous buffer that batches are run from in place.
//!
//! A decode worker leases a run of consecutive slots for a request's crops
//! and writes each crop's normalised planes straight into its slot. Slots
//! are handed out in order around the buffer and come back in about the
//! same order, so a batch's crops usually hold consecutive slots, and the
//! inference thread hands ONNX Runtime that stretch of the slab itself: the
//! crops are not copied again. When they do not (a failed crop left a gap,
//! requests of several workers interleaved, or every slot was taken and a
//! crop got a buffer of its own) the inference thread copies the batch
//! into its own tensor, as every batch was before.
//!
//! Owns the slot bookkeeping and the one piece of shared mutable memory;
//! not batching, not what a slot holds.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// A fixed number of image-sized slots in one allocation.
pub struct Slab {
    /// Start of `slots * per_image` floats, owned by the slab.
    data: NonNull<f32>,
    per_image: usize,
    slots: usize,
    state: Mutex<SlotState>,
}

struct SlotState {
    used: Vec<bool>,
    /// Where the next search for free slots starts.
    next: usize,
}

// SAFETY: the slab's memory is only reached through a `Lease` (one slot,
// held by one owner at a time: `&mut` to write, `&` to read) or through
// `Slab::contiguous`, which borrows the leases of every slot it reads for
// as long as its slice lives. No two owners ever reach the same slot, so
// the raw pointer may cross threads.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

impl Drop for Slab {
    fn drop(&mut self) {
        let len = self.slots * self.per_image;
        // SAFETY: `data` came from `Box::leak` of a slice of exactly `len`
        // floats in `Slab::new`, and is freed only here (no lease
        // outlives the slab: each holds an `Arc` of it).
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.data.as_ptr(),
                len,
            )));
        }
    }
}

impl Slab {
    /// `slots` slots of `per_image` floats each. The memory is zeroed by
    /// the system as it is first written, so slots never used cost nothing.
    pub fn new(slots: usize, per_image: usize) -> Arc<Self> {
        let slots = slots.max(1);
        let per_image = per_image.max(1);
        // `pipeline.max_batch` is bounded by the config's checks and the
        // image size by the model's manifest, so this holds.
        let len = slots
            .checked_mul(per_image)
            .expect("the slab's size fits in memory's address space");
        let boxed: Box<[f32]> = vec![0f32; len].into_boxed_slice();
        // Freed in `Drop` from this pointer and the length.
        let data = NonNull::from(Box::leak(boxed)).cast::<f32>();
        Arc::new(Self {
            data,
            per_image,
            slots,
            state: Mutex::new(SlotState {
                used: vec![false; slots],
                next: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Buffers for `n` crops: consecutive slots where a run of `n` free
    /// ones starts at or after the last lease (or, failing that, at the
    /// start of the slab); otherwise single free slots, and buffers of
    /// their own for the rest.
    pub fn lease(self: &Arc<Self>, n: usize) -> Vec<Pixels> {
        let mut state = self.lock();
        let start = (n <= self.slots)
            .then(|| {
                let from = state.next;
                find_run(&state.used, from, n).or_else(|| find_run(&state.used, 0, n))
            })
            .flatten();
        let mut out = Vec::with_capacity(n);
        if let Some(start) = start {
            for index in start..start + n {
                state.used[index] = true;
                out.push(Pixels::Slot(Lease {
                    slab: Arc::clone(self),
                    index,
                }));
            }
            state.next = (start + n) % self.slots;
            return out;
        }
        while out.len() < n {
            let Some(index) = state.used.iter().position(|u| !u) else {
                break;
            };
            state.used[index] = true;
            out.push(Pixels::Slot(Lease {
                slab: Arc::clone(self),
                index,
            }));
        }
        // Allocated without the lock, which others wait on to free slots.
        drop(state);
        out.resize_with(n, || Pixels::Own(vec![0f32; self.per_image]));
        out
    }

    /// The floats of `pixels`, in order, as one slice of the slab when
    /// they are slots of this slab with consecutive indices; `None`
    /// otherwise (or when `pixels` is empty). The slice borrows the leases,
    /// so none of those slots can be written or freed while it is read.
    pub fn contiguous<'a>(
        &'a self,
        pixels: impl IntoIterator<Item = &'a Pixels>,
    ) -> Option<&'a [f32]> {
        let mut first = None;
        let mut count = 0usize;
        for p in pixels {
            let Pixels::Slot(lease) = p else { return None };
            if !std::ptr::eq(Arc::as_ptr(&lease.slab), self) {
                return None;
            }
            match first {
                None => first = Some(lease.index),
                Some(f) if lease.index == f + count => {}
                Some(_) => return None,
            }
            count += 1;
        }
        let first = first?;
        // SAFETY: slots first..first+count are in the slab (each was leased
        // from it) and every one is held by a lease borrowed for 'a, so
        // nobody writes or frees them while the slice lives.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.data.as_ptr().add(first * self.per_image),
                count * self.per_image,
            )
        })
    }

    fn release(&self, index: usize) {
        let mut state = self.lock();
        if let Some(u) = state.used.get_mut(index) {
            *u = false;
        }
    }
}

/// The first index `i` in `from..` with `used[i..i + n]` all free.
fn find_run(used: &[bool], from: usize, n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let mut start = from;
    while start + n <= used.len() {
        match used[start..start + n].iter().rposition(|u| *u) {
            None => return Some(start),
            // Skip past the last used slot of this window.
            Some(taken) => start += taken + 1,
        }
    }
    None
}

/// One slot of a [`Slab`], held by one owner; freed when dropped.
pub struct Lease {
    slab: Arc<Slab>,
    index: usize,
}

impl Lease {
    fn span(&self) -> (*mut f32, usize) {
        let per = self.slab.per_image;
        // SAFETY: index < slots, so the slot lies inside the allocation.
        (
            unsafe { self.slab.data.as_ptr().add(self.index * per) },
            per,
        )
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slab.release(self.index);
    }
}

/// A prepared crop's normalised planes: a slot of the slab, or a buffer of
/// its own when no slot was free.
pub enum Pixels {
    Slot(Lease),
    Own(Vec<f32>),
}

impl Pixels {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Self::Slot(lease) => {
                let (ptr, len) = lease.span();
                // SAFETY: the lease is the slot's only owner and is
                // borrowed for the slice's lifetime.
                unsafe { std::slice::from_raw_parts(ptr, len) }
            }
            Self::Own(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            Self::Slot(lease) => {
                let (ptr, len) = lease.span();
                // SAFETY: the lease is the slot's only owner and is
                // borrowed mutably for the slice's lifetime.
                unsafe { std::slice::from_raw_parts_mut(ptr, len) }
            }
            Self::Own(v) => v,
        }
    }

    /// The slot's index, for ordering a batch; own buffers sort last.
    pub fn slot(&self) -> usize {
        match self {
            Self::Slot(lease) => lease.index,
            Self::Own(_) => usize::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indices(p: &[Pixels]) -> Vec<usize> {
        p.iter().map(Pixels::slot).collect()
    }

    #[test]
    fn a_request_gets_consecutive_slots_and_a_batch_of_them_is_read_in_place() {
        let slab = Slab::new(8, 3);
        let mut a = slab.lease(3);
        let mut b = slab.lease(2);
        assert_eq!(indices(&a), [0, 1, 2]);
        assert_eq!(indices(&b), [3, 4]);
        for (k, p) in a.iter_mut().chain(b.iter_mut()).enumerate() {
            p.as_mut_slice().fill(k as f32);
        }
        let batch: Vec<&Pixels> = a.iter().chain(&b).collect();
        let view = slab.contiguous(batch).expect("consecutive slots");
        assert_eq!(
            view,
            [0., 0., 0., 1., 1., 1., 2., 2., 2., 3., 3., 3., 4., 4., 4.]
        );
        // Out of order, or with a gap, it is not one stretch.
        assert!(slab.contiguous([&b[0], &a[0]]).is_none());
        assert!(slab.contiguous([&a[0], &a[2]]).is_none());
        assert!(slab.contiguous(std::iter::empty()).is_none());
    }

    #[test]
    fn slots_are_handed_out_around_the_slab_and_reused_once_freed() {
        let slab = Slab::new(6, 1);
        let a = slab.lease(4);
        let b = slab.lease(2);
        assert_eq!(indices(&b), [4, 5]);
        drop(a);
        // A run never wraps past the end: it starts again at slot 0.
        let c = slab.lease(3);
        assert_eq!(indices(&c), [0, 1, 2]);
        drop(b);
        let d = slab.lease(3);
        assert_eq!(indices(&d), [3, 4, 5]);
    }

    #[test]
    fn without_a_free_run_crops_take_single_slots_then_buffers_of_their_own() {
        let slab = Slab::new(4, 2);
        let mut a = slab.lease(4);
        let _held = [a.remove(3), a.remove(1)];
        drop(a); // frees 0 and 2
        let mut b = slab.lease(3);
        assert_eq!(indices(&b), [0, 2, usize::MAX]);
        b[2].as_mut_slice().fill(7.0);
        assert_eq!(b[2].as_slice(), [7.0, 7.0]);
        assert!(slab.contiguous(&b).is_none());
        // More crops than slots: no run is looked for.
        let slab = Slab::new(2, 1);
        assert_eq!(indices(&slab.lease(3)), [0, 1, usize::MAX]);
    }

    #[test]
    fn another_slab_s_slots_are_never_read_as_this_one_s() {
        let (one, two) = (Slab::new(4, 1), Slab::new(4, 1));
        let a = one.lease(1);
        let b = two.lease(1);
        assert!(one.contiguous([&a[0], &b[0]]).is_none());
        assert!(two.contiguous(&a).is_none());
    }

    #[test]
    fn leases_move_between_threads_and_free_their_slot_when_dropped() {
        let slab = Slab::new(2, 4);
        let mut leased = slab.lease(2);
        let written = std::thread::spawn(move || {
            for (k, p) in leased.iter_mut().enumerate() {
                p.as_mut_slice().fill(k as f32 + 1.0);
            }
            leased
        })
        .join()
        .expect("the writer thread");
        assert_eq!(
            slab.contiguous(&written).expect("in place")[..],
            [1., 1., 1., 1., 2., 2., 2., 2.]
        );
        drop(written);
        assert_eq!(indices(&slab.lease(2)), [0, 1]);
    }
}
