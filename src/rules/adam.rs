//! Adam / AdamW / AMSGrad, exactly as `torch.optim.Adam` and `torch.optim.AdamW` (spec §3).
//!
//! Per element, in torch's single-tensor operation order:
//! ```text
//! p ← p·(1 − lr·wd)                  decoupled (AdamW)      | g ← g + wd·p   L2 (Adam)
//! m ← lerp(m, g, 1 − β1)
//! v ← v·β2 + ((1 − β2)·g)·g
//! v̄ ← max(vmax, v) (amsgrad, stored in vmax) | v
//! p ← p + ((−lr/bc1)·m) / (sqrt(v̄)/sqrt(bc2) + eps)
//! ```
//! with `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t` computed in f64 on the host.
//! State slots: `exp_avg`, `exp_avg_sq`, then `max_exp_avg_sq` with amsgrad.
//!
//! Cautious AdamW (Liang et al., arXiv:2411.16085; spec §20, as timm's `AdamWLegacy(caution=True)`):
//! with `φ = 1[m·g > 0]` for the new `m` (the update's sign is `m`'s: the denominator is
//! positive), the step reads `m·φ·k` for `m`, where the per-tensor factor `k` is
//! `1/max(mean φ, 1e-3)` ("mean") or `numel/(Σφ + 1)` ("count"); decay is not masked. `g` is the
//! gradient the moments see (with Adam's L2 term). The sums come from a read-only pass that
//! recomputes the new `m` (`accumulate`).
//!
//! Fused model EMA (spec averaging.md D.3 `ema_in_step`, flag `ema`, hyper-parameter
//! `ema_weight` = 1 − decay): one more slot, the average `E`, last, updated from the new parameter
//! value while it is still in registers, `E ← lerp(E, p_new, ema_weight)`. Equal to a separate
//! `ema` update after the step when the parameter's dtype is the compute type (fp32/fp64); the
//! Python layer only uses it then.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::{Lerp, Real};

/// The `adam` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adam",
    summary: "Adam / AdamW / AMSGrad as torch.optim, optionally with a fused model EMA",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "ema_weight"],
    flags: &["amsgrad", "decoupled", "ema", "caution", "caution_count"],
    optional_flags: &["ema", "caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq", "max_exp_avg_sq"],
};

rule_params! {
    /// Adam's hyper-parameters; `AMSGRAD`, `DECOUPLED` (AdamW), `EMA` (fused model EMA in the
    /// last slot) and `CAUTION` (the cautious mask) are compile-time flags.
    pub struct Adam<const AMSGRAD: bool, const DECOUPLED: bool, const EMA: bool, const CAUTION: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        ema_weight: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// Adam's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdamCoeffs<R: Real> {
    decay: R,
    l2: R,
    m_lerp: Lerp<R>,
    beta2: R,
    one_minus_beta2: R,
    bc2_sqrt: R,
    neg_step_size: R,
    eps: R,
    ema: Lerp<R>,
    /// The cautious factor k of this tensor (unused without caution).
    caution: R,
}

impl<const AMSGRAD: bool, const DECOUPLED: bool, const EMA: bool, const CAUTION: bool> Adam<AMSGRAD, DECOUPLED, EMA, CAUTION> {
    /// The gradient the moments see: with L2 decay (Adam), `g + wd·p`.
    #[inline(always)]
    fn moment_input<R: Real>(l2: R, p: R, g: R) -> R {
        if DECOUPLED {
            g
        } else {
            g + l2 * p
        }
    }
}

impl<const AMSGRAD: bool, const DECOUPLED: bool, const EMA: bool, const CAUTION: bool> Rule for Adam<AMSGRAD, DECOUPLED, EMA, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = match (AMSGRAD, EMA) {
        (false, false) => &["exp_avg", "exp_avg_sq"],
        (true, false) => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        (false, true) => &["exp_avg", "exp_avg_sq", "ema"],
        (true, true) => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema"],
    };
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };
    type Coeffs<R: Real> = AdamCoeffs<R>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let g = Self::moment_input(R::from_f64(self.weight_decay), p, g);
        let m = Lerp::new(1.0 - self.beta1).apply(s[0], g);
        cautious_count(m, g, sums);
    }

    /// `scalars[0]` is torch's `state['step']`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdamCoeffs<R> {
        let (bc1, bc2) = next_step(scalars, self.beta1, self.beta2);
        AdamCoeffs {
            decay: R::from_f64(if DECOUPLED { 1.0 - self.lr * self.weight_decay } else { 1.0 }),
            l2: R::from_f64(if DECOUPLED { 0.0 } else { self.weight_decay }),
            m_lerp: Lerp::new(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            bc2_sqrt: R::from_f64(bc2.sqrt()),
            neg_step_size: R::from_f64(-(self.lr / bc1)),
            eps: R::from_f64(self.eps),
            ema: Lerp::new(self.ema_weight),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdamCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (p, g) = if DECOUPLED { (p * c.decay, g) } else { (p, Self::moment_input(c.l2, p, g)) };
        let m = c.m_lerp.apply(s[0], g);
        let v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        let v_hat = if AMSGRAD {
            s[2] = s[2].max_nan(v);
            s[2]
        } else {
            v
        };
        let denom = v_hat.sqrt() / c.bc2_sqrt + c.eps;
        let m_step = if CAUTION { cautious(m, g, c.caution) } else { m };
        let p = p + c.neg_step_size * m_step / denom;
        if EMA {
            let k = if AMSGRAD { 3 } else { 2 };
            s[k] = c.ema.apply(s[k], p);
        }
        p
    }
}

/// Build Adam from `lr, beta1, beta2, eps, weight_decay` and flags `amsgrad, decoupled`; with
/// the optional flag `ema`, also `ema_weight`; optional flags `caution`, `caution_count`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let ema = h.flag("ema")?;
    let ema_weight = if ema { h.num("ema_weight")? } else { 0.0 };
    if !(0.0..=1.0).contains(&ema_weight) {
        return Err(crate::error::Error::Value(format!("ema_weight must be in [0, 1], got {ema_weight}")));
    }
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("amsgrad")? => A, h.flag("decoupled")? => D, ema => E, h.flag("caution")? => C;
        v.visit(Adam::<A, D, E, C> { lr, beta1, beta2, eps, weight_decay, ema_weight, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight f64 transcription of spec §3 (d), one element.
    fn reference(p: f64, g: f64, m: f64, v: f64, t: f64, wd: f64, decoupled: bool) -> (f64, f64, f64) {
        let (lr, b1, b2, eps) = (1e-2, 0.9, 0.999, 1e-8);
        let (p, g) = if decoupled { (p * (1.0 - lr * wd), g) } else { (p, g + wd * p) };
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let d = v.sqrt() / (1.0 - b2.powf(t)).sqrt() + eps;
        (p - lr / (1.0 - b1.powf(t)) * m / d, m, v)
    }

    #[test]
    fn matches_spec_in_f64() {
        for &decoupled in &[true, false] {
            let rule_d =
                Adam::<false, true, false, false> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.0, caution_count: 0.0 };
            let rule_l =
                Adam::<false, false, false, false> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.0, caution_count: 0.0 };
            let (mut p, mut m, mut v) = (0.7f64, 0.05, 0.002);
            let (mut rp, mut rm, mut rv) = (p, m, v);
            for t in 1..=20 {
                let g = ((t as f64) * 0.37).sin() + 0.1;
                let mut s = [m, v, 0.0, 0.0];
                p = if decoupled {
                    Adam::<false, true, false, false>::update(&rule_d.coeffs::<f64>(&mut [t as f64 - 1.0; 4], &[0.0; MAX_SUMS]), p, g, &mut s)
                } else {
                    Adam::<false, false, false, false>::update(&rule_l.coeffs::<f64>(&mut [t as f64 - 1.0; 4], &[0.0; MAX_SUMS]), p, g, &mut s)
                };
                (m, v) = (s[0], s[1]);
                (rp, rm, rv) = reference(rp, g, rm, rv, t as f64, 0.1, decoupled);
                assert!((p - rp).abs() < 1e-14 && (m - rm).abs() < 1e-15 && (v - rv).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn fused_ema_lerps_towards_the_new_parameter() {
        let plain = Adam::<false, true, false, false> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.0, caution_count: 0.0 };
        let fused = Adam::<false, true, true, false> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.25, caution_count: 0.0 };
        let mut s1 = [0.1f32, 0.01, 0.0, 0.0];
        let mut s2 = [0.1f32, 0.01, 0.5, 0.0];
        let p1 = Adam::<false, true, false, false>::update(&plain.coeffs::<f32>(&mut [3.0; 4], &[0.0; MAX_SUMS]), 0.7, 0.3, &mut s1);
        let p2 = Adam::<false, true, true, false>::update(&fused.coeffs::<f32>(&mut [3.0; 4], &[0.0; MAX_SUMS]), 0.7, 0.3, &mut s2);
        assert_eq!(p1, p2);
        assert_eq!(s2[2], 0.5 + 0.25 * (p1 - 0.5));
    }

    /// Spec §20 (d), C-AdamW, on a small tensor in f64, both normalisations: the step reads m·φ·k.
    fn cautious(count: bool) {
        type C = Adam<false, true, false, true>;
        let caution_count = if count { 1.0 } else { 0.0 };
        let rule = C { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.0, caution_count };
        let (p0, g, m0) = ([1.0f64, -2.0, 0.5, 3.0, 0.25], [0.3f64, -0.4, 0.2, -1.0, 0.0], [0.5f64, -0.1, -3.0, 0.2, 0.1]);
        let mut sums = [0.0; MAX_SUMS];
        for i in 0..5 {
            rule.accumulate(p0[i], g[i], &[m0[i], 0.01, 0.0, 0.0], &mut sums);
        }
        // new m = 0.9 m + 0.1 g = [0.48, -0.13, -2.68, 0.08, 0.09]; m·g > 0 for elements 0 and 1
        assert_eq!(&sums[..2], &[2.0, 5.0]);
        let k = if count { 5.0 / 3.0 } else { 1.0 / 0.4 };
        let c = rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &sums);
        for i in 0..5 {
            let (mut s, mut plain_s) = ([m0[i], 0.01, 0.0, 0.0], [m0[i], 0.01, 0.0, 0.0]);
            let p = C::update(&c, p0[i], g[i], &mut s);
            let (rp, rm, rv) = reference(p0[i], g[i], m0[i], 0.01, 1.0, 0.1, true);
            let plain =
                Adam::<false, true, false, false> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, ema_weight: 0.0, caution_count: 0.0 };
            let decayed = p0[i] * (1.0 - 1e-2 * 0.1);
            let _ = Adam::<false, true, false, false>::update(&plain.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]), p0[i], g[i], &mut plain_s);
            let phi = if rm * g[i] > 0.0 { 1.0 } else { 0.0 };
            let expected = decayed + (rp - decayed) * phi * k;
            assert!((p - expected).abs() < 1e-15, "{i}: {p} vs {expected}");
            assert_eq!((s[0], s[1]), (plain_s[0], plain_s[1]), "{i}: the moments are not masked");
            assert!((s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15);
        }
    }

    #[test]
    fn cautious_mask_and_normalisations_match_spec() {
        cautious(false);
        cautious(true);
    }

    #[test]
    fn amsgrad_keeps_running_max_of_raw_v() {
        let rule = Adam::<true, true, false, false> { lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, ema_weight: 0.0, caution_count: 0.0 };
        let mut s = [0.0f32, 0.5, 0.6, 0.0];
        let mut scalars = [2.0; MAX_SCALARS];
        let c = rule.coeffs::<f32>(&mut scalars, &[0.0; MAX_SUMS]);
        assert_eq!(scalars[0], 3.0);
        Adam::<true, true, false, false>::update(&c, 1.0, 0.01, &mut s);
        assert_eq!(s[2], 0.6);
        s[2] = 0.1;
        Adam::<true, true, false, false>::update(&c, 1.0, 0.01, &mut s);
        assert_eq!(s[2], s[1]);
    }
}
