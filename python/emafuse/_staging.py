"""The engine's slow path, shared by the optimizers and the averaging methods: tensors it cannot
walk linearly together (complex, non-dense, strided unlike their partners) are passed as real
views or contiguous copies, and the written copies are copied back after the step."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DTypeError

__all__ = ["stage_calls"]


def stage_calls(calls: list[tuple], complex_error: str | None = None) -> tuple[list[tuple], list[tuple[Tensor, Tensor]]]:
    """``calls`` (the native step's ``(hyper, targets, inputs, states, slots, scalars)`` tuples)
    with every tensor made contiguous and complex ones viewed as real, and the (original, copy)
    pairs of written tensors to copy back once the step ran. Scalar state passes unchanged.
    ``complex_error``: raise :class:`DTypeError` with it on a complex tensor instead."""
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

    staged = []
    for hyper, targets, inputs, states, slots, scalars in calls:
        ts = [stage(t, True) for t in targets]
        ins = None if inputs is None else [stage(t, False) for t in inputs]
        ss = None
        if states is not None:
            ss = [{**{name: stage(st[name], True) for name in slots}, **{key: st[key] for key in scalars}} for st in states]
        staged.append((hyper, ts, ins, ss, slots, scalars))
    return staged, copy_back
