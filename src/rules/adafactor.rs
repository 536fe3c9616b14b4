//! Adafactor (Shazeer & Stern, ICML 2018, arXiv:1804.04235), as `torch.optim.Adafactor`
//! (spec §18.A).
//!
//! ```text
//! t ← t + 1 ; w = t^beta2_decay ; ρ = min(lr, 1/sqrt(t)) ; α = max(eps2, RMS(p))·ρ
//! FACTORED (2+ dims, per matrix of the last two; R per row, C per column):
//!     R ← lerp(R, mean over the row of g², w) ; C ← lerp(C, mean over the column of g², w)
//!     V̂ = R·C / max(mean of R over the rows, eps1)
//! else: v ← lerp(v, g², w) ; V̂ = v
//! U = g / sqrt(max(V̂, eps1²))
//! p ← p·(1 − lr·wd) − α / max(1, RMS(U)/d) · U
//! ```
//! RMS(p) reads the weights before the step. The factors are the engine's factored state
//! ([`Rule::FACTORED`]): the driver sums g² over every row and column, and the elements read
//! their row's sqrt(R) and their column's sqrt(C/max(mean R, eps1)), so that U = g / max(their
//! product, eps1) takes no square root per element (torch takes the root of the product: the
//! same up to rounding). Sums `[Σp², ΣU², numel]`: in pass 0 when factored (the
//! factors are updated before it), else in pass 1 (U reads the new v, whose weight `prepare`
//! gives).
//! State slots: `row_var`, `col_var` (FACTORED) or `variance`; scalar state `step`.

use super::{bool_dispatch, check_non_negative, rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::{Lerp, Real};

/// The `adafactor` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adafactor",
    summary: "Adafactor (Shazeer & Stern) as torch.optim.Adafactor: factored second moments, relative step sizes, update clipping",
    numbers: &["lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay"],
    flags: &["factored"],
    optional_flags: &["factored"],
    scalars: &["step"],
    input: Input::Gradient,
    nonnegative_slots: &["row_var", "col_var", "variance"],
};

rule_params! {
    /// Adafactor's hyper-parameters; `FACTORED`: the tensors have two or more dimensions (factored
    /// second moments), `DECAY`: weight decay (wd > 0).
    pub struct Adafactor<const FACTORED: bool, const DECAY: bool> {
        lr: f64,
        /// The exponent of the step in the weight of new data, `w = t^beta2_decay` (<= 0).
        beta2_decay: f64,
        /// The floor of the second moment's estimate (squared) and of the rows' mean.
        eps1: f64,
        /// The floor of RMS(p) in the step size.
        eps2: f64,
        /// The update clipping threshold on RMS(U).
        d: f64,
        weight_decay: f64,
    }
}

/// Where in the sums each quantity lies (both Adafactors': `[Σp², ΣU², numel]`).
pub(super) const PP: usize = 0;
pub(super) const UU: usize = 1;
pub(super) const COUNT: usize = 2;

/// Count one element, its weight `p` and its direction `u`, into `[Σp², ΣU², numel]`.
#[inline(always)]
pub(super) fn count_element<R: Real>(p: R, u: R, sums: &mut [f64; MAX_SUMS]) {
    let (p, u) = (p.to_f64(), u.to_f64());
    sums[PP] += p * p;
    sums[UU] += u * u;
    sums[COUNT] += 1.0;
}

/// Adafactor's per-tensor coefficients.
#[derive(Copy, Clone, Debug)]
pub struct AdafactorCoeffs<R: Real> {
    /// The weight of g² in the new variance (not FACTORED).
    lerp: Lerp<R>,
    /// The floor of sqrt(V̂) (FACTORED: eps1), else of V̂ (eps1²).
    floor: R,
    /// 1 − lr·wd.
    decay: R,
    /// −α / max(1, RMS(U)/d).
    neg_step: R,
}

impl<const FACTORED: bool, const DECAY: bool> Adafactor<FACTORED, DECAY> {
    /// The new step `t` and the weight of new data `w = t^beta2_decay`, from the step before.
    fn weight(&self, scalars: &[f64; MAX_SCALARS]) -> (f64, f64) {
        let t = scalars[0] + 1.0;
        (t, t.powf(self.beta2_decay))
    }

    /// The floor of what [`Self::estimate`] returns: eps1 for sqrt(V̂) (FACTORED), eps1² for V̂.
    fn floor(&self) -> f64 {
        if FACTORED {
            self.eps1
        } else {
            self.eps1 * self.eps1
        }
    }

    /// `U = g / sqrt(max(V̂, eps1²))` from the element's estimate (FACTORED: sqrt(V̂), floored at
    /// eps1); torch's `clamp_(min=eps1²).rsqrt_().mul_(g)`.
    #[inline(always)]
    fn direction<R: Real>(floor: R, estimate: R, g: R) -> R {
        if FACTORED {
            R::ONE / estimate.max_nan(floor) * g
        } else {
            R::ONE / estimate.max_nan(floor).sqrt() * g
        }
    }

    /// The element's estimate and (not FACTORED) its new variance: sqrt(V̂), the product of its
    /// row's and column's reads (FACTORED), else V̂ = v from `v` and `g²` weighted by `lerp`.
    #[inline(always)]
    fn estimate<R: Real>(lerp: &Lerp<R>, g: R, s: &[R; MAX_SLOTS]) -> R {
        if FACTORED {
            s[0] * s[1]
        } else {
            lerp.apply(s[0], g * g)
        }
    }

    #[inline(always)]
    fn count<R: Real>(floor: R, lerp: &Lerp<R>, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        count_element(p, Self::direction(floor, Self::estimate(lerp, g, s), g), sums);
    }
}

impl<const FACTORED: bool, const DECAY: bool> Rule for Adafactor<FACTORED, DECAY> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = if FACTORED { &["row_var", "col_var"] } else { &["variance"] };
    const WRITTEN_SLOTS: usize = if FACTORED { 0 } else { 1 };
    type Coeffs<R: Real> = AdafactorCoeffs<R>;
    const SUMS: usize = 3;
    const SUM_PASS: [usize; MAX_SUMS] = if FACTORED { [0; MAX_SUMS] } else { [1; MAX_SUMS] };
    const FACTORED: bool = FACTORED;

    /// `scalars[0]` is the parameter's `step`, incremented here.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdafactorCoeffs<R> {
        let (t, w) = self.weight(scalars);
        scalars[0] = t;
        let root_n = sums[COUNT].sqrt();
        let alpha = self.eps2.max(sums[PP].sqrt() / root_n) * self.lr.min(1.0 / t.sqrt());
        let denom = (sums[UU].sqrt() / (root_n * self.d)).max(1.0);
        AdafactorCoeffs {
            lerp: Lerp::new(w),
            floor: R::from_f64(self.floor()),
            decay: R::from_f64(1.0 - self.lr * self.weight_decay),
            neg_step: R::from_f64(-alpha / denom),
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdafactorCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let estimate = Self::estimate(&c.lerp, g, s);
        if !FACTORED {
            s[0] = estimate;
        }
        let p = if DECAY { p * c.decay } else { p };
        p + c.neg_step * Self::direction(c.floor, estimate, g)
    }

    /// FACTORED: `[Σp², ΣU², numel]` (the factors are already new).
    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if FACTORED {
            Self::count(R::from_f64(self.floor()), &Lerp::new(0.0), p, g, s, sums);
        }
    }

    /// Not FACTORED: the weight of new data, and eps1².
    fn prepare(&self, _pass: usize, scalars: &[f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> [f64; MAX_SUMS] {
        [self.weight(scalars).1, self.floor(), 0.0, 0.0, 0.0, 0.0]
    }

    /// Not FACTORED: `[Σp², ΣU², numel]` with the new variance.
    #[inline(always)]
    fn accumulate_after<R: Real>(&self, _pass: usize, prior: &[R; MAX_SUMS], p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        Self::count(prior[1], &Lerp::new(prior[0].to_f64()), p, g, s, sums);
    }

    #[inline(always)]
    fn factor_term<R: Real>(&self, g: R) -> f64 {
        let g = g.to_f64();
        g * g
    }

    /// `R ← lerp(R, ‖row‖²/cols, w)`, `C ← lerp(C, ‖column‖²/rows, w)`: the norm rounded to the
    /// compute type, then squared and divided there, as torch's `vector_norm(...).square_().div_(n)`.
    fn update_factors<R: Real>(
        &self,
        scalars: &[f64; MAX_SCALARS],
        n_rows: usize,
        n_cols: usize,
        row_sums: &[f64],
        col_sums: &[f64],
        rows: &mut [R],
        cols: &mut [R],
    ) {
        let lerp = Lerp::<R>::new(self.weight(scalars).1);
        // a row's mean is over the columns, a column's over the rows
        for (stats, factors, n) in [(row_sums, rows, n_cols), (col_sums, cols, n_rows)] {
            let n = R::from_f64(n as f64);
            for (f, &sum) in factors.iter_mut().zip(stats) {
                let norm = R::from_f64(sum.sqrt());
                *f = lerp.apply(*f, norm * norm / n);
            }
        }
    }

    /// Rows read sqrt(R), columns sqrt(C / max(mean of R over the matrix's rows, eps1)).
    fn factor_reads<R: Real>(&self, _n_rows: usize, n_cols: usize, row_means: &[f64], rows: &mut [R], cols: &mut [R]) {
        for (c, &mean) in cols.chunks_mut(n_cols.max(1)).zip(row_means) {
            let divisor = R::from_f64(mean).max_nan(R::from_f64(self.eps1));
            c.iter_mut().for_each(|x| *x = (*x / divisor).sqrt());
        }
        rows.iter_mut().for_each(|x| *x = x.sqrt());
    }
}

/// Build Adafactor from `lr, beta2_decay, eps1, eps2, d, weight_decay` and the flag `factored`
/// (the group's tensors have two or more dimensions).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let beta2_decay = h.num("beta2_decay")?;
    if beta2_decay.is_nan() || beta2_decay > 0.0 {
        return Err(Error::Value(format!("beta2_decay must be <= 0, got {beta2_decay}")));
    }
    let eps1 = check_non_negative("eps1", h.num("eps1")?)?;
    let eps2 = check_non_negative("eps2", h.num("eps2")?)?;
    let d = h.num("d")?;
    if d.is_nan() || d < 1.0 {
        return Err(Error::Value(format!("d must be >= 1, got {d}")));
    }
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    Ok(bool_dispatch!(h.flag("factored")? => F, weight_decay > 0.0 => D;
        v.visit(Adafactor::<F, D> { lr, beta2_decay, eps1, eps2, d, weight_decay })))
}
