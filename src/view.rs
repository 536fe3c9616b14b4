//! Plain, thread-safe descriptions of tensor memory that kernels work on with the GIL released.

use crate::dtype::DType;

/// Where a tensor's memory lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The memory of one dense tensor: `numel` elements of `dtype` starting at `ptr`, laid out so that
/// element-wise math may walk them linearly (contiguous, or dense with strides identical to the
/// other tensors of the same parameter).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TensorView {
    ptr: usize,
    numel: usize,
    dtype: DType,
    device: Device,
}

// SAFETY: a TensorView is an address and a length. Whoever dereferences it (the kernels) must make
// sure the memory is alive and that no two threads write the same elements; the drivers do so by
// keeping the owning tensors alive for the whole call and by splitting work into disjoint ranges.
unsafe impl Send for TensorView {}
// SAFETY: as above; shared references only expose the address, never the memory.
unsafe impl Sync for TensorView {}

impl TensorView {
    /// Describe `numel` elements of `dtype` at `ptr` on `device`.
    pub fn new(ptr: *mut u8, numel: usize, dtype: DType, device: Device) -> Self {
        TensorView { ptr: ptr as usize, numel, dtype, device }
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Address of the first element.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }

    /// Address of element `offset`, typed.
    ///
    /// # Safety
    /// `T` must be the element type of `dtype` and `offset <= numel`.
    #[inline(always)]
    pub unsafe fn at<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset <= self.numel);
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        // SAFETY: the caller guarantees the offset stays inside the allocation (or one past it).
        unsafe { (self.ptr as *mut T).add(offset) }
    }
}
