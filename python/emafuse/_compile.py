"""``torch.compile`` support: every emafuse update is one opaque torch custom op.

Under ``torch.compile``, an optimizer's ``step()`` and an average's ``update()`` do not trace their
Python bookkeeping (state creation, hyper-parameters, counters, plan caching): they call one
custom op that declares which tensors it reads and which it writes, and whose implementation is
the eager ``step()`` / ``update()`` of the object it names. Dynamo sees one node; hyper-parameters
(an LR schedule included), counters and lazily created state are read and written when the graph
runs, so a change of them recompiles nothing. The op's fake implementation does nothing: the
update only mutates its arguments.

The implementation updates the object's own tensors. Backends that functionalize the graph without
re-inplacing it (e.g. ``aot_eager``) pass copies of them as the mutated arguments and write those
back afterwards: the results are then copied into the arguments, so either way what the graph
writes back is the update.

Objects are named by a key (an int) registered here; the registry holds them weakly.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["average_update", "optimizer_step", "register"]

_live: dict[int, weakref.ref] = {}
_keys = itertools.count(1)


def register(obj: Any) -> int:
    """A key naming ``obj`` in the ops below, for as long as it lives."""
    key = next(_keys)
    _live[key] = weakref.ref(obj, lambda _, k=key: _live.pop(k, None))
    return key


def _sync(args: list[Tensor], own: list[Tensor]) -> None:
    """Make each mutated argument hold its tensor's new value (a no-op where they are the same)."""
    for arg, t in zip(args, own):
        if arg is not t:
            arg.copy_(t)


def _get(key: int) -> Any:
    ref = _live.get(key)
    obj = ref() if ref is not None else None
    if obj is None:
        raise RuntimeError(f"emafuse: the object a compiled graph updates (key {key}) no longer exists")
    return obj


@torch.library.custom_op("emafuse::optimizer_step", mutates_args=("params", "grads", "written"))
def optimizer_step(key: int, params: list[Tensor], grads: list[Tensor], written: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """One ``step()`` of the optimizer ``key`` (without its closure): it writes ``params``, its
    state and fused averages (``written``), and with AMP the gradients (left unscaled)."""
    opt = _get(key)
    own: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    opt._compile_inputs(*own)  # the tensors the arguments stand for, in the same order
    opt._update(grad_scale, found_inf)
    for args, tensors in zip((params, grads, written), own):
        _sync(args, tensors)


@optimizer_step.register_fake
def _(key: int, params: list[Tensor], grads: list[Tensor], written: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    return None


@torch.library.custom_op("emafuse::average_update", mutates_args=("written",))
def average_update(key: int, step: int | None, force: bool, written: list[Tensor], read: list[Tensor]) -> Tensor:
    """One ``update()`` of the average ``key`` from the model it was built from (whose tensors are
    ``read``); returns whether it was an update event, as a 0-dim bool tensor."""
    avg = _get(key)
    own = avg.fused_outputs()
    changed = avg._eager_update(None, step, force)
    _sync(written, own)
    return torch.tensor(bool(changed))


@average_update.register_fake
def _(key: int, step: int | None, force: bool, written: list[Tensor], read: list[Tensor]) -> Tensor:
    return torch.empty((), dtype=torch.bool)
