//! The Python boundary: the only code that touches pyo3 or tch.

mod errors;
mod plan;
mod reduce;
mod step;
mod tensor;

use crate::batch::Layout;
use crate::rules::Input;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

/// emafuse's native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<plan::Group>()?;
    m.add_class::<plan::StepPlan>()?;
    m.add_function(wrap_pyfunction!(plan::step, m)?)?;
    m.add_function(wrap_pyfunction!(step::step_async, m)?)?;
    m.add_class::<step::PendingStep>()?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(check_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensor, m)?)?;
    m.add("TORCH_VERSION", TORCH_VERSION)?;
    m.add_function(wrap_pyfunction!(rule_names, m)?)?;
    m.add_function(wrap_pyfunction!(rule_info, m)?)?;
    m.add_function(wrap_pyfunction!(rule_slots, m)?)?;
    m.add_function(wrap_pyfunction!(rule_sums, m)?)?;
    m.add("MAX_SUMS", crate::rules::MAX_SUMS)?;
    m.add("WEIGHT_CORRECTION", crate::rounding::WEIGHT_CORRECTION)?;
    m.add("ABSMAX_SUFFIX", crate::quant::ABSMAX_SUFFIX)?;
    m.add("QUANT_BLOCK", crate::quant::BLOCK)?;
    m.add_function(wrap_pyfunction!(quantization_map, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_source, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::sum_squares, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::tensor_sum_squares, m)?)?;
    Ok(())
}

/// Raise the engine's error (`InvalidArgumentError`) unless `tensor` is a `torch.Tensor` the
/// engine may update directly: not a subclass with its own `__torch_dispatch__` (a wrapper
/// tensor such as DTensor). `role` names it in the message.
#[pyfunction]
fn check_tensor(py: Python<'_>, tensor: &Bound<'_, PyAny>, role: &str) -> PyResult<()> {
    tensor::check_type(tensor, &|| role.to_string()).map_err(|e| errors::to_py(py, e))
}

/// The torch release (`major.minor.patch`) this module was compiled against: its C++ ABI is the
/// only one it runs with (`emafuse/_built_for.py` holds the same, for the check at import).
const TORCH_VERSION: &str =
    env!("EMAFUSE_TORCH_VERSION", "build the native module through build_support/torch_build.py (pip install ., or dev.sh), which sets it");

/// What the engine reads of `tensor` (for tests): `{in_place, data_ptr, shape, layout, strides,
/// dtype, device}`, `in_place` telling whether it was read straight from the Python object (the
/// fast path) or through torch's unpack; `layout` is "contiguous", "dense" (with `strides`),
/// "strided" or "overlapping".
#[pyfunction]
fn read_tensor<'py>(py: Python<'py>, tensor: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let (in_place, info) = tensor::read_reporting_path(tensor).map_err(|e| errors::to_py(py, e))?;
    let d = PyDict::new(py);
    d.set_item("in_place", in_place)?;
    d.set_item("data_ptr", info.view.ptr() as usize)?;
    d.set_item("shape", PyTuple::new(py, info.shape.as_slice())?)?;
    let (layout, strides) = match &info.layout {
        Layout::Contiguous => ("contiguous", None),
        Layout::Dense(strides) => ("dense", Some(PyTuple::new(py, strides)?)),
        Layout::Strided => ("strided", None),
        Layout::Overlapping => ("overlapping", None),
    };
    d.set_item("layout", layout)?;
    d.set_item("strides", strides)?;
    d.set_item("dtype", info.view.dtype().name())?;
    d.set_item("device", info.view.device().to_string())?;
    Ok(d)
}

/// Names of every update rule the engine has.
#[pyfunction]
fn rule_names() -> Vec<&'static str> {
    crate::rules::all().map(|i| i.name).collect()
}

/// The description of the rule `name`: `{name, summary, numbers, flags, optional_flags, scalars,
/// nonnegative_slots, reads_input, input}` (names as tuples of str; `input` is "gradient", "weights" (an average's
/// model, possibly narrower than the average) or "none").
#[pyfunction]
fn rule_info<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
    let info = crate::rules::info(name).map_err(|e| errors::to_py(py, e))?;
    let d = PyDict::new(py);
    d.set_item("name", info.name)?;
    d.set_item("summary", info.summary)?;
    d.set_item("numbers", PyTuple::new(py, info.numbers)?)?;
    d.set_item("flags", PyTuple::new(py, info.flags)?)?;
    d.set_item("optional_flags", PyTuple::new(py, info.optional_flags)?)?;
    d.set_item("scalars", PyTuple::new(py, info.scalars)?)?;
    d.set_item("nonnegative_slots", PyTuple::new(py, info.nonnegative_slots)?)?;
    d.set_item("reads_input", info.input != Input::None)?;
    d.set_item(
        "input",
        match info.input {
            Input::None => "none",
            Input::Gradient => "gradient",
            Input::Weights => "weights",
        },
    )?;
    Ok(d)
}

/// The state slot names (in order) of the rule `name` built from the hyper-parameters `hyper`
/// (the dict a step passes).
#[pyfunction]
fn rule_slots<'py>(py: Python<'py>, name: &str, hyper: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyTuple>> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    let names = crate::rules::slot_names(name, &h).map_err(|e| errors::to_py(py, e))?;
    PyTuple::new(py, names)
}

/// The per-tensor sums (reductions over each whole tensor before its update) the rule `name`
/// built from `hyper` reads, as `(pass, is_max)` per sum: the read-only pass that gathers it, and
/// whether it is a maximum (else a sum). Empty for an element-wise rule; at most `MAX_SUMS`.
#[pyfunction]
fn rule_sums(py: Python<'_>, name: &str, hyper: &Bound<'_, PyDict>) -> PyResult<Vec<(usize, bool)>> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    crate::rules::sum_kinds(name, &h).map_err(|e| errors::to_py(py, e))
}

/// The CUDA program of a rule built from `hyper` (for tests): `{type_name, source, preamble,
/// header, hyper_bytes}` (the whole NVRTC program, its generated part, the rule's `.cuh`, and the
/// kernels' `EfHyper` argument).
#[pyfunction]
fn cuda_source<'py>(py: Python<'py>, rule: &str, hyper: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    let (program, bytes) = crate::cuda::describe(rule, &h).map_err(|e| errors::to_py(py, e))?;
    let d = PyDict::new(py);
    d.set_item("type_name", &program.type_name)?;
    d.set_item("source", program.source())?;
    d.set_item("preamble", program.preamble())?;
    d.set_item("header", program.header)?;
    d.set_item("hyper_bytes", PyBytes::new(py, &bytes))?;
    Ok(d)
}

/// Compile a rule's CUDA program with NVRTC for `arch` (e.g. "compute_90"); returns the PTX.
/// Needs libnvrtc (shipped with torch's CUDA wheels), not a GPU.
#[pyfunction]
fn cuda_compile(py: Python<'_>, rule: &str, hyper: &Bound<'_, PyDict>, arch: &str) -> PyResult<String> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    let (program, _) = crate::cuda::describe(rule, &h).map_err(|e| errors::to_py(py, e))?;
    let arch = arch.to_string();
    py.detach(move || crate::cuda::compile_ptx(&program, &arch)).map_err(|e| errors::to_py(py, e))
}

/// The 256 values of 8-bit state's quantization map, ascending: the unsigned one for state that
/// is never negative, else the signed one (see `src/quant.rs`).
#[pyfunction]
fn quantization_map(nonnegative: bool) -> Vec<f32> {
    crate::quant::map_for(nonnegative).values.to_vec()
}

/// Threads of emafuse's CPU pool (`EMAFUSE_NUM_THREADS` capped at the available cores, else
/// the available cores).
#[pyfunction]
fn num_threads() -> usize {
    crate::cpu::pool::num_threads()
}
