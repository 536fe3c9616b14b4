"""What every native call needs to know about CUDA, read without synchronising the device."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["capturing", "current_streams", "per_device"]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph: a step that decides anything on the
    host at every step (a clip from the norms, fresh random bits) cannot be captured."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


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
