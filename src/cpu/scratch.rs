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

use std::sync::Mutex;

/// The arrays given back, for the next calls to take (at most [`KEEP`]).
static KEPT: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());
/// Arrays kept at most: one per call running at the same time, for a few.
const KEEP: usize = 4;

/// An f64 array for one call, taken from the kept ones on first use and given back when dropped.
#[derive(Default)]
pub struct Scratch(Vec<f64>);

impl Scratch {
    /// `len` zeros.
    pub fn zeros(&mut self, len: usize) -> &mut [f64] {
        if self.0.capacity() == 0 {
            if let Some(kept) = KEPT.try_lock().ok().and_then(|mut k| k.pop()) {
                self.0 = kept;
            }
        }
        self.0.clear();
        self.0.resize(len, 0.0);
        &mut self.0
    }
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
