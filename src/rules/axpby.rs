//! Weighted sums (spec averaging.md D.1 K5, streamed one input at a time): the written tensor
//! `S` and the input `X`,
//! ```text
//! S ← a·S + b·X          (ASSIGN: S ← b·X, S is not read)
//! ```
//! Uniform/greedy soups, LAWA's output, post-hoc EMA reconstruction and LITI are built from it.

use super::{bool_dispatch, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `axpby` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "axpby",
    summary: "Weighted sum S <- a*S + b*X (or S <- b*X with assign), for soups, LAWA and post-hoc EMA",
    numbers: &["a", "b"],
    flags: &["assign"],
    optional_flags: &["assign"],
    scalars: &[],
    input: Input::Weights,
    nonnegative_slots: &[],
};

rule_params! {
    /// `S ← a·S + b·X`.
    pub struct Axpby<const ASSIGN: bool> {
        a: f64,
        b: f64,
    }
}

impl<const ASSIGN: bool> Rule for Axpby<ASSIGN> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &[];
    type Coeffs<R: Real> = (R, R);

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> (R, R) {
        (R::from_f64(self.a), R::from_f64(self.b))
    }

    #[inline(always)]
    fn update<R: Real>(c: &(R, R), s: R, x: R, _st: &mut [R; MAX_SLOTS]) -> R {
        if ASSIGN {
            c.1 * x
        } else {
            c.0 * s + c.1 * x
        }
    }
}

/// Build `axpby` from `a`, `b` and the flag `assign`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let assign = h.flag("assign")?;
    let a = if assign { 0.0 } else { h.num("a")? };
    let b = h.num("b")?;
    if !a.is_finite() || !b.is_finite() {
        return Err(Error::Value(format!("axpby: coefficients must be finite, got a={a}, b={b}")));
    }
    Ok(bool_dispatch!(assign => AS; v.visit(Axpby::<AS> { a, b })))
}
