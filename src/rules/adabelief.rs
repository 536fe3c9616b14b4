//! AdaBelief (Zhuang et al., NeurIPS 2020), as `adabelief-pytorch` 0.2.1 (spec §5).
//!
//! Per element, in the reference's operation order:
//! ```text
//! p ← p·(1 − lr_d·wd)   weight_decouple (lr_d = lr, or 1 with fixed_decay) | g ← g + wd·p   L2
//! m ← m·β1 + (1 − β1)·g
//! r ← g − m
//! s ← s·β2 + ((1 − β2)·r)·r + eps               eps persisted in the state
//! smax ← max(smax, s)                            amsgrad
//! p ← p + (step·m) / (sqrt(x)/div + add)
//! ```
//! The host picks `(x, step, div, add)` per tensor:
//! * not rectified: `x = smax` (amsgrad) or `s`, `step = −lr/bc1`, `div = sqrt(bc2)`, `add = eps`;
//! * rectified (RAdam-style), ρ_t >= 5: `x = s`, `step = −(r_t/bc1)·lr`, `div = 1`, `add = eps`
//!   (`sqrt(s)/1` is exact, so this is the reference's `m / (sqrt(s) + eps)`);
//! * rectified, ρ_t < 5, `degenerated_to_sgd`: `step = −(1/bc1)·lr`, `div = +∞`, `add = 1`, so the
//!   denominator is exactly 1 (for finite `s`) and the update is the reference's SGD step;
//! * rectified, ρ_t < 5, otherwise: `step = 0` (the parameter keeps its value; states still move).
//!
//! This keeps the per-element code free of branches on the per-tensor regime. It differs from the
//! reference only when `s` or `m` is already infinite or NaN in the first (ρ_t < 5) steps.
//! State slots: `exp_avg`, `exp_avg_var`, then `max_exp_avg_var` with amsgrad.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper,
    RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `adabelief` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adabelief",
    summary: "AdaBelief (Zhuang et al.) as adabelief-pytorch 0.2.1, optionally rectified",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay"],
    flags: &["amsgrad", "weight_decouple", "fixed_decay", "rectify", "degenerated_to_sgd", "caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_var", "max_exp_avg_var"],
};

rule_params! {
    /// AdaBelief's hyper-parameters. Flags: `AMSGRAD`, `DECOUPLE` (`weight_decouple`), `RECTIFY`,
    /// `CAUTION` (the cautious mask).
    pub struct AdaBelief<const AMSGRAD: bool, const DECOUPLE: bool, const RECTIFY: bool, const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub eps: f64,
        pub weight_decay: f64,
        /// What the decoupled decay rate is multiplied by: `lr`, or 1 with `fixed_decay`.
        pub decay_lr: f64,
        /// 1 if the rectified update falls back to SGD with momentum while ρ_t < 5, else 0.
        pub degenerated_to_sgd: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// AdaBelief's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdaBeliefCoeffs<R: Real> {
    decay: R,
    l2: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    eps: R,
    step: R,
    div: R,
    add: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

/// The rectified update's regime at step `t` (spec §5 (d) 9): `Some(step size)` (before the
/// lr factor) or `None` (no update). The bool tells whether the adaptive denominator is used.
pub fn rectified_step(beta1: f64, beta2: f64, t: f64, degenerated_to_sgd: bool) -> (bool, Option<f64>) {
    let beta2_t = beta2.powf(t);
    let n_sma_max = 2.0 / (1.0 - beta2) - 1.0;
    let n_sma = n_sma_max - 2.0 * t * beta2_t / (1.0 - beta2_t);
    let bc1 = 1.0 - beta1.powf(t);
    if n_sma >= 5.0 {
        let r = (1.0 - beta2_t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0) / n_sma * n_sma_max / (n_sma_max - 2.0);
        (true, Some(r.sqrt() / bc1))
    } else if degenerated_to_sgd {
        (false, Some(1.0 / bc1))
    } else {
        (false, None)
    }
}

impl<const AMSGRAD: bool, const DECOUPLE: bool, const RECTIFY: bool, const CAUTION: bool> Rule for AdaBelief<AMSGRAD, DECOUPLE, RECTIFY, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if AMSGRAD { &["exp_avg", "exp_avg_var", "max_exp_avg_var"] } else { &["exp_avg", "exp_avg_var"] };
    type Coeffs<R: Real> = AdaBeliefCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the per-parameter `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdaBeliefCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        let t = scalars[0];
        let (step, div, add) = if !RECTIFY {
            (-(self.lr / bc1), bc2.sqrt(), self.eps)
        } else {
            match rectified_step(self.beta1, self.beta2, t, self.degenerated_to_sgd != 0.0) {
                (true, Some(s)) => (-s * self.lr, 1.0, self.eps),
                (_, Some(s)) => (-s * self.lr, f64::INFINITY, 1.0),
                (_, None) => (0.0, f64::INFINITY, 1.0),
            }
        };
        AdaBeliefCoeffs {
            decay: R::from_f64(if DECOUPLE { 1.0 - self.decay_lr * self.weight_decay } else { 1.0 }),
            l2: R::from_f64(if DECOUPLE { 0.0 } else { self.weight_decay }),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            eps: R::from_f64(self.eps),
            step: R::from_f64(step),
            div: R::from_f64(div),
            add: R::from_f64(add),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdaBeliefCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (p, g) = if DECOUPLE { (p * c.decay, g) } else { (p, g + c.l2 * p) };
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let r = g - m;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * r * r + c.eps;
        s[0] = m;
        s[1] = v;
        if AMSGRAD {
            s[2] = s[2].max_nan(v);
        }
        let x = if AMSGRAD && !RECTIFY { s[2] } else { v };
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        p + c.step * m / (x.sqrt() / c.div + c.add)
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

/// Build AdaBelief from `lr, beta1, beta2, eps, weight_decay` and flags `amsgrad,
/// weight_decouple, fixed_decay, rectify, degenerated_to_sgd`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let decay_lr = if h.flag("fixed_decay")? { 1.0 } else { lr };
    let degenerated_to_sgd = if h.flag("degenerated_to_sgd")? { 1.0 } else { 0.0 };
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("amsgrad")? => A, h.flag("weight_decouple")? => D, h.flag("rectify")? => RE, h.flag("caution")? => C;
        v.visit(AdaBelief::<A, D, RE, C> { lr, beta1, beta2, eps, weight_decay, decay_lr, degenerated_to_sgd, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy)]
    struct Opts {
        amsgrad: bool,
        decouple: bool,
        fixed: bool,
        rectify: bool,
        sgd: bool,
    }

    const LR: f64 = 1e-2;
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-12;
    const WD: f64 = 0.1;

    /// Straight f64 transcription of spec §5 (d), one element: returns (p, m, s, smax).
    fn reference(o: Opts, p: f64, g: f64, st: (f64, f64, f64), t: f64) -> (f64, f64, f64, f64) {
        let (mut m, mut s, mut smax) = st;
        let (mut p, mut g) = (p, g);
        if o.decouple {
            p *= if o.fixed { 1.0 - WD } else { 1.0 - LR * WD };
        } else {
            g += WD * p;
        }
        let (bc1, bc2) = (1.0 - B1.powf(t), 1.0 - B2.powf(t));
        m = B1 * m + (1.0 - B1) * g;
        let r = g - m;
        s = B2 * s + (1.0 - B2) * r * r;
        s += EPS;
        let d = if o.amsgrad {
            smax = smax.max(s);
            smax.sqrt() / bc2.sqrt() + EPS
        } else {
            s.sqrt() / bc2.sqrt() + EPS
        };
        if !o.rectify {
            return (p - LR / bc1 * m / d, m, s, smax);
        }
        let rho_inf = 2.0 / (1.0 - B2) - 1.0;
        let rho = rho_inf - 2.0 * t * B2.powf(t) / (1.0 - B2.powf(t));
        if rho >= 5.0 {
            let rt = (bc2 * (rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)).sqrt();
            p -= LR * (rt / bc1) * m / (s.sqrt() + EPS);
        } else if o.sgd {
            p -= LR / bc1 * m;
        }
        (p, m, s, smax)
    }

    fn run<const A: bool, const D: bool, const RE: bool>(o: Opts) {
        let rule = AdaBelief::<A, D, RE, false> {
            lr: LR,
            beta1: B1,
            beta2: B2,
            eps: EPS,
            weight_decay: WD,
            decay_lr: if o.fixed { 1.0 } else { LR },
            degenerated_to_sgd: if o.sgd { 1.0 } else { 0.0 },
            caution_count: 0.0,
        };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rs) = (p, (0.0, 0.0, 0.0));
        let mut scalars = [0.0; MAX_SCALARS];
        for t in 1..=12 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = AdaBelief::<A, D, RE, false>::update(&rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]), p, g, &mut s);
            let (np, m, v, vmax) = reference(o, rp, g, rs, t as f64);
            (rp, rs) = (np, (m, v, vmax));
            assert_eq!(scalars[0], t as f64);
            let tol = 1e-13 * rp.abs().max(1.0);
            assert!((p - rp).abs() < tol, "t={t}: {p} vs {rp}");
            assert!((s[0] - m).abs() < 1e-15 && (s[1] - v).abs() < 1e-15);
            if A {
                assert!((s[2] - vmax).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn matches_spec_in_f64_for_every_option() {
        let base = Opts { amsgrad: false, decouple: true, fixed: false, rectify: true, sgd: true };
        run::<false, true, true>(base);
        run::<false, true, true>(Opts { sgd: false, ..base });
        run::<false, true, true>(Opts { fixed: true, ..base });
        run::<true, true, true>(Opts { amsgrad: true, ..base });
        run::<false, true, false>(Opts { rectify: false, ..base });
        run::<true, false, false>(Opts { rectify: false, amsgrad: true, decouple: false, ..base });
        run::<false, false, true>(Opts { decouple: false, ..base });
    }

    #[test]
    fn rectification_starts_at_step_six_with_default_beta2() {
        for t in 1..=5 {
            assert!(!rectified_step(0.9, 0.999, t as f64, true).0, "t={t}");
        }
        assert!(rectified_step(0.9, 0.999, 6.0, true).0);
        assert_eq!(rectified_step(0.9, 0.999, 3.0, false).1, None);
    }

    #[test]
    fn sgd_regime_denominator_is_exactly_one_in_f32() {
        let rule = AdaBelief::<false, true, true, false> {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-16,
            weight_decay: 0.0,
            decay_lr: 0.1,
            degenerated_to_sgd: 1.0,
            caution_count: 0.0,
        };
        let c = rule.coeffs::<f32>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]);
        let mut s = [0.0f32; MAX_SLOTS];
        let p = AdaBelief::<false, true, true, false>::update(&c, 1.0, 0.5, &mut s);
        let bc1 = 1.0 - 0.9f64.powf(1.0);
        assert_eq!(c.step, (-(1.0 / bc1) * 0.1) as f32);
        assert_eq!(p, 1.0f32 + c.step * s[0]);
        assert!(s[1] > 0.0);
    }
}
