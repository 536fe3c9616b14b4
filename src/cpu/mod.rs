//! The CPU multi-tensor driver: for one validated [`Batch`], advance step counters, compute the
//! per-tensor coefficients, dispatch on dtypes once, and run the rule over all tensors as a flat
//! list of chunks on emafuse's rayon pool.

mod kernel;
pub mod pool;

use crate::batch::Batch;
use crate::dtype::{DType, Elem};
use crate::error::{Error, Result};
use crate::real::Real;
use crate::rules::{visit_rule, Hyper, Rule, RuleVisitor, MAX_SLOTS};
use half::{bf16, f16};
use kernel::{GradTransform, SpanPtrs};
use rayon::prelude::*;

/// Elements per work item. Items span tensor boundaries, so thousands of small tensors cost a few
/// hundred items, not thousands.
const CHUNK: usize = 1 << 15;
/// Below this many elements the pool is not woken: the caller's thread does the work.
const INLINE_BELOW: usize = 1 << 15;

/// A piece of one tensor: `len` elements of tensor `tensor` from `start`.
#[derive(Copy, Clone, Debug)]
struct Span {
    tensor: usize,
    start: usize,
    len: usize,
}

/// Cut tensors of the given sizes into work items of about `CHUNK` elements.
fn work_items(numels: impl Iterator<Item = usize>) -> Vec<Vec<Span>> {
    let mut items = Vec::new();
    let mut cur: Vec<Span> = Vec::new();
    let mut room = CHUNK;
    for (tensor, n) in numels.enumerate() {
        let mut start = 0;
        while start < n {
            let len = room.min(n - start);
            cur.push(Span { tensor, start, len });
            start += len;
            room -= len;
            if room == 0 {
                items.push(std::mem::take(&mut cur));
                room = CHUNK;
            }
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
}

/// Run `f` on every span of tensors with the given sizes, in parallel when worth it.
fn for_each_span(numels: &[usize], f: impl Fn(Span) + Sync) {
    let total: usize = numels.iter().sum();
    let items = work_items(numels.iter().copied());
    if total < INLINE_BELOW || items.len() == 1 || pool::num_threads() == 1 {
        items.iter().flatten().for_each(|&s| f(s));
    } else {
        pool::pool().install(|| items.par_iter().for_each(|item| item.iter().for_each(|&s| f(s))));
    }
}

/// A batch ready to run on the CPU.
pub trait CpuStep: Send + Sync {
    /// Fail if the group asked for finite gradients (`check_finite`) and one holds NaN or
    /// infinity. Reads only.
    fn check_finite(&self, who: &str) -> Result<()>;
    /// Advance the step counters and update every tensor. Cannot fail.
    fn run(&self, grad_scale: Option<f64>);
}

/// Pair a batch with the rule named `rule`, built from `hyper`.
pub fn plan(rule: &str, hyper: &Hyper, batch: Batch) -> Result<Box<dyn CpuStep>> {
    let options = Options { maximize: hyper.flag_or_false("maximize")?, check_finite: hyper.flag_or_false("check_finite")? };
    visit_rule(rule, hyper, Planner { batch, options })?
}

/// Rule-independent options of a group.
#[derive(Copy, Clone, Debug)]
struct Options {
    /// Negate gradients (torch's `maximize`).
    maximize: bool,
    /// Refuse the step if a gradient holds NaN or infinity.
    check_finite: bool,
}

struct Planner {
    batch: Batch,
    options: Options,
}

impl RuleVisitor for Planner {
    type Output = Result<Box<dyn CpuStep>>;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
        if self.batch.slots != Ru::SLOTS {
            return Err(Error::Internal(format!("rule keeps {} state tensors, {} were passed", Ru::SLOTS, self.batch.slots)));
        }
        if Ru::COUNTS_STEPS == self.batch.steps.is_empty() && !self.batch.params.is_empty() {
            return Err(Error::Internal("step counters passed to a rule without them, or missing".into()));
        }
        Ok(Box::new(RuleBatch { rule, batch: self.batch, options: self.options }))
    }
}

struct RuleBatch<Ru: Rule> {
    rule: Ru,
    batch: Batch,
    options: Options,
}

impl<Ru: Rule> RuleBatch<Ru> {
    /// Increment every step counter (in its own dtype, float32 as torch's) and return the new
    /// values.
    fn advance_steps(&self) -> Vec<f64> {
        self.batch
            .steps
            .iter()
            .map(|s| {
                // SAFETY: validated as a one-element float32/float64 CPU tensor, kept alive by the
                // caller, and no two counters share memory (check_no_shared_outputs).
                unsafe {
                    if s.dtype() == DType::F64 {
                        let p = s.at::<f64>(0);
                        *p += 1.0;
                        *p
                    } else {
                        let p = s.at::<f32>(0);
                        *p += 1.0;
                        *p as f64
                    }
                }
            })
            .collect()
    }

    fn run_typed<R: Real, P: Elem<R>, S: Elem<R>>(&self, steps: &[f64], grad_scale: Option<f64>) {
        let b = &self.batch;
        let mut coeffs = Vec::with_capacity(b.params.len());
        let mut last: Option<(f64, Ru::Coeffs<R>)> = None;
        for i in 0..b.params.len() {
            let step = steps.get(i).copied().unwrap_or(0.0);
            let c = match last {
                Some((s, c)) if s == step => c,
                _ => self.rule.coeffs::<R>(step),
            };
            last = Some((step, c));
            coeffs.push(c);
        }
        let sign = if self.options.maximize { -1.0 } else { 1.0 };
        let xf = GradTransform { factor: R::from_f64(sign / grad_scale.unwrap_or(1.0)) };
        let numels: Vec<usize> = b.params.iter().map(|p| p.numel()).collect();
        let slots = b.slots;
        for_each_span(&numels, |s| {
            let t = s.tensor;
            // SAFETY: all views were validated to hold numel elements of P (params, grads) or S
            // (states) on the CPU; spans are disjoint ranges inside them, so each element is
            // touched by one thread only; the tensors are kept alive by the caller.
            unsafe {
                let mut states = [std::ptr::null_mut::<S>(); MAX_SLOTS];
                for (k, st) in states.iter_mut().enumerate().take(slots) {
                    *st = b.states[t * slots + k].at::<S>(s.start);
                }
                let ptrs = SpanPtrs { param: b.params[t].at::<P>(s.start), grad: b.grads[t].at::<P>(s.start), states };
                kernel::update_span::<Ru, R, P, S>(&coeffs[t], &xf, ptrs, s.len);
            }
        });
    }

    fn grads_finite<R: Real, P: Elem<R>>(&self) -> bool {
        let numels: Vec<usize> = self.batch.grads.iter().map(|g| g.numel()).collect();
        let ok = std::sync::atomic::AtomicBool::new(true);
        for_each_span(&numels, |s| {
            // SAFETY: grads validated as numel elements of P on the CPU; read only.
            let fine = unsafe { kernel::all_finite::<R, P>(self.batch.grads[s.tensor].at::<P>(s.start), s.len) };
            if !fine {
                ok.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        });
        ok.into_inner()
    }
}

impl<Ru: Rule> CpuStep for RuleBatch<Ru> {
    fn check_finite(&self, who: &str) -> Result<()> {
        if !self.options.check_finite {
            return Ok(());
        }
        let fine = match self.batch.param_dtype {
            DType::F32 => self.grads_finite::<f32, f32>(),
            DType::BF16 => self.grads_finite::<f32, bf16>(),
            DType::F16 => self.grads_finite::<f32, f16>(),
            DType::F64 => self.grads_finite::<f64, f64>(),
        };
        if fine {
            Ok(())
        } else {
            Err(Error::NonFinite(format!("{who}: a gradient holds NaN or infinity; nothing was updated")))
        }
    }

    fn run(&self, grad_scale: Option<f64>) {
        let steps = self.advance_steps();
        match (self.batch.param_dtype, self.batch.state_dtype) {
            (DType::F32, _) => self.run_typed::<f32, f32, f32>(&steps, grad_scale),
            (DType::F64, _) => self.run_typed::<f64, f64, f64>(&steps, grad_scale),
            (DType::BF16, DType::BF16) => self.run_typed::<f32, bf16, bf16>(&steps, grad_scale),
            (DType::BF16, _) => self.run_typed::<f32, bf16, f32>(&steps, grad_scale),
            (DType::F16, DType::F16) => self.run_typed::<f32, f16, f16>(&steps, grad_scale),
            (DType::F16, _) => self.run_typed::<f32, f16, f32>(&steps, grad_scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_items_cover_every_element_once() {
        let sizes = [1usize, 3, CHUNK + 5, 0, 4097, 3 * CHUNK];
        let items = work_items(sizes.iter().copied());
        let mut seen = vec![0usize; sizes.len()];
        for item in &items {
            assert!(item.iter().map(|s| s.len).sum::<usize>() <= CHUNK);
            for s in item {
                assert_eq!(s.start, seen[s.tensor], "spans of a tensor are consecutive");
                seen[s.tensor] += s.len;
            }
        }
        assert_eq!(seen.to_vec(), sizes.to_vec());
    }
}
