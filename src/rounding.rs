//! Stochastic rounding of bf16 stores: a value between two bf16 neighbours is rounded up with
//! probability equal to its distance from the lower one, so the stored value is unbiased and
//! updates far smaller than a bf16 ulp still move a weight or a moment on average.
//!
//! The random bits are a counter-based hash, not a generator's sequence: element `i` of array `a`
//! (the parameter, or state slot `k` as array `1 + k`) of tensor `t` of a batch gets
//! `hash(i ^ stream(key, t, a))`. So the result depends only on the step's key and the element's
//! position, never on how the work was split over threads or blocks, and the CUDA twin
//! (`kernels/common.cuh`, `ef_stream_key`, `ef_random16`, `ef_bf16_stochastic`) rounds every element
//! exactly as the CPU does.
//!
//! Weight correction: a bf16 or fp16 parameter may carry an int8 array (its optimizer state
//! `weight_correction`) holding what rounding the weight to 16 bits lost, in units of 1/256 of the
//! weight's ulp: the weight is `hi + c·u(hi)` with `c` in [−127, 127], where the unit `u` is 2^-8
//! of the ulp of the 16-bit value `hi` ([`CorrectionFormat`]: `2^(E − 127 − m − 8)` for `hi`'s
//! f32 exponent field `E`, clamped to the format's normal range, and `m` mantissa bits). That sum
//! is exact in f32 (8 bits below `hi`'s last), and a weight stored this way and not updated is
//! stored again unchanged (`|c| <= 127` keeps it nearer `hi` than any neighbour). A step reads the
//! corrected weight, updates it in f32, and splits the result into its nearest 16-bit value and
//! the rounded remainder: 8 more significant bits of master weight for 1 byte, instead of the 4 of
//! an fp32 master copy. The CUDA twin is `kernels/common.cuh`'s `ef_corrected` /
//! `ef_split_corrected`.

use crate::batch::Batch;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Refuse stochastic rounding for a batch that stores fp16 (only bf16 stores round
/// stochastically; fp32 and fp64 ones are exact in the compute type).
pub fn check_batch(b: &Batch) -> Result<()> {
    let fp16 = b.param_dtype == DType::F16 || (b.slots() > 0 && b.state_dtype == DType::F16);
    if fp16 {
        return Err(Error::DType(format!(
            "param group {}: stochastic rounding writes bfloat16 tensors only, and this group stores float16 ({}); \
             use bfloat16 parameters or float32 state, or rounding='nearest'",
            b.group,
            if b.param_dtype == DType::F16 { "parameters" } else { "state" }
        )));
    }
    Ok(())
}

/// splitmix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The key of one batch of a step: the step's key (from Python) and the index in its group of
/// the batch's first parameter, so that two batches of a call draw different bits.
pub fn batch_key(step_key: u64, first_member: usize) -> u64 {
    mix64(step_key ^ mix64(first_member as u64))
}

/// The 32-bit stream of array `array` (0: the parameter, 1 + k: state slot k) of tensor `tensor`
/// of a batch.
#[inline(always)]
pub fn stream_key(batch_key: u64, tensor: usize, array: usize) -> u32 {
    (mix64(batch_key ^ mix64(((tensor as u64) << 3) | array as u64)) >> 32) as u32
}

/// 16 random bits for element `index` of a stream (a bijective 32-bit hash, "lowbias32").
#[inline(always)]
pub fn random16(stream: u32, index: u32) -> u32 {
    let mut x = index ^ stream;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x >> 16
}

/// `x` rounded to bf16 stochastically with the 16 random bits `r16`: the 16 bits bf16 drops are
/// added to `r16` and the carry decides. NaN stays a quiet NaN; infinities (whose dropped bits are
/// zero) and every bf16 value stay as they are.
#[inline(always)]
pub fn bf16_stochastic(x: f32, r16: u32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        ((u >> 16) | 0x40) as u16
    } else {
        (u.wrapping_add(r16) >> 16) as u16
    }
}

/// `x` rounded to bf16, to nearest even (the bits). NaN stays a quiet NaN.
#[inline(always)]
pub fn bf16_nearest(x: f32) -> u16 {
    let u = x.to_bits();
    let rounded = if x.is_nan() { (u >> 16) | 0x40 } else { (u + 0x7fff + ((u >> 16) & 1)) >> 16 };
    rounded as u16
}

/// The name of a 16-bit parameter's weight-correction state (an int8 tensor shaped like it).
pub const WEIGHT_CORRECTION: &str = "weight_correction";

/// The largest correction magnitude: below half an ulp, so a stored weight rounds back to its
/// own 16-bit value.
const MAX_CORRECTION: f32 = 127.0;

/// 1.5·2^23: adding it to a float of magnitude below 2^22 rounds it to an integer (half to even,
/// as every float addition rounds), which the low bits of the sum then hold in two's complement.
const ROUND_TO_INTEGER: f32 = 12_582_912.0;

/// Where a 16-bit float format's correction unit comes from: its mantissa bits, and the range of
/// f32 exponent fields its ulp follows (below it, the subnormals' fixed ulp; above it, only
/// infinities and NaN, which carry no correction).
#[derive(Copy, Clone, Debug)]
pub struct CorrectionFormat {
    mantissa_bits: u32,
    min_exponent: u32,
    max_exponent: u32,
}

/// bf16: 7 mantissa bits; the lower bound keeps the unit a normal f32 (weights below 2^-111 get
/// the unit of 2^-111).
pub const BF16_CORRECTION: CorrectionFormat = CorrectionFormat { mantissa_bits: 7, min_exponent: 16, max_exponent: 254 };
/// fp16: 10 mantissa bits, normal exponents 2^-14 (field 113) to 2^15 (142).
pub const F16_CORRECTION: CorrectionFormat = CorrectionFormat { mantissa_bits: 10, min_exponent: 113, max_exponent: 142 };

impl CorrectionFormat {
    /// The f32 exponent field that sets the correction unit of the 16-bit value `hi`.
    #[inline(always)]
    fn exponent(self, hi: f32) -> u32 {
        ((hi.to_bits() >> 23) & 0xff).clamp(self.min_exponent, self.max_exponent)
    }

    /// The weight the 16-bit value `hi` (as f32) and its correction `c` stand for (exact in f32).
    /// Infinities and NaN stay as they are (adding a finite number does not change them).
    #[inline(always)]
    pub fn corrected(self, hi: f32, c: i8) -> f32 {
        hi + c as f32 * f32::from_bits((self.exponent(hi) - self.mantissa_bits - 8) << 23)
    }

    /// The correction of `x` against `hi`, its nearest value in this format (as f32): what
    /// restores `x` to 1/256 of `hi`'s ulp, 0 for infinities and NaN. Branch-free, so that it
    /// vectorises.
    #[inline(always)]
    pub fn correction(self, x: f32, hi: f32) -> i8 {
        // x − hi is exact (hi is x's nearest 16-bit value), and so is the product with a power of
        // two. (It is infinite or NaN only when hi is not finite, and the correction then 0.)
        let inverse_unit = f32::from_bits((254 + self.mantissa_bits + 8 - self.exponent(hi)) << 23);
        let units = ((x - hi) * inverse_unit).clamp(-MAX_CORRECTION, MAX_CORRECTION);
        let c = (units + ROUND_TO_INTEGER).to_bits() as u8 as i8;
        if hi.is_finite() {
            c
        } else {
            0
        }
    }
}

/// `x` split into its nearest bf16 value (the bits) and its correction.
#[inline(always)]
pub fn split_corrected_bf16(x: f32) -> (u16, i8) {
    let bits = bf16_nearest(x);
    (bits, BF16_CORRECTION.correction(x, f32::from_bits((bits as u32) << 16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_value(bits: u16) -> f64 {
        f32::from_bits((bits as u32) << 16) as f64
    }

    /// The mean of many roundings of one value is the value (within 5 standard errors), for
    /// values of both signs, at both ends of a bf16 interval and across binades.
    #[test]
    fn stochastic_rounding_is_unbiased() {
        let n = 200_000u32;
        for (j, &x) in [1.0f32 + 1e-3, -3.7e-5, 123.456, 1.0 + 2f32.powi(-7) * 0.999, -0.1].iter().enumerate() {
            let stream = stream_key(0xfeed, j, 0);
            let (lo, hi) = {
                let down = x.to_bits() & 0xffff_0000;
                (bf16_value((down >> 16) as u16), bf16_value(((down >> 16) + 1) as u16))
            };
            let mut sum = 0.0;
            for i in 0..n {
                let v = bf16_value(bf16_stochastic(x, random16(stream, i)));
                assert!(v == lo || v == hi, "{x}: {v} is not a neighbour");
                sum += v;
            }
            let mean = sum / n as f64;
            let p = (x as f64 - lo) / (hi - lo);
            let std_err = (hi - lo).abs() * (p * (1.0 - p) / n as f64).sqrt();
            assert!((mean - x as f64).abs() <= 5.0 * std_err + 1e-12, "{x}: mean {mean}, std err {std_err}");
        }
    }

    #[test]
    fn representable_values_and_specials_are_kept() {
        for bits in [0x3f80u16, 0xbf80, 0x0000, 0x8000, 0x7f80, 0xff80, 0x7f7f, 0x0001] {
            let x = f32::from_bits((bits as u32) << 16);
            for r in [0, 1, 0x7fff, 0xffff] {
                assert_eq!(bf16_stochastic(x, r), bits);
            }
        }
        assert!(f32::from_bits((bf16_stochastic(f32::NAN, 0xffff) as u32) << 16).is_nan());
    }

    #[test]
    fn streams_differ_by_tensor_array_and_key() {
        let keys = [stream_key(1, 0, 0), stream_key(1, 0, 1), stream_key(1, 1, 0), stream_key(2, 0, 0), stream_key(batch_key(1, 3), 0, 0)];
        for a in 0..keys.len() {
            for b in a + 1..keys.len() {
                assert_ne!(keys[a], keys[b]);
            }
        }
    }

    /// The corrected weight is within 1/256 of a bf16 ulp of the value split (half a unit, one
    /// at the clamped ends), and re-splitting a stored weight gives it back unchanged.
    /// 200 000 random floats of both signs with f32 exponent fields `lowest..lowest + span`
    /// (xorshift32 bits).
    fn random_floats(seed: u32, lowest: u32, span: u32) -> impl Iterator<Item = f32> {
        let mut x = seed;
        (0..200_000).map(move |_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits((x & 0x807f_ffff) | ((lowest + (x >> 8) % span) << 23))
        })
    }

    #[test]
    fn weight_corrections_hold_the_weight_to_a_256th_of_an_ulp() {
        // magnitudes from 2^-60 to 2^60
        for v in random_floats(0x9e37_79b9, 67, 120) {
            let (bits, c) = split_corrected_bf16(v);
            let hi = f32::from_bits((bits as u32) << 16);
            let w = BF16_CORRECTION.corrected(hi, c);
            let ulp = f32::from_bits(((hi.to_bits() >> 23) & 0xff) << 23) as f64 / 128.0;
            assert!(((w as f64) - (v as f64)).abs() <= ulp / 256.0 + 1e-300, "{v:e}: {w:e}");
            assert_eq!(split_corrected_bf16(w), (bits, c), "{v:e} re-splits differently");
            assert_eq!(bits, bf16_nearest(v));
        }
        for special in [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MAX] {
            let (bits, c) = split_corrected_bf16(special);
            assert_eq!((bits, c), (bf16_nearest(special), 0), "{special}");
        }
        let (nan, c) = split_corrected_bf16(f32::NAN);
        assert!(f32::from_bits((nan as u32) << 16).is_nan() && c == 0);
        assert!(BF16_CORRECTION.corrected(f32::from_bits((nan as u32) << 16), 5).is_nan());
        assert_eq!(BF16_CORRECTION.corrected(f32::INFINITY, -127), f32::INFINITY);
        // the rounding to an integer is half to even, as the reference's
        for (units, want) in [(2.5f32, 2i8), (3.5, 4), (-2.5, -2), (-0.5, 0), (126.5, 126), (-126.5, -126)] {
            assert_eq!((units + ROUND_TO_INTEGER).to_bits() as u8 as i8, want, "{units}");
        }
    }

    /// fp16: within 1/256 of an ulp across the normal range and the subnormals (whose ulp is
    /// 2^-24), re-split unchanged; overflow to infinity carries no correction.
    #[test]
    fn fp16_weight_corrections_hold_the_weight_to_a_256th_of_an_ulp() {
        use half::f16;
        // magnitudes from 2^-30 (below the subnormals) to 2^15
        for v in random_floats(0x1234_5678, 97, 46) {
            let hi = f16::from_f32(v).to_f32();
            let c = F16_CORRECTION.correction(v, hi);
            if hi.is_infinite() {
                assert_eq!(c, 0, "{v:e}");
                continue;
            }
            let w = F16_CORRECTION.corrected(hi, c);
            let ulp = if hi.abs() < 2f32.powi(-14) { 2f64.powi(-24) } else { f32::from_bits(((hi.to_bits() >> 23) & 0xff) << 23) as f64 / 1024.0 };
            assert!(((w as f64) - (v as f64)).abs() <= ulp / 256.0, "{v:e}: {w:e}");
            assert_eq!(f16::from_f32(w).to_f32(), hi, "{v:e}");
            assert_eq!(F16_CORRECTION.correction(w, hi), c, "{v:e} re-splits differently");
        }
        assert_eq!(F16_CORRECTION.correction(70000.0, f16::from_f32(70000.0).to_f32()), 0);
    }
}
