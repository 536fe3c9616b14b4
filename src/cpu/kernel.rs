//! The typed inner loops: one span of one tensor, loaded block by block into the compute type,
//! updated element by element by the rule, stored back. Each element is read once and written
//! once.

use crate::dtype::Elem;
use crate::real::Real;
use crate::rules::{Rule, MAX_SLOTS};

/// Elements per block: small enough for the block buffers to stay in L1.
const BLOCK: usize = 256;

/// How the gradient is transformed when loaded: divided by the AMP scale, then negated for
/// `maximize` (torch's order).
#[derive(Copy, Clone, Debug)]
pub struct GradTransform<R: Real> {
    pub divide_by: Option<R>,
    pub negate: bool,
}

impl<R: Real> GradTransform<R> {
    #[inline(always)]
    fn apply(&self, g: &mut [R]) {
        if let Some(s) = self.divide_by {
            g.iter_mut().for_each(|x| *x = *x / s);
        }
        if self.negate {
            g.iter_mut().for_each(|x| *x = -*x);
        }
    }
}

/// Raw pointers to the first element of a span in each tensor of one parameter.
#[derive(Copy, Clone)]
pub struct SpanPtrs<P, S> {
    pub param: *mut P,
    pub grad: *const P,
    pub states: [*mut S; MAX_SLOTS],
}

/// Update `len` elements starting at `ptrs`.
///
/// # Safety
/// Every pointer must be valid for `len` elements of its type (state pointers for slots
/// `0..Ru::SLOTS`), and no other thread may access these elements during the call.
pub unsafe fn update_span<Ru: Rule, R: Real, P: Elem<R>, S: Elem<R>>(
    c: &Ru::Coeffs<R>,
    xf: &GradTransform<R>,
    ptrs: SpanPtrs<P, S>,
    len: usize,
) {
    let mut pb = [R::ZERO; BLOCK];
    let mut gb = [R::ZERO; BLOCK];
    let mut sb = [[R::ZERO; BLOCK]; MAX_SLOTS];
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: [off, off + n) lies inside the span the caller vouched for; the shared slices
        // live only for the duration of each load.
        unsafe {
            P::load(std::slice::from_raw_parts(ptrs.param.add(off), n), &mut pb[..n]);
            P::load(std::slice::from_raw_parts(ptrs.grad.add(off), n), &mut gb[..n]);
            for k in 0..Ru::SLOTS {
                S::load(std::slice::from_raw_parts(ptrs.states[k].add(off), n), &mut sb[k][..n]);
            }
        }
        xf.apply(&mut gb[..n]);
        for i in 0..n {
            let mut s = [R::ZERO; MAX_SLOTS];
            for k in 0..Ru::SLOTS {
                s[k] = sb[k][i];
            }
            pb[i] = Ru::update(c, pb[i], gb[i], &mut s);
            for k in 0..Ru::SLOTS {
                sb[k][i] = s[k];
            }
        }
        // SAFETY: as above; each mutable slice is the only reference to its elements while it
        // lives (the caller guarantees exclusive access to the span).
        unsafe {
            P::store(&pb[..n], std::slice::from_raw_parts_mut(ptrs.param.add(off), n));
            for k in 0..Ru::SLOTS {
                S::store(&sb[k][..n], std::slice::from_raw_parts_mut(ptrs.states[k].add(off), n));
            }
        }
        off += n;
    }
}

/// Whether all `len` elements at `ptr` are finite.
///
/// # Safety
/// `ptr` must be valid for `len` reads of `P`.
pub unsafe fn all_finite<R: Real, P: Elem<R>>(ptr: *const P, len: usize) -> bool {
    let mut buf = [R::ZERO; BLOCK];
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: inside the range the caller vouched for.
        unsafe { P::load(std::slice::from_raw_parts(ptr.add(off), n), &mut buf[..n]) };
        if !buf[..n].iter().fold(true, |ok, x| ok & x.is_finite()) {
            return false;
        }
        off += n;
    }
    true
}
