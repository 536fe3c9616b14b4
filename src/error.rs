//! The one error type of the engine. It knows nothing about Python: `py/` maps each variant to an
//! exception class of the `emafuse` hierarchy.

/// Why a step (or an averaging update) was refused. Every variant is raised before any tensor is
/// written, so a refused call leaves parameters and state untouched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's dtype is not supported, or differs from what its role requires.
    #[error("{0}")]
    DType(String),
    /// A tensor lives on an unsupported device, or on another device than its parameter.
    #[error("{0}")]
    Device(String),
    /// A gradient or state tensor's shape differs from its parameter's.
    #[error("{0}")]
    Shape(String),
    /// Tensors of one parameter are strided differently (or the parameter is not dense). The
    /// Python layer answers this by staging contiguous copies; users never see it.
    #[error("{0}")]
    Layout(String),
    /// A sparse or otherwise non-strided gradient.
    #[error("{0}")]
    Sparse(String),
    /// A gradient holds NaN or infinity and the caller asked for that to be an error.
    #[error("{0}")]
    NonFinite(String),
    /// A bad hyper-parameter, flag, or list structure.
    #[error("{0}")]
    Value(String),
    /// The CUDA backend could not do what was asked (no driver, compile failure, launch failure).
    #[error("{0}")]
    Cuda(String),
    /// A bug in emafuse (including a caught panic).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;
