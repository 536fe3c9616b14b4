//! Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675), as
//! google/automl `lion_pytorch.py` (spec §8).
//!
//! Per element, in the reference's operation order:
//! ```text
//! p ← p·(1 − lr·wd)
//! p ← p + (−lr)·sign(m·β1 + g·(1 − β1))      m from the previous step
//! m ← m·β2 + (1 − β2)·g
//! ```
//! Cautious Lion (Liang et al., arXiv:2411.16085; spec §20): with `u = sign(m·β1 + g·(1 − β1))`
//! and `φ = 1[u·g > 0]`, the step is `p ← p + (−lr)·(u·φ·k)`, where the per-tensor factor `k` is
//! `1/max(mean φ, 1e-3)` ("mean", as timm) or `numel/(Σφ + 1)` ("count", as C-Optim), both
//! evaluated in the compute type as the references do. The sums come from a read-only pass over
//! the old `m` and `g` (`accumulate`); decay is not masked.
//! State slot: `exp_avg`. No step counter.

use super::{
    bool_dispatch, caution_factor, cautious_count_sign, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor,
    MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `lion` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "lion",
    summary: "Lion (Chen et al.) as google/automl, optionally cautious (mean or count normalisation)",
    numbers: &["lr", "beta1", "beta2", "weight_decay", "decay_base_lr"],
    flags: &["lr_independent_decay", "caution", "caution_count"],
    optional_flags: &[],
    scalars: &[],
    input: Input::Gradient,
    nonnegative_slots: &[],
};

rule_params! {
    /// Lion's hyper-parameters. `CAUTION`: the cautious mask.
    pub struct Lion<const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        /// The decoupled decay rate: `weight_decay`, or `weight_decay / decay_base_lr` with
        /// lr-independent decay (lucidrains' `decoupled_weight_decay`).
        pub weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// Lion's coefficients (identical for every tensor).
#[derive(Copy, Clone, Debug)]
pub struct LionCoeffs<R: Real> {
    decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    neg_lr: R,
    /// The cautious factor k of this tensor (unused without caution).
    caution: R,
}

impl<const CAUTION: bool> Lion<CAUTION> {
    /// The update direction is the sign of `m·β1 + g·(1 − β1)`, computed as here in both passes.
    #[inline(always)]
    fn interpolation<R: Real>(beta1: R, one_minus_beta1: R, m: R, g: R) -> R {
        m * beta1 + g * one_minus_beta1
    }
}

impl<const CAUTION: bool> Rule for Lion<CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg"];
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };
    type Coeffs<R: Real> = LionCoeffs<R>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        cautious_count_sign(Self::interpolation(R::from_f64(self.beta1), R::from_f64(1.0 - self.beta1), s[0], g), g, sums);
    }

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> LionCoeffs<R> {
        LionCoeffs {
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            neg_lr: R::from_f64(-self.lr),
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &LionCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let p = p * c.decay;
        let mut dir = Self::interpolation(c.beta1, c.one_minus_beta1, s[0], g).sign();
        if CAUTION {
            dir = dir * if dir * g > R::ZERO { c.caution } else { R::ZERO };
        }
        s[0] = s[0] * c.beta2 + c.one_minus_beta2 * g;
        p + c.neg_lr * dir
    }
}

/// Build Lion from `lr, beta1, beta2, weight_decay`, flags `lr_independent_decay` (then also
/// `decay_base_lr`), `caution` and `caution_count`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let mut weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    if h.flag("lr_independent_decay")? {
        let base = h.num("decay_base_lr")?;
        if base.is_nan() || base <= 0.0 {
            return Err(Error::Value(format!("decay_base_lr must be > 0, got {base}")));
        }
        weight_decay /= base;
    }
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("caution")? => C; v.visit(Lion::<C> { lr, beta1, beta2, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_spec_in_f64() {
        let rule = Lion::<false> { lr: 1e-2, beta1: 0.9, beta2: 0.99, weight_decay: 0.5, caution_count: 0.0 };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rm) = (p, 0.0f64);
        for t in 1..=20 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = Lion::<false>::update(&rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]), p, g, &mut s);
            // spec §8 (d)
            rp *= 1.0 - 1e-2 * 0.5;
            let c = 0.9 * rm + 0.1 * g;
            rp -= 1e-2
                * if c > 0.0 {
                    1.0
                } else if c < 0.0 {
                    -1.0
                } else {
                    0.0
                };
            rm = 0.99 * rm + 0.01 * g;
            assert!((p - rp).abs() < 1e-15 && (s[0] - rm).abs() < 1e-15, "t={t}");
        }
    }

    #[test]
    fn zero_direction_moves_only_by_decay() {
        let rule = Lion::<false> { lr: 0.1, beta1: 0.5, beta2: 0.5, weight_decay: 0.0, caution_count: 0.0 };
        let c = rule.coeffs::<f32>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]);
        let mut s = [1.0f32, 0.0, 0.0, 0.0];
        // m·β1 + g·(1 − β1) = 0.5 − 0.5 = 0: sign 0, p unchanged; m still decays.
        assert_eq!(Lion::<false>::update(&c, 2.0, -1.0, &mut s), 2.0);
        assert_eq!(s[0], 0.0);
    }

    /// Spec §20 (d), C-Lion, on a small tensor in f64, both normalisations.
    fn cautious(count: bool) {
        let rule = Lion::<true> { lr: 0.1, beta1: 0.9, beta2: 0.99, weight_decay: 0.2, caution_count: if count { 1.0 } else { 0.0 } };
        let (p0, g, m) = ([1.0f64, -2.0, 0.5, 3.0, 0.25], [0.3f64, -0.4, 0.2, -1.0, 0.0], [0.5f64, -0.1, -0.9, 0.2, 0.1]);
        let mut sums = [0.0; MAX_SUMS];
        for i in 0..5 {
            rule.accumulate(p0[i], g[i], &[m[i], 0.0, 0.0, 0.0], &mut sums);
        }
        // u = sign(0.9 m + 0.1 g) = [+, −, −, +, +]; u·g > 0 for elements 0 and 1 only
        assert_eq!(&sums[..2], &[2.0, 5.0]);
        let k = if count { 5.0 / 3.0 } else { 1.0 / 0.4 };
        let c = rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &sums);
        for i in 0..5 {
            let mut s = [m[i], 0.0, 0.0, 0.0];
            let p = Lion::<true>::update(&c, p0[i], g[i], &mut s);
            let u = (0.9 * m[i] + 0.1 * g[i]).signum();
            let phi = if u * g[i] > 0.0 { 1.0 } else { 0.0 };
            let expected = p0[i] * (1.0 - 0.1 * 0.2) - 0.1 * u * phi * k;
            assert!((p - expected).abs() < 1e-15, "{i}: {p} vs {expected}");
            assert!((s[0] - (0.99 * m[i] + 0.01 * g[i])).abs() < 1e-15);
        }
    }

    #[test]
    fn cautious_mask_and_normalisations_match_spec() {
        cautious(false);
        cautious(true);
    }

    /// The sums pass counts φ without forming sign(x) (`cautious_count_sign`); it must count
    /// exactly the elements the update's mask `sign(x)·g > 0` keeps, for every kind of value.
    #[test]
    fn cautious_count_agrees_with_the_update_mask() {
        let special = [0.0f32, -0.0, 1e-45, -1e-45, 1e-30, -3.5, 2.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX];
        for &x in &special {
            for &g in &special {
                let mut sums = [0.0; MAX_SUMS];
                cautious_count_sign(x, g, &mut sums);
                let kept = x.sign() * g > 0.0;
                assert_eq!(sums[..2], [f64::from(u8::from(kept)), 1.0], "x = {x}, g = {g}");
            }
        }
    }

    #[test]
    fn cautious_mean_is_floored() {
        let rule = Lion::<true> { lr: 0.1, beta1: 0.9, beta2: 0.99, weight_decay: 0.0, caution_count: 0.0 };
        let c = rule.coeffs::<f32>(&mut [0.0; MAX_SCALARS], &[0.0, 1e6, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(c.caution, 1.0f32 / 1e-3f32);
    }
}
