//! In-place exchange of two equally typed tensor lists (spec averaging.md D.1 K4): the written
//! tensor `A` and slot 0 `B` trade values in registers, 16 bytes per fp32 element, no temporary.

use super::{rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::Result;
use crate::real::Real;

/// The `swap` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "swap",
    summary: "Exchange the written tensors with state slot 'b' in place",
    numbers: &[],
    flags: &[],
    optional_flags: &[],
    scalars: &[],
    input: Input::None,
    nonnegative_slots: &[],
};

rule_params! {
    /// `A ⇄ B`. No hyper-parameters.
    pub struct Swap {}
}

impl Rule for Swap {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["b"];
    type Coeffs<R: Real> = ();

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) {}

    #[inline(always)]
    fn update<R: Real>(_c: &(), a: R, _g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let b = s[0];
        s[0] = a;
        b
    }
}

/// Build `swap` (no hyper-parameters).
pub fn visit<V: RuleVisitor>(_h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    Ok(v.visit(Swap {}))
}
