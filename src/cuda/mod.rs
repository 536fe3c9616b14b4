//! The CUDA backend: every rule's CUDA twin (`kernels/<rule>.cuh`, checked against the Rust rule
//! on the CPU by the test suite) runs through one multi-tensor kernel (`kernels/multi_tensor.cuh`),
//! compiled by NVRTC at first use for the device's compute capability and cached per (device,
//! rule, flags). Launches go on the caller's (PyTorch's current) stream with no host
//! synchronisation; per-parameter scalar state (e.g. `step`) lives on the device and is advanced
//! inside the kernel, so a step can be captured in a CUDA graph.

mod compile;
mod launch;
mod table;

pub use compile::{compile_ptx, program_source, KERNEL_DTYPES};
pub use launch::{plan, CudaStep, DeviceAmp};

use crate::error::{Error, Result};
use crate::rules::{visit_rule, Hyper, Rule, RuleVisitor};

/// A rule's CUDA twin: the source of its header and its C++ type with flags, e.g.
/// `Adam<true, false>`.
#[derive(Clone, Debug)]
pub struct CudaKernel {
    /// Text of `src/cuda/kernels/<rule>.cuh`.
    pub source: &'static str,
    /// The C++ type (with template flags) that the multi-tensor kernel is instantiated with.
    pub type_name: String,
}

/// The bytes of a rule's `#[repr(C)]` hyper-parameter struct (its kernels' `Hyper`).
pub fn rule_bytes<Ru: Rule>(rule: &Ru) -> Vec<u8> {
    // SAFETY: rules with a CUDA kernel are #[repr(C)] structs of f64 fields (see
    // `Rule::cuda_kernel`; checked against the kernels' Hyper by tests/test_cuda_sources.py), so
    // every byte is initialised.
    unsafe { std::slice::from_raw_parts(rule as *const Ru as *const u8, std::mem::size_of::<Ru>()).to_vec() }
}

/// The CUDA twin of the rule `rule` built from `hyper`, and its hyper-parameter bytes.
pub fn describe(rule: &str, hyper: &Hyper) -> Result<(CudaKernel, Vec<u8>)> {
    struct Describe;
    impl RuleVisitor for Describe {
        type Output = Result<(CudaKernel, Vec<u8>)>;
        fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
            let kernel = Ru::cuda_kernel().ok_or_else(|| Error::Cuda("this rule has no CUDA kernel yet".into()))?;
            Ok((kernel, rule_bytes(&rule)))
        }
    }
    visit_rule(rule, hyper, Describe)?
}
