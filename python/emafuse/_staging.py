"""The engine's slow path, shared by the optimizers and the averaging methods: tensors it cannot
walk linearly together (complex, non-dense, strided unlike their partners) are passed as real
views or contiguous copies, and the written copies are copied back after the step."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .errors import DTypeError, InvalidArgumentError

__all__ = ["stage_groups"]


def stage_groups(
    groups: list[_native.Group], complex_error: str | None = None, who: str = "emafuse"
) -> tuple[list[_native.Group], list[tuple[Tensor, Tensor]]]:
    """``groups`` with every tensor made contiguous and complex ones viewed as real, and the
    (original, copy) pairs of written tensors to copy back once the step ran. Scalar state passes
    unchanged. ``complex_error``: raise :class:`DTypeError` with it on a complex tensor instead.
    ``who`` names the caller in messages."""
    copy_back: list[tuple[Tensor, Tensor]] = []

    def stage(t: Tensor, writable: bool) -> Tensor:
        if t.is_complex():
            if complex_error is not None:
                raise DTypeError(complex_error)
            t = torch.view_as_real(t)
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if writable:
            copy_back.append((t, c))
        return c

    _check_memory(groups, who)
    staged = []
    for g in groups:
        states = None
        if g.states is not None:
            states = [{**{name: stage(st[name], True) for name in g.slots}, **{key: st[key] for key in g.scalars}} for st in g.states]
        staged.append(
            _native.Group(
                hyper=g.hyper,
                params=[stage(t, True) for t in g.params],
                inputs=None if g.inputs is None else [stage(t, False) for t in g.inputs],
                states=states,
                slots=g.slots,
                scalars=g.scalars,
                offsets=g.offsets,
                place=g.place,
            )
        )
    return staged, copy_back


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (e.g. an expanded tensor): with dimensions
    sorted by stride, some stride does not exceed the span of the dimensions before it."""
    if t.numel() == 0:
        return False
    span = 0
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _span(t: Tensor) -> tuple[torch.device, int, int] | None:
    """The bytes ``t``'s elements lie in (a superset for tensors with gaps), or None if empty."""
    if t.numel() == 0:
        return None
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return t.device, start, start + (last + 1) * t.element_size()


def _check_memory(groups: list[_native.Group], who: str) -> None:
    """Refuse, before anything is staged or written, what staging would hide from the engine's
    own checks: a written tensor whose elements share memory (an expanded parameter or state
    tensor: the copy back would fail after the step), and a written tensor overlapping another
    operand (their copies would not overlap, and the result would depend on the copy order).
    Tensors with gaps count with their whole span (interleaved views are refused too)."""
    ops: list[tuple[tuple[torch.device, int, int], bool, str]] = []
    for gi, g in enumerate(groups):
        tensors = [(t, True, f"param group {gi}, parameter {i}") for i, t in enumerate(g.params)]
        tensors += [(t, False, f"param group {gi}, grad {i}") for i, t in enumerate(g.inputs or ())]
        for i, st in enumerate(g.states or ()):
            tensors += [(st[name], True, f"param group {gi}, parameter {i}: state '{name}'") for name in (*g.slots, *g.scalars)]
        for t, written, role in tensors:
            if written and _may_overlap(t):
                raise InvalidArgumentError(
                    f"{who}: {role} has elements that share memory (e.g. an expanded tensor), so it cannot be updated in place; "
                    "pass a tensor that owns its elements (e.g. .clone())"
                )
            span = _span(t)
            if span is not None:
                ops.append((span, written, role))
    ops.sort(key=lambda o: (str(o[0][0]), o[0][1]))
    reach: dict[str, tuple[int, str]] = {}  # device -> furthest end so far (any operand), its role
    reach_written: dict[str, tuple[int, str]] = {}
    for (device, start, end), written, role in ops:
        key = str(device)
        hits = [h for h in (reach_written.get(key), reach.get(key) if written else None) if h is not None and h[0] > start]
        if hits:
            hit = hits[0]
            raise InvalidArgumentError(
                f"{who}: {hit[1]} and {role} share memory, and the step writes at least one of them: the result would depend on the "
                "order of reads and writes. Give every parameter, gradient and state tensor its own memory (e.g. .clone())"
            )
        if written and (key not in reach_written or reach_written[key][0] < end):
            reach_written[key] = (end, role)
        if key not in reach or reach[key][0] < end:
            reach[key] = (end, role)
