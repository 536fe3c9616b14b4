//! ⊥Grad (Prieto et al., "Grokking at the Edge of Numerical Stability", ICLR 2025,
//! arXiv:2501.04697; spec §19): any rule that reads a gradient, stepped with the gradient made
//! orthogonal to the parameter. Per tensor, with `w` the parameter and `u` its gradient as flat
//! vectors (the whole tensor is one vector):
//! ```text
//! c  = ⟨w, u⟩ / (⟨w, w⟩ + 1e-30)
//! u⊥ = u − c·w
//! u⊥ ← u⊥ · ‖u‖ / (‖u⊥‖ + 1e-30)      with RESCALE (the official code; without: the paper)
//! ```
//! and the wrapped rule updates with `u⊥` (evaluated in f64, rounded once to the compute type) in
//! place of `u`; nothing is written to the gradient.
//! The sums ⟨w,u⟩, ⟨w,w⟩, ‖u‖² and the element count come from one read-only pass over `w` and
//! `u`, accumulated in f64; `‖u⊥‖² = ‖u‖² − 2c⟨w,u⟩ + c²⟨w,w⟩` is derived from them in f64 (no
//! second pass). A tensor of one element keeps its gradient: its `u⊥` is rounding noise that the
//! rescale would blow up to `|u|` with an arbitrary sign (spec §19 (h), decision §22.5).
//!
//! The transform is linear in `u` and the rescale does not depend on `u`'s scale, so it commutes
//! with the drivers' unscaling (AMP) and negation (`maximize`), which are applied first here.
//! Rules with sums of their own (they would need sums of the transformed gradient: a second,
//! dependent pass) are refused.
//!
//! The math is stated once, here: [`accumulate`] and [`Projection`]. Backends that instantiate a
//! kernel per rule type run the wrapper [`OrthoGrad`] (CUDA's twin is compiled on demand); the
//! CPU driver, whose kernels are compiled ahead for every rule type and dtype, instead applies
//! [`Projection`] to each block of gradients before the unwrapped rule reads it, bit for bit the
//! same, so that ⊥Grad adds no kernel per rule type to the build.

use super::{bool_dispatch, ConstArg, Params, Rule, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::Real;

/// The constant of both denominators (the official code's).
const EPS: f64 = 1e-30;

/// The rule `Ru` stepped with ⊥Grad's gradient.
#[derive(Clone, Debug)]
pub struct OrthoGrad<Ru: Rule, const RESCALE: bool> {
    pub inner: Ru,
}

/// How one tensor's gradient is projected: `u⊥ = (u − along·w)·scale`, evaluated in f64 and
/// rounded once to the compute type (where `u ≈ along·w` the difference cancels: in f32 it would
/// keep only the few bits that f32 rounding of `along·w` left).
#[derive(Copy, Clone, Debug)]
pub struct Projection {
    along: f64,
    scale: f64,
}

impl Projection {
    /// The projection of a tensor with sums `[⟨w,u⟩, ⟨w,w⟩, ‖u‖², numel]` (see [`accumulate`]).
    pub fn from_sums(sums: &[f64; MAX_SUMS], rescale: bool) -> Projection {
        let [wu, ww, uu, numel, ..] = *sums;
        if numel <= 1.0 {
            return Projection { along: 0.0, scale: 1.0 };
        }
        let along = wu / (ww + EPS);
        let perp = (uu - 2.0 * along * wu + along * along * ww).max(0.0).sqrt();
        Projection { along, scale: if rescale { uu.sqrt() / (perp + EPS) } else { 1.0 } }
    }

    /// `u⊥` of the element with parameter `w` and gradient `u`.
    #[inline(always)]
    pub fn apply<R: Real>(&self, w: R, u: R) -> R {
        R::from_f64((u.to_f64() - self.along * w.to_f64()) * self.scale)
    }
}

/// The element with parameter `w` and gradient `u`'s terms of the projection sums
/// `[⟨w,u⟩, ⟨w,w⟩, ‖u‖²]` (the fourth sum counts the elements).
#[inline(always)]
pub fn terms<R: Real>(w: R, u: R) -> [f64; 3] {
    let (w, u) = (w.to_f64(), u.to_f64());
    [w * u, w * w, u * u]
}

/// Add the element with parameter `w` and gradient `u` to a tensor's projection sums
/// `[⟨w,u⟩, ⟨w,w⟩, ‖u‖², numel]`.
#[inline(always)]
pub fn accumulate<R: Real>(w: R, u: R, sums: &mut [f64; MAX_SUMS]) {
    for (sum, x) in sums.iter_mut().zip(terms(w, u)) {
        *sum += x;
    }
    sums[3] += 1.0;
}

/// Refuse ⊥Grad around `Ru`: a rule that reads no gradient, or one with sums of its own (they
/// would have to be sums of the projected gradient: a second, dependent pass).
pub fn check_projectable<Ru: Rule>() -> Result<()> {
    if Ru::READS_GRADIENT && Ru::SUMS == 0 {
        Ok(())
    } else {
        Err(refusal::<Ru>())
    }
}

/// Why ⊥Grad cannot wrap `Ru` (see [`check_projectable`]).
fn refusal<Ru: Rule>() -> Error {
    let name = Ru::INFO.name;
    if !Ru::READS_GRADIENT {
        return Error::Value(format!("orthograd projects a gradient; rule '{name}' reads none: pass orthograd=False"));
    }
    Error::Value(format!(
        "orthograd cannot be combined with rule '{name}' in this configuration: the rule reads per-tensor sums of the \
         gradient, which would have to be sums of the orthogonalised one (a second pass emafuse does not run); \
         pass orthograd=False or turn off the option that needs the sums (e.g. Lion's caution)"
    ))
}

/// The wrapped rule's coefficients, and the gradient's projection.
#[derive(Copy, Clone, Debug)]
pub struct OrthoCoeffs<C> {
    inner: C,
    projection: Projection,
}

impl<Ru: Rule, const RESCALE: bool> Params for OrthoGrad<Ru, RESCALE> {
    const PARAM_NAMES: &'static [&'static str] = Ru::PARAM_NAMES;
    fn param_words(&self) -> Vec<f64> {
        self.inner.param_words()
    }
    fn const_args() -> Vec<ConstArg> {
        Ru::const_args()
    }
    fn twin_type(template: &str) -> String {
        format!("OrthoGrad<{}, {RESCALE}>", Ru::twin_type(template))
    }
}

impl<Ru: Rule, const RESCALE: bool> Rule for OrthoGrad<Ru, RESCALE> {
    const INFO: &'static super::RuleInfo = Ru::INFO;
    const SLOT_NAMES: &'static [&'static str] = Ru::SLOT_NAMES;
    const WRITTEN_SLOTS: usize = Ru::WRITTEN_SLOTS;
    /// ⟨w,u⟩, ⟨w,w⟩, ‖u‖², numel.
    const SUMS: usize = 4;
    const SUMS_READ_STATE: bool = false;
    type Coeffs<R: Real> = OrthoCoeffs<Ru::Coeffs<R>>;

    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, _s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        accumulate(p, g, sums);
    }

    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> Self::Coeffs<R> {
        OrthoCoeffs { inner: self.inner.coeffs::<R>(scalars, &[0.0; MAX_SUMS]), projection: Projection::from_sums(sums, RESCALE) }
    }

    #[inline(always)]
    fn update<R: Real>(c: &Self::Coeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        Ru::update(&c.inner, p, c.projection.apply(p, g), s)
    }
}

/// A visitor that hands the rule it receives, wrapped in [`OrthoGrad`], to `visitor`.
pub struct Wrap<V> {
    pub visitor: V,
    pub rescale: bool,
}

impl<V: RuleVisitor> RuleVisitor for Wrap<V> {
    type Output = Result<V::Output>;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
        // A condition on constants of `Ru` (not a call), so that the types it refuses are never
        // instantiated wrapped.
        if Ru::READS_GRADIENT && Ru::SUMS == 0 {
            Ok(bool_dispatch!(self.rescale => RESCALE; self.visitor.visit(OrthoGrad::<Ru, RESCALE> { inner: rule })))
        } else {
            Err(refusal::<Ru>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::sgd::Sgd;

    /// Plain SGD (p ← p − lr·g) shows the transformed gradient directly.
    fn sgd_step<const RESCALE: bool>(w: &[f64], u: &[f64]) -> Vec<f64> {
        let rule = OrthoGrad::<Sgd<false, false, false, false>, RESCALE> {
            inner: Sgd { lr: 1.0, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, caution_count: 0.0 },
        };
        let mut sums = [0.0; MAX_SUMS];
        for (&p, &g) in w.iter().zip(u) {
            rule.accumulate(p, g, &[0.0; MAX_SLOTS], &mut sums);
        }
        let c = rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &sums);
        w.iter().zip(u).map(|(&p, &g)| p - OrthoGrad::<Sgd<false, false, false, false>, RESCALE>::update(&c, p, g, &mut [0.0; MAX_SLOTS])).collect()
    }

    #[test]
    fn gradient_is_made_orthogonal_and_keeps_its_norm() {
        let (w, u) = ([1.0, 2.0, -0.5, 0.25], [0.3, -0.7, 1.1, 0.4]);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let along = dot(&w, &u) / (dot(&w, &w) + EPS);
        let perp: Vec<f64> = u.iter().zip(w).map(|(g, p)| g - along * p).collect();
        assert_eq!(sgd_step::<false>(&w, &u).iter().zip(&perp).filter(|(a, b)| (*a - *b).abs() > 1e-15).count(), 0);
        let got = sgd_step::<true>(&w, &u);
        assert!(dot(&got, &w).abs() < 1e-14);
        assert!((dot(&got, &got) - dot(&u, &u)).abs() < 1e-14);
        let k = dot(&u, &u).sqrt() / dot(&perp, &perp).sqrt();
        assert!(got.iter().zip(&perp).all(|(a, b)| (a - b * k).abs() < 1e-14));
    }

    #[test]
    fn one_element_tensors_and_zero_parameters_keep_their_gradient() {
        assert_eq!(sgd_step::<true>(&[3.0], &[-0.5]), vec![-0.5]);
        assert_eq!(sgd_step::<true>(&[0.0, 0.0], &[0.5, -2.0]), vec![0.5, -2.0]);
    }

    #[test]
    fn a_zero_gradient_stays_zero() {
        assert_eq!(sgd_step::<true>(&[1.0, 2.0], &[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
