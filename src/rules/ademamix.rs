//! AdEMAMix (Pagliardini, Ablin & Grangier, arXiv:2409.03137), as apple/ml-ademamix (spec §6).
//!
//! Per element, in the reference's operation order:
//! ```text
//! m1 ← m1·β1 + (1 − β1)·g            (β1 = 0: m1 is g, nothing stored)
//! m2 ← m2·β3_t + (1 − β3_t)·g         slow EMA, never bias-corrected
//! v  ← v·β2 + ((1 − β2)·g)·g
//! u  ← (m1/bc1 + α_t·m2) / (sqrt(v)/sqrt(bc2) + eps) + wd·p
//! p  ← p + (−lr)·u
//! ```
//! `α_t` and `β3_t` follow the reference's warm-up schedulers (linear in α, linear in half-life
//! for β3), evaluated per tensor on the host from its step counter. With `caution` (Cautious
//! AdEMAMix, spec §20, as pytorch_optimizer's `cautious=True`) the fast term reads `m1·φ·k` in
//! place of `m1`, with `φ = 1[m1·g > 0]` and the tensor's factor `k` from a read-only pass
//! counting φ (`caution_count`: `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`).
//! State slots: `exp_avg_fast` (only when β1 ≠ 0), `exp_avg_slow`, `exp_avg_sq`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `ademamix` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "ademamix",
    summary: "AdEMAMix (Pagliardini et al.) as apple/ml-ademamix, with its alpha and beta3 warm-ups",
    numbers: &["lr", "beta1", "beta2", "beta3", "alpha", "alpha_warmup", "beta3_warmup", "eps", "weight_decay"],
    flags: &["caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// AdEMAMix's hyper-parameters. `FAST`: β1 ≠ 0 (a fast EMA is kept); `CAUTION`: the
    /// cautious mask on the fast term.
    pub struct AdEMAMix<const FAST: bool, const CAUTION: bool> {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub beta3: f64,
        pub alpha: f64,
        /// Steps of α warm-up (0: none).
        pub alpha_warmup: f64,
        /// Steps of β3 warm-up (0: none).
        pub beta3_warmup: f64,
        pub eps: f64,
        pub weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub caution_count: f64,
    }
}

/// AdEMAMix's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdEMAMixCoeffs<R: Real> {
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    beta3: R,
    one_minus_beta3: R,
    bc1: R,
    bc2_sqrt: R,
    alpha: R,
    eps: R,
    weight_decay: R,
    neg_lr: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

/// α at step `t`: linear from 0 to `alpha` over `warmup` steps (reference `linear_warmup_scheduler`).
pub fn alpha_at(t: f64, alpha: f64, warmup: f64) -> f64 {
    if t < warmup {
        let a = t / warmup;
        (1.0 - a) * 0.0 + a * alpha
    } else {
        alpha
    }
}

/// β3 at step `t`: linear in half-life from `beta1` to `beta3` over `warmup` steps (reference
/// `linear_hl_warmup_scheduler`, including its 1e-8 inside the logarithm).
pub fn beta3_at(t: f64, beta1: f64, beta3: f64, warmup: f64) -> f64 {
    if t < warmup {
        let half_life = |b: f64| 0.5f64.ln() / (b + 1e-8).ln() - 1.0;
        let a = t / warmup;
        let h = (1.0 - a) * half_life(beta1) + a * half_life(beta3);
        0.5f64.powf(1.0 / (h + 1.0))
    } else {
        beta3
    }
}

impl<const FAST: bool, const CAUTION: bool> Rule for AdEMAMix<FAST, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if FAST { &["exp_avg_fast", "exp_avg_slow", "exp_avg_sq"] } else { &["exp_avg_slow", "exp_avg_sq"] };
    type Coeffs<R: Real> = AdEMAMixCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the per-parameter `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdEMAMixCoeffs<R> {
        scalars[0] += 1.0;
        let t = scalars[0];
        let beta3 = beta3_at(t, self.beta1, self.beta3, self.beta3_warmup);
        AdEMAMixCoeffs {
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            beta3: R::from_f64(beta3),
            one_minus_beta3: R::from_f64(1.0 - beta3),
            bc1: R::from_f64(1.0 - self.beta1.powf(t)),
            bc2_sqrt: R::from_f64((1.0 - self.beta2.powf(t)).sqrt()),
            alpha: R::from_f64(alpha_at(t, self.alpha, self.alpha_warmup)),
            eps: R::from_f64(self.eps),
            weight_decay: R::from_f64(self.weight_decay),
            neg_lr: R::from_f64(-self.lr),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdEMAMixCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (fast, slow, sq) = if FAST { (0, 1, 2) } else { (0, 0, 1) };
        let m1 = if FAST {
            let m1 = s[fast] * c.beta1 + c.one_minus_beta1 * g;
            s[fast] = m1;
            m1
        } else {
            g
        };
        let m2 = s[slow] * c.beta3 + c.one_minus_beta3 * g;
        let v = s[sq] * c.beta2 + c.one_minus_beta2 * g * g;
        s[slow] = m2;
        s[sq] = v;
        let denom = v.sqrt() / c.bc2_sqrt + c.eps;
        let m1 = if CAUTION { cautious(m1, g, c.caution) } else { m1 };
        let u = (m1 / c.bc1 + c.alpha * m2) / denom + c.weight_decay * p;
        p + c.neg_lr * u
    }

    /// With caution: count φ for the new fast EMA (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let m1 = if FAST { s[0] * R::from_f64(self.beta1) + R::from_f64(1.0 - self.beta1) * g } else { g };
            cautious_count(m1, g, sums);
        }
    }
}

/// Build AdEMAMix from `lr, beta1, beta2, beta3, alpha, alpha_warmup, beta3_warmup, eps,
/// weight_decay` (warm-ups: 0 for none).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let beta3 = check_unit_interval("beta3", h.num("beta3")?)?;
    let alpha = check_non_negative("alpha", h.num("alpha")?)?;
    let alpha_warmup = check_non_negative("alpha_warmup", h.num("alpha_warmup")?)?;
    let beta3_warmup = check_non_negative("beta3_warmup", h.num("beta3_warmup")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(beta1 != 0.0 => F, h.flag("caution")? => C;
        v.visit(AdEMAMix::<F, C> { lr, beta1, beta2, beta3, alpha, alpha_warmup, beta3_warmup, eps, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight f64 transcription of spec §6 (d), one element: returns (p, m1, m2, v).
    #[allow(clippy::too_many_arguments)]
    fn reference(r: &AdEMAMix<true, false>, b1: f64, p: f64, g: f64, st: (f64, f64, f64), t: f64) -> (f64, f64, f64, f64) {
        let (m1, m2, v) = st;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - r.beta2.powf(t));
        let alpha = if r.alpha_warmup > 0.0 && t < r.alpha_warmup { r.alpha * t / r.alpha_warmup } else { r.alpha };
        let beta3 = if r.beta3_warmup > 0.0 && t < r.beta3_warmup {
            let a = t / r.beta3_warmup;
            let h = |b: f64| 0.5f64.ln() / (b + 1e-8).ln() - 1.0;
            0.5f64.powf(1.0 / ((1.0 - a) * h(b1) + a * h(r.beta3) + 1.0))
        } else {
            r.beta3
        };
        let (m1, bc1) = if b1 == 0.0 { (g, 1.0) } else { (b1 * m1 + (1.0 - b1) * g, bc1) };
        let m2 = beta3 * m2 + (1.0 - beta3) * g;
        let v = r.beta2 * v + (1.0 - r.beta2) * g * g;
        let d = v.sqrt() / bc2.sqrt() + r.eps;
        let u = (m1 / bc1 + alpha * m2) / d + r.weight_decay * p;
        (p - r.lr * u, m1, m2, v)
    }

    fn check<const F: bool>(base: &AdEMAMix<true, false>, b1: f64) {
        let rule = AdEMAMix::<F, false> {
            lr: base.lr,
            beta1: b1,
            beta2: base.beta2,
            beta3: base.beta3,
            alpha: base.alpha,
            alpha_warmup: base.alpha_warmup,
            beta3_warmup: base.beta3_warmup,
            eps: base.eps,
            weight_decay: base.weight_decay,
            caution_count: 0.0,
        };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rs) = (p, (0.0, 0.0, 0.0));
        let mut scalars = [0.0; MAX_SCALARS];
        for t in 1..=30 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = AdEMAMix::<F, false>::update(&rule.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]), p, g, &mut s);
            let (np, m1, m2, v) = reference(base, b1, rp, g, rs, t as f64);
            (rp, rs) = (np, (m1, m2, v));
            assert!((p - rp).abs() < 1e-13, "t={t}: {p} vs {rp}");
            let (slow, sq) = if F { (s[1], s[2]) } else { (s[0], s[1]) };
            assert!((slow - m2).abs() < 1e-15 && (sq - v).abs() < 1e-15);
            if F {
                assert!((s[0] - m1).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn matches_spec_in_f64() {
        let plain = AdEMAMix::<true, false> {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            alpha: 2.0,
            alpha_warmup: 0.0,
            beta3_warmup: 0.0,
            eps: 1e-8,
            weight_decay: 0.0,
            caution_count: 0.0,
        };
        check::<true>(&plain, 0.9);
        let warm = AdEMAMix::<true, false> { alpha: 5.0, alpha_warmup: 20.0, beta3_warmup: 25.0, weight_decay: 0.1, ..plain.clone() };
        check::<true>(&warm, 0.9);
        check::<false>(&warm, 0.0);
        check::<false>(&plain, 0.0);
    }

    #[test]
    fn beta3_schedule_matches_the_closed_form() {
        // The paper's form: exp(ln β1 · ln β3 / ((1 − a)·ln β3 + a·ln β1)), up to the 1e-8.
        let (b1, b3, tw) = (0.9f64, 0.9999f64, 100.0);
        for t in [1.0, 10.0, 50.0, 99.0] {
            let a = t / tw;
            let closed = (b1.ln() * b3.ln() / ((1.0 - a) * b3.ln() + a * b1.ln())).exp();
            assert!((beta3_at(t, b1, b3, tw) - closed).abs() < 1e-6, "t={t}");
        }
        assert_eq!(beta3_at(100.0, b1, b3, tw), b3);
        assert_eq!(alpha_at(5.0, 8.0, 10.0), 4.0);
        assert_eq!(alpha_at(10.0, 8.0, 10.0), 8.0);
    }
}
