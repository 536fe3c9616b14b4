//! Update rules: one file per rule, each a host-side coefficient function plus the per-element
//! math, and the rule's description ([`RuleInfo`]). Rules never loop over tensors and never know
//! which backend runs them.

pub mod adabelief;
pub mod adabound;
pub mod adafactor;
pub mod adafactor_hf;
pub mod adahessian;
pub mod adam;
pub mod adamod;
pub mod adamomentum;
pub mod adamp;
pub mod adan;
pub mod ademamix;
pub mod axpby;
pub mod bema;
pub mod diffgrad;
pub mod ema;
mod hyper;
mod info;
pub mod lion;
pub mod momo;
pub mod orthograd;
pub mod sgd;
pub mod sgd_sai;
pub mod slerp;
pub mod spam;
pub mod stable_spam;
pub mod swap;

pub use hyper::{Hyper, HyperValue, RuleHyper};
pub use info::{Input, RuleInfo, ENGINE_NUMBERS, ENGINE_OPTIONS};

use crate::error::{Error, Result};
use crate::real::Real;

/// The most state tensors per parameter any rule keeps.
pub const MAX_SLOTS: usize = 4;
/// The most scalar state entries per parameter any rule keeps.
pub const MAX_SCALARS: usize = 4;
/// The most per-tensor sums any rule gathers before its update.
pub const MAX_SUMS: usize = 6;

/// One const generic argument of a rule type (a flag, or a count such as `ema_multi`'s tracks).
/// Backends instantiate their twin of the rule with the same arguments, in the same order.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConstArg {
    Bool(bool),
    Usize(usize),
}

impl From<bool> for ConstArg {
    fn from(b: bool) -> ConstArg {
        ConstArg::Bool(b)
    }
}

impl From<usize> for ConstArg {
    fn from(n: usize) -> ConstArg {
        ConstArg::Usize(n)
    }
}

impl std::fmt::Display for ConstArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConstArg::Bool(b) => write!(f, "{b}"),
            ConstArg::Usize(n) => write!(f, "{n}"),
        }
    }
}

/// A rule type's numeric parameters and const generic arguments, as backends pass them to their
/// twin of the rule. Implemented by [`rule_params!`], which declares the type, so the names, the
/// values and their order cannot drift apart.
pub trait Params {
    /// Names of the `f64` parameters, in declaration order.
    const PARAM_NAMES: &'static [&'static str];
    /// The parameters' values, in the order of [`Params::PARAM_NAMES`].
    fn param_words(&self) -> Vec<f64>;
    /// The type's const generic arguments, in declaration order.
    fn const_args() -> Vec<ConstArg>;
    /// The C++ type of the type's CUDA twin, given the name of the rule's template in its header
    /// (`Adam`): the template with [`Params::const_args`], e.g. `Adam<true, false, true>`.
    fn twin_type(template: &str) -> String {
        let args: Vec<String> = Self::const_args().iter().map(|a| a.to_string()).collect();
        if args.is_empty() {
            template.to_string()
        } else {
            format!("{template}<{}>", args.join(", "))
        }
    }
}

/// Declare a rule type: a struct of `f64` parameters, optionally with const generic flags, and
/// its [`Params`] implementation.
///
/// ```text
/// rule_params! {
///     /// Docs.
///     pub struct Sgd<const MOMENTUM: bool, const NESTEROV: bool> { lr: f64, momentum: f64 }
/// }
/// ```
macro_rules! rule_params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident $(<$(const $g:ident: $gt:ty),+>)? {
            $($(#[$fmeta:meta])* $fvis:vis $field:ident: f64),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        $vis struct $name $(<$(const $g: $gt),+>)? {
            $($(#[$fmeta])* $fvis $field: f64),*
        }

        impl $(<$(const $g: $gt),+>)? $crate::rules::Params for $name $(<$($g),+>)? {
            const PARAM_NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
            fn param_words(&self) -> Vec<f64> {
                vec![$(self.$field),*]
            }
            fn const_args() -> Vec<$crate::rules::ConstArg> {
                vec![$($($crate::rules::ConstArg::from($g)),+)?]
            }
        }
    };
}
pub(crate) use rule_params;

/// An element-wise update rule over one written tensor `p` (a parameter, or an average), one
/// read-only input `g` (its gradient, or the model weights being averaged) and `SLOTS` state
/// tensors of the same shape.
///
/// For every tensor the driver
/// 1. reads the per-parameter scalar state (`SCALARS` 0-dim tensors, e.g. torch's `step`),
/// 2. if `SUMS > 0`, runs a read-only pass calling [`Rule::accumulate`] on every element,
/// 3. calls [`Rule::coeffs`] once on the host (bias corrections and the like, in f64, rounded
///    to the compute type once) which may update the scalars, and writes the scalars back,
/// 4. calls [`Rule::update`] once per element with the parameter, the input (already unscaled
///    and negated for `maximize`) and the state values.
///
/// Flags are const generics of the implementing type, so the per-element code has no run-time
/// branches on them. `SLOTS`, `SCALARS` and `READS_INPUT` follow from `SLOT_NAMES` and `INFO`:
/// implementations do not set them (the registry's tests check that none does).
pub trait Rule: Params + Send + Sync + 'static {
    /// The registry entry this type is built for.
    const INFO: &'static RuleInfo;
    /// Names of the state tensors per parameter, in slot order (the keys of the parameter's
    /// state dict, e.g. torch's `exp_avg`, `exp_avg_sq`); slots `0..SLOTS` of the state array
    /// are live.
    const SLOT_NAMES: &'static [&'static str];
    /// State tensors per parameter.
    const SLOTS: usize = Self::SLOT_NAMES.len();
    /// State slots the rule writes: slots `WRITTEN_SLOTS..SLOTS` are only read, and the drivers
    /// do not store them back (no write traffic, e.g. BEMA's anchor between resets).
    const WRITTEN_SLOTS: usize = Self::SLOTS;
    /// Scalar state entries per parameter (`scalars[0..SCALARS]` are live in `coeffs`).
    const SCALARS: usize = Self::INFO.scalars.len();
    /// Per-tensor sums gathered before the update (`sums[0..SUMS]`).
    const SUMS: usize = 0;
    /// The read-only pass that gathers each sum: `SUM_PASS[k]` for sum `k`, non-decreasing (0
    /// for every sum of a one-pass rule). A later pass reads values its rule derives from the
    /// sums of the passes before it ([`Rule::prepare`]): a reduction that depends on another,
    /// e.g. Stable-SPAM's norm of the gradient clipped at a threshold set by its largest element.
    const SUM_PASS: [usize; MAX_SUMS] = [0; MAX_SUMS];
    /// Bit `k`: sum `k` is a maximum of non-negative values, combined with `max` instead of
    /// added (the same value for any order, as the sums' fixed order makes theirs).
    const MAX_SUMS_MASK: u32 = 0;
    /// Read-only passes run before the update: 0 without sums. A pass that gathers none of the
    /// sums is skipped (e.g. pass 0 of a rule whose only sums read [`Rule::prepare`]'s values).
    const SUM_PASSES: usize = if Self::SUMS == 0 { 0 } else { Self::SUM_PASS[Self::SUMS - 1] + 1 };
    /// Whether the sums passes read the state values (false: they see zeros there), from pass
    /// `STATE_SUM_PASS` on.
    const SUMS_READ_STATE: bool = true;
    /// The first sums pass that reads the state values (when `SUMS_READ_STATE`).
    const STATE_SUM_PASS: usize = 0;
    /// Whether the sums passes read the parameter (false: they see zero there).
    const SUMS_READ_PARAM: bool = true;
    /// Whether the rule reads the input tensor `g` (false: callers pass none, `g` is 0).
    const READS_INPUT: bool = !matches!(Self::INFO.input, Input::None);
    /// Whether the input is a gradient ([`Input::Gradient`]): of the parameter's dtype, and what
    /// `orthograd` projects.
    const READS_GRADIENT: bool = matches!(Self::INFO.input, Input::Gradient);
    /// Per-tensor coefficients in the compute type.
    type Coeffs<R: Real>: Copy + Send + Sync;
    /// Coefficients for one tensor, given its scalar state (which it may update, e.g. increment
    /// a step counter) and its sums.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> Self::Coeffs<R>;
    /// New parameter value; updates the state values in place.
    fn update<R: Real>(c: &Self::Coeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R;
    /// Add one element's contribution to the tensor's sums of pass 0 (only called when
    /// `SUMS > 0`).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, _g: R, _s: &[R; MAX_SLOTS], _sums: &mut [f64; MAX_SUMS]) {}
    /// The per-tensor values pass `pass` (>= 1) reads, from the tensor's scalar state before the
    /// step (read only: [`Rule::coeffs`] updates it) and the sums of the earlier passes (it must
    /// not read the others). Runs on the host once per tensor (CUDA: once per block).
    fn prepare(&self, _pass: usize, _scalars: &[f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> [f64; MAX_SUMS] {
        [0.0; MAX_SUMS]
    }
    /// Add one element's contribution to the sums of pass `pass` >= 1, given the values
    /// [`Rule::prepare`] returned for the tensor (in the compute type).
    #[inline(always)]
    fn accumulate_after<R: Real>(&self, _pass: usize, _prior: &[R; MAX_SUMS], _p: R, _g: R, _s: &[R; MAX_SLOTS], _sums: &mut [f64; MAX_SUMS]) {}
    /// Whether the sums are gathered per row: over each row (dim-0 slice) of every tensor of two
    /// or more dimensions, folded into the tensor's sums by [`Rule::fold_row`], and the update
    /// reads each row's own coefficients ([`Rule::row_coeffs`]); e.g. AdamP's per-channel
    /// cosines. Tensors of fewer dimensions gather no sums (their sums stay as given, zeros). Such
    /// a rule gathers all its sums in one pass.
    const ROW_SUMS: bool = false;
    /// Fold the sums of one row of `len` elements into its tensor's sums (rows in order).
    fn fold_row(&self, _row: &[f64; MAX_SUMS], _len: usize, _tensor: &mut [f64; MAX_SUMS]) {}
    /// The coefficients of one row, from its tensor's coefficients and sums (all rows folded) and
    /// the row's sums.
    fn row_coeffs<R: Real>(&self, c: &Self::Coeffs<R>, _tensor: &[f64; MAX_SUMS], _row: &[f64; MAX_SUMS]) -> Self::Coeffs<R> {
        *c
    }
    /// Whether the rule keeps factored state (Adafactor's second moment). Every tensor it updates
    /// has two or more dimensions and is seen as a stack of matrices: its last two dimensions, the
    /// leading ones indexing the matrices. Its last two slots (from [`Rule::FACTOR_SLOT`]) are not
    /// shaped like it: the first holds one value per row of each matrix, the second one per
    /// column (shaped as [`Rule::FACTOR_DIMS`] says); slots
    /// before them are shaped like the parameter, as any rule's. Before the sums passes of the
    /// tensor, the driver adds [`Rule::factor_term`] over every row and every column,
    /// [`Rule::update_factors`] rewrites both factor slots from these sums (on the host, once per
    /// tensor), and [`Rule::factor_reads`] turns the stored factors into what each element then
    /// reads in their place (its row's value, its column's) in the sums passes and the update;
    /// the drivers write the factor slots back from nothing else.
    const FACTORED: bool = false;
    /// How a rule with factored state shapes its factors.
    const FACTOR_DIMS: FactorDims = FactorDims::Kept;
    /// The first factor slot of a rule with factored state (its row values; the column values
    /// follow): the last two slots, after the written ones.
    const FACTOR_SLOT: usize = Self::SLOTS.saturating_sub(2);
    /// One element's contribution to the sums of its row and of its column.
    #[inline(always)]
    fn factor_term<R: Real>(&self, _g: R) -> f64 {
        0.0
    }
    /// Update one tensor's factors in place, its matrices' one after another: `rows` (slot 0, a
    /// value per row) and `cols` (slot 1, `n_cols` per matrix) from the sums of
    /// [`Rule::factor_term`] over each row and each column, given its scalar state before the step.
    /// `n_rows`: the rows of each whole matrix, which a column's sum runs over (a shard of a
    /// tensor whose rows are split across ranks holds fewer; its column sums are the totals).
    #[allow(clippy::too_many_arguments)]
    fn update_factors<R: Real>(
        &self,
        _scalars: &[f64; MAX_SCALARS],
        _n_rows: usize,
        _n_cols: usize,
        _row_sums: &[f64],
        _col_sums: &[f64],
        _rows: &mut [R],
        _cols: &mut [R],
    ) {
    }
    /// What the elements of one tensor's matrices read, in place of its stored factors (laid out
    /// as [`Rule::update_factors`]'): `rows` (`n_rows` per matrix) becomes each row's `s[0]`,
    /// `cols` (`n_cols` per matrix) each column's `s[1]`; `row_means[m]` is the mean of matrix
    /// `m`'s row factors as stored, over all its rows (a shard's included).
    fn factor_reads<R: Real>(&self, _n_rows: usize, _n_cols: usize, _row_means: &[f64], _rows: &mut [R], _cols: &mut [R]) {}
}

/// Fold `part` (a pass's partial sums) into `total`: added, or for the sums in `max_mask`, the
/// larger kept (`ef_combine_sums` in multi_tensor.cuh).
#[inline(always)]
pub fn combine_sums(total: &mut [f64; MAX_SUMS], part: &[f64; MAX_SUMS], max_mask: u32) {
    for (k, (t, &x)) in total.iter_mut().zip(part).enumerate() {
        if max_mask >> k & 1 == 1 {
            if x > *t || x.is_nan() {
                *t = x;
            }
        } else {
            *t += x;
        }
    }
}

/// Receives a concrete rule type; lets backends turn a rule name plus flags into monomorphised
/// code without the registry knowing any backend.
pub trait RuleVisitor {
    type Output;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output;
}

/// The registry: each rule's description and the function that builds it, listed once.
macro_rules! registry {
    ($($info:path => $visit:path),* $(,)?) => {
        /// Every registered rule, in registry order.
        const RULES: &[&RuleInfo] = &[$(&$info),*];

        /// Build the rule `info` from `h` and hand it to `visitor`.
        fn dispatch<V: RuleVisitor>(info: &'static RuleInfo, h: &RuleHyper<'_>, visitor: V) -> Result<V::Output> {
            $(if info.name == $info.name {
                return $visit(h, visitor);
            })*
            Err(Error::Internal(format!("rule '{}' is described but not registered", info.name)))
        }
    };
}

registry! {
    // torch.optim
    adam::INFO => adam::visit,
    sgd::INFO => sgd::visit,
    // the EMA optimizer family (spec optimizers.md)
    adan::INFO => adan::visit,
    spam::INFO => spam::visit,
    stable_spam::INFO => stable_spam::visit,
    diffgrad::INFO => diffgrad::visit,
    adabound::INFO => adabound::visit,
    sgd_sai::INFO => sgd_sai::visit,
    ademamix::INFO => ademamix::visit,
    adabelief::INFO => adabelief::visit,
    adamomentum::INFO => adamomentum::visit,
    lion::INFO => lion::visit,
    adamod::INFO => adamod::visit,
    momo::INFO => momo::visit,
    momo::ADAM_INFO => momo::visit_adam,
    adahessian::INFO => adahessian::visit,
    adamp::INFO => adamp::visit,
    adafactor::INFO => adafactor::visit,
    adafactor_hf::INFO => adafactor_hf::visit,
    // weight averaging (spec averaging.md D.1)
    ema::INFO => ema::visit,
    ema::MULTI_INFO => ema::visit_multi,
    bema::INFO => bema::visit,
    swap::INFO => swap::visit,
    axpby::INFO => axpby::visit,
    slerp::INFO => slerp::visit,
}

/// Every registered rule's description, in registry order.
pub fn all() -> impl Iterator<Item = &'static RuleInfo> {
    RULES.iter().copied()
}

/// The description of the rule called `name`.
pub fn info(name: &str) -> Result<&'static RuleInfo> {
    all().find(|i| i.name == name).ok_or_else(|| {
        let known: Vec<&str> = all().map(|i| i.name).collect();
        Error::Value(format!("unknown update rule '{name}' (known: {})", known.join(", ")))
    })
}

/// Build the rule called `name` from `hyper` and hand it to `visitor`. `hyper` is checked
/// against the rule's [`RuleInfo`] first. With the engine option `orthograd` the rule is wrapped
/// in [`orthograd::OrthoGrad`] (`orthograd_rescale` selects its rescaling).
pub fn visit_rule<V: RuleVisitor>(name: &str, hyper: &Hyper, visitor: V) -> Result<V::Output> {
    if hyper.option("orthograd")? {
        return visit_base_rule(name, hyper, orthograd::Wrap { visitor, rescale: hyper.option("orthograd_rescale")? })?;
    }
    visit_base_rule(name, hyper, visitor)
}

/// As [`visit_rule`], but the rule is never wrapped: for a driver that applies `orthograd`'s
/// projection itself (the CPU's, which so compiles no kernel per wrapped rule type).
pub fn visit_base_rule<V: RuleVisitor>(name: &str, hyper: &Hyper, visitor: V) -> Result<V::Output> {
    let info = info(name)?;
    hyper.check(info)?;
    dispatch(info, &RuleHyper::new(hyper, info), visitor)
}

/// The state slot names of the rule called `name` built from `hyper`.
pub fn slot_names(name: &str, hyper: &Hyper) -> Result<&'static [&'static str]> {
    struct SlotNames;
    impl RuleVisitor for SlotNames {
        type Output = &'static [&'static str];
        fn visit<Ru: Rule>(self, _rule: Ru) -> Self::Output {
            Ru::SLOT_NAMES
        }
    }
    visit_rule(name, hyper, SlotNames)
}

/// The shapes of the two factors of a rule with factored state ([`Rule::FACTORED`]), for a
/// parameter of shape `[..., rows, cols]`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FactorDims {
    /// `[..., rows, 1]` and `[..., 1, cols]` (torch's Adafactor).
    Kept,
    /// `[..., rows]` and `[..., cols]` (transformers').
    Dropped,
}

/// How the rule called `name` built from `hyper` shapes its factors, if it keeps factored state
/// ([`Rule::FACTORED`]).
pub fn factored(name: &str, hyper: &Hyper) -> Result<Option<FactorDims>> {
    struct Factored;
    impl RuleVisitor for Factored {
        type Output = Option<FactorDims>;
        fn visit<Ru: Rule>(self, _rule: Ru) -> Self::Output {
            Ru::FACTORED.then_some(Ru::FACTOR_DIMS)
        }
    }
    visit_rule(name, hyper, Factored)
}

/// The per-tensor sums the rule called `name` built from `hyper` reads (none for an element-wise
/// rule): for each, the pass that gathers it and whether it is a maximum (else a sum).
pub fn sum_kinds(name: &str, hyper: &Hyper) -> Result<Vec<(usize, bool)>> {
    struct SumKinds;
    impl RuleVisitor for SumKinds {
        type Output = Vec<(usize, bool)>;
        fn visit<Ru: Rule>(self, _rule: Ru) -> Self::Output {
            (0..Ru::SUMS).map(|k| (Ru::SUM_PASS[k], Ru::MAX_SUMS_MASK >> k & 1 == 1)).collect()
        }
    }
    visit_rule(name, hyper, SumKinds)
}

/// Python's repr of a list of names: `['exp_avg', 'exp_avg_sq']`.
fn py_list<S: AsRef<str>>(names: &[S]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{}'", n.as_ref())).collect();
    format!("[{}]", quoted.join(", "))
}

/// Refuse a parameter group whose state names (as Python passed them, in order) or inputs do not
/// match the rule `Ru` built from `hyper`. `narrow_input`: the inputs' dtype is narrower than the
/// parameters' (bf16/fp16 for fp32), which only [`Input::Weights`] allows. Every backend calls
/// this before it plans a step.
pub fn check_state<Ru: Rule>(hyper: &Hyper, group: usize, slots: &[String], scalars: &[String], has_input: bool, narrow_input: bool) -> Result<()> {
    let info = Ru::INFO;
    let rule = match hyper.flags_text(info) {
        flags if flags.is_empty() => format!("rule '{}'", info.name),
        flags => format!("rule '{}' ({flags})", info.name),
    };
    if slots.len() != Ru::SLOTS || slots.iter().zip(Ru::SLOT_NAMES).any(|(a, b)| a != b) {
        return Err(Error::Value(format!("param group {group}: {rule} keeps state {}, got {}", py_list(Ru::SLOT_NAMES), py_list(slots))));
    }
    if scalars.len() != info.scalars.len() || scalars.iter().zip(info.scalars).any(|(a, b)| a != b) {
        return Err(Error::Value(format!("param group {group}: {rule} keeps scalar state {}, got {}", py_list(info.scalars), py_list(scalars))));
    }
    if Ru::READS_INPUT && !has_input {
        return Err(Error::Value(format!("param group {group}: {rule} reads an input (gradient) for every parameter; none given")));
    }
    if narrow_input && Ru::READS_GRADIENT {
        return Err(Error::DType(format!(
            "param group {group}: {rule} reads gradients, which must have their parameter's dtype; got gradients of a narrower \
             dtype than the parameters"
        )));
    }
    Ok(())
}

/// Expand run-time booleans into `const` items usable as const generic arguments:
/// `bool_dispatch!(a => A, b => B; expr)` evaluates `expr` with `A` and `B` bound to the values.
macro_rules! bool_dispatch {
    (; $body:expr) => { $body };
    ($first:expr => $A:ident $(, $rest:expr => $R:ident)*; $body:expr) => {
        if $first {
            const $A: bool = true;
            $crate::rules::bool_dispatch!($($rest => $R),*; $body)
        } else {
            const $A: bool = false;
            $crate::rules::bool_dispatch!($($rest => $R),*; $body)
        }
    };
}
pub(crate) use bool_dispatch;

/// Advance the per-parameter step counter kept in `scalars[0]` and return the Adam-style bias
/// corrections of the new step `t`: `(1 − β1^t, 1 − β2^t)` (`ef_next_step` in common.cuh).
pub(crate) fn next_step(scalars: &mut [f64; MAX_SCALARS], beta1: f64, beta2: f64) -> (f64, f64) {
    scalars[0] += 1.0;
    let t = scalars[0];
    (1.0 - beta1.powf(t), 1.0 - beta2.powf(t))
}

/// Count one element into the Cautious optimizers' sums `[Σφ, numel]` (spec §20, the first two of
/// `sums`, e.g. `&mut sums[3..]` after a rule's own): `φ = 1[u·g > 0]` for the update direction
/// `u` (or anything of its sign) and the gradient `g`.
#[inline(always)]
pub(crate) fn cautious_count<R: Real>(u: R, g: R, sums: &mut [f64]) {
    // (a 0 or 1 from the comparison, not a branch: the signs are random, so a branch would be
    // mispredicted half the time)
    sums[0] += f64::from(u8::from(u * g > R::ZERO));
    sums[1] += 1.0;
}

/// [`cautious_count`] for a step of the sign of `x` (Lion's `u = sign(x)`): `φ = 1[sign(x)·g >
/// 0]`, compared without forming the sign (the same φ for every `x` and `g`, zeros and NaN
/// included) and without branches.
#[inline(always)]
pub(crate) fn cautious_count_sign<R: Real>(x: R, g: R, sums: &mut [f64]) {
    let agree = (x > R::ZERO) & (g > R::ZERO) | (x < R::ZERO) & (g < R::ZERO);
    sums[0] += f64::from(u8::from(agree));
    sums[1] += 1.0;
}

/// [`cautious_count`] for a rule whose step has the sign of its new first moment
/// `m = m_old·β1 + (1 − β1)·g`, computed as the rules' updates compute it.
#[inline(always)]
pub(crate) fn cautious_count_momentum<R: Real>(m_old: R, g: R, beta1: f64, sums: &mut [f64]) {
    cautious_count(m_old * R::from_f64(beta1) + R::from_f64(1.0 - beta1) * g, g, sums);
}

/// The Cautious mask applied to `u` (spec §20): `u·k` where `u·g > 0`, else 0 (`ef_cautious` in
/// common.cuh).
#[inline(always)]
pub(crate) fn cautious<R: Real>(u: R, g: R, k: R) -> R {
    if u * g > R::ZERO {
        u * k
    } else {
        R::ZERO
    }
}

/// The Cautious optimizers' per-tensor factor k from the sums `[Σφ, numel]` (the first two of
/// `sums`, as [`cautious_count`] gathered them; spec §20):
/// `1/max(mean φ, 1e-3)` ("mean", timm), or with `count`, `numel/(Σφ + 1)` (C-Optim), evaluated in
/// the compute type as the references do. The counts are exact in f64, so any order of addition
/// gives the same factor.
pub(crate) fn caution_factor<R: Real>(sums: &[f64], count: bool) -> R {
    let (agree, n) = (R::from_f64(sums[0]), R::from_f64(sums[1]));
    if count {
        n / (agree + R::ONE)
    } else {
        R::ONE / (agree / n).max_nan(R::from_f64(1e-3))
    }
}

/// Check `0 <= x < 1` style ranges of rule inputs that Python already validated, so that a direct
/// native call with garbage cannot produce silent nonsense.
pub(crate) fn check_unit_interval(name: &str, x: f64) -> Result<f64> {
    if (0.0..1.0).contains(&x) {
        Ok(x)
    } else {
        Err(Error::Value(format!("{name} must be in [0, 1), got {x}")))
    }
}

/// Check `x >= 0` (NaN fails).
pub(crate) fn check_non_negative(name: &str, x: f64) -> Result<f64> {
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(Error::Value(format!("{name} must be >= 0, got {x}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashSet;

    type Entries = Vec<(String, HyperValue)>;

    /// Values tried for a numeric key: one valid for every rule, plus those that select other
    /// const generic arguments (no momentum buffer, no weight decay, no fast EMA, 1..=5 tracks).
    fn number_values(rule: &str, key: &str) -> Vec<f64> {
        match (rule, key) {
            ("adan" | "momo_adam", "step") => vec![3.0],
            ("ema_multi", "tracks") => (1..=5).map(f64::from).collect(),
            ("adafactor", "beta2_decay") => vec![-0.8],
            ("adafactor", "d") => vec![1.5],
            ("adafactor_hf", "relative_step" | "scale_parameter" | "warmup_init") => vec![1.0, 0.0],
            ("adafactor_hf", "decay_rate") => vec![-0.8],
            (_, "momentum" | "weight_decay" | "beta1") => vec![0.5, 0.0],
            _ => vec![0.5],
        }
    }

    fn product(entries: Vec<Entries>, key: &str, values: Vec<HyperValue>) -> Vec<Entries> {
        let extend = |e: &Entries, v: &HyperValue| {
            let mut e = e.clone();
            e.push((key.to_string(), v.clone()));
            e
        };
        entries.iter().flat_map(|e| values.iter().map(move |v| extend(e, v))).collect()
    }

    /// Hyper-parameters of `info` for every combination of its flags (each false and true) and of
    /// [`number_values`]: every type the rule can be built as.
    pub(crate) fn samples(info: &RuleInfo) -> Vec<Entries> {
        let mut out = vec![Vec::new()];
        for key in info.numbers {
            out = product(out, key, number_values(info.name, key).into_iter().map(HyperValue::Num).collect());
        }
        for key in info.flags {
            out = product(out, key, vec![HyperValue::Flag(false), HyperValue::Flag(true)]);
        }
        out
    }

    fn flag_set(e: &Entries, name: &str) -> bool {
        e.iter().any(|(k, v)| k == name && matches!(v, HyperValue::Flag(true)))
    }

    /// Combinations a rule refuses by design.
    fn exclusive(info: &RuleInfo, e: &Entries) -> bool {
        info.name == "ema" && flag_set(e, "muladd") && flag_set(e, "sub")
    }

    /// Checks what a built rule type states about itself; returns its slot names.
    struct Facts(&'static RuleInfo);

    impl RuleVisitor for Facts {
        type Output = &'static [&'static str];
        fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
            let name = self.0.name;
            assert_eq!(Ru::INFO.name, name, "{name}: the type points at another rule's INFO");
            assert_eq!(Ru::SLOTS, Ru::SLOT_NAMES.len(), "{name}: SLOTS is set apart from SLOT_NAMES");
            assert_eq!(Ru::SCALARS, self.0.scalars.len(), "{name}: SCALARS is set apart from INFO.scalars");
            assert_eq!(Ru::READS_INPUT, self.0.input != Input::None, "{name}: READS_INPUT is set apart from INFO");
            assert!(Ru::SLOTS <= MAX_SLOTS && Ru::WRITTEN_SLOTS <= Ru::SLOTS && Ru::SUMS <= MAX_SUMS, "{name}");
            let passes = &Ru::SUM_PASS[..Ru::SUMS];
            assert!(passes.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1) && passes.first().is_none_or(|&p| p <= 1), "{name}: SUM_PASS");
            assert!(!Ru::ROW_SUMS || passes.windows(2).all(|w| w[0] == w[1]), "{name}: row sums in more than one pass");
            assert!(
                !Ru::FACTORED || (Ru::SLOTS >= 2 && Ru::WRITTEN_SLOTS <= Ru::FACTOR_SLOT && !Ru::ROW_SUMS),
                "{name}: a factored rule keeps its two factors last, not written by the drivers"
            );
            assert_eq!(Ru::MAX_SUMS_MASK >> Ru::SUMS, 0, "{name}: a maximum past SUMS");
            assert_eq!(Ru::PARAM_NAMES.len(), rule.param_words().len(), "{name}");
            let unique = |names: &[&str]| names.iter().collect::<HashSet<_>>().len() == names.len();
            assert!(unique(Ru::PARAM_NAMES), "{name}: parameter names repeat");
            // Slots and scalar entries are keys of one state dict.
            let state: Vec<&str> = Ru::SLOT_NAMES.iter().chain(self.0.scalars).copied().collect();
            assert!(unique(&state), "{name}: state names repeat: {state:?}");
            Ru::SLOT_NAMES
        }
    }

    #[test]
    fn descriptions_are_well_formed() {
        assert_eq!(all().map(|i| i.name).collect::<HashSet<_>>().len(), RULES.len(), "rule names repeat");
        for info in all() {
            let name = info.name;
            let keys: Vec<&str> = info.numbers.iter().chain(info.flags).copied().collect();
            assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len(), "{name}: keys repeat");
            assert!(keys.len() <= 64, "{name}: too many keys for the read mask of the tests");
            assert!(keys.iter().all(|k| !ENGINE_OPTIONS.contains(k) && !ENGINE_NUMBERS.contains(k)), "{name}: declares an engine option");
            assert!(info.optional_flags.iter().all(|f| info.flags.contains(f)), "{name}: optional flags must be flags");
            assert!(info.scalars.len() <= MAX_SCALARS, "{name}");
            assert!(!info.summary.is_empty() && !info.summary.contains('\n'), "{name}: one-line summary");
        }
    }

    /// Every rule, built from every combination of its flags and of the numbers that select
    /// const generics: reads only (and every one of) the keys it declares, and its type states
    /// consistent facts.
    #[test]
    fn every_rule_variant_is_consistent() {
        for info in all() {
            let mut read = HashSet::new();
            let mut slots = HashSet::new();
            for entries in samples(info) {
                let refused = exclusive(info, &entries);
                let hyper = Hyper::new(entries);
                hyper.check(info).unwrap_or_else(|e| panic!("{}: {e}", info.name));
                let h = RuleHyper::new(&hyper, info);
                match dispatch(info, &h, Facts(info)) {
                    Err(Error::Value(_)) if refused => {}
                    Ok(names) if !refused => slots.extend(names.iter().copied()),
                    other => panic!("{}: {other:?} for {hyper:?}", info.name),
                }
                read.extend(h.read_keys());
            }
            let declared: HashSet<&str> = info.numbers.iter().chain(info.flags).copied().collect();
            assert_eq!(read, declared, "{}: declared keys that no variant reads", info.name);
            assert!(info.nonnegative_slots.iter().all(|n| slots.contains(n)), "{}: a non-negative slot that no variant keeps", info.name);
        }
    }

    fn adam_entries() -> Entries {
        let num = |k: &str, x: f64| (k.to_string(), HyperValue::Num(x));
        let flag = |k: &str, b: bool| (k.to_string(), HyperValue::Flag(b));
        vec![
            num("lr", 1e-3),
            num("beta1", 0.9),
            num("beta2", 0.999),
            num("eps", 1e-8),
            num("weight_decay", 0.01),
            flag("amsgrad", false),
            flag("decoupled", true),
            flag("maximize", false),
            flag("check_finite", true),
        ]
    }

    fn value_error(r: Result<&'static [&'static str]>) -> String {
        match r {
            Err(Error::Value(m)) => m,
            other => panic!("expected a value error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_and_misspelled_keys_are_refused() {
        let mut e = adam_entries();
        e.push(("betas".into(), HyperValue::Num(0.9)));
        let m = value_error(slot_names("adam", &Hyper::new(e)));
        assert!(m.contains("'adam'") && m.contains("'betas'") && m.contains("lr, beta1, beta2"), "{m}");
        let mut e = adam_entries();
        e[5].0 = "amsgard".into();
        let m = value_error(slot_names("adam", &Hyper::new(e)));
        assert!(m.contains("'amsgard'") && m.contains("amsgrad, decoupled, ema"), "{m}");
        let e: Entries = adam_entries().into_iter().filter(|(k, _)| k != "amsgrad").collect();
        let m = value_error(slot_names("adam", &Hyper::new(e)));
        assert!(m.contains("missing flag 'amsgrad'"), "{m}");
        let e: Entries = adam_entries().into_iter().filter(|(k, _)| k != "lr").collect();
        let m = value_error(slot_names("adam", &Hyper::new(e)));
        assert!(m.contains("missing hyper-parameter 'lr'"), "{m}");
        assert!(value_error(slot_names("adamw", &Hyper::new(adam_entries()))).contains("unknown update rule 'adamw'"));
    }

    #[test]
    fn values_of_the_wrong_kind_are_refused() {
        for (i, want) in [(0, "'lr' must be a number"), (5, "'amsgrad' must be a bool"), (7, "'maximize' must be a bool")] {
            let mut e = adam_entries();
            e[i].1 = match e[i].1 {
                HyperValue::Num(_) => HyperValue::Flag(true),
                HyperValue::Flag(_) => HyperValue::Num(1.0),
            };
            let m = value_error(slot_names("adam", &Hyper::new(e)));
            assert!(m.contains(want), "{m}");
        }
    }

    #[test]
    fn optional_flags_default_to_false() {
        assert_eq!(slot_names("adam", &Hyper::new(adam_entries())).unwrap(), ["exp_avg", "exp_avg_sq"]);
        let mut e = adam_entries();
        e[5].1 = HyperValue::Flag(true);
        e.push(("ema".into(), HyperValue::Flag(true)));
        e.push(("ema_weight".into(), HyperValue::Num(0.1)));
        assert_eq!(slot_names("adam", &Hyper::new(e)).unwrap(), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema"]);
    }

    #[test]
    fn reading_an_undeclared_key_is_a_bug() {
        static BARE: RuleInfo = RuleInfo {
            name: "bare",
            summary: "x",
            numbers: &[],
            flags: &[],
            optional_flags: &[],
            scalars: &[],
            input: Input::Gradient,
            nonnegative_slots: &[],
        };
        let hyper = Hyper::new(adam_entries());
        let h = RuleHyper::new(&hyper, &BARE);
        assert!(matches!(h.num("lr"), Err(Error::Internal(m)) if m.contains("'bare'") && m.contains("'lr'")));
        assert!(matches!(h.flag("amsgrad"), Err(Error::Internal(_))));
    }

    #[test]
    fn state_names_are_checked_not_counted() {
        type AdamW = adam::Adam<false, true, false, false>;
        let hyper = Hyper::new(adam_entries());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let step = names(&["step"]);
        assert!(check_state::<AdamW>(&hyper, 0, &names(&["exp_avg", "exp_avg_sq"]), &step, true, false).is_ok());
        let swapped = check_state::<AdamW>(&hyper, 0, &names(&["exp_avg_sq", "exp_avg"]), &step, true, false);
        assert!(
            matches!(swapped, Err(Error::Value(m)) if m == "param group 0: rule 'adam' (amsgrad=False, decoupled=True) keeps state ['exp_avg', 'exp_avg_sq'], got ['exp_avg_sq', 'exp_avg']")
        );
        let short = check_state::<AdamW>(&hyper, 2, &names(&["exp_avg"]), &step, true, false);
        assert!(matches!(short, Err(Error::Value(m)) if m.starts_with("param group 2:")));
        let scalars = check_state::<AdamW>(&hyper, 0, &names(&["exp_avg", "exp_avg_sq"]), &names(&["t"]), true, false);
        assert!(matches!(scalars, Err(Error::Value(m)) if m.contains("keeps scalar state ['step'], got ['t']")));
        let no_input = check_state::<AdamW>(&hyper, 0, &names(&["exp_avg", "exp_avg_sq"]), &step, false, false);
        assert!(matches!(no_input, Err(Error::Value(m)) if m.contains("reads an input")));
        let narrow = check_state::<AdamW>(&hyper, 0, &names(&["exp_avg", "exp_avg_sq"]), &step, true, true);
        assert!(matches!(narrow, Err(Error::DType(m)) if m.contains("parameter's dtype")));
    }
}
