//! `_native.step_async`: an update validated here and run on a background thread.

use super::errors::to_py;
use super::plan::{guarded, StepPlan};
use crate::error::{Error, Result};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// An update running on a background thread (see [`step_async`]).
#[pyclass(module = "emafuse._native")]
pub struct PendingStep {
    who: String,
    /// The process that started the thread: a forked child has no such thread to join.
    pid: u32,
    handle: Mutex<Option<JoinHandle<Result<()>>>>,
}

#[pymethods]
impl PendingStep {
    /// Block (without holding the GIL) until the update has finished; raise its error, if any.
    /// Later calls return at once.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.handle.lock().map_err(|_| to_py(py, Error::Internal("poisoned lock".into())))?.take();
        let Some(handle) = handle else { return Ok(()) };
        if std::process::id() != self.pid {
            // The thread exists only in the parent (the Python package joins pending updates
            // before a fork, so only a fork behind its back gets here): its result is unknown.
            std::mem::forget(handle);
            return Err(to_py(
                py,
                Error::Value(format!(
                    "{}: this process was forked while a background update was running; the update's result is unknown \
                     here (fork with os.fork / multiprocessing, which let emafuse finish the update first)",
                    self.who
                )),
            ));
        }
        let joined = py.detach(|| handle.join());
        let result = joined.unwrap_or_else(|_| Err(Error::Internal("the background update panicked".into())));
        result.map_err(|e| to_py(py, Error::from_background(&self.who, e)))
    }

    /// Whether the update has finished (or was already waited for).
    fn done(&self) -> bool {
        std::process::id() != self.pid || self.handle.lock().map(|h| h.as_ref().is_none_or(|h| h.is_finished())).unwrap_or(true)
    }
}

impl Error {
    fn from_background(who: &str, e: Error) -> Error {
        match e {
            Error::Internal(m) => Error::Internal(format!("{who} (background update): {m}")),
            other => other,
        }
    }
}

/// Like `step` (no AMP), but the update runs on a new native thread: everything is validated
/// here, before returning, and the returned [`PendingStep`] is joined with `wait()`. `wait_for`,
/// if given, is a Python callable the thread calls first (e.g. a CUDA event's `synchronize`, so
/// that the update reads a device-to-host copy only once it has landed). The caller must not
/// touch the tensors passed until `wait()` returned.
#[pyfunction]
#[pyo3(signature = (who, rule, groups, wait_for=None))]
pub fn step_async(py: Python<'_>, who: &str, rule: &str, groups: &Bound<'_, PyList>, wait_for: Option<Py<PyAny>>) -> PyResult<PendingStep> {
    let job = guarded(|| StepPlan::build(py, who, rule, groups, None, false)?.into_background()).map_err(|e| to_py(py, e))?;
    let name = who.to_string();
    let thread_name = name.clone();
    let handle = std::thread::Builder::new()
        .name("emafuse-async".into())
        .spawn(move || {
            if let Some(f) = wait_for {
                if !interpreter_alive() {
                    std::mem::forget(f);
                    return Err(Error::Value(format!("{thread_name}: the interpreter exited before the update started")));
                }
                let waited = Python::attach(|py| {
                    let r = f.call0(py).map(drop).map_err(|e| Error::Value(format!("{thread_name}: waiting for the input failed: {e}")));
                    drop(f);
                    r
                });
                waited?;
            }
            job().map(drop)
        })
        .map_err(|e| to_py(py, Error::Internal(format!("cannot start a background thread: {e}"))))?;
    Ok(PendingStep { who: name, pid: std::process::id(), handle: Mutex::new(Some(handle)) })
}

/// Whether the Python interpreter is initialized: a background thread must not attach to it
/// otherwise (pyo3 would panic). The Python package joins pending updates at exit, so this is a
/// last line of defence for an exit that skips that (nothing is freed then: the process ends).
pub(super) fn interpreter_alive() -> bool {
    // SAFETY: Py_IsInitialized may be called at any time, from any thread, without the GIL.
    unsafe { pyo3::ffi::Py_IsInitialized() != 0 }
}
