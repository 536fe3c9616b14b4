//! AdamP (Heo et al., ICLR 2021, arXiv:2006.08217), as the official clovaai `adamp/adamp.py`
//! (spec §9).
//!
//! Adam's moments and direction, then for tensors of two or more dimensions the projection that
//! removes the radial component of the direction where the weights look scale-invariant:
//! ```text
//! m ← m·β1 + (1 − β1)·g ; v ← v·β2 + (1 − β2)·g·g
//! u = m/(sqrt(v)/sqrt(bc2) + eps)            (NESTEROV: (m·β1 + (1 − β1)·g)/(…))
//! cos_i = |⟨g_i,p_i⟩| / (max(‖g_i‖, eps)·max(‖p_i‖, eps))   per row i (dim-0 slice), L = row length
//! channel view if max_i cos_i < δ/sqrt(L):    u_i ← u_i − p_i·⟨p_i,u_i⟩/(‖p_i‖ + eps)²  per row
//! else layer view, the same over the whole tensor (one row of numel elements)
//! r = wd_ratio if a view projected, else 1
//! p ← p·(1 − lr·wd·r) − (lr/bc1)·u
//! ```
//! Every projection quantity reads p before the step. The engine gathers per row (read-only pass
//! 1; pass 0 gathers nothing) `⟨g,p⟩, ‖g‖², ‖p‖², ⟨p,u⟩` for the new moments, and folds them into
//! the tensor's sums `[Σ⟨g,p⟩, Σ‖g‖², Σ‖p‖², Σ⟨p,u⟩, max_i cos_i·sqrt(L), numel]`: added (the
//! maximum kept), so sharded tensors combine theirs across ranks. Vectors gather none (numel 0
//! there: never projected).
//! State slots: `exp_avg`, `exp_avg_sq`; scalar state `step`.

use super::{
    bool_dispatch, check_non_negative, check_unit_interval, next_step, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS,
    MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `adamp` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adamp",
    summary: "AdamP (Heo et al.) as clovaai adamp.py: Adam with the radial component removed per channel or layer",
    numbers: &["lr", "beta1", "beta2", "eps", "weight_decay", "delta", "wd_ratio"],
    flags: &["nesterov"],
    optional_flags: &[],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq"],
};

rule_params! {
    /// AdamP's hyper-parameters; `DECAY`: weight decay (wd > 0).
    pub struct AdamP<const NESTEROV: bool, const DECAY: bool> {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        /// The cosine threshold δ (times 1/sqrt of the view's row length).
        delta: f64,
        /// What multiplies the weight decay of a projected tensor.
        wd_ratio: f64,
    }
}

/// Where in the tensor sums each quantity lies.
const GP: usize = 0;
const GG: usize = 1;
const PP: usize = 2;
const PU: usize = 3;
/// max_i cos_i·sqrt(L) over the rows (a maximum).
const COS: usize = 4;
/// The elements of the rows folded in.
const COUNT: usize = 5;

/// AdamP's per-tensor (or per-row) coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdamPCoeffs<R: Real> {
    beta1: R,
    one_minus_beta1: R,
    beta2: R,
    one_minus_beta2: R,
    sqrt_bc2: R,
    eps: R,
    neg_step: R,
    /// 1 − lr·wd·r.
    decay: R,
    /// What removes the radial component: `u ← u − proj·p` (0: no projection).
    proj: R,
    /// Whether each row has its own `proj` (the channel view).
    by_row: bool,
}

impl<const NESTEROV: bool, const DECAY: bool> AdamP<NESTEROV, DECAY> {
    /// `|⟨g,p⟩| / (max(‖g‖, eps)·max(‖p‖, eps))` from `[⟨g,p⟩, ‖g‖², ‖p‖²]`, as torch's
    /// `cosine_similarity` (then `abs`).
    fn cosine(&self, s: &[f64; MAX_SUMS]) -> f64 {
        s[GP].abs() / (s[GG].sqrt().max(self.eps) * s[PP].sqrt().max(self.eps))
    }

    /// `⟨p,u⟩/(‖p‖ + eps)²`: the radial component of `u` along `p`, per unit of `p`.
    fn radial(&self, s: &[f64; MAX_SUMS]) -> f64 {
        let norm = s[PP].sqrt() + self.eps;
        s[PU] / (norm * norm)
    }

    /// The moments and direction of one element, as the update computes them.
    #[inline(always)]
    fn direction<R: Real>(c: &AdamPCoeffs<R>, g: R, s: &[R; MAX_SLOTS]) -> (R, R, R) {
        let m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        let v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        let n = if NESTEROV { m * c.beta1 + c.one_minus_beta1 * g } else { m };
        (m, v, n / (v.sqrt() / c.sqrt_bc2 + c.eps))
    }

    /// The coefficients before the projection is decided (no projection, no ratio), from the
    /// step's bias corrections.
    fn base<R: Real>(&self, (bc1, bc2): (f64, f64)) -> AdamPCoeffs<R> {
        AdamPCoeffs {
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            beta2: R::from_f64(self.beta2),
            one_minus_beta2: R::from_f64(1.0 - self.beta2),
            sqrt_bc2: R::from_f64(bc2.sqrt()),
            eps: R::from_f64(self.eps),
            neg_step: R::from_f64(-self.lr / bc1),
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            proj: R::ZERO,
            by_row: false,
        }
    }
}

impl<const NESTEROV: bool, const DECAY: bool> Rule for AdamP<NESTEROV, DECAY> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    type Coeffs<R: Real> = AdamPCoeffs<R>;
    const SUMS: usize = 6;
    /// All in pass 1: they read the new moments, whose bias correction `prepare` gives.
    const SUM_PASS: [usize; MAX_SUMS] = [1; MAX_SUMS];
    const MAX_SUMS_MASK: u32 = 1 << COS;
    const ROW_SUMS: bool = true;

    /// `scalars[0]` is the parameter's `step`, incremented here; the sums decide the view.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdamPCoeffs<R> {
        let mut c = self.base::<R>(next_step(scalars, self.beta1, self.beta2));
        let (channel, layer) = if sums[COUNT] > 0.0 {
            let channel = sums[COS] < self.delta;
            (channel, !channel && self.cosine(sums) * sums[COUNT].sqrt() < self.delta)
        } else {
            (false, false)
        };
        if channel || layer {
            c.decay = R::from_f64(1.0 - self.lr * self.weight_decay * self.wd_ratio);
            c.by_row = channel;
            if layer {
                c.proj = R::from_f64(self.radial(sums));
            }
        }
        c
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdamPCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (m, v, u) = Self::direction(c, g, s);
        (s[0], s[1]) = (m, v);
        let u = u - c.proj * p;
        let p = if DECAY { p * c.decay } else { p };
        p + c.neg_step * u
    }

    /// The coefficients the direction needs, for the coming step.
    fn prepare(&self, _pass: usize, scalars: &[f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> [f64; MAX_SUMS] {
        let c = self.base::<f64>(next_step(&mut scalars.clone(), self.beta1, self.beta2));
        [c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.sqrt_bc2, c.eps]
    }

    /// One row's `⟨g,p⟩, ‖g‖², ‖p‖², ⟨p,u⟩`.
    #[inline(always)]
    fn accumulate_after<R: Real>(&self, _pass: usize, prior: &[R; MAX_SUMS], p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        let c = AdamPCoeffs {
            beta1: prior[0],
            one_minus_beta1: prior[1],
            beta2: prior[2],
            one_minus_beta2: prior[3],
            sqrt_bc2: prior[4],
            eps: prior[5],
            neg_step: R::ZERO,
            decay: R::ONE,
            proj: R::ZERO,
            by_row: false,
        };
        let (_, _, u) = Self::direction(&c, g, s);
        let (p, g, u) = (p.to_f64(), g.to_f64(), u.to_f64());
        sums[GP] += g * p;
        sums[GG] += g * g;
        sums[PP] += p * p;
        sums[PU] += p * u;
    }

    fn fold_row(&self, row: &[f64; MAX_SUMS], len: usize, tensor: &mut [f64; MAX_SUMS]) {
        for k in [GP, GG, PP, PU] {
            tensor[k] += row[k];
        }
        let cos = self.cosine(row) * (len as f64).sqrt();
        if cos > tensor[COS] || cos.is_nan() {
            tensor[COS] = cos;
        }
        tensor[COUNT] += len as f64;
    }

    fn row_coeffs<R: Real>(&self, c: &AdamPCoeffs<R>, _tensor: &[f64; MAX_SUMS], row: &[f64; MAX_SUMS]) -> AdamPCoeffs<R> {
        if c.by_row {
            AdamPCoeffs { proj: R::from_f64(self.radial(row)), ..*c }
        } else {
            *c
        }
    }
}

/// Build AdamP from `lr, beta1, beta2, eps, weight_decay, delta, wd_ratio` and the flag
/// `nesterov`.
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let beta2 = check_unit_interval("beta2", h.num("beta2")?)?;
    let eps = check_non_negative("eps", h.num("eps")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    let delta = check_non_negative("delta", h.num("delta")?)?;
    let wd_ratio = h.num("wd_ratio")?;
    if !(0.0..=1.0).contains(&wd_ratio) {
        return Err(Error::Value(format!("wd_ratio must be in [0, 1], got {wd_ratio}")));
    }
    Ok(bool_dispatch!(h.flag("nesterov")? => N, weight_decay > 0.0 => D;
        v.visit(AdamP::<N, D> { lr, beta1, beta2, eps, weight_decay, delta, wd_ratio })))
}

#[cfg(test)]
mod tests {
    use super::*;

    type A = AdamP<false, true>;

    fn rule(delta: f64) -> A {
        A { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, delta, wd_ratio: 0.1 }
    }

    /// The rule over one `rows × len` tensor as a driver runs it: row sums, folded, then the
    /// update row by row.
    fn step(r: &A, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: &mut [f64; MAX_SCALARS], len: usize) {
        let prior = r.prepare(1, t, &[0.0; MAX_SUMS]);
        let rows: Vec<[f64; MAX_SUMS]> = (0..p.len() / len)
            .map(|i| {
                let mut row = [0.0; MAX_SUMS];
                for j in i * len..(i + 1) * len {
                    r.accumulate_after(1, &prior, p[j], g[j], &[m[j], v[j], 0.0, 0.0], &mut row);
                }
                row
            })
            .collect();
        let mut sums = [0.0; MAX_SUMS];
        rows.iter().for_each(|row| r.fold_row(row, len, &mut sums));
        let c = r.coeffs::<f64>(t, &sums);
        for (i, row) in rows.iter().enumerate() {
            let c = r.row_coeffs(&c, &sums, row);
            for j in i * len..(i + 1) * len {
                let mut s = [m[j], v[j], 0.0, 0.0];
                p[j] = A::update(&c, p[j], g[j], &mut s);
                (m[j], v[j]) = (s[0], s[1]);
            }
        }
    }

    /// Spec §9 (d), written out for one `rows × len` tensor: the view that projects (if any).
    fn reference(delta: f64, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: f64, len: usize) -> Option<&'static str> {
        let (lr, b1, b2, eps, wd, ratio) = (1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1);
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let n = p.len();
        let mut u = vec![0.0; n];
        for i in 0..n {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            u[i] = m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
        }
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut view = None;
        for (name, l) in [("channel", len), ("layer", n)] {
            let cos = (0..n / l).map(|i| {
                let (gi, pi) = (&g[i * l..(i + 1) * l], &p[i * l..(i + 1) * l]);
                dot(gi, pi).abs() / (dot(gi, gi).sqrt().max(eps) * dot(pi, pi).sqrt().max(eps))
            });
            if cos.fold(0.0, f64::max) < delta / (l as f64).sqrt() {
                for i in 0..n / l {
                    let r = i * l..(i + 1) * l;
                    let norm = dot(&p[r.clone()], &p[r.clone()]).sqrt() + eps;
                    let k = dot(&p[r.clone()], &u[r.clone()]) / (norm * norm);
                    r.for_each(|j| u[j] -= p[j] * k);
                }
                view = Some(name);
                break;
            }
        }
        let r = if view.is_some() { ratio } else { 1.0 };
        for i in 0..n {
            p[i] = p[i] * (1.0 - lr * wd * r) - lr / bc1 * u[i];
        }
        view
    }

    #[test]
    fn matches_the_spec_in_each_view() {
        let (rows, len) = (5, 7);
        let n = rows * len;
        let g: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.77).sin()).collect();
        // (delta, weights, the view that must project): with a large delta every tensor projects
        // per channel; rows alternately along and against the gradient make a small cosine over
        // the layer only; weights along the gradient project nowhere
        let unlike: Vec<f64> = (0..n).map(|i| ((i as f64) * 1.3).cos() + 0.2).collect();
        let alternating: Vec<f64> = (0..n).map(|i| if (i / len) % 2 == 0 { g[i] } else { -g[i] } + 0.01).collect();
        let mut along: Vec<f64> = g.iter().map(|x| x + 0.05).collect();
        along[3] = 1.5;
        for (delta, p0, want) in [(10.0, &unlike, Some("channel")), (1.5, &alternating, Some("layer")), (0.1, &along, None)] {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.05; n], vec![0.02; n]);
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            let mut t = [3.0, 0.0, 0.0, 0.0];
            step(&rule(delta), &mut p, &g, &mut m, &mut v, &mut t, len);
            let view = reference(delta, &mut p2, &g, &mut m2, &mut v2, 4.0, len);
            assert_eq!(view, want, "delta {delta}: the test's weights do not select the view they are meant to");
            assert_eq!(t[0], 4.0);
            for i in 0..n {
                assert!((p[i] - p2[i]).abs() <= 1e-14 * p2[i].abs().max(1.0), "{want:?} p[{i}]: {} vs {}", p[i], p2[i]);
                assert!((m[i] - m2[i]).abs() <= 1e-15 && (v[i] - v2[i]).abs() <= 1e-15, "{want:?} state[{i}]");
            }
        }
    }

    #[test]
    fn a_tensor_without_rows_is_never_projected() {
        let c = rule(10.0).coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]);
        assert_eq!((c.proj, c.by_row, c.decay), (0.0, false, 1.0 - 1e-2 * 0.1));
    }
}
