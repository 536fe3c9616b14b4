//! Turning Python `torch.Tensor` objects into [`TensorInfo`]s through libtorch (tch/torch-sys).

use crate::batch::{Layout, Shape, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::view::{Device, TensorView};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use std::ffi::CStr;
use std::sync::OnceLock;
use tch::Tensor;
use torch_sys::C_tensor;

/// A tensor unpacked from Python: what the engine needs of it, and a strong reference to the
/// Python object, which keeps the storage alive while the GIL is released.
pub struct Unpacked<'py> {
    pub obj: Bound<'py, PyAny>,
    pub info: TensorInfo,
}

/// Take and clear libtorch's last error, if any.
fn take_torch_error() -> Option<String> {
    // SAFETY: returns either null or a malloc'ed C string that we own and free below.
    unsafe {
        let p = torch_sys::get_and_reset_last_err();
        if p.is_null() {
            return None;
        }
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        libc::free(p as *mut libc::c_void);
        // libtorch appends a C++ backtrace after the first line; keep the message only.
        Some(s.lines().next().unwrap_or_default().to_string())
    }
}

fn dtype_of(code: i32) -> Option<DType> {
    // c10::ScalarType codes.
    match code {
        5 => Some(DType::F16),
        6 => Some(DType::F32),
        7 => Some(DType::F64),
        15 => Some(DType::BF16),
        // (only a weight correction may be int8, and only 8-bit state codes uint8:
        // `batch::split_group` refuses them elsewhere)
        1 => Some(DType::I8),
        0 => Some(DType::U8),
        _ => None,
    }
}

fn dtype_name(code: i32) -> String {
    match code {
        2 => "torch.int16".into(),
        3 => "torch.int32".into(),
        4 => "torch.int64".into(),
        8 => "torch.complex32".into(),
        9 => "torch.complex64".into(),
        10 => "torch.complex128".into(),
        11 => "torch.bool".into(),
        c => format!("scalar type {c}"),
    }
}

/// Whether two elements of a tensor with these sizes and strides may share memory (e.g. an
/// expanded tensor): sufficient test for "no" is that, with dimensions sorted by stride, each
/// stride exceeds the span of the dimensions before it.
fn may_overlap(shape: &[i64], strides: &[i64]) -> bool {
    if shape.contains(&0) {
        return false;
    }
    let mut dims: Vec<(i64, i64)> = shape.iter().copied().zip(strides.iter().copied()).filter(|&(s, _)| s != 1).collect();
    dims.sort_by_key(|&(_, st)| st);
    let mut span = 0i64; // largest offset reachable with the dimensions so far
    for (size, stride) in dims {
        if stride <= span {
            return true;
        }
        span = span.saturating_add((size - 1).saturating_mul(stride));
    }
    false
}

/// Whether strides describe a dense, non-overlapping layout (some permutation of a contiguous one).
fn is_dense(shape: &[i64], strides: &[i64]) -> bool {
    let mut dims: Vec<(i64, i64)> = shape.iter().copied().zip(strides.iter().copied()).filter(|&(s, _)| s != 1).collect();
    dims.sort_by_key(|&(_, st)| st);
    let mut expected = 1;
    for (size, stride) in dims {
        if stride != expected {
            return false;
        }
        expected *= size;
    }
    true
}

/// `torch.Tensor`, `torch.nn.Parameter` and `torch.Tensor.__torch_dispatch__` (looked up once,
/// kept forever).
struct TorchTypes {
    tensor: Py<PyType>,
    parameter: Py<PyType>,
    disabled_dispatch: Py<PyAny>,
}

static TORCH_TYPES: PyOnceLock<TorchTypes> = PyOnceLock::new();

fn torch_types(py: Python<'_>) -> Result<&'static TorchTypes> {
    TORCH_TYPES
        .get_or_try_init(py, || -> PyResult<TorchTypes> {
            let torch = PyModule::import(py, "torch")?;
            let tensor = torch.getattr("Tensor")?.cast_into::<PyType>()?;
            let parameter = torch.getattr("nn")?.getattr("Parameter")?.cast_into::<PyType>()?.unbind();
            let disabled_dispatch = tensor.getattr("__torch_dispatch__")?.unbind();
            Ok(TorchTypes { tensor: tensor.unbind(), parameter, disabled_dispatch })
        })
        .map_err(|e| Error::Internal(format!("cannot find torch.Tensor: {e}")))
}

/// Fail unless `obj` is a `torch.Tensor` (or a subclass, e.g. `nn.Parameter`) whose memory the
/// engine may read and write directly: a plain subtype check (a read of the type's MRO), no
/// `__instancecheck__` dispatch. Subclasses that define `__torch_dispatch__` (wrapper tensors made
/// with `_make_wrapper_subclass`, e.g. DTensor; tensors that log or redirect their operations)
/// are refused: their data is elsewhere, or writing their memory behind their back would skip
/// their own logic.
fn check_tensor(obj: &Bound<'_, PyAny>, types: &TorchTypes, role: &dyn Fn() -> String) -> Result<()> {
    let py = obj.py();
    let tensor_type = types.tensor.as_ptr() as *mut pyo3::ffi::PyTypeObject;
    // SAFETY: obj is borrowed and live.
    let ty = unsafe { pyo3::ffi::Py_TYPE(obj.as_ptr()) };
    if ty == tensor_type || ty == types.parameter.as_ptr() as *mut pyo3::ffi::PyTypeObject {
        return Ok(());
    }
    // SAFETY: both pointers are live type objects (obj is borrowed, tensor_type cached forever).
    if unsafe { pyo3::ffi::PyType_IsSubtype(ty, tensor_type) } == 0 {
        return Err(Error::Value(format!("{}: expected a torch.Tensor, got {}", role(), type_name(obj))));
    }
    let dispatch = obj.get_type().getattr(pyo3::intern!(py, "__torch_dispatch__"));
    if !dispatch.is_ok_and(|d| d.is(types.disabled_dispatch.bind(py))) {
        return Err(Error::Value(wrapper_message(&role(), &type_name(obj))));
    }
    Ok(())
}

/// Fail (as the engine would) unless `obj` is a `torch.Tensor` the engine may update directly
/// (see [`check_tensor`]); its dtype, layout and memory are not looked at.
pub fn check_type(obj: &Bound<'_, PyAny>, role: &dyn Fn() -> String) -> Result<()> {
    check_tensor(obj, torch_types(obj.py())?, role)
}

/// The refusal of a tensor subclass the engine cannot read natively (one place for the wording).
fn wrapper_message(role: &str, type_name: &str) -> String {
    format!(
        "{role} is a {type_name}, a tensor subclass with its own __torch_dispatch__ (a wrapper tensor such as DTensor, or a \
         subclass that intercepts operations): emafuse updates tensor memory directly and cannot do that behind its back. \
         Pass plain torch.Tensors (for a wrapper, its local tensor, e.g. DTensor.to_local()), or use a torch.optim optimizer"
    )
}

/// Where torch 2.11 keeps a `torch.Tensor` object's `at::Tensor`: right after the object header
/// (see [`in_place`]).
fn cdata(obj: *mut pyo3::ffi::PyObject) -> *mut C_tensor {
    (obj as *mut u8).wrapping_add(std::mem::size_of::<pyo3::ffi::PyObject>()) as *mut C_tensor
}

/// Whether `torch.Tensor` objects can be read in place (see [`in_place`]), once per process.
static IN_PLACE: OnceLock<bool> = OnceLock::new();

/// The `at::Tensor` inside a `torch.Tensor` object, if this torch lays it out as torch 2.11 does:
/// `THPVariable { PyObject_HEAD; at::Tensor cdata; ... }` (torch/csrc/autograd/python_variable.h).
/// Reading it there costs no copy and no reference count. A copy (torch's unpack) would incref
/// the tensor's Python object, which needs the GIL and, on long lists, costs as much as the
/// rest of the read. The layout is checked once against torch's own unpack; where it differs,
/// tensors are copied out instead.
///
/// # Safety
/// `obj` is a live `torch.Tensor` and the GIL is held.
unsafe fn in_place(obj: *mut pyo3::ffi::PyObject) -> Result<Option<*mut C_tensor>> {
    let cdata = cdata(obj);
    let ok = match IN_PLACE.get() {
        Some(&ok) => ok,
        None => {
            let copy = Copied::of(obj)?;
            // An at::Tensor is one pointer to its TensorImpl: both must point to the same one.
            let ok = *(copy.0 as *const usize) == *(cdata as *const usize);
            *IN_PLACE.get_or_init(|| ok)
        }
    };
    Ok(ok.then_some(cdata))
}

/// A copy of a `torch.Tensor` object's `at::Tensor` made by torch's unpack, deleted on drop.
struct Copied(*mut C_tensor);

impl Copied {
    /// # Safety
    /// `obj` is a live `torch.Tensor` and the GIL is held.
    unsafe fn of(obj: *mut pyo3::ffi::PyObject) -> Result<Copied> {
        let raw = torch_sys::python::thp_variable_unpack(obj as *mut torch_sys::python::C_pyobject);
        if raw.is_null() {
            return Err(Error::Internal(take_torch_error().unwrap_or_else(|| "cannot unpack tensor".into())));
        }
        Ok(Copied(raw))
    }
}

impl Drop for Copied {
    fn drop(&mut self) {
        // SAFETY: self.0 came from thp_variable_unpack and is deleted once, here.
        drop(unsafe { Tensor::from_ptr(self.0) });
    }
}

/// Read `obj` (a `torch.Tensor`) on the calling thread, which holds the GIL.
///
/// # Safety
/// `obj` is a live `torch.Tensor`, kept alive by the caller.
unsafe fn read_holding_gil(obj: *mut pyo3::ffi::PyObject, role: &dyn Fn() -> String) -> Result<TensorInfo> {
    match in_place(obj)? {
        Some(t) => read_info(t, role),
        // The copy keeps nothing alive past the call: the Python object, kept by the caller,
        // holds the storage.
        None => read_info(Copied::of(obj)?.0, role),
    }
}

/// Unpack `obj` (which must be a `torch.Tensor`) for the role `role` (used in messages).
pub fn unpack<'py>(obj: &Bound<'py, PyAny>, role: &dyn Fn() -> String) -> Result<Unpacked<'py>> {
    check_tensor(obj, torch_types(obj.py())?, role)?;
    // SAFETY: obj is a live torch.Tensor, borrowed for the call, and this thread holds the GIL.
    let info = unsafe { read_holding_gil(obj.as_ptr(), role)? };
    Ok(Unpacked { obj: obj.clone(), info })
}

/// What the engine reads of `obj` (a `torch.Tensor`), and whether it read it in place (the fast
/// path, see [`in_place`]) rather than through torch's unpack. For the tests that verify the
/// in-place read against torch's own accessors on every supported torch release.
pub fn read_reporting_path(obj: &Bound<'_, PyAny>) -> Result<(bool, TensorInfo)> {
    let role = || "tensor".to_string();
    check_tensor(obj, torch_types(obj.py())?, &role)?;
    // SAFETY: obj is a live torch.Tensor, borrowed for the call, and this thread holds the GIL.
    unsafe { Ok((in_place(obj.as_ptr())?.is_some(), read_holding_gil(obj.as_ptr(), &role)?)) }
}

/// Below this many tensors, [`infos`] reads them on the calling thread alone.
const PARALLEL_FROM: usize = 512;

/// What the engine needs of each of `objs` (`role(i)` names object `i` in messages), or the
/// first error in list order. Reading a tensor's metadata costs a few cache misses on torch's
/// objects; for long lists (thousands of parameters, each with several state tensors) the reads
/// run on emafuse's pool beside this thread.
pub fn infos(objs: &[Bound<'_, PyAny>], role: &(dyn Fn(usize) -> String + Sync)) -> Result<Vec<TensorInfo>> {
    let Some(first) = objs.first() else { return Ok(Vec::new()) };
    let types = torch_types(first.py())?;
    for (i, obj) in objs.iter().enumerate() {
        check_tensor(obj, types, &|| role(i))?;
    }
    // SAFETY (all blocks below): every object is a live torch.Tensor (checked above), kept alive
    // by `objs`, and this thread holds the GIL throughout.
    let parallel = objs.len() >= PARALLEL_FROM && unsafe { in_place(first.as_ptr())? }.is_some();
    if !parallel {
        return objs.iter().enumerate().map(|(i, o)| unsafe { read_holding_gil(o.as_ptr(), &|| role(i)) }).collect();
    }
    let tensors: Vec<usize> = objs.iter().map(|o| cdata(o.as_ptr()) as usize).collect();
    // The helpers read the tensors in place with libtorch calls only: no Python API, no
    // reference count. This thread waits for them holding the GIL, so no Python code runs
    // meanwhile and nothing can change the objects.
    let read = |i: usize| unsafe { read_info(tensors[i] as *mut C_tensor, &|| role(i)) };
    crate::cpu::try_map_indices(objs.len(), read)
}

/// Whether every one of `objs` still has the metadata in `cached` (data address, size, strides,
/// dtype, device): read as [`infos`] does, in parallel for long lists, with nothing allocated
/// per tensor.
///
/// # Safety
/// Every object is a live `torch.Tensor`, kept alive by the caller, who holds the GIL.
pub unsafe fn unchanged(objs: &[Py<PyAny>], cached: &[TensorInfo]) -> bool {
    let Some(first) = objs.first() else { return true };
    let same = |i: usize, raw: *mut C_tensor| {
        // SAFETY: per the contract; nothing changes the tensors while the caller holds the GIL.
        match unsafe { read_info(raw, &String::new) } {
            Ok(info) if info == cached[i] => Ok(()),
            _ => Err(()),
        }
    };
    // SAFETY: per the contract.
    let readable_in_place = unsafe { in_place(first.as_ptr()) }.ok().flatten().is_some();
    if objs.len() < PARALLEL_FROM || !readable_in_place {
        return objs.iter().enumerate().all(|(i, o)| {
            // SAFETY: per the contract.
            match unsafe { in_place(o.as_ptr()) } {
                Ok(Some(raw)) => same(i, raw).is_ok(),
                // SAFETY: per the contract.
                _ => unsafe { Copied::of(o.as_ptr()) }.is_ok_and(|c| same(i, c.0).is_ok()),
            }
        });
    }
    let tensors: Vec<usize> = objs.iter().map(|o| cdata(o.as_ptr()) as usize).collect();
    crate::cpu::try_map_indices(objs.len(), |i| same(i, tensors[i] as *mut C_tensor)).is_ok()
}

/// Read a tensor's dtype, device, shape, layout and data address.
///
/// # Safety
/// `raw` is a valid `at::Tensor` that nothing changes during the call.
unsafe fn read_info(raw: *mut C_tensor, role: &dyn Fn() -> String) -> Result<TensorInfo> {
    // Each call is wrapped by libtorch's PROTECT, which turns C++ exceptions into the
    // (thread-local) last-error string checked below.
    // Sparse and other non-strided layouts throw here.
    let contiguous = torch_sys::at_is_contiguous(raw);
    if take_torch_error().is_some() {
        return Err(Error::Sparse(format!("{} is sparse (or has another non-strided layout)", role())));
    }
    let code = torch_sys::at_scalar_type(raw);
    if (8..=10).contains(&code) {
        // Complex tensors are updated as real views; the Python layer stages them.
        return Err(Error::Layout(format!("{} is complex", role())));
    }
    let dtype = dtype_of(code).ok_or_else(|| {
        Error::DType(format!("{} has dtype {}; supported: torch.float32, torch.bfloat16, torch.float16, torch.float64", role(), dtype_name(code)))
    })?;
    let device = match torch_sys::at_device(raw) {
        -1 => Device::Cpu,
        i if i >= 0 => Device::Cuda(i as u32),
        // torch's wording for its fused optimizers (emafuse's always are), which its tests match.
        _ => {
            return Err(Error::Device(format!(
                "`fused=True` requires all the params to be floating point Tensors of supported devices: ['cpu', 'cuda'], \
                 but {} is on another device (emafuse always runs fused: keep the model on cpu or cuda)",
                role()
            )))
        }
    };
    let dim = torch_sys::at_dim(raw);
    let mut shape = Shape::zeros(dim);
    torch_sys::at_shape(raw, shape.as_mut_slice().as_mut_ptr());
    let numel = shape.as_slice().iter().product::<i64>() as usize;
    let layout = if contiguous == 1 {
        Layout::Contiguous
    } else {
        let mut strides = vec![0i64; dim];
        torch_sys::at_stride(raw, strides.as_mut_ptr());
        if is_dense(shape.as_slice(), &strides) {
            Layout::Dense(strides)
        } else if may_overlap(shape.as_slice(), &strides) {
            Layout::Overlapping
        } else {
            Layout::Strided
        }
    };
    let ptr = if numel == 0 { std::ptr::null_mut() } else { torch_sys::at_data_ptr(raw) as *mut u8 };
    if let Some(e) = take_torch_error() {
        if torch_sys::at_is_sparse(raw) == 1 {
            return Err(Error::Sparse(format!("{} is sparse", role())));
        }
        return Err(Error::Value(format!("{}: {e} (emafuse needs tensors with their own memory)", role())));
    }
    if numel > 0 && ptr.is_null() {
        return Err(Error::Value(format!(
            "{} has no memory (a tensor without storage, e.g. a wrapper subclass or a fake tensor): emafuse updates \
             tensor memory directly; pass plain tensors that own their data",
            role()
        )));
    }
    Ok(TensorInfo { view: TensorView::new(ptr, numel, dtype, device), shape, layout })
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::is_dense;

    #[test]
    fn dense_layouts() {
        assert!(is_dense(&[2, 3], &[3, 1]));
        assert!(is_dense(&[2, 3], &[1, 2])); // transposed
        assert!(is_dense(&[4, 3, 5, 5], &[75, 1, 15, 3])); // channels_last
        assert!(is_dense(&[1, 3], &[100, 1])); // size-1 dims may have any stride
        assert!(!is_dense(&[2, 3], &[6, 1])); // every other row
        assert!(!is_dense(&[3], &[0])); // expanded
    }

    #[test]
    fn overlapping_layouts() {
        use super::may_overlap;
        assert!(may_overlap(&[4, 3], &[0, 1])); // expanded rows
        assert!(may_overlap(&[2, 2], &[1, 1])); // as_strided windows
        assert!(!may_overlap(&[2, 3], &[6, 1])); // gaps, no overlap
        assert!(!may_overlap(&[3, 2], &[1, 3])); // transposed
        assert!(!may_overlap(&[1, 3], &[0, 1])); // size-1 dims may have any stride
        assert!(!may_overlap(&[0, 3], &[0, 1])); // empty
    }
}
