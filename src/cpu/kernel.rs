//! The typed inner loops: one span of one tensor, loaded block by block into the compute type,
//! updated element by element by the rule, stored back. Each element is read once and written
//! once.
//!
//! Two layers, so that code grows as rules + element types, not rules × element types: the span
//! drivers ([`update_span`], [`sum_span`]) load and store blocks and are generic over the element
//! types only; the rule's loop over one block in the compute type ([`update_block`],
//! [`sum_block`]) is generic over the rule and compute type only, and the driver calls it through
//! a function pointer ([`UpdateKernel`], [`SumKernel`]) once per block of [`BLOCK`] elements.

use crate::dtype::Elem;
use crate::quant::{self, QuantMap};
use crate::real::Real;
use crate::rules::orthograd::{self, Projection};
use crate::rules::{combine_sums, Rule, MAX_SLOTS, MAX_SUMS};

/// Elements per block: small enough for the block buffers to stay in L1. Also one quantization
/// block of 8-bit state, whose spans start at multiples of it.
const BLOCK: usize = 256;
const _: () = assert!(BLOCK == quant::BLOCK);

/// What happens to every gradient of a tensor when loaded: it is multiplied by `factor` =
/// `±c / grad_scale` (AMP unscaling, negation for `maximize`, the group's `grad_factor` times the
/// tensor's clip factor, see `cpu::GradScaling`); with AMP (`unscale` = `1 / grad_scale`) the
/// unscaled gradient is also stored back, as torch's fused optimizers leave `.grad`. For
/// power-of-two scales (GradScaler's) both equal torch's division exactly.
#[derive(Copy, Clone, Debug)]
pub struct GradTransform<R: Real> {
    pub factor: R,
    pub unscale: Option<R>,
}

/// Raw pointers to the first element of a span in each tensor of one parameter (`grad` is null
/// for rules that read no input; `correction` is null unless the 16-bit parameter carries a weight
/// correction, see [`crate::rounding`]). The input's element type `G` is usually the parameter's
/// `P`; it differs for an fp32 average of a bf16/fp16 model. With 8-bit state (`S::QUANTIZED`,
/// see [`crate::quant`]) the span starts a quantization block, `scales[k]` points at the scale of
/// that block of slot `k` and `maps[k]` is the slot's map; otherwise they are not read.
#[derive(Copy, Clone)]
pub struct SpanPtrs<P, G, S> {
    pub param: *mut P,
    pub grad: *const G,
    pub states: [*mut S; MAX_SLOTS],
    pub correction: *mut i8,
    pub scales: [*mut f32; MAX_SLOTS],
    pub maps: [&'static QuantMap; MAX_SLOTS],
    /// For a rule with factored state, what its elements read as slots 0 and 1.
    pub factors: Option<FactorReads>,
}

/// What the elements of a tensor with factored state ([`Rule::FACTORED`]) read as its factor slots
/// (`first` and the one after it): one value per row of each `rows × cols` matrix, and one per
/// column (the rule's [`Rule::factor_reads`], as f64 holding compute-type values exactly);
/// `start` is the span's first element in the tensor.
#[derive(Copy, Clone)]
pub struct FactorReads {
    pub first: usize,
    pub rows: *const f64,
    pub cols: *const f64,
    pub n_rows: usize,
    pub n_cols: usize,
    pub start: usize,
}

impl FactorReads {
    /// Factor `k`'s values (0: the rows', 1: the columns') of the `n` elements from `off` in the
    /// span, into `buf`.
    ///
    /// # Safety
    /// `rows` and `cols` must hold the values of every matrix of the tensor the span lies in.
    #[inline(always)]
    unsafe fn gather<R: Real>(&self, k: usize, off: usize, n: usize, buf: &mut [R]) {
        let first = self.start + off;
        // One column (rows' values) or one row (columns' values) per matrix: a value per element.
        let per_element = match k {
            0 if self.n_cols == 1 => Some(self.rows),
            1 if self.n_rows == 1 => Some(self.cols),
            _ => None,
        };
        if let Some(vals) = per_element {
            // SAFETY: the tensor's elements are its global rows (n_cols = 1) or its matrices'
            // columns (n_rows = 1), one after another.
            let vals = unsafe { std::slice::from_raw_parts(vals.add(first), n) };
            buf[..n].iter_mut().zip(vals).for_each(|(x, &v)| *x = R::from_f64(v));
            return;
        }
        // the element at `first + j`: its global row (over all matrices), its row within its
        // matrix, its column, and its matrix's first column value
        let (mut row, mut col) = (first / self.n_cols, first % self.n_cols);
        let mut row_in = row % self.n_rows;
        let mut col_base = row / self.n_rows * self.n_cols;
        let mut j = 0;
        while j < n {
            let run = (self.n_cols - col).min(n - j);
            // SAFETY: row < matrices·n_rows, and the columns of its matrix end at col_base + n_cols.
            unsafe {
                if k == 0 {
                    buf[j..j + run].fill(R::from_f64(*self.rows.add(row)));
                } else {
                    let vals = std::slice::from_raw_parts(self.cols.add(col_base + col), run);
                    buf[j..j + run].iter_mut().zip(vals).for_each(|(x, &v)| *x = R::from_f64(v));
                }
            }
            (j, row, row_in, col) = (j + run, row + 1, row_in + 1, 0);
            if row_in == self.n_rows {
                (row_in, col_base) = (0, col_base + self.n_cols);
            }
        }
    }
}

impl<P, G, S> SpanPtrs<P, G, S> {
    /// Block `off / BLOCK` of state slot `k` as compute-type values, as [`block`]; 8-bit codes are
    /// decoded with their block's scale into `buf`, factored state gathered into it (neither is
    /// written back by [`SpanPtrs::finish_state`] unless 8-bit).
    ///
    /// # Safety
    /// As [`block`], for slot `k` of the span and (8-bit state) its block's scale, or (factored)
    /// as [`FactorReads::gather`].
    #[inline(always)]
    unsafe fn state_block<'b, R: Real>(&self, k: usize, off: usize, n: usize, buf: &'b mut [R]) -> &'b mut [R]
    where
        S: Elem<R>,
    {
        // SAFETY: per the contract.
        unsafe {
            if let Some(f) = self.factors.filter(|f| k >= f.first) {
                f.gather(k - f.first, off, n, buf);
                &mut buf[..n]
            } else if S::QUANTIZED {
                S::dequantize(std::slice::from_raw_parts(self.states[k].add(off), n), *self.scales[k].add(off / BLOCK), self.maps[k], &mut buf[..n]);
                &mut buf[..n]
            } else {
                block::<R, S>(self.states[k].add(off), n, buf)
            }
        }
    }

    /// Write back block `off / BLOCK` of state slot `k`, as [`finish`]; 8-bit state is encoded
    /// with the block's new scale.
    ///
    /// # Safety
    /// As [`SpanPtrs::state_block`].
    #[inline(always)]
    unsafe fn finish_state<R: Real>(&self, k: usize, off: usize, vals: &[R], stochastic: Option<(u32, usize)>)
    where
        S: Elem<R>,
    {
        // SAFETY: per the contract.
        unsafe {
            if S::QUANTIZED {
                let codes = std::slice::from_raw_parts_mut(self.states[k].add(off), vals.len());
                *self.scales[k].add(off / BLOCK) = S::quantize(vals, self.maps[k], codes);
            } else {
                finish::<R, S>(self.states[k].add(off), vals, stochastic);
            }
        }
    }
}

/// The parameter block `vals` (`n` elements loaded from `P`) with its weight corrections added,
/// when it has any.
///
/// # Safety
/// A non-null `correction` must be valid for `vals.len()` reads.
#[inline(always)]
unsafe fn add_corrections<R: Real, P: Elem<R>>(vals: &mut [R], correction: *const i8) {
    if !correction.is_null() {
        // SAFETY: per the contract.
        P::apply_corrections(vals, unsafe { std::slice::from_raw_parts(correction, vals.len()) });
    }
}

/// Partial sums per span: element `i` of a span adds into lane `i % LANES`, and the lanes are
/// added in order at the end. Independent chains hide the latency of f64 addition (one chain
/// per sum is latency-bound, several times slower than reading the memory); the order is fixed,
/// so the sums are reproducible bit for bit (`test_cuda_sources.py`'s host harness adds in the
/// same order). `BLOCK` is a multiple of it.
const LANES: usize = 8;

/// Partial sums by lane, sums outermost (`lanes[k][l]`: sum `k` of lane `l`), so that the
/// lanes of one sum lie side by side and their additions vectorise.
type Lanes = [[f64; LANES]; MAX_SUMS];

/// Add each of the `n` elements of a block to its lane: `add(i, sums)` for element `i` with the
/// sums of its lane.
#[inline(always)]
fn add_to_lanes(n: usize, lanes: &mut Lanes, mut add: impl FnMut(usize, &mut [f64; MAX_SUMS])) {
    let mut one = |i: usize, l: usize, lanes: &mut Lanes| {
        let mut lane = std::array::from_fn(|k| lanes[k][l]);
        add(i, &mut lane);
        for (sum, x) in lanes.iter_mut().zip(lane) {
            sum[l] = x;
        }
    };
    let mut i = 0;
    while i + LANES <= n {
        for l in 0..LANES {
            one(i + l, l, lanes);
        }
        i += LANES;
    }
    for l in 0..n - i {
        one(i + l, l, lanes);
    }
}

/// The lanes' sums, combined in lane order (added, or for the sums in `max_mask` the largest).
fn fold_lanes(lanes: &Lanes, max_mask: u32) -> [f64; MAX_SUMS] {
    let mut sums = [0.0; MAX_SUMS];
    (0..LANES).for_each(|l| combine_sums(&mut sums, &std::array::from_fn(|k| lanes[k][l]), max_mask));
    sums
}

/// A rule's read-only sums pass as [`sum_span`] runs it: the rule's constants, and its block
/// function in the compute type `R`. The span drivers are generic over the element types only,
/// the block functions over the rule and `R` only: a rule's code is compiled once per compute
/// type, not once per combination of element types.
#[derive(Copy, Clone)]
pub struct SumKernel<R: Real> {
    /// Adds block elements into the lanes ([`sum_block`] of the rule).
    block: SumBlock<R>,
    /// The rule (`&Ru`), which `block` reads.
    rule: *const (),
    reads_input: bool,
    read_param: bool,
    /// The slots read from pass `state_pass` on.
    slots: usize,
    state_pass: usize,
    max_mask: u32,
}

/// [`sum_block`] of one rule: `rule` points at the rule.
type SumBlock<R> = unsafe fn(rule: *const (), factor: R, pass: usize, prior: &[R; MAX_SUMS], block: &SumBlockIn<'_, R>, lanes: &mut Lanes);

/// What a sums pass reads of one block: its first `n` parameters `p`, gradients `g` (before the
/// factor) and state `slots` (zeros where not read), as compute-type values.
#[derive(Copy, Clone)]
struct SumBlockIn<'a, R> {
    n: usize,
    p: &'a [R; BLOCK],
    g: &'a [R; BLOCK],
    slots: [&'a [R; BLOCK]; MAX_SLOTS],
}

impl<R: Real> SumKernel<R> {
    /// `rule`'s sums pass; the kernel borrows `rule` (it must outlive the kernel's use).
    pub fn of<Ru: Rule>(rule: &Ru) -> Self {
        SumKernel {
            block: sum_block::<Ru, R>(),
            rule: std::ptr::from_ref(rule).cast(),
            reads_input: Ru::READS_INPUT,
            read_param: Ru::SUMS_READ_PARAM,
            slots: if Ru::SUMS_READ_STATE { Ru::SLOTS } else { 0 },
            state_pass: Ru::STATE_SUM_PASS,
            max_mask: Ru::MAX_SUMS_MASK,
        }
    }
}

crate::simd::widest! {
    /// The per-tensor sums of pass `pass` of the rule of `k` over `len` elements at `ptrs`
    /// (read-only pass); `prior`: the tensor's values from [`Rule::prepare`] (pass >= 1). Runs the
    /// widest vector variant this CPU has (the same bits).
    ///
    /// # Safety
    /// As [`update_span`], except that the elements are only read; the rule `k` was made from
    /// must be alive.
    pub unsafe fn sum_span<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        k: &SumKernel<R>,
        factor: R,
        pass: usize,
        prior: &[R; MAX_SUMS],
        ptrs: SpanPtrs<P, G, S>,
        len: usize,
    ) -> [f64; MAX_SUMS] = sum_span_body;
}

/// [`sum_span`]'s loop.
///
/// # Safety
/// As [`sum_span`].
#[inline(always)]
unsafe fn sum_span_body<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
    k: &SumKernel<R>,
    factor: R,
    pass: usize,
    prior: &[R; MAX_SUMS],
    ptrs: SpanPtrs<P, G, S>,
    len: usize,
) -> [f64; MAX_SUMS] {
    let zeros = [R::ZERO; BLOCK];
    let mut pb = [R::ZERO; BLOCK];
    let mut gb = [R::ZERO; BLOCK];
    let mut sb = [[R::ZERO; BLOCK]; MAX_SLOTS];
    let mut lanes: Lanes = [[0.0; LANES]; MAX_SUMS];
    let read_slots = if pass >= k.state_pass { k.slots } else { 0 };
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        let mut slots: [&[R; BLOCK]; MAX_SLOTS] = [&zeros; MAX_SLOTS];
        // SAFETY: inside the span the caller vouched for; read only.
        let (p, g) = unsafe {
            for (j, (slot, buf)) in slots.iter_mut().zip(sb.iter_mut()).enumerate().take(read_slots) {
                *slot = if S::QUANTIZED || ptrs.factors.is_some_and(|f| j >= f.first) {
                    // (8-bit state decoded, factored state gathered, into the buffer, which the
                    // pass does not write)
                    ptrs.state_block(j, off, n, buf);
                    buf
                } else {
                    read_block(ptrs.states[j].add(off), n, buf)
                };
            }
            let g = if k.reads_input { read_block(ptrs.grad.add(off), n, &mut gb) } else { &zeros };
            let p = if k.read_param { param_block(ptrs.param.add(off), ptrs.correction, off, n, &mut pb) } else { &zeros };
            (p, g)
        };
        // SAFETY: the caller vouched for the rule.
        unsafe { (k.block)(k.rule, factor, pass, prior, &SumBlockIn { n, p, g, slots }, &mut lanes) };
        off += n;
    }
    fold_lanes(&lanes, k.max_mask)
}

crate::simd::widest_fn! {
    /// Add the elements of `block` (its gradients times `factor`) into `lanes` by rule `Ru`'s
    /// sums of pass `pass` (see [`sum_span`]): the variant for this CPU's widest vector unit.
    ///
    /// # Safety (of the returned function)
    /// `rule` must point at a live `Ru`.
    fn sum_block<Ru: Rule, R: Real>(
        rule: *const (),
        factor: R,
        pass: usize,
        prior: &[R; MAX_SUMS],
        block: &SumBlockIn<'_, R>,
        lanes: &mut Lanes,
    ) = sum_block_body;
}

/// [`sum_block`]'s loop.
///
/// # Safety
/// As [`sum_block`].
#[inline(always)]
unsafe fn sum_block_body<Ru: Rule, R: Real>(rule: *const (), factor: R, pass: usize, prior: &[R; MAX_SUMS], block: &SumBlockIn<'_, R>, lanes: &mut Lanes) {
    // SAFETY: per the contract.
    let rule = unsafe { &*rule.cast::<Ru>() };
    let SumBlockIn { n, p, g, slots } = *block;
    let state = |i: usize| std::array::from_fn(|k| if k < Ru::SLOTS { slots[k][i] } else { R::ZERO });
    // One loop per pass, the pass a constant in it: no branch on the pass per element, which
    // would keep the loop from vectorising (passes past the rule's are never compiled).
    let mut after = |pass: usize| add_to_lanes(n, lanes, |i, lane| rule.accumulate_after(pass, prior, p[i], g[i] * factor, &state(i), lane));
    match pass {
        0 => add_to_lanes(n, lanes, |i, lane| rule.accumulate(p[i], g[i] * factor, &state(i), lane)),
        1 if Ru::SUM_PASSES > 1 => after(1),
        2 if Ru::SUM_PASSES > 2 => after(2),
        3 if Ru::SUM_PASSES > 3 => after(3),
        _ => unreachable!("sums pass {pass} of a rule with {} passes", Ru::SUM_PASSES),
    }
}

/// Where one span's row and column sums of [`Rule::factor_term`] go: the tensor's arrays (a
/// value per global row, rows counted over all its matrices; one per column entry
/// `matrix·cols + column`), which the span writes directly for the rows and matrices it holds
/// whole (no other span touches them), and its partial sums of the ones its ends cut.
#[derive(Copy, Clone)]
pub struct FactorSink {
    pub rows: *mut f64,
    pub cols: *mut f64,
    pub n_rows: usize,
    pub n_cols: usize,
}

/// A span's sums of the rows and matrices its ends cut: `(global row, sum)`, and
/// `(first column entry, sums)` of each cut matrix, to be added in span order.
#[derive(Default)]
pub struct FactorParts {
    pub rows: Vec<(usize, f64)>,
    pub cols: Vec<(usize, Vec<f64>)>,
}

/// Rows shorter than this are walked element by element (a row's run per block would cost more
/// than its elements).
const SHORT_ROW: usize = 64;

crate::simd::widest! {
    /// The row and column sums of `rule.factor_term(g·factor)` over the `len > 0` gradient
    /// elements at `grad`, elements `start..start + len` of a tensor of row-major matrices (see
    /// [`FactorSink`]): written into `sink` where the span holds the row or matrix whole, returned
    /// where its ends cut one. Within a row the terms add into [`LANES`] lanes by position in the
    /// span's part of the row, folded in lane order; each column's terms add in row order: the
    /// same bits for any thread count, as the spans depend only on the sizes.
    ///
    /// # Safety
    /// `grad` must be valid for `len` reads; `sink` must hold the tensor's arrays, zeros where
    /// this span writes, which no other thread accesses there.
    pub unsafe fn factor_sums<Ru: Rule, R: Real, G: Elem<R>>(
        rule: &Ru,
        factor: R,
        grad: *const G,
        start: usize,
        len: usize,
        sink: FactorSink,
    ) -> FactorParts = factor_sums_body;
}

/// [`factor_sums`]' loop.
///
/// # Safety
/// As [`factor_sums`].
#[inline(always)]
unsafe fn factor_sums_body<Ru: Rule, R: Real, G: Elem<R>>(rule: &Ru, factor: R, grad: *const G, start: usize, len: usize, sink: FactorSink) -> FactorParts {
    let FactorSink { n_rows, n_cols, .. } = sink;
    let (end, size) = (start + len, n_rows * n_cols);
    let mut parts = FactorParts::default();
    // the cut matrices' partial column sums: the first one's, and the last one's if it is another
    let (first, last) = (start / size, (end - 1) / size);
    let first_cut = !start.is_multiple_of(size) || (first == last && !end.is_multiple_of(size));
    let last_cut = last != first && !end.is_multiple_of(size);
    let mut first_cols = vec![0.0; if first_cut { n_cols } else { 0 }];
    let mut last_cols = vec![0.0; if last_cut { n_cols } else { 0 }];
    // Where a matrix's column sums go: a cut one's partial sums, else the sink.
    let cols_of = |matrix: usize, first_cols: &mut Vec<f64>, last_cols: &mut Vec<f64>| -> *mut f64 {
        if matrix == first && first_cut {
            first_cols.as_mut_ptr()
        } else if matrix == last && last_cut {
            last_cols.as_mut_ptr()
        } else {
            // SAFETY: the matrix lies whole in this span (per the contract, its columns are ours).
            unsafe { sink.cols.add(matrix * n_cols) }
        }
    };
    let row_done = |row: usize, sum: f64, parts: &mut FactorParts| {
        if row * n_cols >= start && (row + 1) * n_cols <= end {
            // SAFETY: the row lies whole in this span (per the contract, its sum is ours).
            unsafe { *sink.rows.add(row) = sum };
        } else {
            parts.rows.push((row, sum));
        }
    };
    let mut buf = [R::ZERO; BLOCK];
    let (mut row, mut col) = (start / n_cols, start % n_cols);
    let mut cols = cols_of(row / n_rows, &mut first_cols, &mut last_cols);
    // lanes of the current row, by position in this span's part of it (`k`)
    let mut lanes = [0.0f64; LANES];
    let mut k = 0;
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: inside the range the caller vouched for; read only.
        let g = unsafe { read_block(grad.add(off), n, &mut buf) };
        let mut i = 0;
        while i < n {
            let run = (n_cols - col).min(n - i);
            // SAFETY: `cols` points at the n_cols column sums of the current matrix.
            let out = unsafe { std::slice::from_raw_parts_mut(cols.add(col), run) };
            if n_cols < SHORT_ROW {
                for (j, (&x, c)) in g[i..i + run].iter().zip(out.iter_mut()).enumerate() {
                    let t = rule.factor_term(x * factor);
                    lanes[(k + j) % LANES] += t;
                    *c += t;
                }
            } else {
                // the same lanes, rotated so that element j of the run adds into lane j % LANES
                let skew = k % LANES;
                lanes.rotate_left(skew);
                for (gs, cs) in g[i..i + run].chunks(LANES).zip(out.chunks_mut(LANES)) {
                    for (l, (&x, c)) in gs.iter().zip(cs.iter_mut()).enumerate() {
                        let t = rule.factor_term(x * factor);
                        lanes[l] += t;
                        *c += t;
                    }
                }
                lanes.rotate_right(skew);
            }
            (i, col, k) = (i + run, col + run, k + run);
            if col == n_cols {
                row_done(row, lanes.iter().sum(), &mut parts);
                (lanes, k, col, row) = ([0.0; LANES], 0, 0, row + 1);
                if row.is_multiple_of(n_rows) && off + i < len {
                    cols = cols_of(row / n_rows, &mut first_cols, &mut last_cols);
                }
            }
        }
        off += n;
    }
    if col > 0 {
        row_done(row, lanes.iter().sum(), &mut parts);
    }
    if first_cut {
        parts.cols.push((first * n_cols, first_cols));
    }
    if last_cut {
        parts.cols.push((last * n_cols, last_cols));
    }
    parts
}

/// A block of `n <= BLOCK` elements of one array as compute-type values, to read: a whole block
/// of the compute type is the tensor's own memory (no copy); anything else is converted (or
/// copied) into `buf`, whose elements past `n` are not read.
///
/// # Safety
/// `ptr` must be valid for `n` reads, not written by anyone while the block is read.
#[inline(always)]
unsafe fn read_block<R: Real, E: Elem<R>>(ptr: *const E, n: usize, buf: &mut [R; BLOCK]) -> &[R; BLOCK] {
    if E::IS_COMPUTE && n == BLOCK {
        // SAFETY: E is R (IS_COMPUTE), so the memory holds BLOCK valid R values.
        unsafe { &*(ptr as *const [R; BLOCK]) }
    } else {
        // SAFETY: ptr is valid for n reads.
        unsafe { E::load(std::slice::from_raw_parts(ptr, n), &mut buf[..n]) };
        buf
    }
}

/// A block of a parameter to read, as [`read_block`], with its weight corrections (if
/// `correction` is not null) added.
///
/// # Safety
/// As [`read_block`], for the parameter at `param` and (when not null) the corrections from
/// `correction + off`.
#[inline(always)]
unsafe fn param_block<R: Real, P: Elem<R>>(param: *const P, correction: *const i8, off: usize, n: usize, buf: &mut [R; BLOCK]) -> &[R; BLOCK] {
    if correction.is_null() {
        // SAFETY: per the contract.
        return unsafe { read_block(param, n, buf) };
    }
    // SAFETY: per the contract; only 16-bit parameters carry corrections, so the block is a copy.
    unsafe {
        P::load(std::slice::from_raw_parts(param, n), &mut buf[..n]);
        add_corrections::<R, P>(&mut buf[..n], correction.add(off));
    }
    buf
}

crate::simd::widest! {
    /// ⊥Grad's projection sums (`orthograd::accumulate`) of the `len` parameter elements at `param`
    /// and gradient elements at `grad`, each gradient times `factor` (read-only pass). The lanes of
    /// each sum are consecutive here, so that they become vector registers; the order of addition is
    /// [`sum_span`]'s.
    ///
    /// # Safety
    /// `param` and `grad` must be valid for `len` reads, and so must `correction` unless null.
    pub unsafe fn projection_sums<R: Real, P: Elem<R>, G: Elem<R>>(
        factor: R,
        param: *const P,
        correction: *const i8,
        grad: *const G,
        len: usize,
    ) -> [f64; MAX_SUMS] = projection_sums_body;
}

/// [`projection_sums`]' loop.
///
/// # Safety
/// As [`projection_sums`].
#[inline(always)]
unsafe fn projection_sums_body<R: Real, P: Elem<R>, G: Elem<R>>(
    factor: R,
    param: *const P,
    correction: *const i8,
    grad: *const G,
    len: usize,
) -> [f64; MAX_SUMS] {
    let mut pb = [R::ZERO; BLOCK];
    let mut gb = [R::ZERO; BLOCK];
    let mut lanes = [[0.0; LANES]; 3];
    let mut add = |lane: usize, w: R, u: R| {
        for (sum, x) in lanes.iter_mut().zip(orthograd::terms(w, u * factor)) {
            sum[lane] += x;
        }
    };
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: inside the range the caller vouched for; read only.
        let (w, u) = unsafe { (param_block(param.add(off), correction, off, n, &mut pb), read_block(grad.add(off), n, &mut gb)) };
        let whole = n - n % LANES;
        for (ws, us) in w[..whole].chunks_exact(LANES).zip(u[..whole].chunks_exact(LANES)) {
            for l in 0..LANES {
                add(l, ws[l], us[l]);
            }
        }
        for l in 0..n - whole {
            add(l, w[whole + l], u[whole + l]);
        }
        off += n;
    }
    let mut sums = [0.0; MAX_SUMS];
    sums[3] = len as f64;
    for (total, sum) in sums.iter_mut().zip(&lanes) {
        for x in sum {
            *total += x;
        }
    }
    sums
}

/// Stochastic rounding of one span's stores (see [`crate::rounding`]): the stream of the
/// parameter (`streams[0]`) and of each state slot `k` (`streams[1 + k]`), and the position of the
/// span's first element in its whole tensor (its index in the tensor, plus the shard's offset
/// for a shard).
#[derive(Copy, Clone, Debug)]
pub struct SpanRounding {
    pub streams: [u32; 1 + MAX_SLOTS],
    pub first: usize,
}

/// A rule's update as [`update_span`] runs it: the rule's constants, and its block function in
/// the compute type `R` (see [`SumKernel`]: compiled once per rule and compute type).
#[derive(Copy, Clone)]
pub struct UpdateKernel<R: Real> {
    /// Updates a block ([`update_block`] of the rule).
    block: UpdateBlock<R>,
    reads_input: bool,
    slots: usize,
    written_slots: usize,
}

/// [`update_block`] of one rule: `c` points at its coefficients.
type UpdateBlock<R> = unsafe fn(c: *const (), factor: R, p: &mut [R], input: &[R], s0: &mut [R], s1: &mut [R], s2: &mut [R], s3: &mut [R]);

impl<R: Real> UpdateKernel<R> {
    /// Rule `Ru`'s update.
    pub fn of<Ru: Rule>() -> Self {
        UpdateKernel { block: update_block::<Ru, R>(), reads_input: Ru::READS_INPUT, slots: Ru::SLOTS, written_slots: Ru::WRITTEN_SLOTS }
    }
}

crate::simd::widest! {
    /// Update `len` elements starting at `ptrs` by the rule of `k` with coefficients `c` (a
    /// `Ru::Coeffs<R>` of that rule `Ru`), with the widest vector unit the CPU has; with
    /// `projection` (⊥Grad) the rule reads the projected gradients; with `rounding` the parameter
    /// and state stores round stochastically. The math is the same IEEE arithmetic at any width
    /// (no fused multiply-add is formed), so results do not depend on the CPU.
    ///
    /// # Safety
    /// Every pointer must be valid for `len` elements of its type (state pointers for the rule's
    /// slots), and no other thread may access these elements during the call; with `xf.unscale`
    /// the gradient's elements are written too (stored back unscaled). `c` must point at the
    /// coefficients of the rule `k` was made for.
    pub unsafe fn update_span<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
        k: &UpdateKernel<R>,
        c: *const (),
        xf: &GradTransform<R>,
        projection: Option<Projection>,
        rounding: Option<SpanRounding>,
        ptrs: SpanPtrs<P, G, S>,
        len: usize,
    ) = update_span_body;
}

/// A block of `n` elements of one array as compute-type values: the tensor's own memory when its
/// dtype is the compute type, else a converted copy in `buf` (written back by [`finish`]).
///
/// # Safety
/// `ptr` must be valid for `n` elements and not accessed by anyone else while the slice lives.
#[inline(always)]
unsafe fn block<R: Real, E: Elem<R>>(ptr: *mut E, n: usize, buf: &mut [R]) -> &mut [R] {
    if E::IS_COMPUTE {
        // SAFETY: E is R (IS_COMPUTE), so the memory holds n valid R values.
        unsafe { std::slice::from_raw_parts_mut(ptr as *mut R, n) }
    } else {
        // SAFETY: ptr is valid for n reads.
        unsafe { E::load(std::slice::from_raw_parts(ptr, n), &mut buf[..n]) };
        &mut buf[..n]
    }
}

/// Write a converted block back (no-op when the block is the tensor's own memory), rounding
/// stochastically with `stream`'s bits from element `first` when given.
///
/// # Safety
/// As [`block`].
#[inline(always)]
unsafe fn finish<R: Real, E: Elem<R>>(ptr: *mut E, vals: &[R], stochastic: Option<(u32, usize)>) {
    if !E::IS_COMPUTE {
        // SAFETY: ptr is valid for vals.len() writes and exclusively ours.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, vals.len()) };
        match stochastic {
            Some((stream, first)) => E::store_stochastic(vals, dst, stream, first as u32),
            None => E::store(vals, dst),
        }
    }
}

#[inline(always)]
unsafe fn update_span_body<R: Real, P: Elem<R>, G: Elem<R>, S: Elem<R>>(
    k: &UpdateKernel<R>,
    c: *const (),
    xf: &GradTransform<R>,
    projection: Option<Projection>,
    rounding: Option<SpanRounding>,
    ptrs: SpanPtrs<P, G, S>,
    len: usize,
) {
    let mut pb = [R::ZERO; BLOCK];
    let mut gb = [R::ZERO; BLOCK];
    // the projected gradients (⊥Grad), times `factor`
    let mut xb = [R::ZERO; BLOCK];
    let [mut s0, mut s1, mut s2, mut s3] = [[R::ZERO; BLOCK]; MAX_SLOTS];
    // The rule reads `input[i] * factor`: the gradients (scaled on the fly), or their projections
    // (scaled before the projection).
    let factor = if projection.is_some() { R::ONE } else { xf.factor };
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: [off, off + n) lies inside the span the caller vouched for, and the span is
        // ours alone; each block slice is dropped before the next block is formed. The gradient
        // is written only with `xf.unscale` (AMP), when the caller vouched that it may be.
        unsafe {
            let corr = if ptrs.correction.is_null() { ptrs.correction } else { ptrs.correction.add(off) };
            let p = block::<R, P>(ptrs.param.add(off), n, &mut pb);
            add_corrections::<R, P>(p, corr);
            // With AMP the gradient is written back unscaled (the caller vouched for it then).
            let g: &mut [R] = if k.reads_input { block::<R, G>(ptrs.grad.add(off) as *mut G, n, &mut gb) } else { &mut gb[..n] };
            // Slots the rule does not use stay empty and are never indexed.
            let states = [
                if k.slots > 0 { ptrs.state_block(0, off, n, &mut s0) } else { &mut s0[..0] },
                if k.slots > 1 { ptrs.state_block(1, off, n, &mut s1) } else { &mut s1[..0] },
                if k.slots > 2 { ptrs.state_block(2, off, n, &mut s2) } else { &mut s2[..0] },
                if k.slots > 3 { ptrs.state_block(3, off, n, &mut s3) } else { &mut s3[..0] },
            ];
            let g = &mut g[..n];
            let p = &mut p[..n];
            let input: &[R] = match projection {
                Some(pr) if k.reads_input => {
                    for i in 0..n {
                        xb[i] = pr.apply(p[i], g[i] * xf.factor);
                    }
                    &xb[..n]
                }
                _ => &*g,
            };
            let [st0, st1, st2, st3] = states;
            (k.block)(c, factor, p, input, st0, st1, st2, st3);
            let states = [st0, st1, st2, st3];
            let sr = |array: usize| rounding.map(|r| (r.streams[array], r.first + off));
            if ptrs.correction.is_null() {
                finish::<R, P>(ptrs.param.add(off), p, sr(0));
            } else {
                // (only 16-bit parameters carry corrections: the block is a copy to store)
                P::store_corrected(p, std::slice::from_raw_parts_mut(ptrs.param.add(off), n), std::slice::from_raw_parts_mut(corr, n));
            }
            if k.reads_input {
                if let Some(unscale) = xf.unscale {
                    for x in g.iter_mut() {
                        *x = *x * unscale;
                    }
                    finish::<R, G>(ptrs.grad.add(off) as *mut G, g, None);
                }
            }
            for (slot, vals) in states.iter().enumerate().take(k.written_slots) {
                ptrs.finish_state(slot, off, vals, sr(1 + slot));
            }
        }
        off += n;
    }
}

crate::simd::widest_fn! {
    /// Rule `Ru`'s update of one block in the compute type: `p[i] ← Ru::update(c, p[i],
    /// input[i]·factor, s)`, with the element's state `s` read from `s0..s3` (`p.len()` values
    /// for each slot the rule keeps) and written back to the slots it writes. (Each slice is an
    /// argument of its own: the compiler then knows that they do not overlap.) The variant for
    /// this CPU's widest vector unit.
    ///
    /// # Safety (of the returned function)
    /// `c` must point at a live `Ru::Coeffs<R>`.
    fn update_block<Ru: Rule, R: Real>(
        c: *const (),
        factor: R,
        p: &mut [R],
        input: &[R],
        s0: &mut [R],
        s1: &mut [R],
        s2: &mut [R],
        s3: &mut [R],
    ) = update_block_body;
}

/// [`update_block`]'s loop.
///
/// # Safety
/// As [`update_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn update_block_body<Ru: Rule, R: Real>(c: *const (), factor: R, p: &mut [R], input: &[R], s0: &mut [R], s1: &mut [R], s2: &mut [R], s3: &mut [R]) {
    // SAFETY: per the contract.
    let c = unsafe { &*c.cast::<Ru::Coeffs<R>>() };
    let n = p.len();
    let input = &input[..n];
    // (each slice cut to the block, so that the loop indexes them unchecked)
    let len = |k: usize| if Ru::SLOTS > k { n } else { 0 };
    let (st0, st1, st2, st3) = (&mut s0[..len(0)], &mut s1[..len(1)], &mut s2[..len(2)], &mut s3[..len(3)]);
    for i in 0..n {
        let mut s = [R::ZERO; MAX_SLOTS];
        if Ru::SLOTS > 0 {
            s[0] = st0[i];
        }
        if Ru::SLOTS > 1 {
            s[1] = st1[i];
        }
        if Ru::SLOTS > 2 {
            s[2] = st2[i];
        }
        if Ru::SLOTS > 3 {
            s[3] = st3[i];
        }
        p[i] = Ru::update(c, p[i], input[i] * factor, &mut s);
        if Ru::WRITTEN_SLOTS > 0 {
            st0[i] = s[0];
        }
        if Ru::WRITTEN_SLOTS > 1 {
            st1[i] = s[1];
        }
        if Ru::WRITTEN_SLOTS > 2 {
            st2[i] = s[2];
        }
        if Ru::WRITTEN_SLOTS > 3 {
            st3[i] = s[3];
        }
    }
}

/// Whether all `len` elements at `ptr` are finite.
///
/// # Safety
/// `ptr` must be valid for `len` reads of `G`.
pub unsafe fn all_finite<R: Real, G: Elem<R>>(ptr: *const G, len: usize) -> bool {
    let mut buf = [R::ZERO; BLOCK];
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        // SAFETY: inside the range the caller vouched for.
        unsafe { G::load(std::slice::from_raw_parts(ptr.add(off), n), &mut buf[..n]) };
        if !buf[..n].iter().fold(true, |ok, x| ok & x.is_finite()) {
            return false;
        }
        off += n;
    }
    true
}
