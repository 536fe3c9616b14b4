//! AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second
//! Order Optimizer for Machine Learning", AAAI 2021, arXiv:2006.00719), as timm's `Adahessian`
//! (davda54/ada-hessian): Adam with the EMA of the squared Hutchinson estimate `h` of the Hessian
//! diagonal in place of the EMA of `g²`.
//!
//! Per element, in timm's operation order:
//! ```text
//! p ← p·(1 − lr·wd)                          decoupled decay
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·h)·h
//! p ← p + (−lr/bc1)·(m / ((v/bc2)^(k/2) + eps))     k = hessian_power (sqrt when k = 1)
//! ```
//! `h` is the read-only slot `hessian`, which the Python layer fills before the step (Hutchinson's
//! `z ⊙ Hz` from autograd, averaged over samples and, for convolution kernels, over their spatial
//! positions). State slots: `exp_avg`, `exp_hessian_diag_sq` (written), `hessian` (read only).
//!
//! With the optional flag `caution` (spec §20, as C-AdamW: the step has the sign of the new `m`),
//! `m` in the last line is masked where `m·g <= 0` and the rest scaled by the per-tensor factor
//! (`caution_count` selects the normalisation), from a read-only pass counting the agreements.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `adahessian` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adahessian",
    summary: "AdaHessian (Yao et al.) as timm's Adahessian: Adam on the EMA of the squared Hutchinson Hessian diagonal",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "hessian_power"],
    flags: &["caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_hessian_diag_sq"],
};

rule_params! {
    /// AdaHessian's hyper-parameters; `SQRT`: `hessian_power` is 1 (a square root, as torch's
    /// `pow(0.5)` computes it, instead of a general power); `CAUTION`: the Cautious mask.
    pub struct AdaHessian<const SQRT: bool, const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub eps: f64,
        pub weight_decay: f64,
        pub hessian_power: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// AdaHessian's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdaHessianCoeffs<R: Real> {
    decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    bc2: R,
    half_power: R,
    eps: R,
    neg_step_size: R,
    /// The cautious factor k of this tensor (unused without caution).
    caution: R,
}

impl<const SQRT: bool, const CAUTION: bool> Rule for AdaHessian<SQRT, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_hessian_diag_sq", "hessian"];
    /// `hessian` is only read.
    const WRITTEN_SLOTS: usize = 2;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };
    type Coeffs<R: Real> = AdaHessianCoeffs<R>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        cautious_count_momentum(s[0], g, self.beta1, sums);
    }

    /// `scalars[0]` is the per-parameter `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdaHessianCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        AdaHessianCoeffs {
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            bc2: R::from_f64(bc2),
            half_power: R::from_f64(self.hessian_power / 2.0),
            eps: R::from_f64(self.eps),
            neg_step_size: R::from_f64(-self.lr / bc1),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdaHessianCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let p = p * c.decay;
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * s[2] * s[2];
        s[0] = m;
        s[1] = v;
        let r = v / c.bc2;
        let d = if SQRT { r.sqrt() } else { r.powf(c.half_power) } + c.eps;
        let m_step = if CAUTION { cautious(m, g, c.caution) } else { m };
        p + c.neg_step_size * (m_step / d)
    }
}

/// Build AdaHessian from `lr, beta1, beta2, eps, weight_decay, hessian_power`; optional flags
/// `caution`, `caution_count`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let hessian_power = h.num("hessian_power")?;
    if !(0.0..=1.0).contains(&hessian_power) {
        return Err(Error::Value(format!("hessian_power must be in [0, 1], got {hessian_power}")));
    }
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(hessian_power == 1.0 => S, h.flag("caution")? => C;
        v.visit(AdaHessian::<S, C> { lr, beta1, beta2, eps, weight_decay, hessian_power, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follows_spec<const SQRT: bool>(power: f64) {
        let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.05);
        let rule = AdaHessian::<SQRT, false> { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, hessian_power: power, caution_count: 0.0 };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rm, mut rv) = (p, 0.0f64, 0.0f64);
        let mut scalars = [0.0; MAX_SCALARS];
        for t in 1..=30 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            let hd = ((t as f64) * 0.23).cos() * 2.0 - 0.3;
            s[2] = hd;
            p = AdaHessian::<SQRT, false>::update(&rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]), p, g, &mut s);
            assert_eq!(s[2], hd, "the hessian slot is only read");
            let tf = t as f64;
            rp *= 1.0 - lr * wd;
            rm = b1 * rm + (1.0 - b1) * g;
            rv = b2 * rv + (1.0 - b2) * hd * hd;
            let d = (rv / (1.0 - b2.powf(tf))).powf(power / 2.0) + eps;
            rp -= lr / (1.0 - b1.powf(tf)) * rm / d;
            assert!((p - rp).abs() < 1e-13 * rp.abs().max(1.0), "t={t}: {p} vs {rp}");
            assert!((s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15);
        }
    }

    #[test]
    fn matches_spec_in_f64() {
        follows_spec::<true>(1.0);
        follows_spec::<false>(0.5);
    }
}
