"""The engine's slow path, shared by the optimizers and the averaging methods: tensors it cannot
walk linearly together (complex, non-dense, strided unlike their partners) are passed as real
views or contiguous copies, and the written copies are copied back after the step."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native
from .errors import DTypeError

__all__ = ["stage_groups"]


def stage_groups(groups: list[_native.Group], complex_error: str | None = None) -> tuple[list[_native.Group], list[tuple[Tensor, Tensor]]]:
    """``groups`` with every tensor made contiguous and complex ones viewed as real, and the
    (original, copy) pairs of written tensors to copy back once the step ran. Scalar state passes
    unchanged. ``complex_error``: raise :class:`DTypeError` with it on a complex tensor instead."""
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
            )
        )
    return staged, copy_back
