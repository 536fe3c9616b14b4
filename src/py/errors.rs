//! Engine errors as instances of the `emafuse.errors` exception hierarchy.

use crate::error::Error;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::DType(_) => "DTypeError",
        Error::Device(_) => "DeviceError",
        Error::Shape(_) => "ShapeError",
        Error::Layout(_) => "LayoutError",
        Error::Sparse(_) => "SparseGradError",
        Error::NonFinite(_) => "NonFiniteError",
        Error::Value(_) => "InvalidArgumentError",
        Error::Cuda(_) => "CudaError",
        Error::Internal(_) => "InternalError",
    }
}

/// Convert an engine error into the matching Python exception.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let module = ERRORS_MODULE.get_or_try_init(py, || PyModule::import(py, "emafuse.errors").map(|m| m.unbind()));
    let cls = module.and_then(|m| m.bind(py).getattr(class_name(&e))).and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match cls {
        Ok(cls) => PyErr::from_type(cls, e.to_string()),
        Err(import_error) => import_error,
    }
}
