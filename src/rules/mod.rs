//! Update rules: one file per rule, each a host-side coefficient function plus the per-element
//! math. Rules never loop over tensors and never know which backend runs them.

pub mod adabelief;
pub mod adabound;
pub mod adam;
pub mod adamod;
pub mod adamomentum;
pub mod adan;
pub mod ademamix;
pub mod axpby;
pub mod bema;
pub mod diffgrad;
pub mod ema;
pub mod lion;
pub mod sgd;
pub mod sgd_sai;
pub mod slerp;
pub mod spam;
pub mod swap;

use crate::error::{Error, Result};
use crate::real::Real;

/// The most state tensors per parameter any rule keeps.
pub const MAX_SLOTS: usize = 4;
/// The most scalar state entries per parameter any rule keeps.
pub const MAX_SCALARS: usize = 4;
/// The most per-tensor sums any rule gathers before its update.
pub const MAX_SUMS: usize = 4;

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
/// branches on them.
pub trait Rule: Send + Sync + 'static {
    /// State tensors per parameter (slots `0..SLOTS` of the state array are live).
    const SLOTS: usize;
    /// State slots the rule writes: slots `WRITTEN_SLOTS..SLOTS` are only read, and the drivers
    /// do not store them back (no write traffic, e.g. BEMA's anchor between resets).
    const WRITTEN_SLOTS: usize = Self::SLOTS;
    /// Scalar state entries per parameter (`scalars[0..SCALARS]` are live in `coeffs`).
    const SCALARS: usize = 0;
    /// Per-tensor sums gathered before the update (`sums[0..SUMS]`).
    const SUMS: usize = 0;
    /// Whether the rule reads the input tensor `g` (false: callers pass none, `g` is 0).
    const READS_INPUT: bool = true;
    /// Per-tensor coefficients in the compute type.
    type Coeffs<R: Real>: Copy + Send + Sync;
    /// Coefficients for one tensor, given its scalar state (which it may update, e.g. increment
    /// a step counter) and its sums.
    fn coeffs<R: Real>(&self, scalars: &mut [f64; MAX_SCALARS], sums: &[f64; MAX_SUMS]) -> Self::Coeffs<R>;
    /// New parameter value; updates the state values in place.
    fn update<R: Real>(c: &Self::Coeffs<R>, p: R, g: R, s: &mut [R; MAX_SLOTS]) -> R;
    /// Add one element's contribution to the tensor's sums (only called when `SUMS > 0`).
    #[inline(always)]
    fn accumulate<R: Real>(&self, _p: R, _g: R, _s: &[R; MAX_SLOTS], _sums: &mut [f64; MAX_SUMS]) {}
    /// The rule's CUDA twin (`src/cuda/kernels/<rule>.cuh` and its C++ type with these flags).
    /// The implementing struct must then be `#[repr(C)]` with only `f64` fields, in the order of
    /// the kernel's `Hyper`: its bytes are passed to the kernel as they are.
    fn cuda_kernel() -> Option<crate::cuda::CudaKernel> {
        None
    }
}

/// One hyper-parameter value as Python passed it.
#[derive(Clone, Debug)]
pub enum HyperValue {
    Num(f64),
    Flag(bool),
}

/// A parameter group's hyper-parameters and flags, by name.
#[derive(Clone, Debug, Default)]
pub struct Hyper {
    entries: Vec<(String, HyperValue)>,
}

impl Hyper {
    pub fn new(entries: Vec<(String, HyperValue)>) -> Self {
        Hyper { entries }
    }

    fn get(&self, name: &str) -> Result<&HyperValue> {
        self.entries
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Value(format!("missing hyper-parameter '{name}'")))
    }

    /// A numeric hyper-parameter (booleans are refused).
    pub fn num(&self, name: &str) -> Result<f64> {
        match self.get(name)? {
            HyperValue::Num(x) => Ok(*x),
            HyperValue::Flag(_) => Err(Error::Value(format!("'{name}' must be a number, got a bool"))),
        }
    }

    /// A boolean flag.
    pub fn flag(&self, name: &str) -> Result<bool> {
        match self.get(name)? {
            HyperValue::Flag(b) => Ok(*b),
            HyperValue::Num(_) => Err(Error::Value(format!("'{name}' must be a bool, got a number"))),
        }
    }

    /// A boolean flag that defaults to `false` when absent.
    pub fn flag_or_false(&self, name: &str) -> Result<bool> {
        if self.entries.iter().any(|(k, _)| k == name) {
            self.flag(name)
        } else {
            Ok(false)
        }
    }
}

/// Receives a concrete rule type; lets backends turn a rule name plus flags into monomorphised
/// code without the registry knowing any backend.
pub trait RuleVisitor {
    type Output;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output;
}

/// The registry: rule names and the functions that build them, listed once.
macro_rules! registry {
    ($($name:literal => $visit:path),* $(,)?) => {
        /// Every registered rule name.
        pub const RULE_NAMES: &[&str] = &[$($name),*];

        /// Build the rule called `name` from `hyper` and hand it to `visitor`.
        pub fn visit_rule<V: RuleVisitor>(name: &str, hyper: &Hyper, visitor: V) -> Result<V::Output> {
            match name {
                $($name => $visit(hyper, visitor),)*
                other => Err(Error::Value(format!("unknown update rule '{other}'"))),
            }
        }
    };
}

registry! {
    // torch.optim
    "adam" => adam::visit,
    "sgd" => sgd::visit,
    // the EMA optimizer family (spec optimizers.md)
    "adan" => adan::visit,
    "spam" => spam::visit,
    "diffgrad" => diffgrad::visit,
    "adabound" => adabound::visit,
    "sgd_sai" => sgd_sai::visit,
    "ademamix" => ademamix::visit,
    "adabelief" => adabelief::visit,
    "adamomentum" => adamomentum::visit,
    "lion" => lion::visit,
    "adamod" => adamod::visit,
    // weight averaging (spec averaging.md D.1)
    "ema" => ema::visit,
    "ema_multi" => ema::visit_multi,
    "bema" => bema::visit,
    "swap" => swap::visit,
    "axpby" => axpby::visit,
    "slerp" => slerp::visit,
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
