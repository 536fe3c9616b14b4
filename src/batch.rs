//! Validation of one parameter group's tensors and their split into batches that one kernel
//! pass (one per device, parameter dtype and state dtype) can update. Backend independent.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{self, ABSMAX_SUFFIX};
use crate::rounding::WEIGHT_CORRECTION;
use crate::rules::FactorDims;
use crate::view::{Device, TensorView};

/// How a tensor's elements are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major contiguous.
    Contiguous,
    /// Dense and non-overlapping, with these strides (e.g. channels_last).
    Dense(Vec<i64>),
    /// Gaps between elements: cannot be walked linearly (a contiguous copy can).
    Strided,
    /// Elements that may share memory (e.g. an expanded, stride-0 tensor): can be read through a
    /// contiguous copy, never written in place.
    Overlapping,
}

/// A tensor shape, stored inline up to `INLINE_DIMS` dimensions (no allocation per tensor).
#[derive(Clone, Debug)]
pub enum Shape {
    Inline([i64; Shape::INLINE_DIMS], u8),
    Heap(Vec<i64>),
}

impl Shape {
    pub const INLINE_DIMS: usize = 6;

    /// A shape of `dim` zero sizes, to be filled in.
    pub fn zeros(dim: usize) -> Shape {
        if dim <= Self::INLINE_DIMS {
            Shape::Inline([0; Self::INLINE_DIMS], dim as u8)
        } else {
            Shape::Heap(vec![0; dim])
        }
    }

    pub fn as_slice(&self) -> &[i64] {
        match self {
            Shape::Inline(a, n) => &a[..*n as usize],
            Shape::Heap(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [i64] {
        match self {
            Shape::Inline(a, n) => &mut a[..*n as usize],
            Shape::Heap(v) => v,
        }
    }
}

impl PartialEq for Shape {
    fn eq(&self, other: &Shape) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl From<&[i64]> for Shape {
    fn from(dims: &[i64]) -> Shape {
        let mut s = Shape::zeros(dims.len());
        s.as_mut_slice().copy_from_slice(dims);
        s
    }
}

/// What the engine needs to know of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub view: TensorView,
    pub shape: Shape,
    pub layout: Layout,
}

/// The tensors of one parameter group, as passed from Python.
#[derive(Debug, Default)]
pub struct GroupTensors {
    pub params: Vec<TensorInfo>,
    /// The read-only inputs (gradients), or None for rules that read none.
    pub grads: Option<Vec<TensorInfo>>,
    /// The state slot names Python passed, in order (the rule checks them).
    pub slot_names: Vec<String>,
    /// `states[k][i]`: state slot `k` of parameter `i`.
    pub states: Vec<Vec<TensorInfo>>,
    /// The scalar state names Python passed, in order (the rule checks them).
    pub scalar_names: Vec<String>,
    /// `scalars[k][i]`: scalar state entry `k` (a one-element CPU float tensor, e.g. `step`) of
    /// parameter `i`.
    pub scalars: Vec<Vec<TensorInfo>>,
    /// The position of each parameter's first element in the whole tensor it is a shard of, or
    /// empty: every parameter is whole (see [`Batch::offsets`]).
    pub offsets: Vec<usize>,
    /// With a rule that keeps factored state: how it shapes its last two slots (see
    /// [`Matrices::factor_shapes`]), which are not shaped like the parameter.
    pub factored: Option<FactorDims>,
    /// For messages: the index of the param group these tensors belong to (a group may be
    /// passed as several calls), and each parameter's index in it.
    pub group: usize,
    pub positions: Vec<usize>,
}

/// How a parameter divides into rows (its dim-0 slices), for rules that gather sums per row
/// ([`crate::rules::Rule::ROW_SUMS`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Fewer than two dimensions: no rows.
    None,
    /// This many rows of `numel / rows` elements each, every one a run of consecutive elements in
    /// memory (dim 0 is the outermost).
    Consecutive(usize),
    /// Rows whose elements interleave in memory (a dense layout whose dim 0 is not the outermost).
    Interleaved,
}

impl Rows {
    fn of(t: &TensorInfo) -> Rows {
        let shape = t.shape.as_slice();
        if shape.len() < 2 {
            return Rows::None;
        }
        let rows = shape[0] as usize;
        match &t.layout {
            Layout::Dense(strides) if rows > 1 && strides[0] as usize * rows != t.view.numel() => Rows::Interleaved,
            _ => Rows::Consecutive(rows),
        }
    }
}

/// How a parameter divides into matrices (its last two dimensions; the leading ones index the
/// matrices), for rules with factored state ([`crate::rules::Rule::FACTORED`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Matrices {
    /// Fewer than two dimensions.
    None,
    /// `count` row-major matrices of `rows × cols` elements, one after another in memory
    /// (`count` is the product of the leading dimensions: it stays when `rows` is 0, e.g. in an
    /// empty shard of a sharded tensor).
    RowMajor { count: usize, rows: usize, cols: usize },
    /// Another memory layout (e.g. channels_last).
    Other,
}

impl Matrices {
    fn of(t: &TensorInfo) -> Matrices {
        match (t.shape.as_slice(), &t.layout) {
            (s, _) if s.len() < 2 => Matrices::None,
            ([lead @ .., rows, cols], Layout::Contiguous) => {
                Matrices::RowMajor { count: lead.iter().product::<i64>() as usize, rows: *rows as usize, cols: *cols as usize }
            }
            _ => Matrices::Other,
        }
    }

    /// The shapes of a factored rule's two factor slots for a parameter of shape `shape` (2+
    /// dims): one value per row, one per column, shaped as `dims` says.
    fn factor_shapes(shape: &[i64], dims: FactorDims) -> [Vec<i64>; 2] {
        let n = shape.len();
        let (mut rows, mut cols) = (shape.to_vec(), shape.to_vec());
        match dims {
            FactorDims::Kept => (rows[n - 1], cols[n - 2]) = (1, 1),
            FactorDims::Dropped => {
                rows.remove(n - 1);
                cols.remove(n - 2);
            }
        }
        [rows, cols]
    }
}

/// Check factor `k` (0: the rows', 1: the columns') of a factored rule's state (see
/// [`Matrices::factor_shapes`]) of parameter `p`: on its device, of the factor's shape, row-major.
fn check_factor(at: &dyn Fn() -> String, name: &str, k: usize, dims: FactorDims, p: &TensorInfo, x: &TensorInfo) -> Result<()> {
    if x.view.device() != p.view.device() {
        return Err(Error::Device(format!("{}: state '{name}' is on {} but the parameter is on {}", at(), x.view.device(), p.view.device())));
    }
    let shape = p.shape.as_slice();
    if shape.len() < 2 {
        return Err(Error::Shape(format!("{}: factored state needs a parameter of two or more dimensions, got shape {}", at(), fmt_shape(&p.shape))));
    }
    let want = &Matrices::factor_shapes(shape, dims)[k];
    if x.shape.as_slice() != want.as_slice() {
        return Err(Error::Shape(format!(
            "{}: state '{name}' has shape {} but a parameter of shape {} needs {want:?}",
            at(),
            fmt_shape(&x.shape),
            fmt_shape(&p.shape)
        )));
    }
    if x.layout != Layout::Contiguous {
        return Err(Error::Layout(format!("{}: state '{name}' is not contiguous", at())));
    }
    Ok(())
}

/// Parameters of one group sharing device, parameter dtype, input dtype and state dtype.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The index of the parameter group, for messages.
    pub group: usize,
    pub device: Device,
    pub param_dtype: DType,
    /// The inputs' dtype: the parameter's, or bf16/fp16 for an fp32 parameter (an fp32 average
    /// of a low-precision model). The parameter's dtype when the rule reads no input.
    pub input_dtype: DType,
    pub state_dtype: DType,
    pub params: Vec<TensorView>,
    /// One per parameter, or empty when the rule reads no input.
    pub grads: Vec<TensorView>,
    /// State slot names as passed; `states[i * slots() + k]` is slot `k` of parameter `i`.
    pub slot_names: Vec<String>,
    pub states: Vec<TensorView>,
    /// Scalar state names as passed; `scalars[i * n_scalars() + k]` (f32 or f64, one element).
    pub scalar_names: Vec<String>,
    pub scalars: Vec<TensorView>,
    /// For messages: each parameter's index in its param group (`members` count within the call).
    pub positions: Vec<usize>,
    /// The index in its call of each parameter of the batch (`params[j]` is the call's parameter
    /// `members[j]`): its row in the call's sums arrays, and what stochastic rounding's bits follow.
    pub members: Vec<usize>,
    /// The int8 weight corrections of the (bf16 or fp16) parameters, one per parameter, or empty (see
    /// [`crate::rounding`]).
    pub corrections: Vec<TensorView>,
    /// The position of each parameter's first element in the whole tensor it is a shard of (0 for
    /// whole tensors): stochastic rounding draws element `i`'s bits at position `offset + i`.
    pub offsets: Vec<usize>,
    /// With 8-bit state (`state_dtype` U8): `scales[i * slots() + k]`, the float32 block scales of
    /// slot `k` of parameter `i` (see [`crate::quant`]); else empty.
    pub scales: Vec<TensorView>,
    /// How each parameter divides into rows.
    pub rows: Vec<Rows>,
    /// How each parameter divides into matrices.
    pub matrices: Vec<Matrices>,
}

impl Batch {
    /// Total parameter elements.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }

    /// State slots per parameter.
    pub fn slots(&self) -> usize {
        self.slot_names.len()
    }

    /// Scalar state entries per parameter.
    pub fn n_scalars(&self) -> usize {
        self.scalar_names.len()
    }

    /// Whether every parameter comes with an input.
    pub fn has_input(&self) -> bool {
        self.grads.len() == self.params.len()
    }
}

fn fmt_shape(s: &Shape) -> String {
    format!("{:?}", s.as_slice())
}

/// Whether a parameter of dtype `param` may read an input of dtype `input`: the same dtype, or a
/// bf16/fp16 input for an fp32 parameter (an fp32 average of a low-precision model, a
/// low-precision snapshot accumulated into an fp32 sum).
pub fn input_dtype_ok(param: DType, input: DType) -> bool {
    param == input || (param == DType::F32 && matches!(input, DType::BF16 | DType::F16))
}

/// Check that `x` (a gradient or state tensor of parameter `p`, `at` names the parameter in
/// messages) lies with the parameter: same device, shape and strides.
fn check_peer(at: &dyn Fn() -> String, role: &str, p: &TensorInfo, x: &TensorInfo) -> Result<()> {
    if x.view.device() != p.view.device() {
        return Err(Error::Device(format!("{}: {role} is on {} but the parameter is on {}", at(), x.view.device(), p.view.device())));
    }
    if x.shape != p.shape {
        return Err(Error::Shape(format!("{}: {role} has shape {} but the parameter has shape {}", at(), fmt_shape(&x.shape), fmt_shape(&p.shape))));
    }
    if x.layout != p.layout {
        return Err(Error::Layout(format!("{}: {role} is strided differently from the parameter", at())));
    }
    Ok(())
}

/// Check the read-only input `g` (a gradient, or the model tensor an average reads) of
/// parameter `p`: as [`check_peer`], not the parameter's memory, and a dtype it may read.
pub fn check_input(at: &dyn Fn() -> String, p: &TensorInfo, g: &TensorInfo) -> Result<()> {
    check_peer(at, "grad", p, g)?;
    if g.view.numel() > 0 && g.view.ptr() == p.view.ptr() {
        return Err(Error::Value(format!("{}: grad shares memory with the parameter", at())));
    }
    if !input_dtype_ok(p.view.dtype(), g.view.dtype()) {
        return Err(Error::DType(format!(
            "{}: grad dtype {} differs from parameter dtype {} (only a float32 parameter may read a bfloat16/float16 input)",
            at(),
            g.view.dtype().name(),
            p.view.dtype().name()
        )));
    }
    Ok(())
}

/// Check the weight correction `c` of parameter `p`: an int8 tensor placed like `p`, a bf16 or
/// fp16 parameter.
fn check_correction(at: &dyn Fn() -> String, p: &TensorInfo, c: &TensorInfo) -> Result<()> {
    check_peer(at, WEIGHT_CORRECTION, p, c)?;
    if c.view.dtype() != DType::I8 {
        return Err(Error::DType(format!("{}: {WEIGHT_CORRECTION} must be a torch.int8 tensor, got {}", at(), c.view.dtype().name())));
    }
    if !matches!(p.view.dtype(), DType::BF16 | DType::F16) {
        return Err(Error::DType(format!(
            "{}: weight corrections go with bfloat16 and float16 parameters only, and this parameter is {} (float32 and \
             float64 parameters are their own master weights)",
            at(),
            p.view.dtype().name()
        )));
    }
    Ok(())
}

/// Check the block scales `a` (named `name`) of an 8-bit state slot of parameter `p`: a dense
/// float32 tensor with its device and one element per quantization block.
fn check_scales(at: &dyn Fn() -> String, name: &str, p: &TensorInfo, a: &TensorInfo) -> Result<()> {
    let want = quant::blocks(p.view.numel());
    if a.view.dtype() != DType::F32 || a.view.device() != p.view.device() || a.view.numel() != want || a.layout != Layout::Contiguous {
        return Err(Error::Value(format!(
            "{}: state '{name}' must be a contiguous torch.float32 tensor of {want} elements (one per block of {} elements) on {}, got \
             {} of {} elements on {} (a corrupted checkpoint?)",
            at(),
            quant::BLOCK,
            p.view.device(),
            a.view.dtype().name(),
            a.view.numel(),
            a.view.device()
        )));
    }
    Ok(())
}

/// The number of rule slots among `names` (the slot names Python passed, weight corrections
/// removed): all of them, or with 8-bit state the first half, each followed in the second half by
/// its scales (`exp_avg`, `exp_avg_sq`, `exp_avg_absmax`, `exp_avg_sq_absmax`).
fn rule_slots(who: &str, group: usize, names: &[String]) -> Result<usize> {
    if !names.last().is_some_and(|n| n.ends_with(ABSMAX_SUFFIX)) {
        return Ok(names.len());
    }
    let half = names.len() / 2;
    let paired = names.len().is_multiple_of(2) && names[..half].iter().zip(&names[half..]).all(|(slot, scale)| *scale == format!("{slot}{ABSMAX_SUFFIX}"));
    if !paired {
        return Err(Error::Value(format!(
            "{who}: param group {group}: 8-bit state slots {names:?} must list every slot, then its scales ('<slot>{ABSMAX_SUFFIX}') in the same order"
        )));
    }
    Ok(half)
}

/// Validate `t` and split it into batches. `who` names the optimizer for messages.
pub fn split_group(who: &str, t: &GroupTensors) -> Result<Vec<Batch>> {
    let (n, group) = (t.params.len(), t.group);
    let at = |i: usize| format!("{who}: param group {group}, parameter {}", t.positions[i]);
    if t.slot_names.len() != t.states.len() || t.scalar_names.len() != t.scalars.len() {
        return Err(Error::Internal(format!("{who}: param group {group}: state names and tensor lists disagree")));
    }
    if t.grads.as_ref().is_some_and(|g| g.len() != n) || t.states.iter().any(|s| s.len() != n) || t.scalars.iter().any(|s| s.len() != n) {
        return Err(Error::Value(format!("{who}: param group {group}: tensor lists of different lengths")));
    }
    if t.positions.len() != n {
        return Err(Error::Internal(format!("{who}: param group {group}: {} positions for {n} parameters", t.positions.len())));
    }
    // A last state slot named WEIGHT_CORRECTION is the parameters' weight corrections, not the
    // rule's state.
    let corrected = t.slot_names.last().is_some_and(|name| name == WEIGHT_CORRECTION);
    let n_stored = t.states.len() - usize::from(corrected);
    let (stored, corrections) = t.states.split_at(n_stored);
    // With 8-bit state, the rule's slots hold the codes and are followed by their scales.
    let n_slots = rule_slots(who, group, &t.slot_names[..n_stored])?;
    let (states, scales) = stored.split_at(n_slots);
    let quantized = !scales.is_empty();
    let mut batches: Vec<Batch> = Vec::new();
    for i in 0..n {
        let p = &t.params[i];
        let float_roles = std::iter::once(("parameter", p)).chain(t.grads.iter().map(|g| ("grad", &g[i])));
        let float_states = states.iter().filter(|_| !quantized).map(|slot| ("a state tensor", &slot[i]));
        for (what, x) in float_roles.chain(float_states) {
            if !x.view.dtype().is_float() {
                return Err(Error::DType(format!(
                    "{}: {what} has dtype {}; supported: torch.float32, torch.bfloat16, torch.float16, torch.float64",
                    at(i),
                    x.view.dtype().name()
                )));
            }
        }
        for (k, slot) in scales.iter().enumerate() {
            if states[k][i].view.dtype() != DType::U8 {
                return Err(Error::DType(format!(
                    "{}: state '{}' comes with 8-bit scales but has dtype {}, not torch.uint8",
                    at(i),
                    t.slot_names[k],
                    states[k][i].view.dtype().name()
                )));
            }
            check_scales(&|| at(i), &t.slot_names[n_slots + k], p, &slot[i])?;
        }
        if let Some(c) = corrections.first().map(|c| &c[i]) {
            check_correction(&|| at(i), p, c)?;
        }
        let overlapping = std::iter::once(("parameter", p)).chain(t.states.iter().map(|slot| ("a state tensor", &slot[i])));
        for (what, x) in overlapping {
            if x.layout == Layout::Overlapping {
                return Err(Error::Value(format!(
                    "{}: {what} has elements that share memory (e.g. an expanded tensor), so it cannot be updated in \
                     place; pass a tensor that owns its elements (e.g. .clone())",
                    at(i)
                )));
            }
        }
        if p.layout == Layout::Strided {
            return Err(Error::Layout(format!("{}: parameter is not dense", at(i))));
        }
        if let Some(grads) = &t.grads {
            check_input(&|| at(i), p, &grads[i])?;
        }
        let input_dtype = t.grads.as_ref().map_or(p.view.dtype(), |g| g[i].view.dtype());
        let state_dtype = match states.first() {
            Some(s) => s[i].view.dtype(),
            None => p.view.dtype(),
        };
        for (k, slot) in states.iter().enumerate() {
            let s = &slot[i];
            // a factored rule's factors are its last two slots
            match t.factored {
                Some(dims) if k + 2 >= states.len() => check_factor(&|| at(i), &t.slot_names[k], k + 2 - states.len(), dims, p, s)?,
                _ => check_peer(&|| at(i), &format!("state {k}"), p, s)?,
            }
            if s.view.dtype() != state_dtype {
                return Err(Error::DType(format!("{}: state tensors have different dtypes", at(i))));
            }
        }
        let pd = p.view.dtype();
        let state_ok = state_dtype == pd
            || (state_dtype == DType::F32 && matches!(pd, DType::BF16 | DType::F16))
            || (state_dtype == DType::BF16 && pd == DType::F32 && input_dtype == DType::F32)
            || (state_dtype == DType::U8 && quantized && matches!(pd, DType::F32 | DType::BF16 | DType::F16) && input_dtype == pd);
        if !state_ok {
            return Err(Error::DType(format!(
                "{}: state dtype {} cannot go with parameter dtype {} (use the parameter's dtype, float32 for bf16/fp16 \
                 parameters, bfloat16 for float32 parameters with float32 gradients, or 8-bit state (uint8 codes with \
                 their scales) for float32, bfloat16 and float16 parameters)",
                at(i),
                state_dtype.name(),
                pd.name()
            )));
        }
        // Scalar state (e.g. `step`) lives with the parameter: on the CPU for CPU parameters, on
        // the device for CUDA parameters (where the kernel advances it, as torch's fused and
        // capturable optimizers keep it).
        for (k, entry) in t.scalars.iter().enumerate() {
            let s = &entry[i];
            if !matches!(s.view.dtype(), DType::F32 | DType::F64) || s.view.numel() != 1 {
                return Err(Error::Value(format!(
                    "{}: scalar state {k} must be a one-element float tensor, got {} with {} elements",
                    at(i),
                    s.view.dtype().name(),
                    s.view.numel()
                )));
            }
            let cuda_ok = s.view.dtype() == DType::F32 || p.view.device() == Device::Cpu;
            if s.view.device() != p.view.device() || !cuda_ok {
                // The Python layer moves it next to the parameter and retries.
                return Err(Error::Layout(format!("{}: scalar state {k} is on {}, not with the parameter", at(i), s.view.device())));
            }
        }
        let key = (p.view.device(), pd, input_dtype, state_dtype);
        let b = match batches.iter_mut().position(|b| (b.device, b.param_dtype, b.input_dtype, b.state_dtype) == key) {
            Some(j) => &mut batches[j],
            None => {
                batches.push(Batch {
                    group,
                    device: key.0,
                    param_dtype: key.1,
                    input_dtype: key.2,
                    state_dtype: key.3,
                    params: Vec::new(),
                    grads: Vec::new(),
                    slot_names: t.slot_names[..n_slots].to_vec(),
                    states: Vec::new(),
                    scalar_names: t.scalar_names.clone(),
                    scalars: Vec::new(),
                    members: Vec::new(),
                    corrections: Vec::new(),
                    offsets: Vec::new(),
                    scales: Vec::new(),
                    rows: Vec::new(),
                    matrices: Vec::new(),
                    positions: Vec::new(),
                });
                batches.last_mut().expect("just pushed")
            }
        };
        b.params.push(p.view);
        b.members.push(i);
        b.positions.push(t.positions[i]);
        if let Some(grads) = &t.grads {
            b.grads.push(grads[i].view);
        }
        b.states.extend(states.iter().map(|slot| slot[i].view));
        b.corrections.extend(corrections.iter().map(|c| c[i].view));
        b.scales.extend(scales.iter().map(|a| a[i].view));
        b.offsets.push(t.offsets.get(i).copied().unwrap_or(0));
        b.rows.push(Rows::of(p));
        b.matrices.push(Matrices::of(p));
        b.scalars.extend(t.scalars.iter().map(|entry| entry[i].view));
    }
    Ok(batches)
}

/// The bytes one operand of a step spans on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    device: Device,
    start: usize,
    end: usize,
}

impl TensorInfo {
    /// The bytes the tensor's elements span, or None when it has none. Exact for the dense
    /// tensors the kernels walk (which are the only ones that reach them).
    pub fn extent(&self) -> Option<Extent> {
        let v = &self.view;
        (v.numel() > 0).then(|| Extent { device: v.device(), start: v.ptr() as usize, end: v.ptr() as usize + v.numel() * v.dtype().size() })
    }
}

/// The operands a step writes, sorted by address, checked to overlap nothing else of the step;
/// later runs check their new read-only inputs (the gradients) against it with [`Written::overlapping`].
#[derive(Debug, Default)]
pub struct Written {
    /// (extent, id) sorted by extent; pairwise disjoint.
    items: Vec<(Extent, u32)>,
}

/// An operand of a step for [`Written::index`]: its extent, whether the step writes it, and an id
/// the caller uses to name it.
pub type Operand = (Extent, bool, u32);

impl Written {
    /// Index the written operands of `ops`, or the ids of a pair of operands of which one is
    /// written and whose memory overlaps (the result would depend on the order of reads and writes).
    /// One sort and one sweep.
    pub fn index(mut ops: Vec<Operand>) -> std::result::Result<Written, (u32, u32)> {
        ops.sort_unstable_by_key(|&(e, ..)| e);
        let mut any: Option<(Extent, u32)> = None; // the operand reaching furthest so far, on this device
        let mut written: Option<(Extent, u32)> = None; // the written one reaching furthest so far
        let mut items = Vec::with_capacity(ops.iter().filter(|o| o.1).count());
        for &(e, w, id) in &ops {
            let reaches = |m: Option<(Extent, u32)>| m.filter(|(x, _)| x.device == e.device && x.end > e.start);
            if let Some((_, other)) = reaches(written).or(if w { reaches(any) } else { None }) {
                return Err((other, id));
            }
            let further = |m: Option<(Extent, u32)>| m.is_none_or(|(x, _)| x.device != e.device || x.end < e.end);
            if further(any) {
                any = Some((e, id));
            }
            if w {
                if further(written) {
                    written = Some((e, id));
                }
                items.push((e, id));
            }
        }
        Ok(Written { items })
    }

    /// The id of a written operand whose memory overlaps `e`, if any (a binary search).
    pub fn overlapping(&self, e: Extent) -> Option<u32> {
        // The written extents are disjoint, so sorted by start they are sorted by end too: only
        // the last one starting before `e` ends may reach into it.
        let i = self.items.partition_point(|(x, _)| (x.device, x.start) < (e.device, e.end));
        let (x, id) = *self.items.get(i.checked_sub(1)?)?;
        (x.device == e.device && x.end > e.start).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_dtypes_an_average_may_read() {
        use DType::*;
        for d in [F32, F64, BF16, F16] {
            assert!(input_dtype_ok(d, d));
        }
        assert!(input_dtype_ok(F32, BF16) && input_dtype_ok(F32, F16));
        assert!(!input_dtype_ok(BF16, F32) && !input_dtype_ok(F64, F32) && !input_dtype_ok(F16, BF16) && !input_dtype_ok(F32, F64));
    }

    fn ext(start: usize, end: usize) -> Extent {
        Extent { device: Device::Cpu, start, end }
    }

    /// Brute force: the pairs of operands that overlap with one of them written.
    fn conflicts(ops: &[Operand]) -> bool {
        ops.iter().enumerate().any(|(i, a)| ops[i + 1..].iter().any(|b| (a.1 || b.1) && a.0.device == b.0.device && a.0.start < b.0.end && b.0.start < a.0.end))
    }

    #[test]
    fn overlaps_agree_with_brute_force() {
        // A small deterministic generator (xorshift) of operand lists over a few devices.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..2000 {
            let n = 1 + next(8) as usize;
            let ops: Vec<Operand> = (0..n)
                .map(|i| {
                    let start = next(64) as usize;
                    let device = if next(4) == 0 { Device::Cuda(0) } else { Device::Cpu };
                    (Extent { device, start, end: start + 1 + next(12) as usize }, next(2) == 0, i as u32)
                })
                .collect();
            let indexed = Written::index(ops.clone());
            assert_eq!(indexed.is_err(), conflicts(&ops), "{ops:?}");
            if let Err((a, b)) = indexed {
                let (a, b) = (ops[a as usize], ops[b as usize]);
                assert!((a.1 || b.1) && a.0.device == b.0.device && a.0.start < b.0.end && b.0.start < a.0.end);
            }
            if let Ok(w) = indexed {
                // A new read-only operand: found iff it overlaps a written one.
                let start = next(64) as usize;
                let probe = ext(start, start + 1 + next(12) as usize);
                let expect = ops.iter().any(|o| o.1 && o.0.device == Device::Cpu && o.0.start < probe.end && probe.start < o.0.end);
                assert_eq!(w.overlapping(probe).is_some(), expect, "{ops:?} {probe:?}");
            }
        }
    }
}
