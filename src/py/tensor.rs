//! Turning Python `torch.Tensor` objects into [`TensorInfo`]s through libtorch (tch/torch-sys).

use crate::batch::{Layout, Shape, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::view::{Device, TensorView};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use std::ffi::CStr;
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
        _ => None,
    }
}

fn dtype_name(code: i32) -> String {
    match code {
        0 => "torch.uint8".into(),
        1 => "torch.int8".into(),
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

static TENSOR_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Whether `obj` is a `torch.Tensor` (or subclass, e.g. `nn.Parameter`). A plain subtype check:
/// no `__instancecheck__` dispatch.
fn is_tensor(obj: &Bound<'_, PyAny>) -> Result<bool> {
    let py = obj.py();
    let ty = TENSOR_TYPE
        .get_or_try_init(py, || -> PyResult<Py<PyType>> {
            Ok(PyModule::import(py, "torch")?.getattr("Tensor")?.cast_into::<PyType>()?.unbind())
        })
        .map_err(|e| Error::Internal(format!("cannot find torch.Tensor: {e}")))?;
    // SAFETY: both pointers are live type objects (obj is borrowed, ty is cached forever).
    Ok(unsafe { pyo3::ffi::PyType_IsSubtype(pyo3::ffi::Py_TYPE(obj.as_ptr()), ty.as_ptr() as *mut pyo3::ffi::PyTypeObject) } != 0)
}

/// Unpack `obj` (which must be a `torch.Tensor`) for the role `role` (used in messages).
pub fn unpack<'py>(obj: &Bound<'py, PyAny>, role: &dyn Fn() -> String) -> Result<Unpacked<'py>> {
    if !is_tensor(obj)? {
        return Err(Error::Value(format!("{}: expected a torch.Tensor, got {}", role(), type_name(obj))));
    }
    // SAFETY: obj is a live torch.Tensor (checked above); the returned at::Tensor is a new
    // reference owned by `handle`, dropped as soon as the metadata is read (the Python object,
    // kept by the caller, holds the storage).
    let handle = unsafe {
        let raw = torch_sys::python::thp_variable_unpack(obj.as_ptr() as *mut torch_sys::python::C_pyobject);
        if raw.is_null() {
            return Err(Error::Internal(take_torch_error().unwrap_or_else(|| "cannot unpack tensor".into())));
        }
        Tensor::from_ptr(raw)
    };
    let raw = handle.as_ptr() as *mut C_tensor;
    // SAFETY: raw is a valid at::Tensor owned by `handle`; each call is wrapped by libtorch's
    // PROTECT, which turns C++ exceptions into the last-error string checked below.
    unsafe {
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
            Error::DType(format!(
                "{} has dtype {}; supported: torch.float32, torch.bfloat16, torch.float16, torch.float64",
                role(),
                dtype_name(code)
            ))
        })?;
        let device = match torch_sys::at_device(raw) {
            -1 => Device::Cpu,
            i if i >= 0 => Device::Cuda(i as u32),
            _ => return Err(Error::Device(format!("{} is on an unsupported device (only cpu and cuda are)", role()))),
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
            } else {
                Layout::Strided
            }
        };
        let ptr = if numel == 0 { std::ptr::null_mut() } else { torch_sys::at_data_ptr(raw) as *mut u8 };
        if let Some(e) = take_torch_error() {
            if torch_sys::at_is_sparse(raw) == 1 {
                return Err(Error::Sparse(format!("{} is sparse", role())));
            }
            return Err(Error::Value(format!("{}: {e}", role())));
        }
        drop(handle);
        Ok(Unpacked { obj: obj.clone(), info: TensorInfo { view: TensorView::new(ptr, numel, dtype, device), shape, layout } })
    }
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
}
