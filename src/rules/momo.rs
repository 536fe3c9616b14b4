//! MoMo and MoMo-Adam (Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates",
//! ICML 2024), as fabian-sp/MoMo `momo.py` and `momo_adam.py` (spec §16).
//!
//! Both rules take the Polyak step size `tau` as a hyper-parameter: it depends on sums over every
//! tensor of the step, which the Python layer adds up from the per-tensor sums of this rule
//! between the engine's sums pass and its update (`emafuse.optim.momo`). The sums pass recomputes
//! the new moments from the old ones (read only); the update then writes them.
//!
//! MoMo, per element (`d` = `grad_avg`; `a, b` = `β, 1 − β`, or `0, 1` on a parameter's first step
//! without bias correction, where the reference starts `d` and `γ` at `g` and `⟨p, g⟩`):
//! ```text
//! d ← a·d + b·g
//! p ← (p − τ·d) / (1 + lr·wd)
//! ```
//! sums `[⟨p, g⟩, ⟨p, d⟩, ⟨d, d⟩]` (old `p`, new `d`), and per tensor `γ ← a·γ + b·⟨p, g⟩`
//! (scalar state `grad_dot_w`).
//!
//! MoMo-Adam, per element (`v` = `grad_avg_sq`; `c2 = 1 − β2^k` of the optimizer's step `k`):
//! ```text
//! d ← β1·d + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g² ;  D = sqrt(v / c2) + eps
//! p ← p·(1 − lr·wd)          without `divide`
//! p ← p − τ·(d / D)
//! p ← p / (1 + lr·wd)        with `divide`
//! ```
//! sums `[⟨p, g⟩, ⟨p, d⟩, ⟨d, d/D⟩]`, `γ ← β1·γ + (1 − β1)·⟨p, g⟩`, and the per-parameter `step`.
//!
//! With the optional flag `caution` (spec §20) both move along the masked direction: `d·φ·k` (or
//! `(d/D)·φ·k`) for `φ = 1[d·g > 0]` (the direction has the sign of the new `d`) and the per-tensor
//! factor `k` from the counts `[Σφ, numel]`, gathered as sums 3 and 4 in the same pass. The sums
//! the Polyak step size reads stay those of the unmasked direction.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `momo` rule; `first` is set by the engine for a parameter's first step.
pub const INFO: RuleInfo = RuleInfo {
    name: "momo",
    summary: "MoMo (Schaipp et al.): momentum with a Polyak step size tau from global sums",
    numbers: &["lr", "beta", "weight_decay", "tau"],
    flags: &["bias_correction", "first", "caution", "caution_count"],
    optional_flags: &["first", "caution", "caution_count"],
    scalars: &["grad_dot_w"],
    input: Input::Gradient,
    nonnegative_slots: &[],
};

/// The `momo_adam` rule.
pub const ADAM_INFO: RuleInfo = RuleInfo {
    name: "momo_adam",
    summary: "MoMo-Adam (Schaipp et al.): Adam moments with a Polyak step size tau from global sums",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "tau", "step"],
    flags: &["divide", "caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step", "grad_dot_w"],
    input: Input::Gradient,
    nonnegative_slots: &["grad_avg_sq"],
};

rule_params! {
    /// MoMo's per-step values; `CAUTION`: the Cautious mask.
    pub struct Momo<const CAUTION: bool> {
        /// `d ← keep·d + take·g`: `β, 1 − β`, or `0, 1` on a first step without bias correction.
        keep: f64,
        take: f64,
        tau: f64,
        /// `1 + lr·wd`.
        divisor: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

rule_params! {
    /// MoMo-Adam's per-step values; `CAUTION`: the Cautious mask.
    pub struct MomoAdam<const CAUTION: bool> {
        beta1: f64,
        beta2: f64,
        eps: f64,
        tau: f64,
        /// `1 − β2^k` of the optimizer's step `k`.
        bias_correction2: f64,
        /// `1 − lr·wd` without `divide`, else 1.
        decay: f64,
        /// `1 + lr·wd` with `divide`, else 1.
        divisor: f64,
        /// As [`Momo`]'s.
        caution_count: f64,
    }
}

/// The sums with caution: the three products, then the counts `[Σφ, numel]`.
const fn sums_with(caution: bool) -> usize {
    if caution {
        5
    } else {
        3
    }
}

/// The cautious factor of a tensor (1 without caution) from its sums.
fn factor_of<R: Real>(caution: bool, sums: &[f64; MAX_SUMS], count: f64) -> R {
    if caution {
        caution_factor(&sums[3..], count != 0.0)
    } else {
        R::ONE
    }
}

/// Add one element's `⟨p, g⟩`, `⟨p, d⟩` and `⟨d, e⟩` (MoMo: `e = d`; MoMo-Adam: `e = d/D`).
#[inline(always)]
fn add_products<R: Real>(p: R, g: R, d: R, e: R, sums: &mut [f64; MAX_SUMS]) {
    let (p, d) = (p.to_f64(), d.to_f64());
    sums[0] += p * g.to_f64();
    sums[1] += p * d;
    sums[2] += d * e.to_f64();
}

/// MoMo's coefficients (identical for every tensor).
#[derive(Copy, Clone, Debug)]
pub struct MomoCoeffs<R: Real> {
    keep: R,
    take: R,
    neg_tau: R,
    divisor: R,
    /// The cautious factor k of this tensor (unused without caution).
    caution: R,
}

impl<const CAUTION: bool> Rule for Momo<CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["grad_avg"];
    const SUMS: usize = sums_with(CAUTION);
    type Coeffs<R: Real> = MomoCoeffs<R>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let d = s[0] * R::from_f64(self.keep) + R::from_f64(self.take) * g;
        add_products(p, g, d, d, sums);
        if CAUTION {
            cautious_count(d, g, &mut sums[3..]);
        }
    }

    /// `scalars[0]` is the parameter's `grad_dot_w` (γ), updated here from `sums[0] = ⟨p, g⟩`.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> MomoCoeffs<R> {
        scalars[0] = self.keep * scalars[0] + self.take * sums[0];
        MomoCoeffs {
            keep: R::from_f64(self.keep),
            take: R::from_f64(self.take),
            neg_tau: R::from_f64(-self.tau),
            divisor: R::from_f64(self.divisor),
            caution: factor_of(CAUTION, sums, self.caution_count),
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &MomoCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let d = s[0] * c.keep + c.take * g;
        s[0] = d;
        let u = if CAUTION { cautious(d, g, c.caution) } else { d };
        (p + c.neg_tau * u) / c.divisor
    }
}

/// MoMo-Adam's coefficients (identical for every tensor).
#[derive(Copy, Clone, Debug)]
pub struct MomoAdamCoeffs<R: Real> {
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    bias_correction2: R,
    eps: R,
    neg_tau: R,
    decay: R,
    divisor: R,
    /// The cautious factor k of this tensor (unused without caution).
    caution: R,
}

impl<R: Real> MomoAdamCoeffs<R> {
    /// The new `(d, v)` and `d / D`, as both passes compute them.
    #[inline(always)]
    fn moments(&self, g: R, d: R, v: R) -> (R, R, R) {
        let d = d * self.beta1 + self.one_minus_beta1 * g;
        let v = v * self.beta2 + self.one_minus_beta2 * (g * g);
        (d, v, d / ((v / self.bias_correction2).sqrt() + self.eps))
    }
}

impl<const CAUTION: bool> MomoAdam<CAUTION> {
    /// The coefficients, with the cautious factor `caution`.
    fn coefficients<R: Real>(&self, caution: R) -> MomoAdamCoeffs<R> {
        MomoAdamCoeffs {
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            bias_correction2: R::from_f64(self.bias_correction2),
            eps: R::from_f64(self.eps),
            neg_tau: R::from_f64(-self.tau),
            decay: R::from_f64(self.decay),
            divisor: R::from_f64(self.divisor),
            caution,
        }
    }
}

impl<const CAUTION: bool> Rule for MomoAdam<CAUTION> {
    const INFO: &'static RuleInfo = &ADAM_INFO;
    const SLOT_NAMES: &'static [&'static str] = &["grad_avg", "grad_avg_sq"];
    const SUMS: usize = sums_with(CAUTION);
    type Coeffs<R: Real> = MomoAdamCoeffs<R>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let (d, _, d_over) = self.coefficients::<R>(R::ONE).moments(g, s[0], s[1]);
        add_products(p, g, d, d_over, sums);
        if CAUTION {
            cautious_count(d_over, g, &mut sums[3..]);
        }
    }

    /// `scalars[0]` is the parameter's `step` (incremented), `scalars[1]` its `grad_dot_w` (γ).
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> MomoAdamCoeffs<R> {
        scalars[0] += 1.0;
        scalars[1] = self.beta1 * scalars[1] + (1.0 - self.beta1) * sums[0];
        self.coefficients(factor_of(CAUTION, sums, self.caution_count))
    }

    #[inline(always)]
    fn update<R: Real>(c: &MomoAdamCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (d, v, d_over) = c.moments(g, s[0], s[1]);
        s[0] = d;
        s[1] = v;
        let u = if CAUTION { cautious(d_over, g, c.caution) } else { d_over };
        (p * c.decay + c.neg_tau * u) / c.divisor
    }
}

/// Build MoMo from `lr, beta, weight_decay, tau` and the flags `bias_correction`, `first`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta = h.num("beta")?;
    if !(0.0..=1.0).contains(&beta) {
        return Err(Error::Value(format!("beta must be in [0, 1], got {beta}")));
    }
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let tau = check_non_negative("tau", h.num("tau")?)?;
    let (keep, take) = if h.flag("first")? && !h.flag("bias_correction")? { (0.0, 1.0) } else { (beta, 1.0 - beta) };
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("caution")? => C; v.visit(Momo::<C> { keep, take, tau, divisor: 1.0 + lr * weight_decay, caution_count })))
}

/// Build MoMo-Adam from `lr, beta1, beta2, eps, weight_decay, tau`, the optimizer's `step` and the
/// flag `divide`.
pub fn visit_adam<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let tau = check_non_negative("tau", h.num("tau")?)?;
    let step = h.num("step")?;
    if step.is_nan() || step < 1.0 {
        return Err(Error::Value(format!("step must be >= 1, got {step}")));
    }
    let shrink = lr * weight_decay;
    let (decay, divisor) = if h.flag("divide")? { (1.0, 1.0 + shrink) } else { (1.0 - shrink, 1.0) };
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("caution")? => C;
        v.visit(MomoAdam::<C> { beta1, beta2, eps, tau, bias_correction2: 1.0 - beta2.powf(step), decay, divisor, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §16 (d) for one tensor in f64 over a few steps (the first without bias correction).
    #[test]
    fn momo_matches_spec_in_f64() {
        let (p0, g) = ([0.5f64, -1.5, 2.0], [0.3f64, -0.2, 0.7]);
        let (mut p, mut d, mut gamma) = (p0, [0.0f64; 3], 0.0f64);
        let (mut rp, mut rd, mut rgamma) = (p0, [0.0f64; 3], 0.0f64);
        for t in 0..4 {
            let rule =
                Momo::<false> { keep: if t == 0 { 0.0 } else { 0.9 }, take: if t == 0 { 1.0 } else { 0.1 }, tau: 0.05, divisor: 1.01, caution_count: 0.0 };
            let mut sums = [0.0; MAX_SUMS];
            for i in 0..3 {
                rule.accumulate(p[i], g[i], &[d[i], 0.0, 0.0, 0.0], &mut sums);
            }
            let mut scalars = [gamma, 0.0, 0.0, 0.0];
            let c = rule.coeffs::<f64>(&mut scalars, &sums);
            gamma = scalars[0];
            for i in 0..3 {
                let mut s = [d[i], 0.0, 0.0, 0.0];
                p[i] = Momo::<false>::update(&c, p[i], g[i], &mut s);
                d[i] = s[0];
            }
            // reference: init (g, <p, g>) on the first step, then the EMA
            let pg: f64 = (0..3).map(|i| rp[i] * g[i]).sum();
            for i in 0..3 {
                rd[i] = if t == 0 { g[i] } else { 0.9 * rd[i] + 0.1 * g[i] };
            }
            rgamma = if t == 0 { pg } else { 0.9 * rgamma + 0.1 * pg };
            let dot: f64 = (0..3).map(|i| rp[i] * rd[i]).sum();
            let norm: f64 = rd.iter().map(|x| x * x).sum();
            assert!((sums[0] - pg).abs() < 1e-14 && (sums[1] - dot).abs() < 1e-14 && (sums[2] - norm).abs() < 1e-14, "t={t}");
            for i in 0..3 {
                rp[i] = (rp[i] - 0.05 * rd[i]) / 1.01;
                assert!((p[i] - rp[i]).abs() < 1e-14 && (d[i] - rd[i]).abs() < 1e-15, "t={t} i={i}");
            }
            assert!((gamma - rgamma).abs() < 1e-14, "t={t}");
        }
    }

    /// Spec §16 (d') for one element in f64, with and without `divide`.
    #[test]
    fn momo_adam_matches_spec_in_f64() {
        for divide in [true, false] {
            let (lr, wd, tau) = (0.1, 0.2, 0.03);
            let (decay, divisor) = if divide { (1.0, 1.0 + lr * wd) } else { (1.0 - lr * wd, 1.0) };
            let rule =
                MomoAdam::<false> { beta1: 0.9, beta2: 0.99, eps: 1e-8, tau, bias_correction2: 1.0 - 0.99f64.powi(3), decay, divisor, caution_count: 0.0 };
            let (p, g, d, v) = (0.7f64, -0.4f64, 0.2f64, 0.05f64);
            let mut sums = [0.0; MAX_SUMS];
            rule.accumulate(p, g, &[d, v, 0.0, 0.0], &mut sums);
            let mut scalars = [2.0, 0.5, 0.0, 0.0];
            let c = rule.coeffs::<f64>(&mut scalars, &sums);
            let mut s = [d, v, 0.0, 0.0];
            let out = MomoAdam::<false>::update(&c, p, g, &mut s);
            let (rd, rv) = (0.9 * d + 0.1 * g, 0.99 * v + 0.01 * g * g);
            let big_d = (rv / (1.0 - 0.99f64.powi(3))).sqrt() + 1e-8;
            let mut rp = if divide { p } else { p * (1.0 - lr * wd) };
            rp -= tau * rd / big_d;
            if divide {
                rp /= 1.0 + lr * wd;
            }
            assert!((out - rp).abs() < 1e-15 && (s[0] - rd).abs() < 1e-16 && (s[1] - rv).abs() < 1e-16, "divide={divide}");
            assert_eq!(scalars[0], 3.0);
            assert!((scalars[1] - (0.9 * 0.5 + 0.1 * p * g)).abs() < 1e-16);
            assert!((sums[0] - p * g).abs() < 1e-16 && (sums[1] - p * rd).abs() < 1e-16 && (sums[2] - rd * rd / big_d).abs() < 1e-12);
        }
    }
}
