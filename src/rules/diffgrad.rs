//! diffGrad (Dubey et al., IEEE TNNLS 2020, arXiv:1909.11015), as the official `diffGrad_v2.py`
//! (spec §13).
//!
//! Per element, in the official operation order:
//! ```text
//! g ← g + wd·p                           L2 (wd ≠ 0; the official writes this into p.grad)
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·g)·g
//! ξ ← 1 / (1 + exp(−|prev − g|))         friction, in [0.5, 1)
//! prev ← g
//! p ← p + ((−η)·(m·ξ)) / (sqrt(v) + eps)   η = lr·sqrt(1 − β2^t)/(1 − β1^t)
//! ```
//! With `caution` (spec §20) the last line reads `m·φ·k` for `φ = 1[m·g > 0]` (g with its L2
//! decay) and the tensor's factor `k` from a read-only counting pass (`caution_count`:
//! `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`).
//! State slots: `exp_avg`, `exp_avg_sq`, `previous_grad`; scalar state `step`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `diffgrad` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "diffgrad",
    summary: "diffGrad (Dubey et al.) as the official diffGrad_v2.py",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay"],
    flags: &["caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// diffGrad's hyper-parameters; `L2`: weight decay added to the gradient (wd ≠ 0);
    /// `CAUTION`: the cautious mask.
    pub struct DiffGrad<const L2: bool, const CAUTION: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// diffGrad's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct DiffGradCoeffs<R: Real> {
    weight_decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    eps: R,
    neg_step: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const L2: bool, const CAUTION: bool> Rule for DiffGrad<L2, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq", "previous_grad"];
    type Coeffs<R: Real> = DiffGradCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the parameter's `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> DiffGradCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        DiffGradCoeffs {
            weight_decay: R::from_f64(self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            eps: R::from_f64(self.eps),
            neg_step: R::from_f64(-(self.lr * bc2.sqrt() / bc1)),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &DiffGradCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let g = if L2 { g + c.weight_decay * p } else { g };
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        let friction = R::ONE / (R::ONE + (-(s[2] - g).abs()).exp());
        s[0] = m;
        s[1] = v;
        s[2] = g;
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        p + c.neg_step * (m * friction) / (v.sqrt() + c.eps)
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

/// Build diffGrad from `lr, beta1, beta2, eps, weight_decay`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(weight_decay != 0.0 => L, h.flag("caution")? => C;
        v.visit(DiffGrad::<L, C> { lr, beta1, beta2, eps, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_spec_in_f64() {
        let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.999, 1e-8, 0.05);
        let rule = DiffGrad::<true, false> { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, caution_count: 0.0 };
        let (mut p, mut s, mut t) = (0.8f64, [0.0f64; 4], [0.0f64; 4]);
        let (mut rp, mut rm, mut rv, mut rprev) = (p, 0.0, 0.0, 0.0);
        for step in 1..=30 {
            let g0 = ((step as f64) * 1.3).cos() * 2.0;
            p = DiffGrad::<true, false>::update(&rule.coeffs::<f64>(&mut t, &[0.0; MAX_SUMS]), p, g0, &mut s);
            // Spec §13 (d).
            let g = g0 + wd * rp;
            rm = b1 * rm + (1.0 - b1) * g;
            rv = b2 * rv + (1.0 - b2) * g * g;
            let xi = 1.0 / (1.0 + (-(rprev - g).abs()).exp());
            rprev = g;
            let bc = (1.0 - b2.powi(step)).sqrt() / (1.0 - b1.powi(step));
            rp -= lr * bc * (rm * xi) / (rv.sqrt() + eps);
            assert_eq!(t[0], step as f64);
            assert!((p - rp).abs() < 1e-14 && (s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15 && s[2] == rprev);
        }
    }

    #[test]
    fn first_friction_is_sigmoid_of_abs_grad() {
        let rule = DiffGrad::<false, false> { lr: 1.0, beta1: 0.0, beta2: 0.0, eps: 0.0, weight_decay: 0.0, caution_count: 0.0 };
        let mut s = [0.0f64; 4];
        // β = 0: m = g, v = g², bias corrections 1, so the step is ξ·sign(g).
        let p = DiffGrad::<false, false>::update(&rule.coeffs::<f64>(&mut [0.0; 4], &[0.0; MAX_SUMS]), 0.0, -2.0, &mut s);
        assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
    }
}
