//! AdaMomentum (Wang et al., "Rethinking Adam: A Twofold Exponential Moving Average Approach",
//! arXiv:2106.11514), spec §4. No official code exists; this follows the paper's algorithm.
//!
//! Per element:
//! ```text
//! p ← p·(1 − lr_d·wd)   weight_decouple (lr_d = lr, or 1 with fixed_decay) | g ← g + wd·p   L2
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·m)·m + eps          the second moment of the NEW m; eps kept in the state
//! p ← p + (−lr/bc1)·m / (sqrt(v)/sqrt(bc2))
//! ```
//! With `caution` (spec §20) the last line reads `m·φ·k` for `φ = 1[m·g > 0]` (g with its L2
//! decay) and the tensor's factor `k` from a read-only counting pass (`caution_count`:
//! `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`); `v` keeps the unmasked `m`.
//! State slots: `exp_avg`, `exp_avg_sq`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `adamomentum` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adamomentum",
    summary: "AdaMomentum (Wang et al.): the second moment of the momentum instead of the gradient",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay"],
    flags: &["weight_decouple", "fixed_decay", "caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// AdaMomentum's hyper-parameters. `DECOUPLE`: `weight_decouple`; `CAUTION`: the cautious mask.
    pub struct AdaMomentum<const DECOUPLE: bool, const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub eps: f64,
        pub weight_decay: f64,
        /// What the decoupled decay rate is multiplied by: `lr`, or 1 with `fixed_decay`.
        pub decay_lr: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// AdaMomentum's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdaMomentumCoeffs<R: Real> {
    decay: R,
    l2: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    eps: R,
    bc2_sqrt: R,
    neg_step_size: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const DECOUPLE: bool, const CAUTION: bool> Rule for AdaMomentum<DECOUPLE, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    type Coeffs<R: Real> = AdaMomentumCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the per-parameter `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdaMomentumCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        AdaMomentumCoeffs {
            decay: R::from_f64(if DECOUPLE { 1.0 - self.decay_lr * self.weight_decay } else { 1.0 }),
            l2: R::from_f64(if DECOUPLE { 0.0 } else { self.weight_decay }),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            eps: R::from_f64(self.eps),
            bc2_sqrt: R::from_f64(bc2.sqrt()),
            neg_step_size: R::from_f64(-(self.lr / bc1)),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdaMomentumCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (p, g) = if DECOUPLE { (p * c.decay, g) } else { (p, g + c.l2 * p) };
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * m * m + c.eps;
        s[0] = m;
        s[1] = v;
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        p + c.neg_step_size * m / (v.sqrt() / c.bc2_sqrt)
    }

    /// With caution: count φ for the new `m` (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let g = if DECOUPLE { g } else { g + R::from_f64(self.weight_decay) * p };
            cautious_count_momentum(s[0], g, self.beta1, sums);
        }
    }
}

/// Build AdaMomentum from `lr, beta1, beta2, eps, weight_decay` and flags `weight_decouple,
/// fixed_decay`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let decay_lr = if h.flag("fixed_decay")? { 1.0 } else { lr };
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("weight_decouple")? => D, h.flag("caution")? => C;
        v.visit(AdaMomentum::<D, C> { lr, beta1, beta2, eps, weight_decay, decay_lr, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight f64 transcription of spec §4 (d), one element: returns (p, m, v).
    fn reference(decouple: bool, fixed: bool, p: f64, g: f64, m: f64, v: f64, t: f64) -> (f64, f64, f64) {
        let (lr, b1, b2, eps, wd) = (1e-2, 0.9f64, 0.999f64, 1e-8, 0.1);
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let (mut p, mut g) = (p, g);
        if decouple {
            p *= if fixed { 1.0 - wd } else { 1.0 - lr * wd };
        } else {
            g += wd * p;
        }
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * m * m + eps;
        let d = v.sqrt() / bc2.sqrt();
        (p - lr / bc1 * m / d, m, v)
    }

    fn check<const D: bool>(fixed: bool) {
        let rule = AdaMomentum::<D, false> {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_lr: if fixed { 1.0 } else { 1e-2 },
            caution_count: 0.0,
        };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rm, mut rv) = (p, 0.0, 0.0);
        let mut scalars = [0.0; MAX_SCALARS];
        for t in 1..=20 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = AdaMomentum::<D, false>::update(&rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]), p, g, &mut s);
            (rp, rm, rv) = reference(D, fixed, rp, g, rm, rv, t as f64);
            assert!((p - rp).abs() < 1e-13, "t={t}: {p} vs {rp}");
            assert!((s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15);
        }
    }

    #[test]
    fn matches_spec_in_f64() {
        check::<true>(false);
        check::<true>(true);
        check::<false>(false);
    }

    #[test]
    fn eps_floor_of_the_denominator() {
        // With g = 0 forever, v accumulates eps only: the bias-corrected denominator is
        // sqrt(eps/(1 − β2)), independent of t.
        let rule = AdaMomentum::<true, false> { lr: 1.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decay_lr: 1.0, caution_count: 0.0 };
        let mut s = [0.0f64; MAX_SLOTS];
        let mut scalars = [0.0; MAX_SCALARS];
        for _ in 0..5 {
            let c = rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]);
            AdaMomentum::<true, false>::update(&c, 0.0, 0.0, &mut s);
            let floor = s[1].sqrt() / c.bc2_sqrt;
            assert!((floor - (1e-8f64 / 1e-3).sqrt()).abs() < 1e-12);
        }
    }
}
