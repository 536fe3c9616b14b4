//! The Python boundary: the only code that touches pyo3 or tch.

mod errors;
mod plan;
mod reduce;
mod step;
mod tensor;

use pyo3::prelude::*;

/// emafuse's native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<plan::Group>()?;
    m.add_class::<plan::StepPlan>()?;
    m.add_function(wrap_pyfunction!(plan::step, m)?)?;
    m.add_function(wrap_pyfunction!(step::step_async, m)?)?;
    m.add_class::<step::PendingStep>()?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(rule_names, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_source, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::sum_squares, m)?)?;
    Ok(())
}

/// Names of every update rule the engine has.
#[pyfunction]
fn rule_names() -> Vec<&'static str> {
    crate::rules::RULE_NAMES.to_vec()
}

/// `(cpp_type, program_source, hyper_bytes, rule_header)` of a rule's CUDA twin (for tests).
#[pyfunction]
fn cuda_source<'py>(
    py: Python<'py>,
    rule: &str,
    hyper: &Bound<'py, pyo3::types::PyDict>,
) -> PyResult<(String, String, Bound<'py, pyo3::types::PyBytes>, &'static str)> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    let (kernel, bytes) = crate::cuda::describe(rule, &h).map_err(|e| errors::to_py(py, e))?;
    let source = crate::cuda::program_source(&kernel);
    Ok((kernel.type_name, source, pyo3::types::PyBytes::new(py, &bytes), kernel.source))
}

/// Compile a rule's CUDA program with NVRTC for `arch` (e.g. "compute_90"); returns the PTX.
/// Needs libnvrtc (shipped with torch's CUDA wheels), not a GPU.
#[pyfunction]
fn cuda_compile(py: Python<'_>, rule: &str, hyper: &Bound<'_, pyo3::types::PyDict>, arch: &str) -> PyResult<String> {
    let h = plan::hyper_from(hyper).map_err(|e| errors::to_py(py, e))?;
    let (kernel, _) = crate::cuda::describe(rule, &h).map_err(|e| errors::to_py(py, e))?;
    let arch = arch.to_string();
    py.detach(move || crate::cuda::compile_ptx(&kernel, &arch)).map_err(|e| errors::to_py(py, e))
}

/// Threads of emafuse's CPU pool (`EMAFUSE_NUM_THREADS`, else the available cores).
#[pyfunction]
fn num_threads() -> usize {
    crate::cpu::pool::num_threads()
}
