//! SGD with momentum, dampening and Nesterov, exactly as `torch.optim.SGD` (spec §15).
//!
//! Per element, in torch's operation order:
//! ```text
//! d ← g + wd·p
//! b ← d                                  first step of this buffer (torch clones d)
//! b ← b·μ + (1 − dampening)·d            later steps
//! d ← d + μ·b (nesterov) | b
//! p ← p + (−lr)·d
//! ```
//! With `caution` (Cautious SGD, spec §20) the last line reads `d·φ·k` for `φ = 1[d·g > 0]` (g
//! with its decay, d the final direction) and the tensor's factor `k` from a read-only counting
//! pass (`caution_count`: `numel/(Σφ + 1)`, else `1/max(mean φ, 1e-3)`).
//! State slot: `momentum_buffer` (none when momentum is 0).

use super::{
    bool_dispatch, caution_factor, cautious, cautious_count, check_non_negative, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS,
    MAX_SLOTS, MAX_SUMS,
};
use crate::error::Result;
use crate::real::Real;

/// The `sgd` rule; `first` is set by the engine for fresh momentum buffers.
pub const INFO: RuleInfo = RuleInfo {
    name: "sgd",
    summary: "SGD with momentum, dampening and Nesterov as torch.optim.SGD",
    numbers: &["lr", "momentum", "dampening", "weight_decay"],
    flags: &["nesterov", "first", "caution", "caution_count"],
    optional_flags: &["first", "caution", "caution_count"],
    scalars: &[],
    input: Input::Gradient,
    nonnegative_slots: &[],
};

rule_params! {
    /// SGD's hyper-parameters. `MOMENTUM`: keep a buffer; `NESTEROV`; `FIRST`: the buffers of this
    /// call are fresh (torch initialises them with the first direction, without dampening);
    /// `CAUTION`: the cautious mask.
    pub struct Sgd<const MOMENTUM: bool, const NESTEROV: bool, const FIRST: bool, const CAUTION: bool> {
        pub(crate) lr: f64,
        pub(crate) momentum: f64,
        pub(crate) dampening: f64,
        pub(crate) weight_decay: f64,
        /// 1 for caution's "count" normalisation, 0 for "mean" (only read with `CAUTION`).
        pub(crate) caution_count: f64,
    }
}

/// SGD's coefficients (identical for every tensor).
#[derive(Copy, Clone, Debug)]
pub struct SgdCoeffs<R: Real> {
    neg_lr: R,
    momentum: R,
    one_minus_dampening: R,
    weight_decay: R,
    /// The cautious factor k of this tensor (1 without caution).
    caution: R,
}

impl<const MOMENTUM: bool, const NESTEROV: bool, const FIRST: bool, const CAUTION: bool> Sgd<MOMENTUM, NESTEROV, FIRST, CAUTION> {
    /// The step's direction and the new buffer for gradient `g` (with its decay added) and the
    /// buffer `buf`.
    #[inline(always)]
    fn direction<R: Real>(momentum: R, one_minus_dampening: R, d: R, buf: R) -> (R, R) {
        if !MOMENTUM {
            return (d, buf);
        }
        let buf = if FIRST { d } else { buf * momentum + one_minus_dampening * d };
        (if NESTEROV { d + momentum * buf } else { buf }, buf)
    }
}

impl<const MOMENTUM: bool, const NESTEROV: bool, const FIRST: bool, const CAUTION: bool> Rule for Sgd<MOMENTUM, NESTEROV, FIRST, CAUTION> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if MOMENTUM { &["momentum_buffer"] } else { &[] };
    type Coeffs<R: Real> = SgdCoeffs<R>;
    /// With caution: Σφ and the element count.
    const SUMS: usize = if CAUTION { 2 } else { 0 };

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> SgdCoeffs<R> {
        SgdCoeffs {
            neg_lr: R::from_f64(-self.lr),
            momentum: R::from_f64(self.momentum),
            one_minus_dampening: R::from_f64(1.0 - self.dampening),
            weight_decay: R::from_f64(self.weight_decay),
            caution: if CAUTION { caution_factor(sums, self.caution_count != 0.0) } else { R::ONE },
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &SgdCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let g = g + c.weight_decay * p;
        let (d, buf) = Self::direction(c.momentum, c.one_minus_dampening, g, s[0]);
        if MOMENTUM {
            s[0] = buf;
        }
        let d = if CAUTION { cautious(d, g, c.caution) } else { d };
        p + c.neg_lr * d
    }

    /// With caution: count φ for this step's direction (computed as `update` computes it).
    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if CAUTION {
            let g = g + R::from_f64(self.weight_decay) * p;
            let (d, _) = Self::direction(R::from_f64(self.momentum), R::from_f64(1.0 - self.dampening), g, s[0]);
            cautious_count(d, g, sums);
        }
    }
}

/// Build SGD from `lr, momentum, dampening, weight_decay` and flags `nesterov, first`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let momentum = check_non_negative("momentum", h.num("momentum")?)?;
    let dampening = h.num("dampening")?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let nesterov = h.flag("nesterov")?;
    let first = h.flag("first")?;
    let caution_count = if h.flag("caution_count")? { 1.0 } else { 0.0 };
    Ok(bool_dispatch!(momentum != 0.0 => M, nesterov => N, first => F, h.flag("caution")? => C;
        v.visit(Sgd::<M, N, F, C> { lr, momentum, dampening, weight_decay, caution_count })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_copies_direction_then_dampens() {
        let h = (0.1, 0.9, 0.25, 0.01);
        let first = Sgd::<true, false, true, false> { lr: h.0, momentum: h.1, dampening: h.2, weight_decay: h.3, caution_count: 0.0 };
        let later = Sgd::<true, false, false, false> { lr: h.0, momentum: h.1, dampening: h.2, weight_decay: h.3, caution_count: 0.0 };
        let mut s = [0.0f64; MAX_SLOTS];
        let p = Sgd::<true, false, true, false>::update(&first.coeffs(&mut [0.0; 4], &[0.0; MAX_SUMS]), 2.0, 0.5, &mut s);
        let d = 0.5 + 0.01 * 2.0;
        assert_eq!(s[0], d);
        assert_eq!(p, 2.0 - 0.1 * d);
        let p2 = Sgd::<true, false, false, false>::update(&later.coeffs(&mut [0.0; 4], &[0.0; MAX_SUMS]), p, -0.3, &mut s);
        let d2 = -0.3 + 0.01 * p;
        let b2 = d * 0.9 + 0.75 * d2;
        assert!((s[0] - b2).abs() < 1e-15);
        assert!((p2 - (p - 0.1 * b2)).abs() < 1e-15);
    }

    #[test]
    fn nesterov_looks_ahead() {
        let r = Sgd::<true, true, false, false> { lr: 0.5, momentum: 0.5, dampening: 0.0, weight_decay: 0.0, caution_count: 0.0 };
        let mut s = [1.0f64, 0.0, 0.0, 0.0];
        let p = Sgd::<true, true, false, false>::update(&r.coeffs(&mut [0.0; 4], &[0.0; MAX_SUMS]), 0.0, 2.0, &mut s);
        assert_eq!(s[0], 2.5);
        assert_eq!(p, -0.5 * (2.0 + 0.5 * 2.5));
    }
}
