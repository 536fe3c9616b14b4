//! In-place exchange of two equally typed tensor lists (spec averaging.md D.1 K4): the written
//! tensor `A` and slot 0 `B` trade values in registers, 16 bytes per fp32 element, no temporary.

use super::{Hyper, Rule, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::cuda::CudaKernel;
use crate::error::Result;
use crate::real::Real;

/// `A ⇄ B`. No hyper-parameters; the one placeholder field exists because the struct's bytes
/// are the CUDA kernel's `Hyper` argument, and a kernel argument cannot be zero bytes long (C++
/// gives an empty struct size 1, which the launch would read from an empty buffer).
#[repr(C)]
#[derive(Clone, Debug)]
pub struct Swap {
    _unused: f64,
}

impl Rule for Swap {
    const SLOTS: usize = 1;
    const READS_INPUT: bool = false;
    type Coeffs<R: Real> = ();

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) {}

    #[inline(always)]
    fn update<R: Real>(_c: &(), a: R, _g: R, s: &mut [R; MAX_SLOTS]) -> R {
        let b = s[0];
        s[0] = a;
        b
    }

    fn cuda_kernel() -> Option<CudaKernel> {
        Some(CudaKernel { source: include_str!("../cuda/kernels/swap.cuh"), type_name: "Swap".into() })
    }
}

/// Build `swap` (no hyper-parameters).
pub fn visit<V: RuleVisitor>(_h: &Hyper, v: V) -> Result<V::Output> {
    Ok(v.visit(Swap { _unused: 0.0 }))
}
