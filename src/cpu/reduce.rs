//! Reductions over many tensors that must finish before an update starts (e.g. Adan's global
//! gradient norm). Rule independent: they read tensors and return host numbers.

use super::map_spans;
use crate::dtype::{DType, Elem};
use crate::real::Real;
use crate::view::TensorView;
use half::{bf16, f16};

/// Elements converted to the compute type at a time.
const BLOCK: usize = 256;
/// Independent accumulators: breaks the dependency chain of one running sum so the loop
/// vectorises, and keeps a fixed summation order.
const LANES: usize = 8;

crate::simd::widest! {
    /// `Σ x²` over `len` elements at `ptr`, accumulated in f64, with the widest vector unit the
    /// CPU has (the same bits).
    ///
    /// # Safety
    /// `ptr` must be valid for `len` reads of `E`.
    unsafe fn span_sum_squares<R: Real, E: Elem<R>>(ptr: *const E, len: usize) -> f64 = span_sum_squares_body;
}

/// [`span_sum_squares`]' loop.
///
/// # Safety
/// As [`span_sum_squares`].
#[inline(always)]
unsafe fn span_sum_squares_body<R: Real, E: Elem<R>>(ptr: *const E, len: usize) -> f64 {
    let mut buf = [R::ZERO; BLOCK];
    let mut acc = [0.0f64; LANES];
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: [off, off + n) lies inside the range the caller vouched for.
        unsafe { E::load(std::slice::from_raw_parts(ptr.add(off), n), &mut buf[..n]) };
        // Element i of the block goes to lane i % LANES (BLOCK is a multiple of LANES): whole
        // groups of LANES as fixed-size chunks, so that the lanes become vector registers.
        let (groups, rest) = buf[..n].split_at(n - n % LANES);
        for group in groups.chunks_exact(LANES) {
            for (a, x) in acc.iter_mut().zip(group) {
                let x = x.to_f64();
                *a += x * x;
            }
        }
        for (a, x) in acc.iter_mut().zip(rest) {
            let x = x.to_f64();
            *a += x * x;
        }
        off += n;
    }
    acc.iter().sum()
}

/// The sum of the squares of every element of every tensor, accumulated in f64 (so
/// `sqrt(sum_squares(grads))` is the global 2-norm): the per-tensor sums of
/// [`tensor_sum_squares`] added in tensor order.
///
/// # Safety
/// As [`tensor_sum_squares`].
pub unsafe fn sum_squares(views: &[TensorView]) -> f64 {
    // SAFETY: per the contract.
    unsafe { tensor_sum_squares(views) }.iter().sum()
}

/// The sum of the squares of each tensor's elements, accumulated in f64. Runs on emafuse's pool;
/// the result does not depend on the number of threads (partial sums are added in span order).
///
/// # Safety
/// Every view must describe live CPU memory holding `numel` elements of its dtype (any layout
/// without gaps or overlaps: the order of elements does not matter), not written during the
/// call.
pub unsafe fn tensor_sum_squares(views: &[TensorView]) -> Vec<f64> {
    let numels: Vec<usize> = views.iter().map(|v| v.numel()).collect();
    let parts = map_spans(&numels, 1, |s| {
        let v = &views[s.tensor];
        // SAFETY: the span lies inside tensor `s.tensor`, which the caller vouched for; the
        // element type matches the view's dtype.
        unsafe {
            match v.dtype() {
                DType::F32 => span_sum_squares::<f32, f32>(v.at::<f32>(s.start), s.len),
                DType::F64 => span_sum_squares::<f64, f64>(v.at::<f64>(s.start), s.len),
                DType::BF16 => span_sum_squares::<f32, bf16>(v.at::<bf16>(s.start), s.len),
                DType::F16 => span_sum_squares::<f32, f16>(v.at::<f16>(s.start), s.len),
                DType::I8 | DType::U8 => unreachable!("py/reduce.rs refuses integer tensors"),
            }
        }
    });
    let mut sums = vec![0.0; views.len()];
    for (span, x) in parts {
        sums[span.tensor] += x;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Device;

    #[test]
    fn sums_squares_of_mixed_dtypes_in_f64() {
        let a: Vec<f32> = (0..70_001).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let b: Vec<f64> = (0..5).map(|i| i as f64 - 1.5).collect();
        let c: Vec<bf16> = (0..4097).map(|i| bf16::from_f32((i as f32 * 0.01).cos())).collect();
        let d: Vec<f16> = vec![f16::from_f32(-2.5); 3];
        let views = [
            TensorView::new(a.as_ptr() as *mut u8, a.len(), DType::F32, Device::Cpu),
            TensorView::new(b.as_ptr() as *mut u8, b.len(), DType::F64, Device::Cpu),
            TensorView::new(std::ptr::null_mut(), 0, DType::F32, Device::Cpu),
            TensorView::new(c.as_ptr() as *mut u8, c.len(), DType::BF16, Device::Cpu),
            TensorView::new(d.as_ptr() as *mut u8, d.len(), DType::F16, Device::Cpu),
        ];
        let expect: f64 = a.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
            + b.iter().map(|x| x * x).sum::<f64>()
            + c.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>()
            + 3.0 * 6.25;
        // SAFETY: the views describe the live vectors above.
        let got = unsafe { sum_squares(&views) };
        assert!((got - expect).abs() <= 1e-12 * expect, "{got} vs {expect}");
        // SAFETY: as above.
        assert_eq!(got.to_bits(), unsafe { sum_squares(&views) }.to_bits(), "reproducible");
        // SAFETY: as above.
        let each = unsafe { tensor_sum_squares(&views) };
        assert_eq!(each.len(), 5);
        assert_eq!((each[2], each[4]), (0.0, 3.0 * 6.25));
        assert!((each[0] - a.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).abs() <= 1e-12 * each[0]);
    }
}
