//! SGD-SaI (Xu et al., arXiv:2412.11768), as AnonymousAlethiometer/SGD_SaI `sgd_sai.py` 1.0.3
//! (spec §17).
//!
//! On a parameter's first step (`FIRST`), a read-only pass gathers Σg, Σg² and the count in f64,
//! and `coeffs` stores the gradient signal-to-noise ratio as scalar state:
//! ```text
//! σ = sqrt((Σg² − (Σg)²/n) / (n − 1))     unbiased std; 0 when n <= 1 (torch: NaN → 0)
//! gsnr = ‖g‖ / (σ + eps)
//! ```
//! Every step, per element, in the official operation order:
//! ```text
//! b ← g (copy) on the first step, else b ← b·μ + (1 − μ)·g     MOMENTUM (μ ≠ 0); b = g otherwise
//! p ← p·(1 − wd·lr) + (−lr·gsnr)·b
//! ```
//! With `caution` (spec §20) the step reads `b·φ·k` for `φ = 1[b·g > 0]` and the tensor's factor
//! `k` from the counting pass (`caution_count`: `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`); the
//! buffer keeps the unmasked `b`, the decay is not masked. The sums are `[Σφ, n]`, then on the
//! first step `Σg, Σg²` (without caution: `[Σg, Σg², n]`).
//! State slot: `momentum_buffer` (none when μ = 0); scalar state `gsnr`.

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `sgd_sai` rule; `first` is set by the engine for a parameter's first step.
pub const INFO: RuleInfo = RuleInfo {
    name: "sgd_sai",
    summary: "SGD-SaI (Xu et al.): SGD scaled by each parameter's gradient signal-to-noise ratio at its first step",
    numbers: &["lr", "momentum", "eps", "weight_decay"],
    flags: &["first", "caution", "caution_count"],
    optional_flags: &["first", "caution", "caution_count"],
    scalars: &["gsnr"],
    input: Input::Gradient,
    nonnegative_slots: &[],
};

rule_params! {
    /// SGD-SaI's hyper-parameters. `MOMENTUM`: keep a buffer (μ ≠ 0); `FIRST`: the parameter's first
    /// step (measure gsnr, start the buffer as a copy of g); `CAUTION`: the cautious mask.
    pub struct SgdSai<const MOMENTUM: bool, const FIRST: bool, const CAUTION: bool> {
        lr: f64,
        momentum: f64,
        eps: f64,
        weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// SGD-SaI's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct SgdSaiCoeffs<R: Real> {
    momentum: R,
    one_minus_momentum: R,
    decay: R,
    neg_step: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

/// gsnr of a tensor from its f64 sums `(Σg, Σg², n)`.
fn gsnr(sum: f64, sum_sq: f64, n: f64, eps: f64) -> f64 {
    let sigma = if n > 1.0 {
        let var = (sum_sq - sum * sum / n) / (n - 1.0);
        // Rounding may leave a tiny negative variance for (nearly) constant gradients.
        var.max(0.0).sqrt()
    } else {
        0.0
    };
    let sigma = if sigma.is_nan() { 0.0 } else { sigma };
    sum_sq.sqrt() / (sigma + eps)
}

impl<const MOMENTUM: bool, const FIRST: bool, const CAUTION: bool> Rule for SgdSai<MOMENTUM, FIRST, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if MOMENTUM { &["momentum_buffer"] } else { &[] };
    const SUMS: usize = match (FIRST, CAUTION) {
        (true, true) => 4,
        (true, false) => 3,
        (false, true) => 2,
        (false, false) => 0,
    };
    type Coeffs<R: Real> = SgdSaiCoeffs<R>;

    /// `scalars[0]` is the parameter's `gsnr`, written on its first step.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> SgdSaiCoeffs<R> {
        if FIRST {
            scalars[0] = if CAUTION { gsnr(sums[2], sums[3], sums[1], self.eps) } else { gsnr(sums[0], sums[1], sums[2], self.eps) };
        }
        SgdSaiCoeffs {
            momentum: R::from_f64(self.momentum),
            one_minus_momentum: R::from_f64(1.0 - self.momentum),
            decay: R::from_f64(1.0 - self.weight_decay * self.lr),
            neg_step: R::from_f64(-(self.lr * scalars[0])),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let b = if !MOMENTUM || FIRST { g } else { s[0] * R::from_f64(self.momentum) + R::from_f64(1.0 - self.momentum) * g };
            cautious_count(b, g, sums);
        }
        if FIRST {
            let (at, g) = (if CAUTION { 2 } else { 0 }, g.to_f64());
            sums[at] += g;
            sums[at + 1] += g * g;
            if !CAUTION {
                sums[2] += 1.0;
            }
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &SgdSaiCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let b = if !MOMENTUM || FIRST { g } else { s[0] * c.momentum + c.one_minus_momentum * g };
        if MOMENTUM {
            s[0] = b;
        }
        let b = if CAUTION { cautious(b, g, c.caution) } else { b };
        p * c.decay + c.neg_step * b
    }
}

/// Build SGD-SaI from `lr, momentum, eps, weight_decay` and flag `first`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let momentum = check_unit_interval("momentum", h.num("momentum")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(momentum != 0.0 => M, h.flag("first")? => F, h.flag("caution")? => C;
        v.visit(SgdSai::<M, F, C> { lr, momentum, eps, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_of(gs: &[f64]) -> [f64; MAX_SUMS] {
        let mut sums = [0.0; MAX_SUMS];
        for &g in gs {
            SgdSai::<true, true, false> { lr: 0.1, momentum: 0.9, eps: 1e-8, weight_decay: 0.0, caution_count: 0.0 }.accumulate(
                0.0f64,
                g,
                &[0.0; MAX_SLOTS],
                &mut sums,
            );
        }
        sums
    }

    #[test]
    fn gsnr_is_norm_over_unbiased_std() {
        let gs = [0.3, -1.2, 2.5, 0.7, -0.1];
        let n = gs.len() as f64;
        let mean = gs.iter().sum::<f64>() / n;
        let std = (gs.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / (n - 1.0)).sqrt();
        let norm = gs.iter().map(|g| g * g).sum::<f64>().sqrt();
        let rule = SgdSai::<true, true, false> { lr: 0.1, momentum: 0.9, eps: 1e-8, weight_decay: 0.01, caution_count: 0.0 };
        let mut scalars = [0.0; MAX_SCALARS];
        rule.coeffs::<f64>(&mut scalars, &sums_of(&gs));
        assert!((scalars[0] - norm / (std + 1e-8)).abs() < 1e-13 * scalars[0]);
        // One element: std is NaN in torch, replaced by 0.
        rule.coeffs::<f64>(&mut scalars, &sums_of(&[-0.5]));
        assert!((scalars[0] - 0.5 / 1e-8).abs() < 1e-6);
        // Constant gradient: std 0 exactly, never negative under the root.
        rule.coeffs::<f64>(&mut scalars, &sums_of(&[0.1; 1000]));
        assert!(scalars[0].is_finite() && scalars[0] > 0.0);
    }

    #[test]
    fn buffer_starts_as_a_copy_then_dampens() {
        let (lr, mu, wd) = (0.1, 0.9, 0.01);
        let first = SgdSai::<true, true, false> { lr, momentum: mu, eps: 1e-8, weight_decay: wd, caution_count: 0.0 };
        let later = SgdSai::<true, false, false> { lr, momentum: mu, eps: 1e-8, weight_decay: wd, caution_count: 0.0 };
        let mut scalars = [2.0, 0.0, 0.0, 0.0];
        let mut s = [0.0f64; MAX_SLOTS];
        let c = first.coeffs::<f64>(&mut scalars, &sums_of(&[0.5, -0.25, 1.0]));
        let gsnr = scalars[0];
        let p = SgdSai::<true, true, false>::update(&c, 1.0, 0.5, &mut s);
        assert_eq!(s[0], 0.5);
        assert!((p - (1.0 * (1.0 - wd * lr) - lr * gsnr * 0.5)).abs() < 1e-12);
        let c = later.coeffs::<f64>(&mut scalars, &[0.0; MAX_SUMS]);
        assert_eq!(scalars[0], gsnr, "gsnr is kept after the first step");
        let p2 = SgdSai::<true, false, false>::update(&c, p, -0.3, &mut s);
        let b = 0.5 * mu + (1.0 - mu) * -0.3;
        assert!((s[0] - b).abs() < 1e-15);
        assert!((p2 - (p * (1.0 - wd * lr) - lr * gsnr * b)).abs() < 1e-12);
    }

    #[test]
    fn without_momentum_the_gradient_is_the_direction() {
        let r = SgdSai::<false, false, false> { lr: 0.5, momentum: 0.0, eps: 1e-8, weight_decay: 0.0, caution_count: 0.0 };
        let c = r.coeffs::<f64>(&mut [3.0, 0.0, 0.0, 0.0], &[0.0; MAX_SUMS]);
        assert_eq!(SgdSai::<false, false, false>::update(&c, 1.0, 0.25, &mut [0.0; MAX_SLOTS]), 1.0 - 1.5 * 0.25);
    }
}
