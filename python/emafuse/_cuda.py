"""What every native call needs to know about CUDA, read without synchronising the device."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["current_streams", "per_device"]


def current_streams() -> list[int] | None:
    """PyTorch's current stream handle of every visible CUDA device (None before CUDA is used):
    the native kernels are launched on these, in PyTorch's order."""
    if not torch.cuda.is_initialized():
        return None
    return [torch.cuda.current_stream(i).cuda_stream for i in range(torch.cuda.device_count())]


def per_device(t: Tensor | None) -> Tensor | dict[int, Tensor] | None:
    """An AMP tensor (GradScaler's scale or found-inf flag, on one device) for every device the
    kernels may read it on: CUDA kernels read it on their own device (copied there without
    synchronising), CPU kernels on the host."""
    if t is None or not t.is_cuda or torch.cuda.device_count() == 1:
        return t
    return {i: t.to(f"cuda:{i}", non_blocking=True) for i in range(torch.cuda.device_count())}
