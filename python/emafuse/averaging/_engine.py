"""The native calls behind every averaging method: one call per update over all tensors (the
engine groups them by device and dtype), with a slow path for tensors it cannot walk linearly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _native
from .._cuda import current_streams
from .._staging import stage_groups
from ..errors import LayoutError

__all__ = ["CachedStep", "Group", "engine_input", "group", "input_dtype", "native_step", "native_step_async", "real_view"]

Group = _native.Group


def real_view(t: Tensor) -> Tensor:
    """``t`` as the engine can take it: complex tensors as real views (lerp and weighted sums with
    real coefficients act on real and imaginary parts alike)."""
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def input_dtype(target: Tensor, x: Tensor) -> torch.dtype:
    """The dtype in which the engine reads input ``x`` when writing ``target``: ``x``'s own if it
    is the target's, or bf16/fp16 for an fp32 target (an fp32 average of a low-precision model);
    otherwise the target's (``x`` must be converted first)."""
    if x.dtype == target.dtype or (target.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
        return x.dtype
    return target.dtype


def engine_input(target: Tensor, x: Tensor) -> Tensor:
    """``x`` as the engine can read it for ``target``: itself, or a converted copy (e.g. an fp64
    average of an fp32 model)."""
    want = input_dtype(target, x)
    return x if want == x.dtype else x.to(want)


def group(
    hyper: dict[str, Any],
    targets: Sequence[Tensor],
    inputs: Sequence[Tensor] | None = None,
    states: Sequence[dict[str, Tensor]] | None = None,
    slots: tuple[str, ...] = (),
    offsets: Sequence[int] | None = None,
) -> Group:
    """The tensors of one update: the written ``targets`` (averages), the read-only ``inputs``
    (the model's tensors), per target the state tensors named in ``slots``, and for local shards
    of DTensors where each starts in its whole tensor (``offsets``, see ``_native.Group``)."""
    inputs = None if inputs is None else list(inputs)
    offsets = None if offsets is None else list(offsets)
    return Group(hyper=hyper, params=list(targets), inputs=inputs, states=None if states is None else list(states), slots=slots, offsets=offsets)


def native_step(who: str, rule: str, g: Group) -> None:
    """Run ``rule`` over ``g`` in one native call; tensors that are not dense (or strided
    differently from their partners) are staged through contiguous copies."""
    groups = [g]
    try:
        _native.step(who, rule, groups, streams=current_streams())
    except LayoutError:
        groups, copy_back = stage_groups(groups, who=who)
        _native.step(who, rule, groups, streams=current_streams())
        for orig, copy in copy_back:
            orig.copy_(copy)


class CachedStep:
    """One averaging update's validated native plan, kept between updates while it is built from
    the same tensor lists (``key``: the list objects, compared by identity); the native plan itself
    checks at every run that the tensors and their memory are unchanged, and is rebuilt when they
    are not. Saves re-reading and re-validating every tensor of a model at each update."""

    __slots__ = ("_inputs", "_key", "_plan")

    def __init__(self) -> None:
        self._key: tuple = ()
        self._plan: _native.StepPlan | None = None
        self._inputs: list[Tensor] | None = None

    def run(self, who: str, rule: str, key: tuple, make: Callable[[], Group]) -> None:
        """One update; ``make()`` gives this update's group (its hyper-parameters are used even
        when the cached plan runs)."""
        g = make()
        streams = current_streams()
        plan = self._plan
        if plan is not None and len(key) == len(self._key) and all(a is b for a, b in zip(key, self._key)):
            if plan.run([g.hyper], None, None, streams) is not None:
                return
        self._plan = None
        try:
            plan = _native.StepPlan(who, rule, [g])
            plan.run(None, None, None, streams)
        except LayoutError:
            native_step(who, rule, g)  # staged copies every time: nothing to keep
            return
        self._plan, self._key, self._inputs = plan, key, g.inputs

    def inputs_for(self, source: list[Tensor]) -> list[Tensor] | None:
        """The inputs of the cached plan if it was built reading ``source`` (the list object
        first in its key) as they are, else None."""
        return self._inputs if self._plan is not None and self._key and self._key[0] is source else None

    def clear(self) -> None:
        """Forget the plan (and the tensors it holds)."""
        self._plan, self._key, self._inputs = None, (), None


def native_step_async(who: str, rule: str, g: Group, wait_for: Callable[[], Any] | None = None):
    """Validate now, run on a native background thread; returns a handle with ``wait()``.
    The caller must not touch the tensors until ``wait()`` returned. Tensors the engine cannot
    walk linearly are staged (the copy back then happens in ``wait()``)."""
    groups = [g]
    try:
        return _native.step_async(who, rule, groups, wait_for)
    except LayoutError:
        groups, copy_back = stage_groups(groups, who=who)
        return _StagedPending(_native.step_async(who, rule, groups, wait_for), copy_back)


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
