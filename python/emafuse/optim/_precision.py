"""Lean optimizer state: the dtype an optimizer stores its state tensors in (``state_dtype=``:
float32, bfloat16, or ``"8bit"`` blockwise codes with a float32 scale per block), how bf16 stores
are rounded (``rounding=``), the seeded random bits of stochastic rounding, and the weight
corrections of 16-bit parameters (``weight_correction=``).

The random bits are counter based (``src/rounding.rs``): each step hands the engine one key per
param group, made here from the group's ``rounding_seed`` and ``rounding_step`` (the number of
applied steps), and the engine hashes it with each element's position. Both numbers live in the
param group, so ``state_dict`` saves them and a resumed run rounds exactly as the uninterrupted
one; nothing depends on torch's global generator or on the thread count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import torch

from .. import _dtensor, _native
from ..errors import DTypeError, InvalidArgumentError

__all__ = ["Rounding", "StateDType"]

StateDType = torch.dtype | Literal["8bit"] | None
Rounding = Literal["nearest", "stochastic"]

#: ``state_dtype`` of blockwise 8-bit state: each state tensor is stored as uint8 codes shaped like
#: the parameter (in its row-major order) plus ``<slot>_absmax``, one float32 scale per block of
#: ``QUANT_BLOCK`` elements (``src/quant.rs``), shaped by :func:`scales_shape`.
EIGHT_BIT = "8bit"
# The state dtypes the engine stores (math always runs in float32 or float64).
STATE_DTYPES = (torch.float32, torch.bfloat16, EIGHT_BIT)
ROUNDINGS = ("nearest", "stochastic")
#: Under ``state_dtype="8bit"``, parameters with fewer elements keep float32 state (as
#: bitsandbytes' ``min_8bit_size``): their state is a negligible part of the memory, and
#: quantizing biases and norms' scales costs accuracy for nothing.
MIN_8BIT_NUMEL = 4096
QUANT_BLOCK: int = _native.QUANT_BLOCK
ABSMAX_SUFFIX: str = _native.ABSMAX_SUFFIX

_MASK64 = (1 << 64) - 1


#: The state entry of a 16-bit parameter's weight correction (an int8 tensor shaped like it; the
#: engine's name, ``src/rounding.rs``).
WEIGHT_CORRECTION: str = _native.WEIGHT_CORRECTION


def precision_options(who: str, state_dtype: StateDType, rounding: str | None, rounding_seed: int, weight_correction: bool) -> dict[str, Any]:
    """The param group entries of the constructor's ``state_dtype``, ``rounding``,
    ``rounding_seed`` and ``weight_correction``, checked. (A group's ``rounding_step`` counter
    appears with its first stochastically rounded step.)"""
    options = {"state_dtype": state_dtype, "rounding": rounding, "rounding_seed": rounding_seed, "weight_correction": weight_correction}
    check_group(who, options)
    return options


def check_group(who: str, group: dict[str, Any]) -> None:
    """Refuse a group whose precision entries are not ones this module knows."""
    state_dtype = group.get("state_dtype")
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{who}: state_dtype must be None (the parameter's dtype), torch.float32, torch.bfloat16 or '8bit' (blockwise 8-bit), "
            f"got {state_dtype!r}"
        )
    rounding = group.get("rounding")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ValueError(f"{who}: rounding must be 'nearest', 'stochastic' or None (stochastic for bfloat16 state), got {rounding!r}")
    seed = group.get("rounding_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MASK64:
        raise ValueError(f"{who}: rounding_seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(group.get("weight_correction", False), bool):
        raise TypeError(f"{who}: weight_correction must be a bool, got {group['weight_correction']!r}")


def corrects(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether ``p`` (of ``group``) keeps a weight correction: a bf16 or fp16 parameter of a group
    with ``weight_correction=True`` (float32 and float64 weights need none: they are their own
    master copy)."""
    return p.dtype in (torch.bfloat16, torch.float16) and bool(group.get("weight_correction", False))


def new_correction(p: torch.Tensor) -> torch.Tensor:
    """The weight correction of a 16-bit parameter that has none yet: zeros (the weight is exactly
    its bf16 value)."""
    return torch.zeros_like(p, dtype=torch.int8, memory_format=torch.preserve_format)


def _blocks(numel: int) -> int:
    """The number of 8-bit blocks (scales) of a tensor of ``numel`` elements."""
    return -(-numel // QUANT_BLOCK)


def new_slot(p: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A new state entry ``name`` of ``p`` holding zeros: a slot of ``dtype`` (8-bit codes in
    row-major order), a slot's 8-bit scales (:func:`scales_shape`), or the weight correction. For
    a DTensor ``p``, a DTensor placed like it (of its local shard's part)."""
    if name == WEIGHT_CORRECTION:
        return new_correction(p)
    if name.endswith(ABSMAX_SUFFIX):
        return _zeros_placed_like(p, scales_shape, torch.float32)
    if dtype == torch.uint8:
        return _zeros_placed_like(p, tuple, torch.uint8)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _zeros_placed_like(p: torch.Tensor, shape_of: Callable[[Sequence[int]], tuple[int, ...]], dtype: torch.dtype) -> torch.Tensor:
    """Contiguous zeros of shape ``shape_of(p.shape)`` on ``p``'s device; for a DTensor ``p``, a
    DTensor of that global shape with ``p``'s placements whose local part is
    ``shape_of(local shard's shape)`` (rows follow rows)."""
    local = _dtensor.local(p)
    data = torch.zeros(shape_of(local.shape), dtype=dtype, device=local.device)
    return _dtensor.wrap(_dtensor.reshaped(_dtensor.layout(p), shape_of(p.shape)), data)


def stored_slots(slots: tuple[str, ...], quantized: bool) -> tuple[str, ...]:
    """The state entries of a parameter whose rule keeps ``slots``: the slots, and with 8-bit state
    each one's scales after them (the order the engine expects)."""
    return (*slots, *(name + ABSMAX_SUFFIX for name in slots)) if quantized and slots else slots


@functools.cache
def _map(nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's 8-bit map (float32) and the midpoints between its neighbours."""
    values = torch.tensor(_native.quantization_map(nonnegative), dtype=torch.float32)
    return values, (values[:-1] + values[1:]) / 2


def quantize(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as 8-bit state: uint8 codes shaped like ``x`` and the float32 scale of each block of
    its row-major elements, rounded as the engine does (for checkpoint conversions and tests)."""
    _, mids = _map(nonnegative)
    flat = x.detach().reshape(-1).to(torch.float32)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % QUANT_BLOCK)).view(-1, QUANT_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # (NaN, e.g. infinity times the zero factor of an infinite absmax, goes to -1 as in the engine)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).nan_to_num(nan=-1.0).clamp(-1.0, 1.0)
    codes = torch.bucketize(scaled, mids.to(x.device)).to(torch.uint8)
    return codes.view(-1)[: flat.numel()].view(x.shape), absmax.view(scales_shape(x.shape))


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """The float32 values of 8-bit state (``codes`` and its block scales ``absmax``)."""
    values, _ = _map(nonnegative)
    n = codes.numel()
    decoded = values.to(codes.device)[codes.reshape(-1).long()]
    padded = torch.nn.functional.pad(decoded, (0, -n % QUANT_BLOCK)).view(-1, QUANT_BLOCK) * absmax.to(torch.float32).reshape(-1, 1)
    return padded.view(-1)[:n].view(codes.shape)


def stored_as(name: str, value: torch.Tensor, scales: torch.Tensor | None, want: torch.dtype, nonnegative: bool) -> dict[str, torch.Tensor]:
    """State slot ``name`` of a checkpoint (``value``, with its 8-bit ``scales`` if it is 8-bit) as
    an optimizer storing ``want`` keeps it: cast, quantized (``want`` uint8: codes and scales,
    shaped by :func:`scales_shape`) or dequantized. DTensors are converted shard by shard (their
    blocks are the whole tensor's, :func:`blocks_follow_shards`) and stay placed as they were."""
    like = _dtensor.layout(value)
    if like is not None:
        local = stored_as(name, _dtensor.local(value), None if scales is None else _dtensor.local(scales), want, nonnegative)
        return {
            key: _dtensor.wrap(_dtensor.reshaped(like, scales_shape(value.shape)) if key.endswith(ABSMAX_SUFFIX) else like, t)
            for key, t in local.items()
        }
    if value.dtype == torch.uint8:
        if scales is None:
            raise InvalidArgumentError(
                f"load_state_dict: state '{name}' is 8-bit (uint8) but its scales '{name}{ABSMAX_SUFFIX}' are missing (a corrupted "
                "checkpoint?). Nothing was loaded."
            )
        if scales.numel() != _blocks(value.numel()):
            raise InvalidArgumentError(
                f"load_state_dict: 8-bit state '{name}' has {value.numel()} elements but {scales.numel()} scales in "
                f"'{name}{ABSMAX_SUFFIX}' (one per {QUANT_BLOCK} elements expected; a corrupted checkpoint?). Nothing was loaded."
            )
        if want == torch.uint8:
            # (older checkpoints keep every tensor's scales flat)
            return {name: value, name + ABSMAX_SUFFIX: scales.reshape(scales_shape(value.shape))}
        return {name: dequantize(value, scales, nonnegative).to(want)}
    if want == torch.uint8:
        codes, absmax = quantize(value, nonnegative)
        return {name: codes, name + ABSMAX_SUFFIX: absmax}
    return {name: value.to(dtype=want)}


def is_quantized(st: dict[str, Any] | None, slots: Collection[str]) -> bool | None:
    """Whether the existing state ``st`` holds its ``slots`` as 8-bit codes (None: none of them
    exists yet)."""
    for name in slots:
        if st is not None and name in st:
            return isinstance(st[name], torch.Tensor) and st[name].dtype == torch.uint8
    return None


def effective_rounding(group: dict[str, Any]) -> str:
    """The group's rounding: as chosen, or (None) stochastic exactly when the state was asked to
    be bfloat16."""
    rounding = group.get("rounding")
    if rounding is None:
        return "stochastic" if group.get("state_dtype") == torch.bfloat16 else "nearest"
    return rounding


def state_dtype_for(who: str, p: torch.Tensor, wanted: StateDType, default: torch.dtype, by_rows: bool = False) -> torch.dtype:
    """The dtype of ``p``'s state: ``wanted`` (a group's ``state_dtype``; ``"8bit"``: uint8 codes,
    or float32 for parameters under ``MIN_8BIT_NUMEL`` elements) if the engine can pair it with
    ``p``, else a DTypeError saying what to do; ``default`` when nothing was asked. ``by_rows``:
    the rule updates each row (dim-0 slice) on its own, so 8-bit state needs rows of whole blocks."""
    if wanted is None or wanted == default:
        return default
    if wanted == EIGHT_BIT:
        return _eight_bit_dtype(who, p, by_rows)
    if p.is_complex() or p.dtype == torch.float64:
        raise DTypeError(
            f"{who}: state_dtype={wanted} cannot go with {p.dtype} parameters ({p.dtype} parameters keep their own state dtype); "
            "put them in a param group without state_dtype"
        )
    if p.dtype == torch.float16 and wanted == torch.bfloat16:
        raise DTypeError(f"{who}: state_dtype=torch.bfloat16 cannot go with float16 parameters; use torch.float32 for their state")
    return wanted


def _eight_bit_dtype(who: str, p: torch.Tensor, by_rows: bool) -> torch.dtype:
    """``state_dtype="8bit"``'s dtype for ``p`` (``by_rows``: as :func:`state_dtype_for`), or why
    it cannot have it."""
    if p.is_complex() or p.dtype == torch.float64:
        raise DTypeError(
            f"{who}: state_dtype='8bit' cannot go with {p.dtype} parameters; put them in a param group without state_dtype "
            "(8-bit state is for float32, bfloat16 and float16 parameters)"
        )
    rows_split_blocks = by_rows and p.dim() >= 2 and not rows_are_blocks(p.shape)
    if p.numel() < MIN_8BIT_NUMEL or not blocks_follow_shards(p) or rows_split_blocks:
        return torch.float32
    return torch.uint8


def scales_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the block scales of 8-bit state of a tensor of ``shape``: one row of scales
    per row (dim-0 slice) where every row is a whole number of blocks, so that the scales shard
    along dim 0 with the tensor (FSDP2) and a checkpoint holds one layout whatever the sharding;
    else one flat row of scales."""
    if rows_are_blocks(shape):
        return (shape[0], math.prod(shape[1:]) // QUANT_BLOCK)
    return (_blocks(math.prod(shape)),)


def rows_are_blocks(shape: Sequence[int]) -> bool:
    """Whether every row (dim-0 slice) of a tensor of ``shape`` is a whole number of 8-bit
    blocks (two or more dims, non-empty rows)."""
    row = math.prod(shape[1:])
    return len(shape) >= 2 and row > 0 and row % QUANT_BLOCK == 0


def blocks_follow_shards(p: torch.Tensor) -> bool:
    """Whether the 8-bit blocks of ``p``'s local part are blocks of the whole tensor: always for a
    plain tensor and a replicated DTensor; for a DTensor sharded on dim 0 (FSDP2) when its rows
    are whole blocks (:func:`scales_shape`), whatever the world size and however uneven the
    shards; never for one sharded on another dim."""
    dim = _dtensor.shard_dim(p)
    return dim is None or (dim == 0 and rows_are_blocks(p.shape))


def _mix64(x: int) -> int:
    """splitmix64's finaliser (``src/rounding.rs`` ``mix64``)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_key(seed: int, step: int, index: int = 0) -> float:
    """The engine's ``rounding_key`` for step ``step`` of stream ``index`` (e.g. a param group)
    from ``seed``: 53 bits (a float64 carries them exactly), never 0."""
    key = _mix64(_mix64(seed) ^ _mix64((step << 16) ^ index)) >> 11
    return float(key or 1)


def rounding_key(group: dict[str, Any], group_index: int) -> float | None:
    """This step's key for the engine's stochastic rounding of ``group`` (None: round to
    nearest)."""
    if effective_rounding(group) != "stochastic":
        return None
    return step_key(int(group.get("rounding_seed", 0)), int(group.get("rounding_step", 0)), group_index)


def advance(groups: list[dict[str, Any]]) -> None:
    """After an applied step: the next step of every stochastically rounded group draws new bits."""
    for group in groups:
        if effective_rounding(group) == "stochastic":
            group["rounding_step"] = int(group.get("rounding_step", 0)) + 1
