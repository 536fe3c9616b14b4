"""Lean optimizer state: the dtype an optimizer stores its state tensors in (``state_dtype=``),
how bf16 stores are rounded (``rounding=``), the seeded random bits of stochastic rounding, and
the weight corrections of 16-bit parameters (``weight_correction=``).

The random bits are counter based (``src/rounding.rs``): each step hands the engine one key per
param group, made here from the group's ``rounding_seed`` and ``rounding_step`` (the number of
applied steps), and the engine hashes it with each element's position. Both numbers live in the
param group, so ``state_dict`` saves them and a resumed run rounds exactly as the uninterrupted
one; nothing depends on torch's global generator or on the thread count.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .. import _native
from ..errors import DTypeError, UnsupportedOptionError

__all__ = ["Rounding", "StateDType"]

StateDType = torch.dtype | None
Rounding = Literal["nearest", "stochastic"]

# The state dtypes the engine stores (math always runs in float32 or float64).
STATE_DTYPES = (torch.float32, torch.bfloat16)
ROUNDINGS = ("nearest", "stochastic")

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
    if isinstance(state_dtype, str) and state_dtype.lower() in ("8bit", "8-bit", "int8", "uint8"):
        raise UnsupportedOptionError(
            f"{who}: state_dtype={state_dtype!r} (blockwise 8-bit moments) is not implemented yet; use state_dtype=torch.bfloat16 "
            "(2 bytes per moment, written with stochastic rounding) or leave it unset"
        )
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"{who}: state_dtype must be None (the parameter's dtype), torch.float32 or torch.bfloat16, got {state_dtype!r}")
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


def effective_rounding(group: dict[str, Any]) -> str:
    """The group's rounding: as chosen, or (None) stochastic exactly when the state was asked to
    be bfloat16."""
    rounding = group.get("rounding")
    if rounding is None:
        return "stochastic" if group.get("state_dtype") == torch.bfloat16 else "nearest"
    return rounding


def state_dtype_for(who: str, p: torch.Tensor, wanted: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """The dtype of ``p``'s state: ``wanted`` (a group's ``state_dtype``) if the engine can pair
    it with ``p``, else a DTypeError saying what to do; ``default`` when nothing was asked."""
    if wanted is None or wanted == default:
        return default
    if p.is_complex() or p.dtype == torch.float64:
        raise DTypeError(
            f"{who}: state_dtype={wanted} cannot go with {p.dtype} parameters ({p.dtype} parameters keep their own state dtype); "
            "put them in a param group without state_dtype"
        )
    if p.dtype == torch.float16 and wanted == torch.bfloat16:
        raise DTypeError(f"{who}: state_dtype=torch.bfloat16 cannot go with float16 parameters; use torch.float32 for their state")
    return wanted


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
