//! The compute type of the update rules: `f32` (for fp32/bf16/fp16 storage) or `f64`.

use std::ops::{Add, Div, Mul, Neg, Sub};

/// Arithmetic the update rules use. Implemented for `f32` and `f64` only.
pub trait Real:
    Copy + Send + Sync + PartialOrd + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// Round a host-side (f64) scalar to the compute type.
    fn from_f64(x: f64) -> Self;
    /// Widen to f64.
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    /// `e^x` (the platform libm; used by diffGrad's sigmoid).
    fn exp(self) -> Self;
    /// `self^e` (the platform libm's pow).
    fn powf(self, e: Self) -> Self;
    /// `torch.maximum`: NaN if either operand is NaN.
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        #[allow(clippy::eq_op)]
        let self_is_nan = self != self;
        if self_is_nan || self > other {
            self
        } else {
            other
        }
    }
    /// `torch.minimum`: NaN if either operand is NaN.
    #[inline(always)]
    fn min_nan(self, other: Self) -> Self {
        #[allow(clippy::eq_op)]
        let self_is_nan = self != self;
        if self_is_nan || self < other {
            self
        } else {
            other
        }
    }
    /// Sign with `sign(0) = 0` (and NaN for NaN), as `torch.sign`.
    #[inline(always)]
    fn sign(self) -> Self {
        if self > Self::ZERO {
            Self::ONE
        } else if self < Self::ZERO {
            -Self::ONE
        } else {
            self * Self::ZERO
        }
    }
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    /// e^x in plain arithmetic that vectorises (libm's expf does not): see [`exp_f32`].
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn powf(self, e: Self) -> Self {
        f32::powf(self, e)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn powf(self, e: Self) -> Self {
        f64::powf(self, e)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// e^x for f32 without a libm call, so that kernels using it still vectorise: Cody–Waite range
/// reduction x = n·ln2 + r (|r| ≤ ln2/2), a degree-7 Taylor polynomial (truncation below 6e-9
/// relative), and 2^n applied as two exact exponent scalings. Within 2 ulp of the exact value;
/// NaN stays NaN, x > 88.72 gives +inf, x < −87.34 gives 0 (subnormal results are flushed).
/// `ef_exp(float)` in common.cuh performs the same operations in the same order, so the CUDA
/// kernels round exactly like the CPU ones.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = if x >= LO {
        if x <= HI {
            x
        } else {
            HI
        }
    } else {
        LO
    }; // NaN → LO, fixed below
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (xc - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n = n as i32;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let scale = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale(n1) * scale(n2);
    if x.is_nan() {
        x
    } else if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// A linear interpolation weight prepared on the host with torch's rounding rule: for |w| < 0.5
/// `lerp(a, b) = a + w·(b − a)`, otherwise `b − (b − a)·(1 − w)`.
#[derive(Copy, Clone, Debug)]
pub struct Lerp<R: Real> {
    w: R,
    one_minus_w: R,
    small: bool,
}

impl<R: Real> Lerp<R> {
    /// Prepare weight `w` (rounded to `R` first, `1 − w` then computed in `R`, as torch does).
    pub fn new(w: f64) -> Self {
        let w = R::from_f64(w);
        Lerp { w, one_minus_w: R::ONE - w, small: w.abs() < R::from_f64(0.5) }
    }

    /// `lerp(a, b, w)`.
    #[inline(always)]
    pub fn apply(&self, a: R, b: R) -> R {
        if self.small {
            a + self.w * (b - a)
        } else {
            b - (b - a) * self.one_minus_w
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maximum_propagates_nan() {
        assert!(f32::NAN.max_nan(1.0).is_nan());
        assert!(1.0f32.max_nan(f32::NAN).is_nan());
        assert_eq!(2.0f32.max_nan(1.0), 2.0);
        assert_eq!((-2.0f64).max_nan(1.0), 1.0);
        assert!(f64::NAN.min_nan(1.0).is_nan());
        assert_eq!(2.0f64.min_nan(1.0), 1.0);
    }

    #[test]
    fn sign_of_zero_is_zero() {
        assert_eq!(0.0f32.sign(), 0.0);
        assert_eq!((-3.0f32).sign(), -1.0);
        assert_eq!(7.5f64.sign(), 1.0);
        assert!(f32::NAN.sign().is_nan());
    }

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((got - want).abs() / ulp as f64);
            x += 0.0173;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn lerp_uses_both_torch_forms() {
        let small = Lerp::<f64>::new(0.1);
        assert_eq!(small.apply(1.0, 3.0), 1.0 + 0.1 * 2.0);
        let big = Lerp::<f64>::new(0.75);
        assert_eq!(big.apply(1.0, 3.0), 3.0 - 2.0 * 0.25);
    }
}
