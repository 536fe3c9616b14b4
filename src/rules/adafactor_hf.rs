//! Adafactor as Hugging Face transformers' `Adafactor` (spec §18.B): ε1 added to g², relative
//! step sizes, optional first moment.
//!
//! ```text
//! t ← t + 1 ; RMS ← RMS(p) (scalar state, the weights before the step)
//! ρ = min(warmup_init ? 1e-6·t : 1e-2, 1/sqrt(t)) if relative_step else lr
//! α = max(eps2, RMS)·ρ if scale_parameter else ρ ; b = 1 − t^decay_rate ; q = g² + eps1
//! FACTORED (2+ dims, per matrix of the last two; R per row, C per column):
//!     R ← b·R + (1 − b)·(mean over the row of q) ; C ← b·C + (1 − b)·(mean over the column of q)
//!     U = g · rsqrt(R / mean of R over the rows) · rsqrt(C)
//! else: v ← b·v + (1 − b)·q ; U = g · rsqrt(v)
//! u = α / max(1, RMS(U)/clip_threshold) · U
//! FIRST_MOMENT: m ← beta1·m + (1 − beta1)·u ; u = m
//! p ← p·(1 − wd·α) − u
//! ```
//! The factors are the engine's factored state ([`Rule::FACTORED`]): the driver sums q over every
//! row and column, and the elements read their row's rsqrt(R/mean R) and their column's
//! rsqrt(C). Sums `[Σp², ΣU², numel]`: in pass 0 when factored (the factors are updated before
//! it), else in pass 1 (U reads the new v, whose weights `prepare` gives).
//! State slots: `exp_avg` (FIRST_MOMENT), then `exp_avg_sq_row`, `exp_avg_sq_col` (FACTORED) or
//! `exp_avg_sq`; scalar state `step` and `RMS`.

use super::adafactor::{count_element, COUNT, PP, UU};
use super::{
    bool_dispatch, check_non_negative, check_unit_interval, rule_params, FactorDims, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS,
    MAX_SUMS,
};
use crate::error::{Error, Result};
use crate::real::Real;

/// The `adafactor_hf` rule.
pub const INFO: RuleInfo = RuleInfo {
    name: "adafactor_hf",
    summary: "Adafactor as Hugging Face transformers' Adafactor: ε1 added to g², relative step sizes, optional first moment",
    numbers: &["lr", "eps1", "eps2", "clip_threshold", "decay_rate", "beta1", "weight_decay", "relative_step", "scale_parameter", "warmup_init"],
    flags: &["factored", "first_moment"],
    optional_flags: &["factored"],
    scalars: &["step", "RMS"],
    input: Input::Gradient,
    nonnegative_slots: &["exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"],
};

rule_params! {
    /// The hyper-parameters of HF's Adafactor; `FACTORED`: the tensors have two or more
    /// dimensions, `FIRST_MOMENT`: beta1 is given (state `exp_avg`), `DECAY`: wd > 0.
    pub struct AdafactorHf<const FACTORED: bool, const FIRST_MOMENT: bool, const DECAY: bool> {
        /// The step size ρ without relative steps.
        lr: f64,
        /// Added to g² before it is averaged.
        eps1: f64,
        /// The floor of RMS(p) in the step size.
        eps2: f64,
        /// The update clipping threshold on RMS(U).
        clip_threshold: f64,
        /// The exponent of the step in the weight of new data, `1 − b = t^decay_rate`.
        decay_rate: f64,
        beta1: f64,
        weight_decay: f64,
        /// 1: ρ = min(1e-2, 1/sqrt(t)) (or min(1e-6·t, ...) with warmup_init), ignoring lr; 0: ρ = lr.
        relative_step: f64,
        /// 1: α = max(eps2, RMS(p))·ρ; 0: α = ρ.
        scale_parameter: f64,
        /// 1: the relative step's cap grows as 1e-6·t.
        warmup_init: f64,
    }
}

/// Per-tensor coefficients of HF's Adafactor.
#[derive(Copy, Clone, Debug)]
pub struct AdafactorHfCoeffs<R: Real> {
    /// The weights of the old second moment and of q (not FACTORED).
    keep: R,
    take: R,
    eps1: R,
    /// α / max(1, RMS(U)/clip_threshold).
    step: R,
    beta1: R,
    one_minus_beta1: R,
    /// 1 − wd·α.
    decay: R,
}

impl<const FACTORED: bool, const FIRST_MOMENT: bool, const DECAY: bool> AdafactorHf<FACTORED, FIRST_MOMENT, DECAY> {
    /// The second moment's slot: after `exp_avg` (not FACTORED).
    const V: usize = FIRST_MOMENT as usize;

    /// The weight `b` of the old second moment at the step after `step` (HF's `beta2t`).
    fn keep(&self, step: f64) -> f64 {
        1.0 - (step + 1.0).powf(self.decay_rate)
    }

    /// The element's U: g times its row's and column's reads (FACTORED), else g·rsqrt of the new
    /// variance `b·v + (1 − b)·(g² + eps1)`, which it returns too.
    #[inline(always)]
    fn direction<R: Real>(keep: R, take: R, eps1: R, g: R, s: &[R; MAX_SLOTS]) -> (R, R) {
        if FACTORED {
            let f = FIRST_MOMENT as usize;
            (s[f] * s[f + 1] * g, R::ZERO)
        } else {
            let v = s[Self::V] * keep + take * (g * g + eps1);
            (R::ONE / v.sqrt() * g, v)
        }
    }

    #[inline(always)]
    fn count<R: Real>(keep: R, take: R, eps1: R, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        count_element(p, Self::direction(keep, take, eps1, g, s).0, sums);
    }
}

impl<const FACTORED: bool, const FIRST_MOMENT: bool, const DECAY: bool> Rule for AdafactorHf<FACTORED, FIRST_MOMENT, DECAY> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = match (FIRST_MOMENT, FACTORED) {
        (true, true) => &["exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"],
        (false, true) => &["exp_avg_sq_row", "exp_avg_sq_col"],
        (true, false) => &["exp_avg", "exp_avg_sq"],
        (false, false) => &["exp_avg_sq"],
    };
    const WRITTEN_SLOTS: usize = if FACTORED { FIRST_MOMENT as usize } else { Self::SLOT_NAMES.len() };
    type Coeffs<R: Real> = AdafactorHfCoeffs<R>;
    const SUMS: usize = 3;
    const SUM_PASS: [usize; MAX_SUMS] = if FACTORED { [0; MAX_SUMS] } else { [1; MAX_SUMS] };
    const FACTORED: bool = FACTORED;
    const FACTOR_DIMS: FactorDims = FactorDims::Dropped;

    /// `scalars`: the parameter's `step` (incremented here) and `RMS` (set to RMS(p)).
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> AdafactorHfCoeffs<R> {
        let keep = self.keep(scalars[0]);
        let t = scalars[0] + 1.0;
        let root_n = sums[COUNT].sqrt();
        // (an empty tensor's RMS is 0, not 0/0)
        let rms = if sums[COUNT] > 0.0 { sums[PP].sqrt() / root_n } else { 0.0 };
        (scalars[0], scalars[1]) = (t, rms);
        let rho = if self.relative_step != 0.0 {
            let cap = if self.warmup_init != 0.0 { 1e-6 * t } else { 1e-2 };
            cap.min(1.0 / t.sqrt())
        } else {
            self.lr
        };
        let alpha = if self.scale_parameter != 0.0 { self.eps2.max(rms) * rho } else { rho };
        let clip = (sums[UU].sqrt() / root_n / self.clip_threshold).max(1.0);
        AdafactorHfCoeffs {
            keep: R::from_f64(keep),
            take: R::from_f64(1.0 - keep),
            eps1: R::from_f64(self.eps1),
            step: R::from_f64(alpha / clip),
            beta1: R::from_f64(self.beta1),
            one_minus_beta1: R::from_f64(1.0 - self.beta1),
            decay: R::from_f64(1.0 - self.weight_decay * alpha),
        }
    }

    #[inline(always)]
    fn update<R: Real>(c: &AdafactorHfCoeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let (u, v) = Self::direction(c.keep, c.take, c.eps1, g, s);
        if !FACTORED {
            s[Self::V] = v;
        }
        let mut u = c.step * u;
        if FIRST_MOMENT {
            s[0] = s[0] * c.beta1 + c.one_minus_beta1 * u;
            u = s[0];
        }
        let p = if DECAY { p * c.decay } else { p };
        p - u
    }

    /// FACTORED: `[Σp², ΣU², numel]` (the factors are already new).
    #[inline(always)]
    fn accumulate<R: Real>(&self, p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        if FACTORED {
            Self::count(R::ZERO, R::ZERO, R::ZERO, p, g, s, sums);
        }
    }

    /// Not FACTORED: the weights of the old second moment and of q, and eps1.
    fn prepare(&self, _pass: usize, scalars: &[f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> [f64; MAX_SUMS] {
        let keep = self.keep(scalars[0]);
        [keep, 1.0 - keep, self.eps1, 0.0, 0.0, 0.0]
    }

    /// Not FACTORED: `[Σp², ΣU², numel]` with the new variance.
    #[inline(always)]
    fn accumulate_after<R: Real>(&self, _pass: usize, prior: &[R; MAX_SUMS], p: R, g: R, s: &[R; MAX_SLOTS], sums: &mut [f64; MAX_SUMS]) {
        Self::count(prior[0], prior[1], prior[2], p, g, s, sums);
    }

    #[inline(always)]
    fn factor_term<R: Real>(&self, g: R) -> f64 {
        // q = g² + eps1 in the compute type, as HF's `grad**2 + eps[0]`
        (g * g + R::from_f64(self.eps1)).to_f64()
    }

    /// `R ← b·R + (1 − b)·(Σ_row q)/cols`, `C ← b·C + (1 − b)·(Σ_column q)/rows`, the means
    /// rounded to the compute type (HF's `mul_(b).add_(q.mean(...), alpha=1 − b)`).
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
        let keep = self.keep(scalars[0]);
        let (b, one_minus_b) = (R::from_f64(keep), R::from_f64(1.0 - keep));
        // a row's mean is over the columns, a column's over the rows
        for (stats, factors, n) in [(row_sums, rows, n_cols), (col_sums, cols, n_rows)] {
            for (f, &sum) in factors.iter_mut().zip(stats) {
                *f = *f * b + one_minus_b * R::from_f64(sum / n as f64);
            }
        }
    }

    /// Rows read rsqrt(R / mean of R over the matrix's rows), columns rsqrt(C).
    fn factor_reads<R: Real>(&self, n_rows: usize, _n_cols: usize, row_means: &[f64], rows: &mut [R], cols: &mut [R]) {
        for (r, &mean) in rows.chunks_mut(n_rows.max(1)).zip(row_means) {
            let mean = R::from_f64(mean);
            r.iter_mut().for_each(|x| *x = R::ONE / (*x / mean).sqrt());
        }
        cols.iter_mut().for_each(|x| *x = R::ONE / x.sqrt());
    }
}

/// Build HF's Adafactor from its numbers and the flags `factored` (the group's tensors have two
/// or more dimensions) and `first_moment` (beta1 is given).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let switch = |name: &str| -> Result<f64> {
        let x = h.num(name)?;
        if x == 0.0 || x == 1.0 {
            Ok(x)
        } else {
            Err(Error::Value(format!("{name} must be 0 or 1 (a switch), got {x}")))
        }
    };
    // (transformers checks no ranges; the Python class refuses the same numbers as here)
    let (relative_step, scale_parameter, warmup_init) = (switch("relative_step")?, switch("scale_parameter")?, switch("warmup_init")?);
    let lr = check_non_negative("lr", h.num("lr")?)?;
    let (eps1, eps2) = (check_non_negative("eps1", h.num("eps1")?)?, check_non_negative("eps2", h.num("eps2")?)?);
    let clip_threshold = h.num("clip_threshold")?;
    if clip_threshold.is_nan() || clip_threshold <= 0.0 {
        return Err(Error::Value(format!("clip_threshold must be > 0, got {clip_threshold}")));
    }
    let decay_rate = h.num("decay_rate")?;
    if decay_rate.is_nan() || decay_rate > 0.0 {
        return Err(Error::Value(format!("decay_rate must be <= 0, got {decay_rate}")));
    }
    let beta1 = check_unit_interval("beta1", h.num("beta1")?)?;
    let weight_decay = check_non_negative("weight_decay", h.num("weight_decay")?)?;
    Ok(bool_dispatch!(h.flag("factored")? => F, h.flag("first_moment")? => M, weight_decay > 0.0 => D;
        v.visit(AdafactorHf::<F, M, D> { lr, eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay, relative_step, scale_parameter, warmup_init })))
}
