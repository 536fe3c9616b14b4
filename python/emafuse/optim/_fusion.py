"""A weight average updated inside the optimizer's native step (spec ``averaging.md`` D.3): the
new weight is averaged while still in registers, 8 instead of 12 bytes per element and no
separate pass.

The average (e.g. :class:`emafuse.ModelEMA`) implements :class:`FusedAverage` and registers
itself with :meth:`FusedOptimizer.register_fused_average
<emafuse.optim._base.FusedOptimizer.register_fused_average>`; the optimizer asks it once per
step for a :class:`FusedRequest`, adds the extra state slot ``ema`` to the parameters the request
maps (rules with ``_supports_fused_ema``, e.g. Adam/AdamW: flag ``ema``, hyper-parameter
``ema_weight``) and reports back which ones the native pass updated.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..errors import InvalidArgumentError

__all__ = ["FusedAverage", "FusedRequest", "fused_average", "register_fused_average"]

# The optimizer's registry of fused averages ({handle id: average}, at most one entry). Not part
# of torch's optimizer state: pickled or deep-copied optimizers come without it.
_REGISTRY = "_fused_averages"


@dataclass
class FusedRequest:
    """What the optimizer's native step should average this step."""

    #: lerp weight (1 - decay) of this update.
    weight: float
    #: parameter -> its average tensor (same dtype, device and contiguity).
    targets: dict[Tensor, Tensor]


class FusedAverage(Protocol):
    """What an average fused into an optimizer step implements."""

    def fused_begin(self, found_inf: Tensor | None) -> FusedRequest | None:
        """Called once per optimizer step, before the native call (``found_inf``: AMP's flag, or
        None). None: nothing to fuse this step."""

    def fused_end(self, request: FusedRequest, fused: set[int]) -> None:
        """After the native step succeeded; ``fused`` holds the ids of the parameters whose average
        the native pass updated (the average updates the rest itself)."""

    def fused_abort(self, request: FusedRequest | None) -> None:
        """The step raised: undo every bookkeeping change :meth:`fused_begin` made."""

    def fused_outputs(self) -> list[Tensor]:
        """Every tensor a fused update may write (declared by the step's ``torch.compile`` op)."""


def register_fused_average(optimizer: Any, average: FusedAverage) -> RemovableHandle:
    """Register ``average`` with ``optimizer`` (at most one per optimizer); ``remove()`` on the
    returned handle unregisters it."""
    name = type(optimizer).__name__
    if not getattr(optimizer, "_supports_fused_ema", False):
        raise InvalidArgumentError(f"{name} cannot update a weight average inside its step; call the average's update() after step()")
    registry = optimizer.__dict__.setdefault(_REGISTRY, OrderedDict())  # weakly referenced by the handle
    if registry:
        raise InvalidArgumentError(
            f"{name} already updates a fused average; remove that one first (its handle's remove(), or ModelEMA.detach_optimizer())"
        )
    handle = RemovableHandle(registry)
    registry[handle.id] = average
    return handle


def fused_average(optimizer: Any) -> FusedAverage | None:
    """The average registered with ``optimizer``, if any."""
    registry = optimizer.__dict__.get(_REGISTRY)
    return next(iter(registry.values())) if registry else None
