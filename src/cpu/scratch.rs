//! Working arrays kept from one call to the next.
//!
//! Some per-step arrays are as large as the parameters: the row and column sums of factored state
//! hold, for a 1×1 convolution, two values per weight. Allocated fresh every step, they cost more
//! than the pass that fills them: the kernel maps and zeroes their pages on first touch, and
//! unmapping them afterwards interrupts every core that touched them (TLB shootdowns). A
//! [`Scratch`] takes a kept array instead and gives it back when dropped, so after the first step
//! the largest call's array stays allocated (its size is documented where a rule needs one).
//!
//! The lock is only ever tried, never waited for: a call that finds it held (another thread's
//! call, or a lock inherited held across `fork()`) allocates its own array.

use crate::real::Real;
use std::sync::Mutex;

/// The arrays given back, for the next calls to take (at most [`KEEP`]).
static KEPT: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());
/// Arrays kept at most: one per call running at the same time, and one per thread of a call that
/// works on its tensors in parallel, for a few.
const KEEP: usize = 16;

/// An f64 array for one call, taken from the kept ones on first use and given back when dropped.
#[derive(Default)]
pub struct Scratch(Vec<f64>);

impl Scratch {
    /// `len` zeros.
    pub fn zeros(&mut self, len: usize) -> &mut [f64] {
        if self.0.capacity() == 0 {
            self.0 = take_kept(len);
        }
        self.0.clear();
        self.0.resize(len, 0.0);
        &mut self.0
    }

    /// `len` zeros of the compute type `R` (f32 or f64), in the same kept array.
    pub fn zeros_of<R: Real>(&mut self, len: usize) -> &mut [R] {
        const { assert!(size_of::<R>() <= size_of::<f64>() && align_of::<R>() <= align_of::<f64>()) };
        let words = self.zeros(len);
        // SAFETY: `len` values of R fit in (and are aligned as) `len` f64s (checked above); R is a
        // plain float (f32 or f64), for which the zero bits are 0.0 and every bit pattern is a
        // value; the slice borrows the array mutably for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<R>(), len) }
    }
}

/// The kept array that best fits `len` values ([`best_fit`]).
fn take_kept(len: usize) -> Vec<f64> {
    let Ok(mut kept) = KEPT.try_lock() else { return Vec::new() };
    best_fit(kept.iter().map(Vec::capacity), len).map(|i| kept.swap_remove(i)).unwrap_or_default()
}

/// Of arrays with the given capacities, the one to take for `len` values: the smallest that holds
/// them, else the largest (which grows), so that a small call never takes (and holds) the array a
/// large one keeps.
fn best_fit(capacities: impl Iterator<Item = usize> + Clone, len: usize) -> Option<usize> {
    let fits = capacities.clone().enumerate().filter(|&(_, c)| c >= len).min_by_key(|&(_, c)| c);
    fits.or_else(|| capacities.enumerate().max_by_key(|&(_, c)| c)).map(|(i, _)| i)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.capacity() == 0 {
            return;
        }
        if let Ok(mut kept) = KEPT.try_lock() {
            if kept.len() < KEEP {
                kept.push(std::mem::take(&mut self.0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_takes_the_smallest_that_holds_else_the_largest() {
        let caps = [100, 10, 1000, 50];
        assert_eq!(best_fit(caps.iter().copied(), 40), Some(3));
        assert_eq!(best_fit(caps.iter().copied(), 10), Some(1));
        assert_eq!(best_fit(caps.iter().copied(), 1000), Some(2));
        assert_eq!(best_fit(caps.iter().copied(), 5000), Some(2));
        assert_eq!(best_fit([].iter().copied(), 1), None);
    }

    #[test]
    fn zeros_of_gives_zeros_of_the_compute_type() {
        let mut scratch = Scratch::default();
        scratch.zeros(7).fill(3.0);
        let vals = scratch.zeros_of::<f32>(5);
        assert_eq!(vals, &[0.0f32; 5]);
        vals[4] = 2.5;
        assert_eq!(scratch.zeros_of::<f64>(3), &[0.0f64; 3]);
    }
}
