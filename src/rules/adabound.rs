//! AdaBound and AMSBound (Luo et al., ICLR 2019, arXiv:1902.09843), as Luolc/AdaBound's
//! `adabound.py` (spec §14).
//!
//! Per element, in the official operation order:
//! ```text
//! g ← g + wd·p                                 L2 (wd ≠ 0)
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·g)·g
//! v̄ ← max(vmax, v) (amsbound, stored in vmax) | v
//! p ← p − clamp(η0 / (sqrt(v̄) + eps), lo, hi)·m
//! ```
//! AdaBoundW (`decoupled`, the official file's second class): no L2 term; the decay, taken from
//! the parameter before the step and not scaled by the learning rate, is subtracted last:
//! `p ← (p − clamp(…)·m) − wd·p_old`.
//! with, on the host in f64, `η0 = lr·sqrt(1 − β2^t)/(1 − β1^t)`, `f = final_lr·lr/base_lr`,
//! `lo = f·(1 − 1/(γ·t + 1))`, `hi = f·(1 + 1/(γ·t))`.
//! State slots: `exp_avg`, `exp_avg_sq`, then `max_exp_avg_sq` with amsbound; scalar `step`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `adabound` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adabound",
    summary: "AdaBound / AMSBound (Luo et al.) as Luolc/AdaBound, with L2 or (AdaBoundW) decoupled decay",
    numbers: &["lr", "beta1", "beta2", "final_lr", "gamma", "eps", "weight_decay", "base_lr"],
    flags: &["amsbound", "decoupled", "caution", "caution_count"],
    optional_flags: &["decoupled", "caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq", "max_exp_avg_sq"],
};

rule_params! {
    /// AdaBound's hyper-parameters; `AMSBOUND`, `L2` (wd ≠ 0, AdaBound) and `DECOUPLED` (wd ≠ 0,
    /// AdaBoundW) and `CAUTION` (the cautious mask) are compile-time flags.
    pub struct AdaBound<const AMSBOUND: bool, const L2: bool, const DECOUPLED: bool, const CAUTION: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        final_lr: f64,
        gamma: f64,
        eps: f64,
        weight_decay: f64,
        /// The group's learning rate when it was added (the scheduler's reference point).
        base_lr: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// AdaBound's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdaBoundCoeffs<R: Real> {
    weight_decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    eps: R,
    step_size: R,
    lower: R,
    upper: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const AMSBOUND: bool, const L2: bool, const DECOUPLED: bool, const CAUTION: bool> Rule for AdaBound<AMSBOUND, L2, DECOUPLED, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if AMSBOUND { &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] } else { &["exp_avg", "exp_avg_sq"] };
    type Coeffs<R: Real> = AdaBoundCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the parameter's `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdaBoundCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        let t = scalars[0];
        let final_lr = self.final_lr * self.lr / self.base_lr;
        AdaBoundCoeffs {
            weight_decay: R::from_f64(self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            eps: R::from_f64(self.eps),
            step_size: R::from_f64(self.lr * bc2.sqrt() / bc1),
            lower: R::from_f64(final_lr * (1.0 - 1.0 / (self.gamma * t + 1.0))),
            upper: R::from_f64(final_lr * (1.0 + 1.0 / (self.gamma * t))),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdaBoundCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let g = if L2 { g + c.weight_decay * p } else { g };
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        let v_bar = if AMSBOUND {
            s[2] = s[2].max_nan(v);
            s[2]
        } else {
            v
        };
        let step = (c.step_size / (v_bar.sqrt() + c.eps)).max_nan(c.lower).min_nan(c.upper);
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        let stepped = p + -(step * m);
        if DECOUPLED {
            stepped - c.weight_decay * p
        } else {
            stepped
        }
    }

    /// With caution: count φ for the new `m` (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let g = if L2 { g + R::from_f64(self.weight_decay) * p } else { g };
            cautious_count_momentum(s[0], g, self.beta1, sums);
        }
    }
}

/// Build AdaBound from `lr, beta1, beta2, final_lr, gamma, eps, weight_decay, base_lr` and flags
/// `amsbound` and `decoupled` (optional: AdaBoundW).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let final_lr = check_non_negative("final_lr", h.num("final_lr")?)?;
    let gamma = check_unit_interval("gamma", h.num("gamma")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let base_lr = h.num("base_lr")?;
    if base_lr.is_nan() || base_lr <= 0.0 || gamma == 0.0 {
        return Err(Error::Value(format!("base_lr and gamma must be > 0, got {base_lr} and {gamma}")));
    }
    let decoupled = h.flag("decoupled")?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("amsbound")? => A, weight_decay != 0.0 && !decoupled => L, weight_decay != 0.0 && decoupled => D, h.flag("caution")? => C;
        v.visit(AdaBound::<A, L, D, C> { lr, beta1, beta2, final_lr, gamma, eps, weight_decay, base_lr, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER: (f64, f64, f64, f64, f64, f64, f64, f64) = (2e-3, 0.9, 0.999, 0.05, 0.1, 1e-8, 0.01, 4e-3);

    /// One step of AdaBound with L2 decay (AMSBound with `A`) and the [`HYPER`] parameters.
    fn l2_step<const A: bool>(t: &mut [f64; 4], p: f64, g: f64, s: &mut [f64; 4]) -> f64 {
        let (lr, beta1, beta2, final_lr, gamma, eps, weight_decay, base_lr) = HYPER;
        let r = AdaBound::<A, true, false, false> { lr, beta1, beta2, final_lr, gamma, eps, weight_decay, base_lr, caution_count: 0.0 };
        AdaBound::<A, true, false, false>::update(&r.coeffs::<f64>(t, &[0.0; MAX_SUMS]), p, g, s)
    }

    #[test]
    fn matches_spec_in_f64() {
        let (lr, b1, b2, fl, gm, eps, wd, base) = HYPER;
        for ams in [false, true] {
            let (mut p, mut s, mut t) = (0.5f64, [0.0f64; 4], [0.0f64; 4]);
            let (mut rp, mut rm, mut rv, mut rmax) = (p, 0.0f64, 0.0f64, 0.0f64);
            for step in 1..=40 {
                let g0 = ((step as f64) * 0.9).sin() * if step % 5 == 0 { 0.1 } else { 1.0 };
                p = if ams { l2_step::<true>(&mut t, p, g0, &mut s) } else { l2_step::<false>(&mut t, p, g0, &mut s) };
                // Spec §14 (d).
                let tt = step as f64;
                let g = g0 + wd * rp;
                rm = b1 * rm + (1.0 - b1) * g;
                rv = b2 * rv + (1.0 - b2) * g * g;
                rmax = rmax.max(rv);
                let d = if ams { rmax.sqrt() } else { rv.sqrt() } + eps;
                let eta0 = lr * (1.0 - b2.powf(tt)).sqrt() / (1.0 - b1.powf(tt));
                let f = fl * lr / base;
                let (lo, hi) = (f * (1.0 - 1.0 / (gm * tt + 1.0)), f * (1.0 + 1.0 / (gm * tt)));
                rp -= (eta0 / d).clamp(lo, hi) * rm;
                assert!((p - rp).abs() < 1e-15 && (s[0] - rm).abs() < 1e-15, "step {step}");
                if ams {
                    assert_eq!(s[2], rmax);
                }
            }
        }
    }

    /// AdaBoundW (spec §14 (d)): the step without L2, then `− wd·p_old`, no lr factor.
    #[test]
    fn decoupled_decay_matches_spec_in_f64() {
        let (lr, b1, b2, fl, gm, eps, wd, base) = HYPER;
        let r = AdaBound::<true, false, true, false> {
            lr,
            beta1: b1,
            beta2: b2,
            final_lr: fl,
            gamma: gm,
            eps,
            weight_decay: wd,
            base_lr: base,
            caution_count: 0.0,
        };
        let (mut p, mut s, mut t) = (0.5f64, [0.0f64; 4], [0.0f64; 4]);
        let (mut rp, mut rm, mut rv, mut rmax) = (p, 0.0f64, 0.0f64, 0.0f64);
        for step in 1..=40 {
            let g = ((step as f64) * 0.9).sin() * if step % 5 == 0 { 0.1 } else { 1.0 };
            p = AdaBound::<true, false, true, false>::update(&r.coeffs::<f64>(&mut t, &[0.0; MAX_SUMS]), p, g, &mut s);
            let tt = step as f64;
            rm = b1 * rm + (1.0 - b1) * g;
            rv = b2 * rv + (1.0 - b2) * g * g;
            rmax = rmax.max(rv);
            let eta0 = lr * (1.0 - b2.powf(tt)).sqrt() / (1.0 - b1.powf(tt));
            let f = fl * lr / base;
            let (lo, hi) = (f * (1.0 - 1.0 / (gm * tt + 1.0)), f * (1.0 + 1.0 / (gm * tt)));
            rp = rp - (eta0 / (rmax.sqrt() + eps)).clamp(lo, hi) * rm - wd * rp;
            assert!((p - rp).abs() < 1e-15 && (s[0] - rm).abs() < 1e-15, "step {step}");
        }
    }

    #[test]
    fn bounds_clamp_the_step_size() {
        // Huge η0/D at t = 1 is cut to the upper bound f·(1 + 1/γ).
        let r = AdaBound::<false, false, false, false> {
            lr: 1.0,
            beta1: 0.0,
            beta2: 0.0,
            final_lr: 0.1,
            gamma: 0.5,
            eps: 0.0,
            weight_decay: 0.0,
            base_lr: 1.0,
            caution_count: 0.0,
        };
        let mut s = [0.0f64; 4];
        let p = AdaBound::<false, false, false, false>::update(&r.coeffs::<f64>(&mut [0.0; 4], &[0.0; MAX_SUMS]), 0.0, 1e-6, &mut s);
        assert!((p - -(0.1 * 3.0 * 1e-6)).abs() < 1e-18);
    }
}
