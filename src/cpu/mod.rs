//! The CPU multi-tensor driver: for one validated [`Batch`], advance step counters, compute the
//! per-tensor coefficients, dispatch on dtypes once, and run the rule over all tensors as a flat
//! list of chunks on emafuse's rayon pool.

mod kernel;
pub mod pool;
mod reduce;
mod scratch;

pub use reduce::{sum_squares, tensor_sum_squares};

use crate::batch::{Batch, Matrices, Rows};
use crate::dtype::{DType, Elem};
use crate::error::{Error, Result};
use crate::quant::{self, QuantMap};
use crate::real::Real;
use crate::rounding;
use crate::rules::orthograd::{self, Projection};
use crate::rules::{check_state, combine_sums, visit_base_rule, Hyper, Rule, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::view::TensorView;
use half::{bf16, f16};
use kernel::{FactorReads, GradTransform, SpanPtrs, SpanRounding};
use scratch::Scratch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Elements per work item. Items span tensor boundaries, so thousands of small tensors cost a few
/// hundred items, not thousands.
const CHUNK: usize = 1 << 15;
/// Below this many elements the pool is not woken: the caller's thread does the work alone
/// (waking a helper costs more than it saves on a few hundred microseconds of work).
const INLINE_BELOW: usize = 1 << 17;

/// A piece of one tensor: `len` elements of tensor `tensor` from `start` (of unit `tensor`, in the
/// spans cut from a [`RuleBatch`]'s units).
#[derive(Copy, Clone, Debug)]
struct Span {
    tensor: usize,
    start: usize,
    len: usize,
}

/// A piece of one tensor that gathers its own sums and reads its own coefficients: each row of a
/// tensor with rows for a rule with row sums ([`Rule::ROW_SUMS`]), else a whole tensor.
#[derive(Copy, Clone, Debug)]
struct Unit {
    tensor: usize,
    start: usize,
    len: usize,
    /// Whether it is a row, whose sums fold into its tensor's.
    row: bool,
}

/// The units of the tensors of `b`: rows where `by_rows` and a tensor has them, else tensors.
fn units_of(b: &Batch, by_rows: bool) -> Vec<Unit> {
    let mut units = Vec::with_capacity(b.params.len());
    for (tensor, (p, rows)) in b.params.iter().zip(&b.rows).enumerate() {
        match *rows {
            Rows::Consecutive(n) if by_rows && n > 0 => {
                let len = p.numel() / n;
                units.extend((0..n).map(|r| Unit { tensor, start: r * len, len, row: true }));
            }
            _ => units.push(Unit { tensor, start: 0, len: p.numel(), row: false }),
        }
    }
    units
}

/// Cut tensors of the given sizes into work items of about `CHUNK` elements, every span starting
/// at a multiple of `align` in its tensor (blockwise 8-bit state is updated a whole block at a
/// time: `quant::BLOCK`; `CHUNK` is a multiple of it).
fn work_items(numels: impl Iterator<Item = usize>, align: usize) -> Vec<Vec<Span>> {
    let mut items = Vec::new();
    let mut cur: Vec<Span> = Vec::new();
    let mut room = CHUNK;
    for (tensor, n) in numels.enumerate() {
        let mut start = 0;
        while start < n {
            // (room >= align here, so a cut span is never empty)
            let mut len = room.min(n - start);
            if len < n - start {
                len -= len % align;
            }
            cur.push(Span { tensor, start, len });
            start += len;
            room -= len;
            if room < align {
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

/// Calls running work on the pool right now (e.g. an average updated on a background thread).
static POOL_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Counts one call in [`POOL_CALLS`] while alive (also when the work panics).
struct PoolCall;

impl PoolCall {
    fn start() -> PoolCall {
        POOL_CALLS.fetch_add(1, Ordering::Relaxed);
        PoolCall
    }
}

impl Drop for PoolCall {
    fn drop(&mut self) {
        POOL_CALLS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run `f(i)` for every work item index `i < items`, on the pool if `parallel`. The calling
/// thread works too, beside up to `threads − 1` pool helpers, taking items from a shared counter.
fn run_items(items: usize, parallel: bool, f: impl Fn(usize) + Sync) {
    let helpers = pool::num_threads().saturating_sub(1).min(items.saturating_sub(1));
    if !parallel || helpers == 0 {
        (0..items).for_each(f);
        return;
    }
    let _counted = PoolCall::start();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= items {
            break;
        }
        f(i);
    };
    pool::pool().in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| work());
        }
        work();
    });
}

/// Run `f` on every span of tensors with the given sizes (spans aligned to `align`), in parallel
/// when worth it.
fn for_each_span(numels: &[usize], align: usize, f: impl Fn(Span) + Sync) {
    let items = work_items(numels.iter().copied(), align);
    run_items(items.len(), numels.iter().sum::<usize>() >= INLINE_BELOW, |i| items[i].iter().for_each(|&s| f(s)));
}

/// `f` of every span of tensors with the given sizes (aligned to `align`), in parallel when worth it, returned in span
/// order. Spans depend only on the sizes (not on the thread count), so a caller that folds the
/// results in order gets the same bits on every run and every machine: reductions use this.
fn map_spans<T: Send + Sync>(numels: &[usize], align: usize, f: impl Fn(Span) -> T + Sync) -> Vec<(Span, T)> {
    let items = work_items(numels.iter().copied(), align);
    let results: Vec<OnceLock<Vec<(Span, T)>>> = items.iter().map(|_| OnceLock::new()).collect();
    run_items(items.len(), numels.iter().sum::<usize>() >= INLINE_BELOW, |i| {
        let _ = results[i].set(items[i].iter().map(|&s| (s, f(s))).collect());
    });
    results.into_iter().flat_map(|r| r.into_inner().expect("every item ran")).collect()
}

/// `f(i)` for every `i < n`, in index order, or the error of the first `i` that fails; blocks
/// of indices run spread over the pool (for host work per tensor, e.g. reading metadata, on long
/// tensor lists) unless the pool is busy: helpers would only join after the running work (e.g. a
/// background average update) finished, stalling the caller. A block stops at its first error.
pub fn try_map_indices<T: Send + Sync, E: Send + Sync>(n: usize, f: impl Fn(usize) -> std::result::Result<T, E> + Sync) -> std::result::Result<Vec<T>, E> {
    const BLOCK: usize = 64;
    let blocks = n.div_ceil(BLOCK);
    let results: Vec<OnceLock<std::result::Result<Vec<T>, E>>> = (0..blocks).map(|_| OnceLock::new()).collect();
    run_items(blocks, POOL_CALLS.load(Ordering::Relaxed) == 0, |b| {
        let _ = results[b].set((b * BLOCK..n.min((b + 1) * BLOCK)).map(&f).collect());
    });
    let mut out = Vec::with_capacity(n);
    for r in results {
        out.extend(r.into_inner().expect("every block ran")?);
    }
    Ok(out)
}

/// A batch ready to run on the CPU.
pub trait CpuStep: Send + Sync {
    /// Fail if the group asked for finite gradients (`check_finite`) and one holds NaN or
    /// infinity. Reads only.
    fn check_finite(&self, who: &str) -> Result<()>;
    /// The per-tensor sums of read-only pass `pass` over this batch, in its parameters' order,
    /// combined into `prior` (the sums of the earlier passes, e.g. added across the shards of
    /// sharded tensors; None: zeros): the rule's (zeros for a rule without sums), or with
    /// `orthograd` the projection's (one pass). Reads only.
    /// `factors`: for a rule with factored state, the [`FactorStats`] to use instead of the
    /// batch's own (one array per parameter), as for `run`.
    fn sums(&self, scaling: GradScaling<'_>, pass: usize, prior: Option<Vec<[f64; MAX_SUMS]>>, factors: Option<&[&[f64]]>) -> Vec<[f64; MAX_SUMS]>;
    /// Update the scalar state and every tensor. Cannot fail. `sums`: the per-tensor sums to use
    /// (e.g. added across the shards of sharded tensors) instead of the batch's own, in its
    /// parameters' order; `factors` likewise the [`FactorStats`] of a rule with factored state.
    fn run(&self, scaling: GradScaling<'_>, sums: Option<&[[f64; MAX_SUMS]]>, factors: Option<&[&[f64]]>);
    /// For a rule with factored state: every parameter's [`FactorStats`] into `out` (one array of
    /// [`FactorStats::len`] per parameter, in its order). Reads only.
    fn factor_stats(&self, scaling: GradScaling<'_>, out: Vec<&mut [f64]>);
    /// Whether the rule keeps factored state ([`Rule::FACTORED`]).
    fn factored(&self) -> bool;
}

/// What a run multiplies the gradients by as it loads them, besides the group's sign and
/// `grad_factor`: AMP's `grad_scale` divides every input (which is also stored back unscaled, as
/// torch's fused optimizers do), and `factors` (in the batch's order; e.g. AdaGC's clip factors)
/// each tensor's. Neither is stored into the gradients.
#[derive(Copy, Clone, Debug, Default)]
pub struct GradScaling<'a> {
    pub grad_scale: Option<f64>,
    pub factors: Option<&'a [f64]>,
}

/// What one typed pass over a batch does.
enum Pass<'s, 'o> {
    /// Only the [`FactorStats`] of every tensor, into these arrays.
    FactorStats(Vec<&'o mut [f64]>),
    /// Only the per-tensor sums of one read-only pass, combined into those of the earlier ones.
    Sums(usize, Option<Vec<[f64; MAX_SUMS]>>),
    /// The update, with the given sums or (None) its own.
    Update(Option<&'s [[f64; MAX_SUMS]]>),
}

/// Pair a batch with the rule named `rule`, built from `hyper`. With `orthograd` the driver
/// projects the gradients itself (`orthograd::Projection`) for the unwrapped rule.
pub fn plan<'a>(rule: &str, hyper: &'a Hyper, batch: &'a Batch) -> Result<Box<dyn CpuStep + 'a>> {
    let options = Options {
        grad_multiplier: hyper.grad_multiplier()?,
        check_finite: hyper.option("check_finite")?,
        orthograd: if hyper.option("orthograd")? { Some(hyper.option("orthograd_rescale")?) } else { None },
        rounding_key: hyper.rounding_key()?,
    };
    visit_base_rule(rule, hyper, Planner { batch, hyper, options })?
}

/// Rule-independent options of a group.
#[derive(Copy, Clone, Debug)]
struct Options {
    /// Multiplies every gradient as loaded: −1 for torch's `maximize`, times `grad_factor`.
    grad_multiplier: f64,
    /// Refuse the step if a gradient holds NaN or infinity.
    check_finite: bool,
    /// ⊥Grad: `Some(rescale)` projects every gradient.
    orthograd: Option<bool>,
    /// Stochastic rounding of bf16 stores with this step's key (None: round to nearest).
    rounding_key: Option<u64>,
}

struct Planner<'a> {
    batch: &'a Batch,
    hyper: &'a Hyper,
    options: Options,
}

impl<'a> RuleVisitor for Planner<'a> {
    type Output = Result<Box<dyn CpuStep + 'a>>;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
        let b = self.batch;
        check_state::<Ru>(self.hyper, b.group, &b.slot_names, &b.scalar_names, b.has_input(), b.input_dtype != b.param_dtype)?;
        if self.options.orthograd.is_some() {
            orthograd::check_projectable::<Ru>()?;
        }
        check_step_counters(b)?;
        if self.options.rounding_key.is_some() {
            rounding::check_batch(b)?;
        }
        if Ru::ROW_SUMS {
            check_rows(b, Ru::INFO.name)?;
        }
        if Ru::FACTORED {
            check_matrices(b, Ru::INFO.name)?;
        }
        // 8-bit state: each slot's map (never-negative slots take the unsigned one)
        let maps = std::array::from_fn(|k| quant::map_for(Ru::SLOT_NAMES.get(k).is_some_and(|name| Ru::INFO.nonnegative_slots.contains(name))));
        let units = units_of(b, Ru::ROW_SUMS);
        Ok(Box::new(RuleBatch { rule, batch: self.batch, options: self.options, maps, units }))
    }
}

struct RuleBatch<'a, Ru: Rule> {
    rule: Ru,
    batch: &'a Batch,
    options: Options,
    maps: [&'static QuantMap; MAX_SLOTS],
    /// What the spans are cut from, in tensor order.
    units: Vec<Unit>,
}

/// Refuse tensors a rule with row sums cannot walk row by row: rows interleaved in memory (the
/// Python layer then passes contiguous copies), and with 8-bit state rows that are not whole
/// quantization blocks.
fn check_rows(b: &Batch, rule: &str) -> Result<()> {
    for (j, (p, rows)) in b.params.iter().zip(&b.rows).enumerate() {
        let at = || format!("param group {}, parameter {}", b.group, b.positions[j]);
        match *rows {
            Rows::Interleaved => {
                return Err(Error::Layout(format!(
                    "{}: rule '{rule}' reduces over each row (dim-0 slice), and this parameter's rows are not consecutive in memory",
                    at()
                )))
            }
            Rows::Consecutive(n) if !b.scales.is_empty() && n > 0 && (p.numel() / n) % quant::BLOCK != 0 => {
                return Err(Error::Value(format!(
                    "{}: rule '{rule}' updates each row (dim-0 slice) on its own, and 8-bit state needs rows of whole blocks of {} \
                     elements; this parameter's rows have {}: keep its state in float32",
                    at(),
                    quant::BLOCK,
                    p.numel() / n
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Refuse tensors a rule with factored state cannot walk as row-major matrices (the Python layer
/// then passes contiguous copies), tensors of fewer than two dimensions, and 8-bit state.
fn check_matrices(b: &Batch, rule: &str) -> Result<()> {
    let at = |j: usize| format!("param group {}, parameter {}", b.group, b.positions[j]);
    if !b.scales.is_empty() {
        return Err(Error::Value(format!("{}: rule '{rule}' keeps factored state, which cannot be stored as 8-bit codes", at(0))));
    }
    for (j, m) in b.matrices.iter().enumerate() {
        match m {
            Matrices::RowMajor { .. } => {}
            Matrices::Other => return Err(Error::Layout(format!("{}: rule '{rule}' walks each parameter as row-major matrices", at(j)))),
            Matrices::None => {
                return Err(Error::Value(format!(
                    "{}: rule '{rule}' with factored state updates parameters of two or more dimensions; this one has fewer",
                    at(j)
                )))
            }
        }
    }
    Ok(())
}

/// What the elements of one tensor with factored state read ([`Rule::factor_reads`]): a value
/// per row of its matrices and one per column, as f64 (in the [`Scratch`] of the row and column
/// sums they replace).
struct TensorFactors<'s> {
    rows: &'s [f64],
    cols: &'s [f64],
}

/// A pointer shared by work items that each touch their own part of its memory.
#[derive(Copy, Clone)]
struct SyncPtr(*mut f64);
// SAFETY: users touch disjoint parts (each says which).
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The element `n` past the start.
    ///
    /// # Safety
    /// As `pointer::add`.
    unsafe fn add(&self, n: usize) -> *mut f64 {
        // SAFETY: per the contract.
        unsafe { self.0.add(n) }
    }
}

/// Where one tensor's factors lie: the rows and columns of its matrices, its values per row
/// (`rows`, over all its matrices) and per column (`cols`), and where its row sums start in the
/// factor sums' array (its column sums follow them).
#[derive(Copy, Clone)]
struct FactorShape {
    n_rows: usize,
    n_cols: usize,
    rows: usize,
    cols: usize,
    at: usize,
}

/// A tensor's factor statistics, for a rule with factored state ([`Rule::FACTORED`]) whose
/// tensors are shards of tensors split across ranks by rows: `[row sums | column sums | (Σ row
/// factors, rows) per matrix]`, the sums those of [`Rule::factor_term`] over the shard's rows and
/// columns, the row factors as the step updates and stores them. With the column sums and the
/// pairs added across the ranks, a pass given them ([`CpuStep::sums`], [`CpuStep::run`]) updates
/// the columns' factors and reads the rows' mean as the whole tensor's.
pub struct FactorStats;

impl FactorStats {
    /// The length of the statistics of a tensor divided into `m`; None without matrices.
    pub fn len(m: Matrices) -> Option<usize> {
        match m {
            Matrices::RowMajor { count, rows, cols } => Some(count * (rows + cols + 2)),
            _ => None,
        }
    }

    /// The `(Σ row factors, rows)` pairs of a tensor shaped `f`.
    fn totals(stats: &[f64], f: FactorShape) -> &[f64] {
        &stats[f.rows + f.cols..]
    }

    fn totals_mut(stats: &mut [f64], f: FactorShape) -> &mut [f64] {
        &mut stats[f.rows + f.cols..]
    }

    /// The rows of each whole matrix, from its pairs (0 for a tensor of no matrices).
    fn whole_rows(totals: &[f64]) -> usize {
        totals.get(1).map_or(0, |&n| n as usize)
    }
}

/// Refuse step counters (scalar state `step`) that are negative or not finite, e.g. from a
/// corrupted checkpoint: the bias corrections would turn the parameters into NaN.
fn check_step_counters(b: &Batch) -> Result<()> {
    let Some(k) = b.scalar_names.iter().position(|n| n == "step") else { return Ok(()) };
    let ns = b.n_scalars();
    for (j, &position) in b.positions.iter().enumerate() {
        // SAFETY: validated one-element CPU float tensors, alive for the call; only read.
        let step = unsafe { read_scalar(&b.scalars[j * ns + k]) };
        if !(step.is_finite() && step >= 0.0) {
            return Err(Error::Value(format!(
                "param group {}, parameter {position}: state 'step' is {step}; a step counter must be a finite number >= 0 \
                 (a corrupted checkpoint?)",
                b.group
            )));
        }
    }
    Ok(())
}

/// Read a one-element f32/f64 CPU tensor.
///
/// # Safety
/// `v` must be a live one-element CPU tensor of dtype F32 or F64.
unsafe fn read_scalar(v: &TensorView) -> f64 {
    // SAFETY: per the contract.
    unsafe {
        if v.dtype() == DType::F64 {
            *v.at::<f64>(0)
        } else {
            *v.at::<f32>(0) as f64
        }
    }
}

/// Write a one-element f32/f64 CPU tensor (rounding to f32 when it is one, as torch's float32
/// step counter does).
///
/// # Safety
/// As [`read_scalar`], and nobody else accesses it.
unsafe fn write_scalar(v: &TensorView, x: f64) {
    // SAFETY: per the contract.
    unsafe {
        if v.dtype() == DType::F64 {
            *v.at::<f64>(0) = x
        } else {
            *v.at::<f32>(0) = x as f32
        }
    }
}

impl<Ru: Rule> RuleBatch<'_, Ru> {
    /// The sizes of the units, which the spans are cut from.
    fn unit_lens(&self) -> Vec<usize> {
        self.units.iter().map(|u| u.len).collect()
    }

    /// Span `s` of a unit as a span of its tensor.
    fn in_tensor(&self, s: Span) -> Span {
        let u = &self.units[s.tensor];
        Span { tensor: u.tensor, start: u.start + s.start, len: s.len }
    }

    /// Where spans may start: anywhere, or with 8-bit state at the start of a quantization block.
    fn align(&self) -> usize {
        if self.batch.scales.is_empty() {
            1
        } else {
            quant::BLOCK
        }
    }

    /// Pointers to the first element of span `s` in every tensor of its parameter (and for a rule
    /// with factored state, to what its elements read: `reads`, one per tensor).
    ///
    /// # Safety
    /// The batch's views must be validated for element types P (params), G (inputs) and S
    /// (states).
    unsafe fn span_ptrs<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(&self, s: Span, reads: &[TensorFactors<'_>]) -> SpanPtrs<P, G, S> {
        let b = &self.batch;
        let t = s.tensor;
        let mut states = [std::ptr::null_mut::<S>(); MAX_SLOTS];
        let mut scales = [std::ptr::null_mut::<f32>(); MAX_SLOTS];
        // SAFETY: offsets stay inside the validated tensors (8-bit spans start a block).
        unsafe {
            for (k, st) in states.iter_mut().enumerate().take(b.slots()) {
                *st = b.states[t * b.slots() + k].at::<S>(s.start);
            }
            if !b.scales.is_empty() {
                for (k, sc) in scales.iter_mut().enumerate().take(b.slots()) {
                    *sc = b.scales[t * b.slots() + k].at::<f32>(s.start / quant::BLOCK);
                }
            }
            let grad = if Ru::READS_INPUT { b.grads[t].at::<G>(s.start) as *const G } else { std::ptr::null() };
            let correction = if b.corrections.is_empty() { std::ptr::null_mut() } else { b.corrections[t].at::<i8>(s.start) };
            let factors = reads.get(t).map(|f| {
                let Matrices::RowMajor { rows, cols, .. } = b.matrices[t] else { unreachable!("check_matrices") };
                FactorReads { first: Ru::FACTOR_SLOT, rows: f.rows.as_ptr(), cols: f.cols.as_ptr(), n_rows: rows, n_cols: cols, start: s.start }
            });
            SpanPtrs { param: b.params[t].at::<P>(s.start), grad, states, correction, scales, maps: self.maps, factors }
        }
    }

    /// The scalar state of tensor `i` before the step.
    fn scalars(&self, i: usize) -> [f64; MAX_SCALARS] {
        let b = &self.batch;
        let ns = b.n_scalars();
        let mut scalars = [0.0; MAX_SCALARS];
        for (k, x) in scalars.iter_mut().enumerate().take(ns) {
            // SAFETY: validated one-element CPU float tensors, alive for the call.
            *x = unsafe { read_scalar(&b.scalars[i * ns + k]) };
        }
        scalars
    }

    /// The read-only passes before the update: the rule's, or with `orthograd` the projection's one.
    fn sum_passes(&self) -> usize {
        if self.options.orthograd.is_some() {
            1
        } else {
            Ru::SUM_PASSES
        }
    }

    /// Whether read-only pass `pass` gathers any sums (else it is skipped).
    fn gathers(&self, pass: usize) -> bool {
        pass < self.sum_passes() && (self.options.orthograd.is_some() || Ru::SUM_PASS[..Ru::SUMS].contains(&pass))
    }

    /// Per-tensor sums of every pass: the rule's (zeros when it has none), or with `orthograd`
    /// the projection's; and with row sums, each unit's (as [`RuleBatch::pass_sums_by_row`]).
    fn tensor_sums<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        &self,
        factors: &[R],
        reads: &[TensorFactors<'_>],
    ) -> (Vec<[f64; MAX_SUMS]>, Vec<[f64; MAX_SUMS]>) {
        let mut sums = vec![[0.0; MAX_SUMS]; self.batch.params.len()];
        let mut rows = Vec::new();
        for pass in 0..self.sum_passes() {
            let by_row;
            (sums, by_row) = self.pass_sums_by_row::<R, P, G, S>(factors, reads, pass, sums);
            if !by_row.is_empty() {
                rows = by_row;
            }
        }
        (sums, rows)
    }

    /// The per-tensor sums of read-only pass `pass` combined into `sums` (those of the earlier
    /// passes); `factors[t]` multiplies tensor `t`'s gradient as loaded; `reads`: what the
    /// elements of a rule with factored state read (else empty).
    fn pass_sums<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        &self,
        factors: &[R],
        reads: &[TensorFactors<'_>],
        pass: usize,
        sums: Vec<[f64; MAX_SUMS]>,
    ) -> Vec<[f64; MAX_SUMS]> {
        self.pass_sums_by_row::<R, P, G, S>(factors, reads, pass, sums).0
    }

    /// [`RuleBatch::pass_sums`], and the sums of each unit that is a row (one entry per unit,
    /// zeros for the others; empty unless the rule has row sums), before they fold into their
    /// tensor's.
    fn pass_sums_by_row<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        &self,
        factors: &[R],
        reads: &[TensorFactors<'_>],
        pass: usize,
        mut sums: Vec<[f64; MAX_SUMS]>,
    ) -> (Vec<[f64; MAX_SUMS]>, Vec<[f64; MAX_SUMS]>) {
        if !self.gathers(pass) {
            return (sums, Vec::new());
        }
        // The values each tensor's pass reads (none in pass 0).
        let priors: Vec<[R; MAX_SUMS]> =
            if pass == 0 { Vec::new() } else { sums.iter().enumerate().map(|(i, s)| self.rule.prepare(pass, &self.scalars(i), s).map(R::from_f64)).collect() };
        let by_rows = Ru::ROW_SUMS && self.options.orthograd.is_none();
        let parts = map_spans(&self.unit_lens(), self.align(), |s| {
            if by_rows && !self.units[s.tensor].row {
                return [0.0; MAX_SUMS]; // (no sums outside rows)
            }
            let s = self.in_tensor(s);
            // SAFETY: validated views; the pass only reads.
            unsafe {
                let (ptrs, factor) = (self.span_ptrs::<R, P, G, S>(s, reads), factors[s.tensor]);
                if self.options.orthograd.is_some() {
                    kernel::projection_sums::<R, P, G>(factor, ptrs.param, ptrs.correction, ptrs.grad, s.len)
                } else if Ru::SUMS > 0 {
                    // (a guard on the constant: no sums kernel is compiled for rules without sums)
                    let prior = priors.get(s.tensor).copied().unwrap_or([R::ZERO; MAX_SUMS]);
                    kernel::sum_span::<R, P, G, S>(&kernel::SumKernel::of(&self.rule), factor, pass, &prior, ptrs, s.len)
                } else {
                    [0.0; MAX_SUMS]
                }
            }
        });
        // Folded in span order, rows in row order: the sums (and so the step) are reproducible
        // bit for bit.
        let max_mask = if self.options.orthograd.is_some() { 0 } else { Ru::MAX_SUMS_MASK };
        let mut rows = if by_rows { vec![[0.0; MAX_SUMS]; self.units.len()] } else { Vec::new() };
        for (s, part) in parts {
            let into = if by_rows { &mut rows[s.tensor] } else { &mut sums[self.units[s.tensor].tensor] };
            combine_sums(into, &part, max_mask);
        }
        for (u, row) in self.units.iter().zip(&rows).filter(|(u, _)| u.row) {
            self.rule.fold_row(row, u.len, &mut sums[u.tensor]);
        }
        (sums, rows)
    }

    /// Each tensor's [`FactorShape`], and the length of one array of every tensor's row sums, then
    /// column sums (as [`FactorShape::at`] places them).
    fn factor_shapes(&self) -> (Vec<FactorShape>, usize) {
        let mut total = 0;
        let shapes = (0..self.batch.params.len())
            .map(|t| {
                let Matrices::RowMajor { count, rows: n_rows, cols: n_cols } = self.batch.matrices[t] else {
                    unreachable!("check_matrices refuses other tensors")
                };
                let shape = FactorShape { n_rows, n_cols, rows: count * n_rows, cols: count * n_cols, at: total };
                total += shape.rows + shape.cols;
                shape
            })
            .collect();
        (shapes, total)
    }

    /// The sums of [`Rule::factor_term`] over every row and column of every matrix (folded in
    /// span order) into `sums` (zeros, laid out by `shapes`). `factors[t]` multiplies tensor
    /// `t`'s gradient as loaded.
    fn gather_factor_sums<R: Real, G: Elem<R>>(&self, factors: &[R], shapes: &[FactorShape], sums: &mut [f64]) {
        let b = self.batch;
        let base = SyncPtr(sums.as_mut_ptr());
        struct Sinks(Vec<kernel::FactorSink>);
        // SAFETY: each span writes only the rows and matrices it holds whole (see `factor_sums`).
        unsafe impl Sync for Sinks {}
        // SAFETY: each tensor's sums lie inside `sums`.
        let sinks = Sinks(
            shapes
                .iter()
                .map(|f| unsafe { kernel::FactorSink { rows: base.add(f.at), cols: base.add(f.at + f.rows), n_rows: f.n_rows, n_cols: f.n_cols } })
                .collect(),
        );
        let parts = map_spans(&self.unit_lens(), 1, |s| {
            let sinks = &sinks;
            // SAFETY: validated gradients of numel elements of G, read only; the sinks are zeros of
            // the tensor's rows and columns, alive until the spans ran.
            unsafe { kernel::factor_sums::<Ru, R, G>(&self.rule, factors[s.tensor], b.grads[s.tensor].at::<G>(s.start), s.start, s.len, sinks.0[s.tensor]) }
        });
        // The cut rows' and matrices' sums, added in span order.
        for (s, part) in parts {
            let f = shapes[s.tensor];
            for (row, x) in part.rows {
                sums[f.at + row] += x;
            }
            for (first, cols) in part.cols {
                for (total, x) in sums[f.at + f.rows + first..].iter_mut().zip(cols) {
                    *total += x;
                }
            }
        }
    }

    /// For a rule with factored state ([`Rule::FACTORED`]; else nothing): each tensor's factors
    /// updated ([`Rule::update_factors`]) from the sums of [`Rule::factor_term`] over its rows and
    /// columns (its own, or `given`: see [`FactorStats`]) and, with `store`, written to its slots,
    /// and what its elements read ([`Rule::factor_reads`] of the factors as stored: rounded to the
    /// state's dtype also without `store`), written over the sums in `scratch`. `factors[t]`
    /// multiplies tensor `t`'s gradient as loaded.
    fn factor_reads<'s, R: Real, G: Elem<R>, S: Elem<R>>(
        &self,
        factors: &[R],
        given: Option<&[&[f64]]>,
        store: bool,
        scratch: &'s mut Scratch,
    ) -> Vec<TensorFactors<'s>> {
        if !Ru::FACTORED {
            return Vec::new();
        }
        let (shapes, total) = self.factor_shapes();
        let sums = scratch.zeros(total);
        match given {
            Some(given) => {
                for (f, stats) in shapes.iter().zip(given) {
                    sums[f.at..f.at + f.rows + f.cols].copy_from_slice(&stats[..f.rows + f.cols]);
                }
            }
            None => self.gather_factor_sums::<R, G>(factors, &shapes, sums),
        }
        // Each tensor's factors updated and turned into reads in place of its sums (tensors in
        // parallel, each on its own part of the array).
        let base = SyncPtr(sums.as_mut_ptr());
        run_items(shapes.len(), total >= INLINE_BELOW, |t| {
            let f = shapes[t];
            // SAFETY: tensor t's row and column sums, which no other item touches; the array
            // outlives the items.
            let (row_sums, col_sums) =
                unsafe { (std::slice::from_raw_parts_mut(base.add(f.at), f.rows), std::slice::from_raw_parts_mut(base.add(f.at + f.rows), f.cols)) };
            let totals = given.map(|g| FactorStats::totals(g[t], f));
            let whole_rows = totals.map_or(f.n_rows, FactorStats::whole_rows);
            let mut scratch = Scratch::default();
            let (rows, cols) = self.new_factors::<R, S>(t, f, store, whole_rows, row_sums, col_sums, &mut scratch);
            let means: Vec<f64> = match totals {
                Some(totals) => totals.chunks(2).map(|m| m[0] / m[1]).collect(),
                None => rows.chunks(f.n_rows.max(1)).map(|r| r.iter().map(|x| x.to_f64()).sum::<f64>() / f.n_rows as f64).collect(),
            };
            self.rule.factor_reads(f.n_rows, f.n_cols, &means, rows, cols);
            for (out, vals) in [(row_sums, &*rows), (col_sums, &*cols)] {
                out.iter_mut().zip(vals.iter()).for_each(|(o, v)| *o = v.to_f64());
            }
        });
        let sums: &'s [f64] = sums;
        shapes.iter().map(|f| TensorFactors { rows: &sums[f.at..f.at + f.rows], cols: &sums[f.at + f.rows..f.at + f.rows + f.cols] }).collect()
    }

    /// Every tensor's [`FactorStats`] into `out` (one array per tensor), nothing else written.
    fn write_factor_stats<R: Real, G: Elem<R>, S: Elem<R>>(&self, factors: &[R], out: Vec<&mut [f64]>) {
        let (shapes, total) = self.factor_shapes();
        let mut scratch = Scratch::default();
        let sums = scratch.zeros(total);
        self.gather_factor_sums::<R, G>(factors, &shapes, sums);
        for (t, (f, out)) in shapes.into_iter().zip(out).enumerate() {
            let (row_sums, col_sums) = sums[f.at..f.at + f.rows + f.cols].split_at_mut(f.rows);
            out[..f.rows].copy_from_slice(row_sums);
            out[f.rows..f.rows + f.cols].copy_from_slice(col_sums);
            // (the columns' factors are not needed: any row count does)
            let mut scratch = Scratch::default();
            let (rows, _) = self.new_factors::<R, S>(t, f, false, f.n_rows.max(1), row_sums, col_sums, &mut scratch);
            let totals = FactorStats::totals_mut(out, f);
            for (m, total) in totals.chunks_mut(2).enumerate() {
                total[0] = rows[m * f.n_rows..(m + 1) * f.n_rows].iter().map(|x| x.to_f64()).sum();
                total[1] = f.n_rows as f64;
            }
        }
    }

    /// Tensor `t`'s factors (shaped `f`) updated from its row and column sums (`whole_rows`: the
    /// rows each column sum runs over) and, with `store`, written to its slots: returned as stored
    /// (rounded to the state's dtype also without `store`) in the compute type, in `scratch`.
    #[allow(clippy::too_many_arguments)]
    fn new_factors<'s, R: Real, S: Elem<R>>(
        &self,
        t: usize,
        f: FactorShape,
        store: bool,
        whole_rows: usize,
        row_sums: &[f64],
        col_sums: &[f64],
        scratch: &'s mut Scratch,
    ) -> (&'s mut [R], &'s mut [R]) {
        let b = self.batch;
        // SAFETY: validated slots of `f.rows` (`f.cols`) elements of S on the CPU, alive for the
        // call and accessed by nobody else (check_no_shared_outputs).
        let (row_mem, col_mem) = unsafe {
            // (an empty factor, e.g. of an empty shard, may have no memory at all)
            let slot = |k: usize, len: usize| if len == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(b.states[t * b.slots() + k].at::<S>(0), len) };
            (slot(Ru::FACTOR_SLOT, f.rows), slot(Ru::FACTOR_SLOT + 1, f.cols))
        };
        // (the factors in the compute type: as large as the sums, so in a kept array too)
        let (rows, cols) = scratch.zeros_of::<R>(f.rows + f.cols).split_at_mut(f.rows);
        S::load(row_mem, rows);
        S::load(col_mem, cols);
        // (the factors of empty matrices stay as they are)
        if whole_rows > 0 && f.n_cols > 0 {
            self.rule.update_factors(&self.scalars(t), whole_rows, f.n_cols, row_sums, col_sums, rows, cols);
        }
        for (mem, vals) in [(row_mem, &mut *rows), (col_mem, &mut *cols)] {
            if store {
                S::store(vals, mem);
                S::load(mem, vals);
            } else {
                let mut copy = mem.to_vec();
                S::store(vals, &mut copy);
                S::load(&copy, vals);
            }
        }
        (rows, cols)
    }

    /// Coefficients of every tensor, from the rule's per-tensor sums (None: zeros, for a rule
    /// without sums); reads and writes back the scalar state. Consecutive tensors with equal
    /// scalar state (the common case) share one evaluation.
    fn coeffs<R: Real>(&self, sums: Option<&[[f64; MAX_SUMS]]>) -> Vec<Ru::Coeffs<R>> {
        let b = &self.batch;
        let ns = b.n_scalars();
        let mut out = Vec::with_capacity(b.params.len());
        // (scalar state before, after, coefficients) of the previous tensor
        type Memo<C> = Option<([f64; MAX_SCALARS], [f64; MAX_SCALARS], C)>;
        let mut last: Memo<Ru::Coeffs<R>> = None;
        for i in 0..b.params.len() {
            let sum = sums.map_or(&[0.0; MAX_SUMS], |s| &s[i]);
            let scalars = self.scalars(i);
            let (updated, c) = match last {
                Some((before, after, c)) if Ru::SUMS == 0 && before == scalars => (after, c),
                _ => {
                    let mut after = scalars;
                    let c = self.rule.coeffs::<R>(&mut after, sum);
                    (after, c)
                }
            };
            for (k, &x) in updated.iter().enumerate().take(ns) {
                // SAFETY: validated one-element CPU float tensors, alive for the call; no two share
                // memory (check_no_shared_outputs).
                unsafe { write_scalar(&b.scalars[i * ns + k], x) };
            }
            last = Some((scalars, updated, c));
            out.push(c);
        }
        out
    }

    /// One pass in the types R (compute), P, G, S; returns the sums of a `Pass::Sums` (else
    /// nothing).
    fn pass_typed<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        &self,
        scaling: GradScaling<'_>,
        pass: Pass<'_, '_>,
        given: Option<&[&[f64]]>,
    ) -> Vec<[f64; MAX_SUMS]> {
        // Each tensor's gradient multiplier, rounded once to the compute type.
        let base = self.options.grad_multiplier / scaling.grad_scale.unwrap_or(1.0);
        let factors: Vec<R> = match scaling.factors {
            Some(f) => f.iter().map(|&x| R::from_f64(base * x)).collect(),
            None => vec![R::from_f64(base); self.batch.params.len()],
        };
        let unscale = scaling.grad_scale.map(|s| R::from_f64(1.0 / s));
        if let Pass::FactorStats(out) = pass {
            self.write_factor_stats::<R, G, S>(&factors, out);
            return Vec::new();
        }
        // Factored state: updated (stored) before the update's sums, only read for a sums pass.
        let mut scratch = Scratch::default();
        let reads = self.factor_reads::<R, G, S>(&factors, given, matches!(pass, Pass::Update(_)), &mut scratch);
        let own;
        // With row sums: each unit's (those of the rows; given tensor sums come without them)
        let mut rows = Vec::new();
        let sums = match pass {
            Pass::Update(Some(given)) => {
                if Ru::ROW_SUMS {
                    rows = self.pass_sums_by_row::<R, P, G, S>(&factors, &reads, Ru::SUM_PASSES - 1, given.to_vec()).1;
                }
                Some(given)
            }
            Pass::Sums(pass, prior) => {
                let prior = prior.unwrap_or_else(|| vec![[0.0; MAX_SUMS]; self.batch.params.len()]);
                return self.pass_sums::<R, P, G, S>(&factors, &reads, pass, prior);
            }
            Pass::Update(None) if self.options.orthograd.is_some() || Ru::SUMS > 0 => {
                (own, rows) = self.tensor_sums::<R, P, G, S>(&factors, &reads);
                Some(&own[..])
            }
            Pass::Update(None) => None,
            Pass::FactorStats(_) => unreachable!("returned above"),
        };
        // With orthograd the sums are the projection's, and the rule has none of its own.
        let (coeffs, projections) = match (self.options.orthograd, sums) {
            (Some(rescale), Some(sums)) => {
                let projections: Vec<Projection> = sums.iter().map(|s| Projection::from_sums(s, rescale)).collect();
                (self.coeffs::<R>(None), Some(projections))
            }
            _ => (self.coeffs::<R>(sums), None),
        };
        // Each unit's: its row's own, else its tensor's (units are the tensors without row sums).
        let coeffs = match sums {
            Some(sums) if !rows.is_empty() => self
                .units
                .iter()
                .zip(&rows)
                .map(|(u, row)| if u.row { self.rule.row_coeffs(&coeffs[u.tensor], &sums[u.tensor], row) } else { coeffs[u.tensor] })
                .collect(),
            _ => coeffs,
        };
        let batch_key = self.options.rounding_key.map(|key| rounding::batch_key(key, self.batch.members[0]));
        let update = kernel::UpdateKernel::<R>::of::<Ru>();
        for_each_span(&self.unit_lens(), self.align(), |unit_span| {
            let c = &coeffs[unit_span.tensor];
            let s = self.in_tensor(unit_span);
            let projection = projections.as_ref().map(|v| v[s.tensor]);
            let rounding = batch_key.map(|key| SpanRounding {
                streams: std::array::from_fn(|a| rounding::stream_key(key, s.tensor, a)),
                first: self.batch.offsets[s.tensor] + s.start,
            });
            // SAFETY: all views were validated to hold numel elements of P (params), G (inputs) or
            // S (states) on the CPU; spans are disjoint ranges inside them, so each element is
            // touched by one thread only; the tensors are kept alive by the caller.
            let xf = GradTransform { factor: factors[s.tensor], unscale };
            unsafe {
                kernel::update_span::<R, P, G, S>(
                    &update,
                    std::ptr::from_ref(c).cast(),
                    &xf,
                    projection,
                    rounding,
                    self.span_ptrs::<R, P, G, S>(s, &reads),
                    s.len,
                )
            };
        });
        Vec::new()
    }

    fn pass(&self, scaling: GradScaling<'_>, pass: Pass<'_, '_>, given: Option<&[&[f64]]>) -> Vec<[f64; MAX_SUMS]> {
        // Combinations accepted by `batch::split_group`: the input has the parameter's dtype, or
        // an fp32 parameter (an average) reads a bf16/fp16 input (the model; `check_state` refused
        // it for gradients, so that gradient rules compile no kernel for it); the state has the
        // parameter's dtype, or fp32 for bf16/fp16 parameters, or bf16 for fp32 parameters.
        match (self.batch.param_dtype, self.batch.input_dtype, self.batch.state_dtype) {
            (DType::F32, DType::BF16, _) if !Ru::READS_GRADIENT => self.pass_typed::<f32, f32, bf16, f32>(scaling, pass, given),
            (DType::F32, DType::F16, _) if !Ru::READS_GRADIENT => self.pass_typed::<f32, f32, f16, f32>(scaling, pass, given),
            (DType::F32, DType::F32, DType::BF16) => self.pass_typed::<f32, f32, f32, bf16>(scaling, pass, given),
            (DType::F32, DType::F32, DType::U8) => self.pass_typed::<f32, f32, f32, u8>(scaling, pass, given),
            (DType::BF16, _, DType::U8) => self.pass_typed::<f32, bf16, bf16, u8>(scaling, pass, given),
            (DType::F16, _, DType::U8) => self.pass_typed::<f32, f16, f16, u8>(scaling, pass, given),
            (DType::F32, DType::F32, _) => self.pass_typed::<f32, f32, f32, f32>(scaling, pass, given),
            (DType::F64, _, _) => self.pass_typed::<f64, f64, f64, f64>(scaling, pass, given),
            (DType::BF16, _, DType::BF16) => self.pass_typed::<f32, bf16, bf16, bf16>(scaling, pass, given),
            (DType::BF16, _, _) => self.pass_typed::<f32, bf16, bf16, f32>(scaling, pass, given),
            (DType::F16, _, DType::F16) => self.pass_typed::<f32, f16, f16, f16>(scaling, pass, given),
            (DType::F16, _, _) => self.pass_typed::<f32, f16, f16, f32>(scaling, pass, given),
            (DType::F32, input, _) => unreachable!("check_state refuses {} gradients for float32 parameters", input.name()),
            (DType::I8 | DType::U8, _, _) => unreachable!("batch::split_group refuses integer parameters"),
        }
    }

    fn grads_finite<R: Real, G: Elem<R>>(&self) -> bool {
        let numels: Vec<usize> = self.batch.grads.iter().map(|g| g.numel()).collect();
        let ok = std::sync::atomic::AtomicBool::new(true);
        for_each_span(&numels, 1, |s| {
            // SAFETY: grads validated as numel elements of G on the CPU; read only.
            let fine = unsafe { kernel::all_finite::<R, G>(self.batch.grads[s.tensor].at::<G>(s.start), s.len) };
            if !fine {
                ok.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        });
        ok.into_inner()
    }
}

impl<Ru: Rule> CpuStep for RuleBatch<'_, Ru> {
    fn check_finite(&self, who: &str) -> Result<()> {
        if !self.options.check_finite || !Ru::READS_INPUT {
            return Ok(());
        }
        let fine = match self.batch.input_dtype {
            DType::F32 => self.grads_finite::<f32, f32>(),
            DType::BF16 => self.grads_finite::<f32, bf16>(),
            DType::F16 => self.grads_finite::<f32, f16>(),
            DType::F64 => self.grads_finite::<f64, f64>(),
            DType::I8 | DType::U8 => unreachable!("batch::split_group refuses integer gradients"),
        };
        if fine {
            Ok(())
        } else {
            Err(Error::NonFinite(format!("{who}: a gradient holds NaN or infinity; nothing was updated")))
        }
    }

    fn sums(&self, scaling: GradScaling<'_>, pass: usize, prior: Option<Vec<[f64; MAX_SUMS]>>, factors: Option<&[&[f64]]>) -> Vec<[f64; MAX_SUMS]> {
        self.pass(scaling, Pass::Sums(pass, prior), factors)
    }

    fn run(&self, scaling: GradScaling<'_>, sums: Option<&[[f64; MAX_SUMS]]>, factors: Option<&[&[f64]]>) {
        self.pass(scaling, Pass::Update(sums), factors);
    }

    fn factor_stats(&self, scaling: GradScaling<'_>, out: Vec<&mut [f64]>) {
        if Ru::FACTORED {
            self.pass(scaling, Pass::FactorStats(out), None);
        }
    }

    fn factored(&self) -> bool {
        Ru::FACTORED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_items_cover_every_element_once() {
        let sizes = [1usize, 3, CHUNK + 5, 0, 4097, 3 * CHUNK, 300, CHUNK - 7, 2 * CHUNK + 999];
        for align in [1, crate::quant::BLOCK] {
            let items = work_items(sizes.iter().copied(), align);
            let mut seen = vec![0usize; sizes.len()];
            for item in &items {
                assert!(!item.is_empty() && item.iter().map(|s| s.len).sum::<usize>() <= CHUNK);
                for s in item {
                    assert_eq!(s.start, seen[s.tensor], "spans of a tensor are consecutive");
                    assert!(s.len > 0 && s.start % align == 0, "{s:?} is not aligned to {align}");
                    seen[s.tensor] += s.len;
                }
            }
            assert_eq!(seen.to_vec(), sizes.to_vec());
        }
    }

    #[test]
    fn try_map_indices_keeps_order_and_reports_the_first_error() {
        assert_eq!(try_map_indices(1000, |i| Ok::<_, ()>(i * 2)), Ok((0..1000).map(|i| i * 2).collect()));
        assert_eq!(try_map_indices(1000, |i| if i % 300 == 299 { Err(i) } else { Ok(i) }), Err(299));
        assert_eq!(try_map_indices(0, Ok::<_, ()>), Ok(vec![]));
    }

    /// While other work holds the pool (an average updated on a background thread), per-tensor
    /// host work runs on the caller instead of queueing behind it.
    #[test]
    fn try_map_indices_does_not_wait_for_a_busy_pool() {
        use std::sync::atomic::AtomicBool;
        use std::sync::mpsc;
        use std::time::Duration;
        let busy = pool::num_threads().min(8);
        let (started, release) = (AtomicUsize::new(0), AtomicBool::new(false));
        std::thread::scope(|s| {
            s.spawn(|| {
                run_items(busy, true, |_| {
                    started.fetch_add(1, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                })
            });
            // Every thread that will ever run an item of the blocking call is inside one now.
            while started.load(Ordering::SeqCst) < busy {
                std::thread::yield_now();
            }
            let (tx, rx) = mpsc::channel();
            s.spawn(move || tx.send(try_map_indices(5000, Ok::<_, ()>).map(|v| v.len())));
            let got = rx.recv_timeout(Duration::from_secs(60));
            release.store(true, Ordering::SeqCst);
            assert_eq!(got, Ok(Ok(5000)), "try_map_indices queued behind the busy pool");
        });
    }
}
