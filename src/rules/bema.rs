//! BEMA, bias-corrected EMA (Block & Zhang, arXiv 2508.00180; spec averaging.md B.1, D.1 K3).
//!
//! Written tensor: the EMA `E`; input: the model `θ`; slot 0 (`out`): the BEMA estimate `O`
//! (written); slot 1 (`anchor`): the anchor `θ₀` (read). Per event, with `β` (an update weight) and `α` from the host:
//! ```text
//! E ← lerp(E, θ, β)
//! O ← α·(θ − θ₀) + E
//! ```
//! `RESET` (burn-in): `E ← θ`, `O ← θ`, `θ₀ ← θ`.

use super::{bool_dispatch, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::{Lerp, Real};

/// The `bema` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "bema",
    summary: "BEMA, bias-corrected EMA (Block & Zhang): the EMA, the BEMA estimate and the anchor, or a reset",
    numbers: &["alpha", "beta"],
    flags: &["reset"],
    optional_flags: &[],
    scalars: &[],
    input: Input::Weights,
    nonnegative_slots: &[],
};

rule_params! {
    /// BEMA's weights for one event.
    pub struct Bema<const RESET: bool> {
        alpha: f64,
        beta: f64,
    }
}

/// Per-call coefficients.
#[derive(Copy, Clone, Debug)]
pub struct BemaCoeffs<R: Real> {
    lerp: Lerp<R>,
    alpha: R,
}

impl<const RESET: bool> Rule for Bema<RESET> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["out", "anchor"];
    /// The anchor (slot 1) is only written by a reset.
    const WRITTEN_SLOTS: usize = if RESET { 2 } else { 1 };
    type Coeffs<R: Real> = BemaCoeffs<R>;

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> BemaCoeffs<R> {
        BemaCoeffs { lerp: Lerp::new(self.beta), alpha: R::from_f64(self.alpha) }
    }

    #[inline(always)]
    fn update<R: Real>(c: &BemaCoeffs<R>, e: R, theta: R, s: &mut [R; MAX_SLOTS]) -> R {
        if RESET {
            s[0] = theta;
            s[1] = theta;
            return theta;
        }
        let e = c.lerp.apply(e, theta);
        s[0] = c.alpha * (theta - s[1]) + e;
        e
    }
}

/// Build `bema` from `alpha`, `beta` and the flag `reset`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let alpha = h.num("alpha")?;
    let beta = h.num("beta")?;
    if !(0.0..=1.0).contains(&beta) || !alpha.is_finite() {
        return Err(Error::Value(format!("bema: need beta in [0, 1] and a finite alpha, got beta={beta}, alpha={alpha}")));
    }
    Ok(bool_dispatch!(h.flag("reset")? => RS; v.visit(Bema::<RS> { alpha, beta })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec B.1 test vector, τ = 0, φ = 1: θ_t = t, κ = 0.5, η = 0.2, ρ = 10, γ = 1.
    #[test]
    fn spec_vector() {
        let expect = [
            (0.3015113446, 0.9205552653),
            (0.7918227858, 2.0085514696),
            (1.4042609528, 3.2003695194),
            (2.0980013942, 4.4575796437),
            (2.8472942123, 5.7563480081),
        ];
        let mut s = [0.0f64; MAX_SLOTS];
        let mut e = Bema::<true>::update(&Bema::<true> { alpha: 0.0, beta: 0.0 }.coeffs(&mut [0.0; 4], &[0.0; MAX_SUMS]), 7.0, 0.0, &mut s);
        for t in 1..=5 {
            let b = 10.0 + t as f64;
            let rule = Bema::<false> { alpha: b.powf(-0.2), beta: b.powf(-0.5) };
            e = Bema::<false>::update(&rule.coeffs(&mut [0.0; 4], &[0.0; MAX_SUMS]), e, t as f64, &mut s);
            assert!((e - expect[t - 1].0).abs() < 1e-9 && (s[0] - expect[t - 1].1).abs() < 1e-9, "t={t}: {e} {}", s[0]);
        }
    }
}
