//! SPAM (Huang et al., ICLR 2025, arXiv:2501.06842), as the official `galore_torch/SPAM.py`
//! (spec §10).
//!
//! Per element, in the official operation order. The optimizer-level counters (momentum reset
//! period, warm-up factor `s`, whether spike clipping is active) are decided in Python once per
//! step and arrive as flags and numbers:
//! ```text
//! m ← 0 ; v ← 0                                  RESET (t mod ΔT == 0)
//! g ← sign(g)·sqrt(v·θ)  where g·g > θ·v         CLIP (θ ≠ 0, past the accumulation window)
//! m ← m·β1 + (1 − β1)·g
//! v ← v·β2 + ((1 − β2)·g)·g
//! p ← p + (−η·s)·(m / (sqrt(v) + eps))           η = lr·sqrt(1 − β2^k)/(1 − β1^k) (correct_bias)
//! p ← p + (−lr·wd)·p                             DECAY (wd > 0), after the update, not warmed up
//! ```
//! `k` is the parameter's own step counter (scalar state `step`, never reset). With `caution`
//! (spec §20) the update reads `m·φ·k'` for `φ = 1[m·g > 0]` (`g` as clipped, the gradient the
//! moments see) and the tensor's factor `k'` from a read-only counting pass (`caution_count`:
//! `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`); the decay is not masked.
//! State slots: `exp_avg`, `exp_avg_sq`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `spam` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "spam",
    summary: "SPAM (Huang et al.) as galore_torch/SPAM.py: momentum reset and spike clipping decided in Python",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "threshold", "scale"],
    flags: &["reset", "clip", "correct_bias", "caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// SPAM's hyper-parameters for one group and step; `CAUTION`: the cautious mask.
    pub struct Spam<const RESET: bool, const CLIP: bool, const CORRECT_BIAS: bool, const DECAY: bool, const CAUTION: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        /// Spike threshold θ (only read with CLIP).
        threshold: f64,
        /// Cosine warm-up factor after a momentum reset, in [0.01, 1].
        scale: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// SPAM's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct SpamCoeffs<R: Real> {
    threshold: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    eps: R,
    neg_step: R,
    neg_lr_wd: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const RESET: bool, const CLIP: bool, const CORRECT_BIAS: bool, const DECAY: bool, const CAUTION: bool> Spam<RESET, CLIP, CORRECT_BIAS, DECAY, CAUTION> {
    /// The gradient the moments see (spike-clipped with CLIP) given the second moment `v`.
    #[inline(always)]
    fn clipped<R: Real>(threshold: R, g: R, v: R) -> R {
        if CLIP && g * g > threshold * v {
            g.sign() * (v * threshold).sqrt()
        } else {
            g
        }
    }
}

impl<const RESET: bool, const CLIP: bool, const CORRECT_BIAS: bool, const DECAY: bool, const CAUTION: bool> Rule
    for Spam<RESET, CLIP, CORRECT_BIAS, DECAY, CAUTION>
{
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    type Coeffs<R: Real> = SpamCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    /// `scalars[0]` is the parameter's `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> SpamCoeffs<R> {
        scalars[0] += 1.0;
        let k = scalars[0];
        let step_size = if CORRECT_BIAS { self.lr * (1.0 - self.beta2.powf(k)).sqrt() / (1.0 - self.beta1.powf(k)) } else { self.lr };
        SpamCoeffs {
            threshold: R::from_f64(self.threshold),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            eps: R::from_f64(self.eps),
            neg_step: R::from_f64(-step_size * self.scale),
            neg_lr_wd: R::from_f64(-self.lr * self.weight_decay),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &SpamCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (m, v) = if RESET { (R::ZERO, R::ZERO) } else { (s[0], s[1]) };
        let g = Self::clipped(c.threshold, g, v);
        let m = m * c.beta1 + c.one_minus_beta1 * g;
        let v = v * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        let p = p + c.neg_step * (m / (v.sqrt() + c.eps));
        if DECAY {
            p + c.neg_lr_wd * p
        } else {
            p
        }
    }

    /// With caution: count φ for the new `m` (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let (m, v) = if RESET { (R::ZERO, R::ZERO) } else { (s[0], s[1]) };
            let g = Self::clipped(R::from_f64(self.threshold), g, v);
            cautious_count_momentum(m, g, self.beta1, sums);
        }
    }
}

/// Build SPAM from `lr, beta1, beta2, eps, weight_decay, threshold, scale` and flags
/// `reset, clip, correct_bias`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let threshold = check_non_negative("threshold", h.num("threshold")?)?;
    let scale = h.num("scale")?;
    if !(0.0..=1.0).contains(&scale) {
        return Err(Error::Value(format!("scale must be in [0, 1], got {scale}")));
    }
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("reset")? => RS, h.flag("clip")? => CL, h.flag("correct_bias")? => CB, weight_decay > 0.0 => D, h.flag("caution")? => C;
        v.visit(Spam::<RS, CL, CB, D, C> { lr, beta1, beta2, eps, weight_decay, threshold, scale, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    type S<const R: bool, const C: bool> = Spam<R, C, true, true, false>;

    /// Spec §10 (d) steps 1–8 in f64 for one element.
    #[allow(clippy::too_many_arguments)]
    fn reference(p: f64, g: f64, m: f64, v: f64, k: f64, reset: bool, clip: bool, scale: f64) -> (f64, f64, f64) {
        let (lr, b1, b2, eps, wd, th) = (1e-2, 0.9, 0.999, 1e-6, 0.1, 50.0);
        let (m, v) = if reset { (0.0, 0.0) } else { (m, v) };
        let g = if clip && g * g > th * v { g.signum() * (th * v).sqrt() } else { g };
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let eta = lr * (1.0 - b2.powf(k)).sqrt() / (1.0 - b1.powf(k));
        let p = p - eta * scale * m / (v.sqrt() + eps);
        (p * (1.0 - lr * wd), m, v)
    }

    fn run<const R: bool, const C: bool>(scale: f64, k: &mut [f64; 4], p: f64, g: f64, s: &mut [f64; 4]) -> f64 {
        let r = S::<R, C> { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.1, threshold: 50.0, scale, caution_count: 0.0 };
        S::<R, C>::update(&r.coeffs::<f64>(k, &[0.0; MAX_SUMS]), p, g, s)
    }

    #[test]
    fn matches_spec_in_f64_through_resets_and_spikes() {
        let (mut p, mut s, mut k) = (0.4f64, [0.0f64; 4], [0.0f64; 4]);
        let (mut rp, mut rm, mut rv) = (p, 0.0, 0.0);
        for t in 1..=40u32 {
            let spike = if t % 7 == 0 { 40.0 } else { 1.0 };
            let g = spike * (((t as f64) * 0.53).sin() + 0.05);
            let reset = t % 10 == 0;
            let clip = t >= 3 && t % 10 >= 3;
            let scale = if t >= 10 { 1.0 - 0.99 * (1.0 + (std::f64::consts::PI * (t % 10) as f64 / 5.0).cos()) / 2.0 } else { 1.0 };
            p = match (reset, clip) {
                (true, true) => run::<true, true>(scale, &mut k, p, g, &mut s),
                (true, false) => run::<true, false>(scale, &mut k, p, g, &mut s),
                (false, true) => run::<false, true>(scale, &mut k, p, g, &mut s),
                (false, false) => run::<false, false>(scale, &mut k, p, g, &mut s),
            };
            (rp, rm, rv) = reference(rp, g, rm, rv, t as f64, reset, clip, scale);
            assert_eq!(k[0], t as f64, "the per-parameter step is never reset");
            assert!((p - rp).abs() < 1e-14 && (s[0] - rm).abs() < 1e-15 && (s[1] - rv).abs() < 1e-15, "t {t}");
        }
    }

    #[test]
    fn zero_second_moment_freezes_element_while_clipping() {
        let mut s = [0.0f32; 4];
        let p = run_f32(&mut s, 0.7, 3.0);
        assert_eq!((p, s[0], s[1]), (0.7, 0.0, 0.0));
    }

    fn run_f32(s: &mut [f32; 4], p: f32, g: f32) -> f32 {
        let r = Spam::<false, true, true, false, false> {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
            threshold: 5000.0,
            scale: 1.0,
            caution_count: 0.0,
        };
        Spam::<false, true, true, false, false>::update(&r.coeffs::<f32>(&mut [3.0; 4], &[0.0; MAX_SUMS]), p, g, s)
    }
}
