"""The native calls behind every averaging method: one call per update over all tensors (the
engine groups them by device and dtype), with a slow path for tensors it cannot walk linearly."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import _native
from .._cuda import current_streams
from ..errors import CudaError, LayoutError

__all__ = ["native_step", "native_step_async", "real_view"]

# (hyper, targets, inputs or None, state dicts or None, slot names)
Call = tuple[dict[str, Any], Sequence[Tensor], "Sequence[Tensor] | None", "Sequence[dict[str, Tensor]] | None", tuple[str, ...]]


def real_view(t: Tensor) -> Tensor:
    """``t`` as the engine can take it: complex tensors as real views (lerp and weighted sums with
    real coefficients act on real and imaginary parts alike)."""
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def _full(calls: Sequence[Call]) -> list[tuple]:
    return [(h, list(t), None if i is None else list(i), None if s is None else list(s), slots, ()) for h, t, i, s, slots in calls]


def native_step(who: str, rule: str, calls: Sequence[Call]) -> None:
    """Run ``rule`` over ``calls`` in one native call; tensors that are not dense (or strided
    differently from their partners) are staged through contiguous copies."""
    full = _full(calls)
    try:
        _native.step(who, rule, full, None, None, current_streams())
    except LayoutError:
        copy_back = _stage(full)
        _native.step(who, rule, full, None, None, current_streams())
        for orig, copy in copy_back:
            orig.copy_(copy)
    except CudaError as e:
        if "no CUDA kernel" not in str(e) or rule not in _FALLBACKS:
            raise
        _FALLBACKS[rule](full)


# -- CUDA tensors of rules without a CUDA kernel yet ------------------------------------------
# The same math with torch's foreach ops (same formulas and weights; torch's own rounding). Used
# only while a rule has no CUDA kernel; goes away with the rules' CUDA twins.


def _fb_ema(full: list[tuple]) -> None:
    for h, ts, ins, _, _, _ in full:
        w = float(h["weight"])
        ins = [x if x.dtype == t.dtype else x.to(t.dtype) for t, x in zip(ts, ins)]
        if h.get("muladd"):
            torch._foreach_mul_(ts, 1.0 - w)
            torch._foreach_add_(ts, torch._foreach_mul(ins, w))
        elif h.get("sub"):
            torch._foreach_sub_(ts, torch._foreach_mul(torch._foreach_sub(ts, ins), w))
        else:
            torch._foreach_lerp_(ts, ins, w)


def _fb_ema_multi(full: list[tuple]) -> None:
    for h, ts, ins, states, slots, _ in full:
        ins = [x if x.dtype == t.dtype else x.to(t.dtype) for t, x in zip(ts, ins)]
        torch._foreach_lerp_(ts, ins, float(h["w0"]))
        for j, name in enumerate(slots, 1):
            torch._foreach_lerp_([st[name] for st in states], ins, float(h[f"w{j}"]))


def _fb_swap(full: list[tuple]) -> None:
    for _, ts, _, states, slots, _ in full:
        other = [st[slots[0]] for st in states]
        tmp = torch._foreach_add(ts, 0)  # a copy
        torch._foreach_copy_(ts, other)
        torch._foreach_copy_(other, tmp)


def _fb_axpby(full: list[tuple]) -> None:
    for h, ts, ins, _, _, _ in full:
        ins = [x if x.dtype == t.dtype else x.to(t.dtype) for t, x in zip(ts, ins)]
        if h.get("assign"):
            torch._foreach_copy_(ts, torch._foreach_mul(ins, float(h["b"])))
        else:
            torch._foreach_mul_(ts, float(h["a"]))
            torch._foreach_add_(ts, torch._foreach_mul(ins, float(h["b"])))


def _fb_bema(full: list[tuple]) -> None:
    for h, ts, ins, states, slots, _ in full:
        out = [st[slots[0]] for st in states]
        anchor = [st[slots[1]] for st in states]
        if h.get("reset"):
            for group in (ts, out, anchor):
                torch._foreach_copy_(group, ins)
            continue
        torch._foreach_lerp_(ts, ins, float(h["beta"]))
        torch._foreach_copy_(out, torch._foreach_add(torch._foreach_mul(torch._foreach_sub(ins, anchor), float(h["alpha"])), ts))


_FALLBACKS = {"ema": _fb_ema, "ema_multi": _fb_ema_multi, "swap": _fb_swap, "axpby": _fb_axpby, "bema": _fb_bema}


def native_step_async(who: str, rule: str, calls: Sequence[Call], wait_for: Callable[[], Any] | None = None):
    """Validate now, run on a native background thread; returns a handle with ``wait()``.
    The caller must not touch the tensors until ``wait()`` returned. Tensors the engine cannot
    walk linearly are staged (the copy back then happens in ``wait()``)."""
    full = _full(calls)
    try:
        return _native.step_async(who, rule, full, wait_for)
    except LayoutError:
        copy_back = _stage(full)
        return _StagedPending(_native.step_async(who, rule, full, wait_for), copy_back)


class _StagedPending:
    def __init__(self, inner, copy_back: list[tuple[Tensor, Tensor]]) -> None:
        self._inner = inner
        self._copy_back = copy_back

    def wait(self) -> None:
        self._inner.wait()
        for orig, copy in self._copy_back:
            orig.copy_(copy)
        self._copy_back = []

    def done(self) -> bool:
        return self._inner.done()


def _stage(full: list[tuple]) -> list[tuple[Tensor, Tensor]]:
    """Replace non-contiguous tensors in ``full`` (in place) by contiguous copies; returns the
    (original, copy) pairs of written tensors to copy back."""
    copy_back: list[tuple[Tensor, Tensor]] = []

    def stage(t: Tensor, writable: bool) -> Tensor:
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if writable:
            copy_back.append((t, c))
        return c

    for k, (h, targets, inputs, states, slots, scalars) in enumerate(full):
        ts = [stage(t, True) for t in targets]
        ins = None if inputs is None else [stage(t, False) for t in inputs]
        ss = None if states is None else [{name: stage(st[name], True) for name in slots} for st in states]
        full[k] = (h, ts, ins, ss, slots, scalars)
    return copy_back
