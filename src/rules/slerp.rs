//! Spherical interpolation of two task vectors, per tensor (WARP; spec averaging.md B.6, D.1
//! K7 + K9 in one call).
//!
//! Written tensor: the output, holding `θ₁` on entry; input: `θ₂`; slot 0: the base `θ_init`
//! (read). A read-only pass gathers per tensor, in f64, `⟨δ₁, δ₂⟩`, `‖δ₁‖²`, `‖δ₂‖²` with
//! `δᵢ = θᵢ − θ_init`; the host then computes
//! ```text
//! cos Ω = ⟨δ₁,δ₂⟩ / (‖δ₁‖‖δ₂‖),   Ω = arccos(clamp(cos Ω, −1, 1))
//! c₁ = sin((1−λ)Ω)/sin Ω,  c₂ = sin(λΩ)/sin Ω       (LERP c₁ = 1−λ, c₂ = λ when |cos Ω| > 0.9995
//!                                                    or a norm ≤ 1e-8)
//! ```
//! and the update pass writes `θ_init + c₁·δ₁ + c₂·δ₂`.

use super::{rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::Real;

/// |cos Ω| above which SLERP falls back to LERP (mergekit's threshold).
pub const LERP_THRESHOLD: f64 = 0.9995;
/// Task-vector norm at or below which SLERP falls back to LERP.
pub const MIN_NORM: f64 = 1e-8;

/// The `slerp` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "slerp",
    summary: "Spherical interpolation of two task vectors per tensor (WARP), LERP when nearly parallel",
    numbers: &["t"],
    flags: &[],
    optional_flags: &[],
    scalars: &[],
    input: Input::Weights,
    nonnegative_slots: &[],
};

rule_params! {
    /// SLERP at fraction `t` (λ) from `θ₁` towards `θ₂`.
    pub struct Slerp {
        t: f64,
    }
}

/// The two host-computed coefficients (f64) for one tensor.
pub fn coefficients(t: f64, dot: f64, n1sq: f64, n2sq: f64) -> (f64, f64) {
    let (n1, n2) = (n1sq.sqrt(), n2sq.sqrt());
    if n1 <= MIN_NORM || n2 <= MIN_NORM {
        return (1.0 - t, t);
    }
    let cos = (dot / (n1 * n2)).clamp(-1.0, 1.0);
    if cos.abs() > LERP_THRESHOLD {
        return (1.0 - t, t);
    }
    let omega = cos.acos();
    let s = omega.sin();
    (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s)
}

impl Rule for Slerp {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["base"];
    const SUMS: usize = 3;
    type Coeffs<R: Real> = (R, R);

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> (R, R) {
        let (c1, c2) = coefficients(self.t, sums[0], sums[1], sums[2]);
        (R::from_f64(c1), R::from_f64(c2))
    }

    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let base = s[0].to_f64();
        let (d1, d2) = (p.to_f64() - base, g.to_f64() - base);
        sums[0] += d1 * d2;
        sums[1] += d1 * d1;
        sums[2] += d2 * d2;
    }

    #[inline(always)]
    fn update<R: Real>(c: &(R, R), p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let base = s[0];
        base + c.0 * (p - base) + c.1 * (g - base)
    }
}

/// Build `slerp` from `t` (λ).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let t = h.num("t")?;
    if !(0.0..=1.0).contains(&t) {
        return Err(Error::Value(format!("slerp: t must be in [0, 1], got {t}")));
    }
    Ok(v.visit(Slerp { t }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        // θ_init = 0, θ1 = (1, 2, 2), θ2 = (2, 0, 1), λ = 0.3.
        let (c1, c2) = coefficients(0.3, 4.0, 9.0, 5.0);
        let out: Vec<f64> = [(1.0, 2.0), (2.0, 0.0), (2.0, 1.0)].iter().map(|(a, b)| c1 * a + c2 * b).collect();
        for (o, e) in out.iter().zip([1.4436954710, 1.5124001519, 1.8561478494]) {
            assert!((o - e).abs() < 1e-9, "{o} vs {e}");
        }
        // Orthogonal unit task vectors at λ = 0.5: both coefficients sin(π/4)/sin(π/2).
        let (c1, c2) = coefficients(0.5, 0.0, 1.0, 4.0);
        let half = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c1 - half).abs() < 1e-9 && (c2 - half).abs() < 1e-9);
        // Nearly parallel: LERP.
        assert_eq!(coefficients(0.5, 2.0, 1.0, 4.0 + 1e-8), (0.5, 0.5));
    }
}
