//! Storage dtypes and their conversion to the compute type.
//!
//! Math always runs in a [`Real`] compute type: `f32` for fp32, bf16 and fp16 storage (as torch's
//! fused kernels do) and `f64` for fp64 storage. Conversions work on whole slices so that the
//! per-element math loops stay free of conversion code and vectorise.

use crate::quant::QuantMap;
use crate::real::Real;
use crate::rounding;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A storage dtype the engine accepts: the floating-point ones for parameters, inputs and state,
/// int8 for the weight-correction array of bf16 and fp16 parameters ([`crate::rounding`]) and uint8
/// for the codes of blockwise 8-bit state ([`crate::quant`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    I8,
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    /// torch's name for the dtype, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
            DType::BF16 => "torch.bfloat16",
            DType::F16 => "torch.float16",
            DType::I8 => "torch.int8",
            DType::U8 => "torch.uint8",
        }
    }

    /// Whether this is a floating-point dtype (what parameters, inputs and state must be).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I8 | DType::U8)
    }

    /// Whether math on this storage dtype runs in f64.
    pub fn computes_in_f64(self) -> bool {
        self == DType::F64
    }
}

/// A storage element type that loads into and stores from the compute type `R`.
pub trait Elem<R: Real>: Copy + Send + Sync + 'static {
    /// True when `Self` is `R` itself: kernels then work on the tensor's memory directly.
    const IS_COMPUTE: bool = false;
    /// Convert `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [R]);
    /// Round `src` into `dst` (same length), round-to-nearest-even.
    fn store(src: &[R], dst: &mut [Self]);
    /// Round `src` into `dst` stochastically, element `j` with the bits of element `first + j`
    /// of `stream` (see [`crate::rounding`]). Only bf16 does; the compute types store exactly, and
    /// fp16 stores round to nearest (the planners refuse stochastic rounding for fp16 tensors).
    #[inline(always)]
    fn store_stochastic(src: &[R], dst: &mut [Self], _stream: u32, _first: u32) {
        Self::store(src, dst)
    }
    /// Add the weight corrections `corr` to `vals`, loaded from this dtype (see
    /// [`crate::rounding`]). Only bf16 and fp16 parameters carry corrections (the planners refuse
    /// them for any other dtype), so the others never call it.
    #[inline(always)]
    fn apply_corrections(_vals: &mut [R], _corr: &[i8]) {}
    /// Round `src` into `dst` to nearest and write what that lost into `corr`; as
    /// [`Elem::apply_corrections`], only bf16 and fp16 do.
    #[inline(always)]
    fn store_corrected(src: &[R], dst: &mut [Self], corr: &mut [i8]) {
        Self::store(src, dst);
        corr.fill(0);
    }
    /// Whether this is the code of blockwise 8-bit state ([`crate::quant`]): read a block at a
    /// time with its scale ([`Elem::dequantize`]) and written with [`Elem::quantize`], never with
    /// `load` / `store`. Only `u8` is.
    const QUANTIZED: bool = false;
    /// Decode one block of codes with its scale `absmax` into `dst`.
    #[inline(always)]
    fn dequantize(_codes: &[Self], _absmax: f32, _map: &QuantMap, _dst: &mut [R]) {
        unreachable!("only 8-bit codes are dequantized")
    }
    /// Encode one block `src` into `codes`; returns the block's scale.
    #[inline(always)]
    fn quantize(_src: &[R], _map: &QuantMap, _codes: &mut [Self]) -> f32 {
        unreachable!("only 8-bit codes are quantized")
    }
}

/// The codes of blockwise 8-bit state (math in f32).
impl Elem<f32> for u8 {
    const QUANTIZED: bool = true;
    fn load(_src: &[u8], _dst: &mut [f32]) {
        unreachable!("8-bit codes are read with their block's scale (Elem::dequantize)")
    }
    fn store(_src: &[f32], _dst: &mut [u8]) {
        unreachable!("8-bit codes are written with their block's scale (Elem::quantize)")
    }
    #[inline(always)]
    fn dequantize(codes: &[u8], absmax: f32, map: &QuantMap, dst: &mut [f32]) {
        map.dequantize(codes, absmax, dst)
    }
    #[inline(always)]
    fn quantize(src: &[f32], map: &QuantMap, codes: &mut [u8]) -> f32 {
        map.quantize(src, codes)
    }
}

impl Elem<f32> for f32 {
    const IS_COMPUTE: bool = true;
    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}

impl Elem<f64> for f64 {
    const IS_COMPUTE: bool = true;
    #[inline(always)]
    fn load(src: &[f64], dst: &mut [f64]) {
        dst.copy_from_slice(src)
    }
    #[inline(always)]
    fn store(src: &[f64], dst: &mut [f64]) {
        dst.copy_from_slice(src)
    }
}

/// bf16 conversions written as plain bit arithmetic, so that they inline into the kernels and
/// vectorise with them (round to nearest even; NaN stays a quiet NaN).
impl Elem<f32> for bf16 {
    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [bf16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(rounding::bf16_nearest(x));
        }
    }
    #[inline(always)]
    fn store_stochastic(src: &[f32], dst: &mut [bf16], stream: u32, first: u32) {
        for (j, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
            *d = bf16::from_bits(rounding::bf16_stochastic(x, rounding::random16(stream, first.wrapping_add(j as u32))));
        }
    }
    #[inline(always)]
    fn apply_corrections(vals: &mut [f32], corr: &[i8]) {
        for (v, &c) in vals.iter_mut().zip(corr) {
            *v = rounding::BF16_CORRECTION.corrected(*v, c);
        }
    }
    #[inline(always)]
    fn store_corrected(src: &[f32], dst: &mut [bf16], corr: &mut [i8]) {
        for ((d, c), &x) in dst.iter_mut().zip(corr.iter_mut()).zip(src) {
            let (hi, lo) = rounding::split_corrected_bf16(x);
            *d = bf16::from_bits(hi);
            *c = lo;
        }
    }
}

impl Elem<f32> for f16 {
    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
    #[inline(always)]
    fn apply_corrections(vals: &mut [f32], corr: &[i8]) {
        for (v, &c) in vals.iter_mut().zip(corr) {
            *v = rounding::F16_CORRECTION.corrected(*v, c);
        }
    }
    /// Rounded with the slice conversion (vectorised), then each correction against its result.
    #[inline(always)]
    fn store_corrected(src: &[f32], dst: &mut [f16], corr: &mut [i8]) {
        dst.convert_from_f32_slice(src);
        let mut hi = [0f32; 256];
        for ((d, c), x) in dst.chunks(hi.len()).zip(corr.chunks_mut(hi.len())).zip(src.chunks(hi.len())) {
            let hi = &mut hi[..d.len()];
            d.convert_to_f32_slice(hi);
            for ((c, &h), &x) in c.iter_mut().zip(hi.iter()).zip(x) {
                *c = rounding::F16_CORRECTION.correction(x, h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_rounds_to_nearest_even() {
        let xs = [1.0f32, -3.5, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 65504.0, 1e-3];
        let mut h = [bf16::ZERO; 6];
        <bf16 as Elem<f32>>::store(&xs, &mut h);
        let mut back = [0f32; 6];
        <bf16 as Elem<f32>>::load(&h, &mut back);
        for (x, b) in xs.iter().zip(back) {
            assert_eq!(bf16::from_f32(*x).to_f32(), b);
        }
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins.
        assert_eq!(back[2], 1.0);
        assert_eq!(back[3], 1.0 + 2.0 / 128.0);
    }

    #[test]
    fn bf16_store_matches_half_on_every_kind_of_value() {
        let mut x: u32 = 0x1234_5678;
        let mut vals: Vec<f32> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect();
        vals.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-40]);
        let mut out = vec![bf16::ZERO; vals.len()];
        <bf16 as Elem<f32>>::store(&vals, &mut out);
        for (v, o) in vals.iter().zip(&out) {
            let want = bf16::from_f32(*v);
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()), "{v:e}");
        }
    }

    #[test]
    fn f16_round_trip() {
        let xs = [0.1f32, -2.75, 6.1e-5, 1000.5];
        let mut h = [f16::ZERO; 4];
        <f16 as Elem<f32>>::store(&xs, &mut h);
        let mut back = [0f32; 4];
        <f16 as Elem<f32>>::load(&h, &mut back);
        for (x, b) in xs.iter().zip(back) {
            assert_eq!(f16::from_f32(*x).to_f32(), b);
        }
    }
}
