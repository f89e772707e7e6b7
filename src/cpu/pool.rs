//! Reuse of the large activation and gradient buffers across training steps. A fresh
//! allocation of this size comes back from the kernel as untouched pages, and faulting them in
//! (plus glibc trimming the heap again on free) cost about 15% of a step (perf, D=128, B=256,
//! L=8). [`Buf`] returns its storage to a per-thread, per-type free list when dropped, so a
//! training loop keeps its working set mapped: memory held = the peak of one step.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

use crate::cpu::Real;

/// Smaller buffers are cheap to allocate and are not pooled (elements).
const MIN_POOLED: usize = 4096;
/// Free buffers kept per thread and type; beyond this the smallest are released.
const MAX_FREE: usize = 512;

/// The free list of one thread for one element type.
pub type FreeList<T> = RefCell<Vec<Vec<T>>>;

/// Per-thread free list of `T` buffers (implemented by each [`Real`]).
pub trait Pooled: Sized + 'static {
    fn free_list() -> &'static LocalKey<FreeList<Self>>;
}

/// A buffer of `T` that goes back to the free list when dropped.
#[derive(Debug, Default)]
pub struct Buf<T: Real>(Vec<T>);

impl<T: Real> Buf<T> {
    /// `n` zeros.
    pub fn zeros(n: usize) -> Self {
        let mut b = Self::scratch(n);
        b.0.fill(T::zero());
        b
    }

    /// `n` elements whose values are unspecified (initialised, but stale): for outputs that
    /// are written in full before they are read.
    pub fn scratch(n: usize) -> Self {
        let reused = if n >= MIN_POOLED {
            T::free_list()
                .try_with(|l| {
                    let mut l = l.borrow_mut();
                    // Best fit: the smallest free buffer that holds n.
                    let best = (0..l.len())
                        .filter(|&i| l[i].capacity() >= n)
                        .min_by_key(|&i| l[i].capacity());
                    best.map(|i| l.swap_remove(i))
                })
                .ok()
                .flatten()
        } else {
            None
        };
        let mut v = reused.unwrap_or_default();
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, T::zero());
        }
        Buf(v)
    }

    /// Takes over `v` (its storage will be pooled when dropped).
    pub fn from_vec(v: Vec<T>) -> Self {
        Buf(v)
    }

    /// The storage, which then leaves the pool's care.
    pub fn into_vec(mut self) -> Vec<T> {
        std::mem::take(&mut self.0)
    }
}

impl<T: Real> Drop for Buf<T> {
    fn drop(&mut self) {
        if self.0.capacity() < MIN_POOLED {
            return;
        }
        let v = std::mem::take(&mut self.0);
        // During thread teardown the list may be gone: the buffer is then simply freed.
        let _ = T::free_list().try_with(|l| {
            let mut l = l.borrow_mut();
            l.push(v);
            if l.len() > MAX_FREE {
                let smallest = (0..l.len()).min_by_key(|&i| l[i].capacity()).unwrap_or(0);
                l.swap_remove(smallest);
            }
        });
    }
}

impl<T: Real> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Real> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: Real> Clone for Buf<T> {
    fn clone(&self) -> Self {
        let mut b = Buf::scratch(self.len());
        b.copy_from_slice(self);
        b
    }
}

/// Releases this thread's cached buffers (both types), e.g. after training.
pub fn free_cached_buffers() {
    let _ = f32::free_list().try_with(|l| l.borrow_mut().clear());
    let _ = f64::free_list().try_with(|l| l.borrow_mut().clear());
}

impl Pooled for f32 {
    fn free_list() -> &'static LocalKey<FreeList<f32>> {
        thread_local!(static LIST: FreeList<f32> = const { RefCell::new(Vec::new()) });
        &LIST
    }
}

impl Pooled for f64 {
    fn free_list() -> &'static LocalKey<FreeList<f64>> {
        thread_local!(static LIST: FreeList<f64> = const { RefCell::new(Vec::new()) });
        &LIST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_zeroed_on_request() {
        free_cached_buffers();
        let mut a = Buf::<f32>::zeros(10_000);
        a[5] = 3.0;
        let ptr = a.as_ptr();
        drop(a);
        let b = Buf::<f32>::scratch(9_000);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is reused");
        assert_eq!(b.len(), 9_000);
        drop(b);
        let c = Buf::<f32>::zeros(10_000);
        assert_eq!(c.as_ptr(), ptr);
        assert!(c.iter().all(|&x| x == 0.0), "zeros() clears stale values");
        let small = Buf::<f64>::zeros(10);
        assert_eq!(small.len(), 10);
        free_cached_buffers();
    }
}
