//! The Python boundary: the only code that touches pyo3 or tch.

mod errors;
mod step;
mod tensor;

use pyo3::prelude::*;

/// emafuse's native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(step::step, m)?)?;
    m.add_function(wrap_pyfunction!(step::step_async, m)?)?;
    m.add_class::<step::PendingStep>()?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}

/// Threads of emafuse's CPU pool (`EMAFUSE_NUM_THREADS`, else the available cores).
#[pyfunction]
fn num_threads() -> usize {
    crate::cpu::pool::current_num_threads()
}
