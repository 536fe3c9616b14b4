//! emafuse: fused multi-tensor optimizer and weight-averaging updates for PyTorch tensors.
//!
//! `rules` hold the math, `cpu` runs it over many tensors at once, `batch` validates what Python
//! passes, and `py` is the only place that knows about Python or libtorch.

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
#[cfg(feature = "python")]
mod py;
pub mod quant;
pub mod real;
pub mod rounding;
pub mod rules;
pub mod simd;
pub mod view;
