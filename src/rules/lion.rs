//! Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675), as
//! google/automl `lion_pytorch.py` (spec §8).
//!
//! Per element, in the reference's operation order:
//! ```text
//! p ← p·(1 − lr·wd)
//! p ← p + (−lr)·sign(m·β1 + g·(1 − β1))      m from the previous step
//! m ← m·β2 + (1 − β2)·g
//! ```
//! State slot: `exp_avg`. No step counter.

use super::{check_non_negative, check_unit_interval, Hyper, Rule, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::Real;

/// Lion's hyper-parameters.
#[repr(C)]
#[derive(Clone, Debug)]
pub struct Lion {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// The decoupled decay rate: `weight_decay`, or `weight_decay / decay_base_lr` with
    /// lr-independent decay (lucidrains' `decoupled_weight_decay`).
    pub weight_decay: f64,
}

/// Lion's coefficients (identical for every tensor).
#[derive(Copy, Clone, Debug)]
pub struct LionCoeffs<R: Real> {
    decay: R,
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    neg_lr: R,
}

impl Rule for Lion {
    const SLOTS: usize = 1;
    type Coeffs<R: Real> = LionCoeffs<R>;

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> LionCoeffs<R> {
        LionCoeffs {
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            neg_lr: R::from_f64(-self.lr),
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &LionCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let p = p * c.decay;
        let dir = (s[0] * c.beta1 + g * c.one_minus_beta1).sign();
        s[0] = s[0] * c.beta2 + c.one_minus_beta2 * g;
        p + c.neg_lr * dir
    }
}

/// Build Lion from `lr, beta1, beta2, weight_decay`, flag `lr_independent_decay` and (with it)
/// `decay_base_lr`.
pub fn visit<V: RuleVisitor>(h: &Hyper, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let mut weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    if h.flag_or_false("lr_independent_decay")? {
        let base = h.num("decay_base_lr")?;
        if !(base > 0.0) {
            return Err(Error::Value(format!("decay_base_lr must be > 0, got {base}")));
        }
        weight_decay /= base;
    }
    Ok(v.visit(Lion { lr, beta1, beta2, weight_decay }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_spec_in_f64() {
        let rule = Lion { lr: 1e-2, beta1: 0.9, beta2: 0.99, weight_decay: 0.5 };
        let (mut p, mut s) = (0.7f64, [0.0f64; MAX_SLOTS]);
        let (mut rp, mut rm) = (p, 0.0f64);
        for t in 1..=20 {
            let g = ((t as f64) * 0.37).sin() + 0.1;
            p = Lion::update(&rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]), p, g, &mut s);
            // spec §8 (d)
            rp *= 1.0 - 1e-2 * 0.5;
            let c = 0.9 * rm + 0.1 * g;
            rp -= 1e-2 * if c > 0.0 { 1.0 } else if c < 0.0 { -1.0 } else { 0.0 };
            rm = 0.99 * rm + 0.01 * g;
            assert!((p - rp).abs() < 1e-15 && (s[0] - rm).abs() < 1e-15, "t={t}");
        }
    }

    #[test]
    fn zero_direction_moves_only_by_decay() {
        let rule = Lion { lr: 0.1, beta1: 0.5, beta2: 0.5, weight_decay: 0.0 };
        let c = rule.coeffs::<f32>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]);
        let mut s = [1.0f32, 0.0, 0.0, 0.0];
        // m·β1 + g·(1 − β1) = 0.5 − 0.5 = 0: sign 0, p unchanged; m still decays.
        assert_eq!(Lion::update(&c, 2.0, -1.0, &mut s), 2.0);
        assert_eq!(s[0], 0.0);
    }
}
