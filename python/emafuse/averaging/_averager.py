"""What every averaging class shares: the vocabulary of ``emafuse.averaging`` (``module``,
``num_steps_seen``, ``num_updates``, ``n_averaged``; see the package docstring), the exchanges
with the model (``swap``, ``average_parameters``, ``copy_to``, ``store``/``restore``) through
:class:`~emafuse.averaging._tracking.Tracking`, and the helpers that keep the old spellings
working."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _dtensor
from ..errors import InvalidArgumentError, ShapeError
from ._tracking import Tracking

__all__ = ["Alias", "Averager", "load_module_state", "renamed", "saved", "saved_count"]


class Alias:
    """An old spelling of attribute ``name``: reads and writes go to ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"Old spelling of :attr:`{name}`."

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.name, value)


def renamed(who: str, name: str, value: Any, old: str, old_value: Any, default: Any) -> Any:
    """The value of option ``name``, passed as ``name`` or under its old spelling ``old``
    (None: not passed), or ``default``."""
    if old_value is None:
        return default if value is None else value
    if value is not None:
        raise InvalidArgumentError(f"{who}: pass {name}= or its old spelling {old}=, not both")
    return old_value


def saved(who: str, state: Mapping[str, Any], key: str, *old: str) -> Any:
    """``state[key]``, or the entry under an old spelling of ``key`` (checkpoints written before
    the names were unified); a clear error when there is none."""
    for k in (key, *old):
        if k in state:
            return state[k]
    raise InvalidArgumentError(f"{who}.load_state_dict: missing '{key}'")


def saved_count(who: str, state: Mapping[str, Any], key: str, *old: str) -> int:
    """A saved counter (``state[key]`` or an old spelling, as :func:`saved`) as an int; a clear
    error for anything but a whole number >= 0 (a string, NaN, a fraction, a negative count).
    Callers read every counter before they write anything."""
    value = saved(who, state, key, *old)
    try:
        number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        count = int(number) if not isinstance(number, bool) and float(number) == int(number) else None
    except (TypeError, ValueError, OverflowError):
        count = None
    if count is None or count < 0:
        raise InvalidArgumentError(f"{who}.load_state_dict: '{key}' is {value!r}; expected a whole number >= 0 (a corrupted checkpoint?). Nothing was loaded.")
    return count


def load_module_state(who: str, module: nn.Module, theirs: Mapping[str, Tensor]) -> None:
    """Copy a saved ``state_dict`` into the module holding an average, in place (into its dtype
    and device); a clear error, before anything is written, if it does not match."""
    check_module_state(who, module, theirs)
    own = module.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            _dtensor.copy_into(v, theirs[k])


def check_module_state(who: str, module: nn.Module, theirs: Mapping[str, Tensor]) -> None:
    """Raise (writing nothing) unless ``theirs`` can be loaded by :func:`load_module_state`: the
    same keys, tensors of the same shapes."""
    if not isinstance(theirs, Mapping):
        raise InvalidArgumentError(f"{who}.load_state_dict: the saved average is a {type(theirs).__name__}, expected a state_dict")
    own = module.state_dict()
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    if missing or unexpected:
        raise InvalidArgumentError(
            f"{who}.load_state_dict: the saved average does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in own.items():
        if not isinstance(theirs[k], Tensor):
            raise InvalidArgumentError(f"{who}.load_state_dict: '{k}' is a {type(theirs[k]).__name__}, expected a tensor")
        if tuple(theirs[k].shape) != tuple(v.shape):
            raise ShapeError(f"{who}.load_state_dict: '{k}' has shape {tuple(theirs[k].shape)}, expected {tuple(v.shape)}")


class Averager:
    """Base of the averaging classes. A subclass builds ``self._tracking`` and the counters, and
    implements :meth:`_averaged` (the module holding the average and its tensors in entry order);
    ``update``, ``state_dict`` and ``load_state_dict`` are its own."""

    _tracking: Tracking
    #: Calls of ``update`` observed (optimizer steps accounted for).
    num_steps_seen: int
    #: Update events applied (calls that changed the average).
    num_updates: int

    def _averaged(self) -> tuple[nn.Module, list[Tensor]]:
        """The module holding the average and its tensors in entry order, up to date (pending
        work joined)."""
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        """The averaged model (an ``nn.Module`` in eval mode, no gradients)."""
        return self._averaged()[0]

    @property
    def n_averaged(self) -> int:
        """``torch.optim.swa_utils.AveragedModel``'s and Lightning's name for :attr:`num_updates`."""
        return self.num_updates

    def full_state_dict(self) -> dict[str, Tensor]:
        """The average as a state_dict of whole tensors, e.g. to save a consolidated checkpoint of
        a sharded (FSDP2) model's average: DTensors are gathered, so every rank of the mesh must
        call this (one ``all_gather`` per sharded tensor); the same as ``module.state_dict()`` for
        an unsharded model."""
        return _dtensor.full_state_dict(self.module.state_dict())

    def swap(self, model: nn.Module | None = None) -> None:
        """Exchange the model's weights with the average in place (the fused native swap for
        same-dtype, same-device tensors, a temporary copy for the others); calling it twice
        restores both."""
        own = self._averaged()[1]
        self._tracking.swap(self._tracking.model(model), own)

    def average_parameters(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the model holds the average inside, its own weights again after (the
        fused swap; a backup only for tensors whose average has another dtype or device).
        Updates are refused inside."""
        own = self._averaged()[1]
        return self._tracking.swapped(self._tracking.model(model), own)

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the average into ``model`` (default: the model it was built from)."""
        own = self._averaged()[1]
        self._tracking.copy_to(self._tracking.model(model), own)

    def store(self, model: nn.Module | None = None) -> None:
        """Keep a copy of the model's weights (torch-ema's ``store``), for :meth:`restore`."""
        self._tracking.store(self._tracking.model(model))

    def restore(self, model: nn.Module | None = None) -> None:
        """Write back what :meth:`store` kept."""
        self._tracking.restore(self._tracking.model(model))

