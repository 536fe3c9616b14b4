//! Validation of one parameter group's tensors and their split into batches that one kernel
//! pass (one per device, parameter dtype and state dtype) can update. Backend independent.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::view::{Device, TensorView};
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes memory addresses: one multiply (addresses are already well spread, bar alignment).
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_usize(&mut self, x: usize) {
        self.0 = (x as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// How a tensor's elements are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major contiguous.
    Contiguous,
    /// Dense and non-overlapping, with these strides (e.g. channels_last).
    Dense(Vec<i64>),
    /// Gaps or overlaps: cannot be walked linearly.
    Strided,
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
    /// The index in its group of each parameter of the batch (`params[j]` is parameter
    /// `members[j]`).
    pub members: Vec<usize>,
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

/// Validate `t` and split it into batches. `who` names the optimizer for messages.
pub fn split_group(who: &str, group: usize, t: &GroupTensors) -> Result<Vec<Batch>> {
    let n = t.params.len();
    let at = |i: usize| format!("{who}: param group {group}, parameter {i}");
    if t.slot_names.len() != t.states.len() || t.scalar_names.len() != t.scalars.len() {
        return Err(Error::Internal(format!("{who}: param group {group}: state names and tensor lists disagree")));
    }
    if t.grads.as_ref().is_some_and(|g| g.len() != n) || t.states.iter().any(|s| s.len() != n) || t.scalars.iter().any(|s| s.len() != n) {
        return Err(Error::Value(format!("{who}: param group {group}: tensor lists of different lengths")));
    }
    let mut batches: Vec<Batch> = Vec::new();
    for i in 0..n {
        let p = &t.params[i];
        if p.layout == Layout::Strided {
            return Err(Error::Layout(format!("{}: parameter is not dense", at(i))));
        }
        if let Some(grads) = &t.grads {
            check_input(&|| at(i), p, &grads[i])?;
        }
        let input_dtype = t.grads.as_ref().map_or(p.view.dtype(), |g| g[i].view.dtype());
        let state_dtype = match t.states.first() {
            Some(s) => s[i].view.dtype(),
            None => p.view.dtype(),
        };
        for (k, slot) in t.states.iter().enumerate() {
            let s = &slot[i];
            check_peer(&|| at(i), &format!("state {k}"), p, s)?;
            if s.view.dtype() != state_dtype {
                return Err(Error::DType(format!("{}: state tensors have different dtypes", at(i))));
            }
        }
        let pd = p.view.dtype();
        let state_ok = state_dtype == pd || (state_dtype == DType::F32 && matches!(pd, DType::BF16 | DType::F16));
        if !state_ok {
            return Err(Error::DType(format!(
                "{}: state dtype {} cannot go with parameter dtype {} (use the parameter's dtype, or float32 for bf16/fp16 parameters)",
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
                    slot_names: t.slot_names.clone(),
                    states: Vec::new(),
                    scalar_names: t.scalar_names.clone(),
                    scalars: Vec::new(),
                    members: Vec::new(),
                });
                batches.last_mut().expect("just pushed")
            }
        };
        b.params.push(p.view);
        b.members.push(i);
        if let Some(grads) = &t.grads {
            b.grads.push(grads[i].view);
        }
        b.states.extend(t.states.iter().map(|slot| slot[i].view));
        b.scalars.extend(t.scalars.iter().map(|entry| entry[i].view));
    }
    Ok(batches)
}

/// Refuse a step in which one piece of memory would be written twice (the same tensor used as
/// two parameters or two state slots, e.g. from a corrupted checkpoint): the result would depend
/// on the order of writes.
pub fn check_no_shared_outputs<'a>(who: &str, batches: impl IntoIterator<Item = &'a Batch> + Clone) -> Result<()> {
    let n: usize = batches.clone().into_iter().map(|b| b.params.len() + b.states.len() + b.scalars.len()).sum();
    let mut seen = HashSet::with_capacity_and_hasher(n, BuildHasherDefault::<AddressHasher>::default());
    for b in batches {
        for v in b.params.iter().chain(b.states.iter()).chain(b.scalars.iter()) {
            if v.numel() > 0 && !seen.insert(v.ptr() as usize) {
                return Err(Error::Value(format!("{who}: the same tensor memory appears twice among parameters and optimizer state")));
            }
        }
    }
    Ok(())
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
}
