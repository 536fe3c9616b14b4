"""Stochastic rounding to bfloat16, written from the description in ``src/rounding.rs``: element
``i`` of array ``a`` (0: the parameter, 1 + k: state slot k) of tensor ``t`` of a batch adds 16
random bits ``lowbias32(i ^ stream) >> 16`` to the float32 bit pattern and keeps its top 16 bits,
where ``stream = mix64(batch_key ^ mix64(t << 3 | a)) >> 32`` and ``batch_key = mix64(step_key ^
mix64(first member))``. Vectorised over elements with numpy integers."""

from __future__ import annotations

import numpy as np
import torch

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def stream(step_key: float | int, first_member: int, tensor: int, array: int) -> int:
    """``step_key``: the engine's ``rounding_key`` (an integer, possibly as a float)."""
    batch = mix64(int(step_key) ^ mix64(first_member))
    return mix64(batch ^ mix64((tensor << 3) | array)) >> 32


def random16(stream_key: int, n: int) -> np.ndarray:
    """The 16 random bits of elements 0..n-1 of a stream (uint32)."""
    x = np.arange(n, dtype=np.uint64).astype(np.uint32) ^ np.uint32(stream_key)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x = (x.astype(np.uint64) * 0x7FEB352D & 0xFFFFFFFF).astype(np.uint32)
        x ^= x >> np.uint32(15)
        x = (x.astype(np.uint64) * 0x846CA68B & 0xFFFFFFFF).astype(np.uint32)
        x ^= x >> np.uint32(16)
    return x >> np.uint32(16)


def to_bf16_stochastic(x: torch.Tensor, stream_key: int) -> torch.Tensor:
    """float32 ``x`` (finite) rounded to bfloat16 with the stream's bits, element by element in
    flattened order."""
    bits = x.detach().contiguous().view(torch.int32).numpy().reshape(-1).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + random16(stream_key, bits.size)) >> 16).astype(np.uint16)
    return torch.from_numpy(rounded.view(np.int16).copy()).view(torch.bfloat16).reshape(x.shape)


# -- weight corrections of bf16 and fp16 parameters ---------------------------------------------------
# A 16-bit weight ``hi`` with int8 correction ``c`` stands for ``hi + c·u``, where the unit ``u`` is
# 2^-8 of hi's ulp: ``2^(E − 127 − M − 8)`` for hi's float32 exponent field E clamped to the
# format's range (bf16: M = 7, [16, 254]; fp16: M = 10, [113, 142], the subnormals taking the
# smallest normal's ulp). A float32 weight splits into its nearest 16-bit value and
# ``c = round_half_even((x − hi)/u)`` clamped to [−127, 127] (0 for infinities and NaN).

_FORMATS = {torch.bfloat16: (7, 16, 254), torch.float16: (10, 113, 142)}


def _exponents(hi: torch.Tensor) -> tuple[torch.Tensor, int]:
    m, lo, top = _FORMATS[hi.dtype]
    return ((hi.float().view(torch.int32) >> 23) & 0xFF).clamp(lo, top), m


def corrected(hi: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The float32 weight of 16-bit ``hi`` and int8 correction ``c``."""
    e, m = _exponents(hi)
    unit = ((e - m - 8) << 23).view(torch.float32)
    w = hi.float() + c.float() * unit
    return torch.where(torch.isfinite(hi.float()), w, hi.float())


def split_corrected(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x`` as (``dtype`` weight, int8 correction)."""
    hi = x.to(dtype)
    e, m = _exponents(hi)
    inverse_unit = ((254 + m + 8 - e) << 23).view(torch.float32)
    units = torch.round((x - hi.float()) * inverse_unit).clamp(-127, 127)
    c = torch.where(torch.isfinite(hi.float()), units, torch.zeros_like(units))
    return hi, c.to(torch.int8)
