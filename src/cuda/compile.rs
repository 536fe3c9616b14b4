//! Compiling kernel programs with NVRTC.

use super::Program;
use crate::error::{Error, Result};

/// Suffixes of the kernels in every program, one per (param, input, state) dtype combination.
pub const KERNEL_DTYPES: [&str; 12] =
    ["f32", "f64", "bf16", "bf16_f32", "f16", "f16_f32", "f32_bf16in", "f32_f16in", "f32_bf16", "f32_q8", "bf16_q8", "f16_q8"];

/// Whether libnvrtc can be loaded (it ships with torch's CUDA wheels and is loaded by
/// `import torch` there).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile `program` to PTX for the virtual architecture `arch` (e.g. "compute_90").
/// Multiply-add contraction is off so the device rounds exactly like the CPU kernels (IEEE
/// division and square root are NVRTC's defaults).
pub fn compile_ptx(program: &Program, arch: &str) -> Result<String> {
    if !nvrtc_available() {
        return Err(Error::Cuda("cannot load libnvrtc (install torch's CUDA wheel, or set LD_LIBRARY_PATH)".into()));
    }
    let arch_flag = format!("--gpu-architecture={arch}");
    let opts =
        cudarc::nvrtc::CompileOptions { fmad: Some(false), options: vec![arch_flag, "--std=c++17".into(), "-default-device".into()], ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(program.source(), opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| Error::Cuda(format!("NVRTC could not compile {} for {arch}: {e}", program.type_name)))
}
