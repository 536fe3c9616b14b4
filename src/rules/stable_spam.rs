//! Stable-SPAM (Huang et al., arXiv:2502.17055), as the official `galore_torch/stablespam.py`
//! (spec §11).
//!
//! Per tensor, with `k` its step counter, `M = max|g|` (read-only pass 0) and the clip threshold
//! `τ = m_max/(1 − θ^k)` for the updated `m_max = θ·m_max + (1 − θ)·M`:
//! ```text
//! g ← g/M·τ  where |g| > τ                          AdaClip
//! n = ‖g‖ (read-only pass 1, over the clipped g)
//! m_norm ← γ1·m_norm + (1 − γ1)·n ; v_norm ← γ2·v_norm + (1 − γ2)·n²
//! c = [m_norm/(1 − γ1^k)] / (sqrt(v_norm/(1 − γ2^k)) + eps)
//! g ← g/n·c  (n > 0)                                AdaNorm
//! ```
//! then per element, in the official operation order (`β1`, `γ1` arrive scaled by the cosine
//! factor σ, which Python computes once per step):
//! ```text
//! p ← p·(1 − lr·wd)                                 DECAY
//! m ← m·β1 + (1 − β1)·g ; v ← v·β2 + (1 − β2)·g·g    (CLEAN reset: from m = v = 0)
//! v̂ = max(v̂, v) (AMSGRAD, else v̂ = v)
//! p ← p + (−lr/bc1)·(m/(sqrt(v̂)/sqrt(bc2) + eps))    bc = 1 − β^k', k' = 1 on a RESET step
//! m, v stored as 0 on a RESET step (the official "faithful" reset), else as computed
//! ```
//! With `caution` (spec §20) the step reads `m·φ·k` for `φ = 1[m·g > 0]` (the rescaled `g`) and
//! the factor `k` from a third read-only pass (`caution_count`: `numel/(Σφ + 1)`, else
//! `1/max(mean φ, 1e-3)`); the decay is not masked.
//! State slots: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`); scalar state `step` (reset to 1
//! at a momentum reset), `m_max_t`, `m_norm_t`, `v_norm_t` (never reset).

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count_momentum, check_non_negative, check_unit_interval, rule_params, Input, Rule, RuleHyper, RuleInfo,
    RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `stable_spam` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "stable_spam",
    summary: "Stable-SPAM (Huang et al.) as galore_torch/stablespam.py: AdaClip and AdaNorm from two read-only passes, then Adam",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "gamma1", "gamma2", "theta"],
    flags: &["amsgrad", "reset", "clean_reset", "caution", "caution_count"],
    optional_flags: &["caution", "caution_count"],
    scalars: &["step", "m_max_t", "m_norm_t", "v_norm_t"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq", "max_exp_avg_sq"],
};

rule_params! {
    /// Stable-SPAM's hyper-parameters for one group and step; `RESET`: a momentum reset step
    /// (`CLEAN`: computed from zero moments); `CAUTION`: the cautious mask.
    pub struct StableSpam<const AMSGRAD: bool, const RESET: bool, const CLEAN: bool, const DECAY: bool, const CAUTION: bool> {
        lr: f64,
        /// β1 times this step's cosine factor σ.
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        /// γ1 times σ.
        gamma1: f64,
        gamma2: f64,
        /// θ, the EMA weight of the largest gradient magnitude.
        theta: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        caution_count: f64,
    }
}

/// One tensor's AdaClip and AdaNorm quantities, from its scalar state before the step and its
/// sums (`[M, ‖clipped g‖², …]`; pass 0 gives M only).
struct Norms {
    /// The new step counter (before a reset sets it to 1).
    k: f64,
    m_max: f64,
    /// The clip threshold τ.
    tau: f64,
    /// ‖clipped g‖, and the norm c it is rescaled to.
    n: f64,
    c: f64,
    m_norm: f64,
    v_norm: f64,
}

/// Stable-SPAM's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct StableSpamCoeffs<R: Real> {
    tau: R,
    max: R,
    norm: R,
    target: R,
    rescale: bool,
    decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    sqrt_bc2: R,
    eps: R,
    neg_step: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const AMSGRAD: bool, const RESET: bool, const CLEAN: bool, const DECAY: bool, const CAUTION: bool> StableSpam<AMSGRAD, RESET, CLEAN, DECAY, CAUTION> {
    fn norms(&self, scalars: &[f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> Norms {
        let k = scalars[0] + 1.0;
        let m_max = self.theta * scalars[1] + (1.0 - self.theta) * sums[0];
        let tau = m_max / (1.0 - self.theta.powf(k));
        let n = sums[1].sqrt();
        let m_norm = self.gamma1 * scalars[2] + (1.0 - self.gamma1) * n;
        let v_norm = self.gamma2 * scalars[3] + (1.0 - self.gamma2) * sums[1];
        let m_hat = m_norm / (1.0 - self.gamma1.powf(k));
        let v_hat = v_norm / (1.0 - self.gamma2.powf(k));
        Norms { k, m_max, tau, n, c: m_hat / (v_hat.sqrt() + self.eps), m_norm, v_norm }
    }

    /// AdaClip: `g` scaled down to the threshold `tau` from the largest magnitude `max`.
    #[inline(always)]
    fn clipped<R: Real>(g: R, tau: R, max: R) -> R {
        if g.abs() > tau {
            g / max * tau
        } else {
            g
        }
    }

    /// The moments a step starts from.
    #[inline(always)]
    fn moments<R: Real>(s: &[R; MAX_SLOTS]) -> (R, R) {
        if RESET && CLEAN {
            (R::ZERO, R::ZERO)
        } else {
            (s[0], s[1])
        }
    }
}

impl<const AMSGRAD: bool, const RESET: bool, const CLEAN: bool, const DECAY: bool, const CAUTION: bool> Rule
    for StableSpam<AMSGRAD, RESET, CLEAN, DECAY, CAUTION>
{
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if AMSGRAD { &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] } else { &["exp_avg", "exp_avg_sq"] };
    type Coeffs<R: Real> = StableSpamCoeffs<R>;
    /// `[max|g|, ‖clipped g‖²]`, with caution `Σφ` and the element count (pass 2).
    const SUMS: usize = if CAUTION { 4 } else { 2 };
    const SUM_PASS: [usize; MAX_SUMS] = [0, 1, 2, 2, 2, 2];
    const MAX_SUMS_MASK: u32 = 1;
    /// Passes 0 and 1 read only the gradient, pass 2 (caution) the first moment too.
    const SUMS_READ_STATE: bool = CAUTION;
    const STATE_SUM_PASS: usize = 2;
    const SUMS_READ_PARAM: bool = false;

    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> StableSpamCoeffs<R> {
        let x = self.norms(scalars, sums);
        let k = if RESET { 1.0 } else { x.k };
        *scalars = [k, x.m_max, x.m_norm, x.v_norm];
        let (bc1, bc2) = (1.0 - self.beta1.powf(k), 1.0 - self.beta2.powf(k));
        StableSpamCoeffs {
            tau: R::from_f64(x.tau),
            max: R::from_f64(sums[0]),
            norm: R::from_f64(x.n),
            target: R::from_f64(x.c),
            rescale: x.n > 0.0,
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            sqrt_bc2: R::from_f64(bc2.sqrt()),
            eps: R::from_f64(self.eps),
            neg_step: R::from_f64(-self.lr / bc1),
            caution: if CAUTION { caution_factor(&sums[2..], self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &StableSpamCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let p = if DECAY { p * c.decay } else { p };
        let g = Self::clipped(g, c.tau, c.max);
        let g = if c.rescale { g / c.norm * c.target } else { g };
        let (m, v) = Self::moments(s);
        let m = m * c.beta1 + c.one_minus_beta1 * g;
        let v = v * c.beta2 + c.one_minus_beta2 * g * g;
        let denom_v = if AMSGRAD {
            s[2] = s[2].max_nan(v);
            s[2]
        } else {
            v
        };
        (s[0], s[1]) = if RESET && !CLEAN { (R::ZERO, R::ZERO) } else { (m, v) };
        let m = if CAUTION { cautious(m, g, c.caution) } else { m };
        p + c.neg_step * (m / (denom_v.sqrt() / c.sqrt_bc2 + c.eps))
    }

    /// Pass 0: the largest gradient magnitude.
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, g: R, _s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let a = g.abs().to_f64();
        if a > sums[0] || a.is_nan() {
            sums[0] = a;
        }
    }

    /// Pass 1: `[τ, M]`; pass 2 (caution): also the norm `n` and its target `c`.
    fn prepare(&self, pass: usize, scalars: &[f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> [f64; MAX_SUMS] {
        let x = self.norms(scalars, sums);
        let mut out = [0.0; MAX_SUMS];
        out[..2].copy_from_slice(&[x.tau, sums[0]]);
        if pass > 1 {
            out[2..4].copy_from_slice(&[x.n, x.c]);
        }
        out
    }

    /// Pass 1: `‖clipped g‖²`; pass 2: count φ for the new `m` (as `update` computes it).
    #[inline(always)]
    fn accumulate_after<R: Real>(&self, pass: usize, prior: &[R; MAX_SUMS], _p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let g = Self::clipped(g, prior[0], prior[1]);
        if pass == 1 {
            let x = g.to_f64();
            sums[1] += x * x;
        } else if CAUTION {
            let g = if prior[2] > R::ZERO { g / prior[2] * prior[3] } else { g };
            let (m, _) = Self::moments(s);
            cautious_count_momentum(m, g, self.beta1, &mut sums[2..]);
        }
    }
}

/// Build Stable-SPAM from `lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, theta` and flags
/// `amsgrad, reset, clean_reset`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let gamma1 = check_unit_interval("gamma1", h.num("gamma1")?)?;
    let gamma2 = check_unit_interval("gamma2", h.num("gamma2")?)?;
    let theta = check_unit_interval("theta", h.num("theta")?)?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(h.flag("amsgrad")? => A, h.flag("reset")? => RS, h.flag("clean_reset")? => CL, weight_decay > 0.0 => D, h.flag("caution")? => C;
        v.visit(StableSpam::<A, RS, CL, D, C> { lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, theta, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    type S<const RESET: bool, const CLEAN: bool> = StableSpam<false, RESET, CLEAN, true, false>;

    fn rule<const RESET: bool, const CLEAN: bool>() -> S<RESET, CLEAN> {
        S { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, gamma1: 0.7, gamma2: 0.9, theta: 0.999, caution_count: 0.0 }
    }

    /// The rule's passes and update over a whole tensor, as a driver runs them.
    fn step<const RESET: bool, const CLEAN: bool>(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], scalars: &mut [f64; 4]) {
        let r = rule::<RESET, CLEAN>();
        let mut sums = [0.0; MAX_SUMS];
        for &x in g {
            r.accumulate(0.0, x, &[0.0; MAX_SLOTS], &mut sums);
        }
        let prior = r.prepare(1, scalars, &sums);
        for &x in g {
            r.accumulate_after(1, &prior, 0.0, x, &[0.0; MAX_SLOTS], &mut sums);
        }
        let c = r.coeffs::<f64>(scalars, &sums);
        for i in 0..p.len() {
            let mut s = [m[i], v[i], 0.0, 0.0];
            p[i] = S::<RESET, CLEAN>::update(&c, p[i], g[i], &mut s);
            (m[i], v[i]) = (s[0], s[1]);
        }
    }

    /// Spec §11 (d), written out for one tensor in f64.
    fn reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], st: &mut [f64; 4], reset: bool, clean: bool) {
        let (lr, b1, b2, eps, wd, g1, g2, th) = (1e-2, 0.9, 0.999, 1e-8, 0.1, 0.7, 0.9, 0.999);
        let mut g = g.to_vec();
        let k = st[0] + 1.0;
        let big = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        st[1] = th * st[1] + (1.0 - th) * big;
        let tau = st[1] / (1.0 - th.powf(k));
        g.iter_mut().filter(|x| x.abs() > tau).for_each(|x| *x = *x / big * tau);
        let n = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        st[2] = g1 * st[2] + (1.0 - g1) * n;
        st[3] = g2 * st[3] + (1.0 - g2) * n * n;
        let c = (st[2] / (1.0 - g1.powf(k))) / ((st[3] / (1.0 - g2.powf(k))).sqrt() + eps);
        g.iter_mut().for_each(|x| *x = *x / n * c);
        st[0] = if reset { 1.0 } else { k };
        let (bc1, bc2) = (1.0 - b1.powf(st[0]), 1.0 - b2.powf(st[0]));
        for i in 0..p.len() {
            let (m0, v0) = if reset && clean { (0.0, 0.0) } else { (m[i], v[i]) };
            let mi = b1 * m0 + (1.0 - b1) * g[i];
            let vi = b2 * v0 + (1.0 - b2) * g[i] * g[i];
            p[i] = p[i] * (1.0 - lr * wd) - lr / bc1 * mi / (vi.sqrt() / bc2.sqrt() + eps);
            (m[i], v[i]) = if reset && !clean { (0.0, 0.0) } else { (mi, vi) };
        }
    }

    #[test]
    fn matches_the_spec_with_clipping_and_both_resets() {
        let g: Vec<f64> = (0..37).map(|i| ((i as f64) * 0.77).sin() * if i == 5 { 40.0 } else { 1.0 }).collect();
        for (reset, clean) in [(false, false), (true, false), (true, true)] {
            let (mut p, mut m, mut v) = (vec![0.3; 37], vec![0.05; 37], vec![0.02; 37]);
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            let mut st = [6.0, 0.4, 0.9, 1.1];
            let mut st2 = st;
            match (reset, clean) {
                (false, _) => step::<false, false>(&mut p, &g, &mut m, &mut v, &mut st),
                (true, false) => step::<true, false>(&mut p, &g, &mut m, &mut v, &mut st),
                (true, true) => step::<true, true>(&mut p, &g, &mut m, &mut v, &mut st),
            }
            reference(&mut p2, &g, &mut m2, &mut v2, &mut st2, reset, clean);
            for i in 0..37 {
                assert!((p[i] - p2[i]).abs() <= 1e-14 * p2[i].abs().max(1.0), "{reset} {clean} p[{i}]: {} vs {}", p[i], p2[i]);
                assert!((m[i] - m2[i]).abs() <= 1e-14 && (v[i] - v2[i]).abs() <= 1e-14, "{reset} {clean} state[{i}]");
            }
            for k in 0..4 {
                assert!((st[k] - st2[k]).abs() <= 1e-14 * st2[k].abs().max(1.0), "{reset} {clean} scalar {k}: {} vs {}", st[k], st2[k]);
            }
        }
    }

    #[test]
    fn a_zero_gradient_is_neither_clipped_nor_rescaled() {
        let (mut p, mut m, mut v) = (vec![0.3; 4], vec![0.05; 4], vec![0.02; 4]);
        let mut st = [0.0; 4];
        step::<false, false>(&mut p, &[0.0; 4], &mut m, &mut v, &mut st);
        assert!(p.iter().chain(&m).chain(&v).all(|x| x.is_finite()));
        assert_eq!(st, [1.0, 0.0, 0.0, 0.0]);
    }
}
