//! AdaMod (Ding et al., "An Adaptive and Momental Bound Method for Stochastic Learning",
//! arXiv:1910.12249), as lancopku/AdaMod `adamod` 0.0.3 (spec §12).
//!
//! Per element, in the reference's operation order:
//! ```text
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·g)·g
//! p ← p + (−wd·lr)·p                         decoupled decay (a no-op when wd = 0)
//! η ← η0 / (sqrt(v) + eps)                   η0 = lr·sqrt(bc2)/bc1
//! s ← s·β3 + (1 − β3)·η
//! p ← p − min(η, s)·m
//! ```
//! With `caution` (spec §20) the last line reads `m·φ·k` for `φ = 1[m·g > 0]` and the tensor's
//! factor `k` from a read-only counting pass (`caution_count`: `numel/(Σφ + 1)`, else
//! `1/max(mean φ, 1e-3)`); the step size stays positive, so `m` carries the update's sign.
//! State slots: `exp_avg`, `exp_avg_sq`, `exp_avg_lr`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `adamod` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adamod",
    summary: "AdaMod (Ding et al.) as lancopku/AdaMod: Adam with a momental bound on the step size",
    numbers: &["lr", "beta1", "beta2", "beta3", "eps", "weight_decay"],
    flags: &["caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq", "exp_avg_lr"],
};

rule_params! {
    /// AdaMod's hyper-parameters; `CAUTION`: the cautious mask.
    pub struct AdaMod<const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub beta3: f64,
        pub eps: f64,
        pub weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// AdaMod's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdaModCoeffs<R: Real> {
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    beta3: R,
    one_minus_beta3: R,
    eps: R,
    step_size: R,
    neg_decay: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const CAUTION: bool> Rule for AdaMod<CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq", "exp_avg_lr"];
    type Coeffs<R: Real> = AdaModCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the per-parameter `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdaModCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        AdaModCoeffs {
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            beta3: R::from_f64(self.beta3),
            one_minus_beta3: R::from_f64(1.0 - self.beta3),
            eps: R::from_f64(self.eps),
            step_size: R::from_f64(self.lr * bc2.sqrt() / bc1),
            neg_decay: R::from_f64(-self.weight_decay * self.lr),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdaModCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        let p = p + c.neg_decay * p;
        let eta = c.step_size / (v.sqrt() + c.eps);
        let bound = s[2] * c.beta3 + c.one_minus_beta3 * eta;
        s[0] = m;
        s[1] = v;
        s[2] = bound;
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        p - eta.min_nan(bound) * m
    }

    /// With caution: count φ for the new `m` (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            cautious_count_momentum(s[0], g, self.beta1, sums);
        }
    }
}

/// Build AdaMod from `lr, beta1, beta2, beta3, eps, weight_decay`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let beta3 = check_unit_interval("beta3", h.num("beta3")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("caution")? => C;
        v.visit(AdaMod::<C> { lr, beta1, beta2, beta3, eps, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_spec_in_f64() {
        let (lr, b1, b2, b3, eps, wd) = (1e-2, 0.9, 0.999, 0.99, 1e-8, 0.1);
        let rule = AdaMod::<false> { lr, beta1: b1, beta2: b2, beta3: b3, eps, weight_decay: wd, caution_count: 0.0 };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rm, mut rv, mut rs) = (p, 0.0f64, 0.0f64, 0.0f64);
        let mut scalars = [0.0; MAX_SCALARS];
        for t in 1..=30 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = AdaMod::<false>::update(&rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]), p, g, &mut s);
            // spec §12 (d)
            let tf = t as f64;
            rm = b1 * rm + (1.0 - b1) * g;
            rv = b2 * rv + (1.0 - b2) * g * g;
            let d = rv.sqrt() + eps;
            let eta0 = lr * (1.0 - b2.powf(tf)).sqrt() / (1.0 - b1.powf(tf));
            rp *= 1.0 - lr * wd;
            let eta = eta0 / d;
            rs = b3 * rs + (1.0 - b3) * eta;
            rp -= eta.min(rs) * rm;
            assert!((p - rp).abs() < 1e-14, "t={t}: {p} vs {rp}");
            assert!((s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15 && (s[2] - rs).abs() < 1e-15);
        }
    }

    #[test]
    fn first_step_is_damped_by_one_minus_beta3() {
        let rule = AdaMod::<false> { lr: 1e-3, beta1: 0.9, beta2: 0.999, beta3: 0.999, eps: 1e-8, weight_decay: 0.0, caution_count: 0.0 };
        let c = rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]);
        let mut s = [0.0f64; MAX_SLOTS];
        let p = AdaMod::<false>::update(&c, 1.0, 1.0, &mut s);
        let eta = c.step_size / (s[1].sqrt() + 1e-8);
        assert!((s[2] - 1e-3 * eta).abs() < 1e-18);
        assert!((1.0 - p - s[2] * s[0]).abs() < 1e-15);
    }
}
