//! `_native.sum_squares` / `tensor_sum_squares`: generic reductions the Python layer needs before a step (e.g. Adan's
//! global gradient norm), computed by the engine instead of one torch call per tensor.

use super::errors::to_py;
use super::tensor::{unpack, Unpacked};
use crate::batch::Layout;
use crate::error::{Error, Result};
use crate::view::{Device, TensorView};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn views<'py>(tensors: &Bound<'py, PyList>, keep: &mut Vec<Bound<'py, PyAny>>) -> Result<Vec<TensorView>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (i, obj) in tensors.iter().enumerate() {
        let Unpacked { obj: handle, info } = unpack(&obj, &|| format!("sum_squares: tensor {i}"))?;
        keep.push(handle);
        if !info.view.dtype().is_float() {
            return Err(Error::DType(format!(
                "sum_squares: tensor {i} has dtype {}; supported: torch.float32, torch.bfloat16, torch.float16, torch.float64",
                info.view.dtype().name()
            )));
        }
        if info.view.device() != Device::Cpu {
            return Err(Error::Device(format!("sum_squares: tensor {i} is on {}, which this build's engine does not reduce yet", info.view.device())));
        }
        if matches!(info.layout, Layout::Strided | Layout::Overlapping) {
            return Err(Error::Layout(format!("sum_squares: tensor {i} is not dense")));
        }
        out.push(info.view);
    }
    Ok(out)
}

/// The sum of the squares of each tensor of `tensors` (float32/64, bfloat16, float16, any mix),
/// accumulated in float64 in a fixed order (reproducible), holding the GIL. Raises `LayoutError`
/// for tensors with gaps or overlaps (callers pass `.contiguous()` copies then).
#[pyfunction]
pub fn tensor_sum_squares<'py>(py: Python<'py>, tensors: &Bound<'py, PyList>) -> PyResult<Vec<f64>> {
    let mut keep = Vec::new();
    let views = views(tensors, &mut keep).map_err(|e| to_py(py, e))?;
    // The GIL stays held: no Python thread can free a tensor's memory (a `.data` swap, `set_`, a
    // storage resize) while it is read.
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: every view is a dense CPU tensor checked above and kept alive by `keep` until
        // after the call; this thread holds the GIL, so no Python code changes the tensors
        // meanwhile (concurrent writers from native threads would be a data race in torch itself).
        unsafe { crate::cpu::tensor_sum_squares(&views) }
    }))
    .map_err(|_| Error::Internal("panic in tensor_sum_squares".into()));
    drop(keep);
    result.map_err(|e| to_py(py, e))
}

/// `Σ x²` over every element of every tensor in `tensors`: the sums of [`tensor_sum_squares`]
/// added in order.
#[pyfunction]
pub fn sum_squares<'py>(py: Python<'py>, tensors: &Bound<'py, PyList>) -> PyResult<f64> {
    Ok(tensor_sum_squares(py, tensors)?.iter().sum())
}
