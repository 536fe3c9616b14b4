//! Adan (Xie et al., arXiv:2208.06677), as sail-sg/Adan's `adan.py` (spec §7).
//!
//! Per element, in the official single-tensor operation order (`c` is the global clipping factor,
//! 1 without `max_grad_norm`; `k` the group's step counter, passed in by Python):
//! ```text
//! ĝ ← g·c
//! r ← −ĝ                          when FIRST (group step 1, or the parameter's first step)
//! Δ ← r + ĝ                       (r is the stored neg_pre_grad: Δ = ĝ − previous ĝ)
//! m ← m·β1 + (1 − β1)·ĝ
//! v ← v·β2 + (1 − β2)·Δ
//! u ← Δ·β2 + ĝ
//! n ← n·β3 + ((1 − β3)·u)·u
//! D ← sqrt(n)/sqrt(1 − β3^k) + eps
//! no_prox: p ← p·(1 − lr·wd);  p ← p + (−lr/bc1)·m/D;  p ← p + (−lr·β2/bc2)·v/D
//! else:    p ← p + (−lr/bc1)·m/D;  p ← p + (−lr·β2/bc2)·v/D;  p ← p / (1 + lr·wd)
//! r ← −ĝ
//! ```
//! With `caution` (spec §20) both update terms are multiplied by `φ·k` for `φ = 1[d·ĝ > 0]`, the
//! direction `d = m/bc1 + (β2/bc2)·v` (the update's, before `−lr/D`), and the tensor's factor `k`
//! from a read-only counting pass (`caution_count`: `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`);
//! the decay is not masked.
//! State slots: `exp_avg` (m), `exp_avg_sq` (n), `exp_avg_diff` (v), `neg_pre_grad` (r).

use super::{
    bool_dispatch, caution_factor, cautious_count, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor,
    MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `adan` rule; `first` is set by the engine on the group's first step and for fresh state.
pub const INFO: RuleInfo = RuleInfo {
    name: "adan",
    summary: "Adan (Xie et al.) as sail-sg/Adan, with the group step and clipping factor from Python",
    numbers: &["lr", "beta1", "beta2", "beta3", "eps", "weight_decay", "clip", "step"],
    flags: &["no_prox", "first", "caution", "caution_count"],
    optional_flags: &["first", "caution", "caution_count"],
    scalars: &[],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// Adan's hyper-parameters for one group and step. `NO_PROX`: decoupled decay before the update
    /// instead of the proximal division after it; `FIRST`: the previous gradient is (re)started from
    /// this one; `CAUTION`: the cautious mask.
    pub struct Adan<const NO_PROX: bool, const FIRST: bool, const CAUTION: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        beta3: f64,
        eps: f64,
        weight_decay: f64,
        /// Global gradient clipping factor, in [0, 1].
        clip: f64,
        /// The group's step counter after this step's increment (k >= 1).
        step: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
        /// The weights of m and v in the update's direction, `1/bc1` and `β2/bc2` (only read with
        /// `CAUTION`; computed once in `visit`, not per element by the counting pass).
        dir_m: f64,
        dir_v: f64,
    }
}

/// Adan's coefficients (the same for every tensor of a group).
#[derive(Copy, Clone, Debug)]
pub struct AdanCoeffs<R: Real> {
    clip: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    beta3: R,
    one_minus_beta3: R,
    bc3_sqrt: R,
    eps: R,
    neg_step: R,
    neg_step_diff: R,
    decay: R,
    prox: R,
    /// The update direction's weights of m and v (`1/bc1`, `β2/bc2`), for the cautious mask.
    dir_m: R,
    dir_v: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const NO_PROX: bool, const FIRST: bool, const CAUTION: bool> Rule for Adan<NO_PROX, FIRST, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"];
    type Coeffs<R: Real> = AdanCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdanCoeffs<R> {
        let k = self.step;
        let bc1 = 1.0 - self.beta1.powf(k);
        let bc2 = 1.0 - self.beta2.powf(k);
        let bc3 = 1.0 - self.beta3.powf(k);
        let lr_wd = self.lr * self.weight_decay;
        AdanCoeffs {
            clip: R::from_f64(self.clip),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            beta3: R::from_f64(self.beta3),
            one_minus_beta3: R::from_f64(1.0 - self.beta3),
            bc3_sqrt: R::from_f64(bc3.sqrt()),
            eps: R::from_f64(self.eps),
            neg_step: R::from_f64(-(self.lr / bc1)),
            neg_step_diff: R::from_f64(-(self.lr * self.beta2 / bc2)),
            decay: R::from_f64(1.0 - lr_wd),
            prox: R::from_f64(1.0 + lr_wd),
            dir_m: R::from_f64(self.dir_m),
            dir_v: R::from_f64(self.dir_v),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdanCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let g = g * c.clip;
        let neg_prev = if FIRST { -g } else { s[3] };
        let diff = neg_prev + g;
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[2] * c.beta2 + c.one_minus_beta2 * diff;
        let u = diff * c.beta2 + g;
        let n = s[1] * c.beta3 + c.one_minus_beta3 * u * u;
        s[0] = m;
        s[1] = n;
        s[2] = v;
        s[3] = -g;
        let denom = n.sqrt() / c.bc3_sqrt + c.eps;
        let (m, v) = if !CAUTION {
            (m, v)
        } else if (m * c.dir_m + v * c.dir_v) * g > R::ZERO {
            (m * c.caution, v * c.caution)
        } else {
            (R::ZERO, R::ZERO)
        };
        if NO_PROX {
            let p = p * c.decay;
            let p = p + c.neg_step * m / denom;
            p + c.neg_step_diff * v / denom
        } else {
            let p = p + c.neg_step * m / denom;
            let p = p + c.neg_step_diff * v / denom;
            p / c.prox
        }
    }

    /// With caution: count φ for the new direction (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let g = g * R::from_f64(self.clip);
            let diff = if FIRST { R::ZERO } else { s[3] + g };
            let m = s[0] * R::from_f64(self.beta1) + R::from_f64(1.0 - self.beta1) * g;
            let v = s[2] * R::from_f64(self.beta2) + R::from_f64(1.0 - self.beta2) * diff;
            cautious_count(m * R::from_f64(self.dir_m) + v * R::from_f64(self.dir_v), g, sums);
        }
    }
}

/// Build Adan from `lr, beta1, beta2, beta3, eps, weight_decay, clip, step` and flags
/// `no_prox, first`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let beta3 = check_unit_interval("beta3", h.num("beta3")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let clip = h.num("clip")?;
    // NaN (or 0) comes from non-finite gradients: let it flow as the reference does (or let
    // `check_finite` / AMP's found-inf refuse the step).
    if !(clip.is_nan() || (0.0..=1.0).contains(&clip)) {
        return Err(Error::Value(format!("clip must be in [0, 1], got {clip}")));
    }
    let step = h.num("step")?;
    if !(step >= 1.0 && step.fract() == 0.0) {
        return Err(Error::Value(format!("step must be a positive integer, got {step}")));
    }
    let first = h.flag("first")?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    let (dir_m, dir_v) = (1.0 / (1.0 - beta1.powf(step)), beta2 / (1.0 - beta2.powf(step)));
    Ok(bool_dispatch!(h.flag("no_prox")? => N, first => F, h.flag("caution")? => C;
        v.visit(Adan::<N, F, C> { lr, beta1, beta2, beta3, eps, weight_decay, clip, step, caution_count, dir_m, dir_v })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §7 (d) in f64 for one element: (p, m, v, n, prev) after one step.
    #[allow(clippy::too_many_arguments)]
    fn reference(p: f64, g: f64, st: (f64, f64, f64, Option<f64>), k: f64, h: (f64, f64, f64, f64, f64, f64, f64), no_prox: bool) -> (f64, [f64; 4]) {
        let (lr, b1, b2, b3, eps, wd, c) = h;
        let (m, v, n, prev) = st;
        let g = c * g;
        let prev = if k == 1.0 { g } else { prev.unwrap_or(g) };
        let d = g - prev;
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * d;
        let u = g + b2 * d;
        let n = b3 * n + (1.0 - b3) * u * u;
        let den = n.sqrt() / (1.0 - b3.powf(k)).sqrt() + eps;
        let (bc1, bc2) = (1.0 - b1.powf(k), 1.0 - b2.powf(k));
        let p = if no_prox {
            let p = p * (1.0 - lr * wd);
            p - lr / bc1 * m / den - lr * b2 / bc2 * v / den
        } else {
            (p - lr / bc1 * m / den - lr * b2 / bc2 * v / den) / (1.0 + lr * wd)
        };
        (p, [m, n, v, -g])
    }

    fn step<const N: bool>(h: (f64, f64, f64, f64, f64, f64, f64), k: f64, first: bool, p: f64, g: f64, s: &mut [f64; 4]) -> f64 {
        let (lr, beta1, beta2, beta3, eps, weight_decay, clip) = h;
        if first {
            let r = Adan::<N, true, false> { lr, beta1, beta2, beta3, eps, weight_decay, clip, step: k, caution_count: 0.0, dir_m: 0.0, dir_v: 0.0 };
            Adan::<N, true, false>::update(&r.coeffs::<f64>(&mut [0.0; 4], &[0.0; MAX_SUMS]), p, g, s)
        } else {
            let r = Adan::<N, false, false> { lr, beta1, beta2, beta3, eps, weight_decay, clip, step: k, caution_count: 0.0, dir_m: 0.0, dir_v: 0.0 };
            Adan::<N, false, false>::update(&r.coeffs::<f64>(&mut [0.0; 4], &[0.0; MAX_SUMS]), p, g, s)
        }
    }

    #[test]
    fn matches_spec_in_f64() {
        let h = (2e-2, 0.98, 0.92, 0.99, 1e-8, 0.05, 0.7);
        for no_prox in [false, true] {
            // A parameter seen from k = 1 and one first seen at k = 4 (damped bias correction).
            for start in [1, 4] {
                let mut p = 0.3f64;
                let mut s = [0.0f64; 4];
                let (mut rp, mut rs) = (p, (0.0, 0.0, 0.0, None));
                for k in start..=25 {
                    let g = ((k as f64) * 0.71).sin() + 0.2;
                    let first = k == start;
                    p = if no_prox { step::<true>(h, k as f64, first, p, g, &mut s) } else { step::<false>(h, k as f64, first, p, g, &mut s) };
                    let (np, ns) = reference(rp, g, rs, k as f64, h, no_prox);
                    rp = np;
                    rs = (ns[0], ns[2], ns[1], Some(-ns[3]));
                    assert!((p - rp).abs() < 1e-14, "p {p} vs {rp} at k {k}");
                    assert!((s[0] - ns[0]).abs() < 1e-15 && (s[1] - ns[1]).abs() < 1e-15);
                    assert!((s[2] - ns[2]).abs() < 1e-15 && s[3] == ns[3]);
                }
            }
        }
    }

    #[test]
    fn first_step_has_no_difference_term() {
        let r = Adan::<false, true, false> {
            lr: 1e-3,
            beta1: 0.98,
            beta2: 0.92,
            beta3: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            clip: 1.0,
            step: 1.0,
            caution_count: 0.0,
            dir_m: 0.0,
            dir_v: 0.0,
        };
        let mut s = [0.0f32, 0.0, 0.0, 123.0];
        Adan::<false, true, false>::update(&r.coeffs::<f32>(&mut [0.0; 4], &[0.0; MAX_SUMS]), 1.0, 0.5, &mut s);
        assert_eq!(s[2], 0.0, "v stays 0 at the first step");
        assert_eq!(s[3], -0.5);
    }
}
