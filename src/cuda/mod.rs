//! The CUDA backend: every rule's CUDA twin (`kernels/<rule>.cuh`, listed in `kernels.rs` and
//! checked against the Rust rule on the CPU by the test suite) runs through one multi-tensor
//! kernel (`kernels/multi_tensor.cuh`), compiled by NVRTC at first use for the device's compute
//! capability and cached per (device, rule, flags). The program's `EfHyper` struct and counts are
//! generated from the Rust rule type (`program.rs`). Launches go on the caller's (PyTorch's
//! current) stream with no host synchronisation; per-parameter scalar state (e.g. `step`) lives on
//! the device and is advanced inside the kernel, so a step can be captured in a CUDA graph.

mod compile;
mod kernels;
mod launch;
mod program;
mod table;

pub use compile::{compile_ptx, KERNEL_DTYPES};
pub use launch::{plan, CudaStep, DeviceAmp};
pub use program::{hyper_bytes, Program};

use crate::error::Result;
use crate::rules::{visit_rule, Hyper, Rule, RuleVisitor};

/// The CUDA program of the rule `rule` built from `hyper`, and its hyper-parameter bytes.
pub fn describe(rule: &str, hyper: &Hyper) -> Result<(Program, Vec<u8>)> {
    struct Describe;
    impl RuleVisitor for Describe {
        type Output = Result<(Program, Vec<u8>)>;
        fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
            Ok((Program::of::<Ru>()?, hyper_bytes(&rule)))
        }
    }
    visit_rule(rule, hyper, Describe)?
}
