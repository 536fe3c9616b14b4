"""Model tracking, shared by every averaging class: which tensors of a model an average follows
(names, kinds and the per-tensor policy of spec ``averaging.md`` §1.4), cloning them into an
average, and the exchanges between model and average: the fused swap (spec K4), ``copy_to``,
``store`` / ``restore``."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from .. import _dtensor
from ..errors import InvalidArgumentError, ShapeError
from ._engine import group, native_step, real_view

__all__ = ["Entry", "Policy", "Tracking", "averaged_copy", "clone_tensors"]

# dtypes the native swap exchanges in place (complex ones as real views); others take the backup path.
_SWAP_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128}

_CHOICES = dict(buffers=("average", "copy", "skip"), non_float=("copy", "skip", "truncate"), complex=("average", "copy"))


@dataclass(frozen=True)
class Policy:
    """What happens to each tensor of the model at an update event (spec §1.4), decided once from
    its name and kind:

    * ``"average"``: float (and complex) parameters; float buffers with ``buffers="average"``;
    * ``"copy"``: taken from the model: float buffers with ``buffers="copy"``, non-float tensors
      (e.g. BatchNorm's ``num_batches_tracked``) with ``non_float="copy"``, complex tensors with
      ``complex="copy"``, and names in ``copy_names``;
    * ``"truncate"``: non-float tensors with ``non_float="truncate"`` (the float average
      truncated into the integer, as ``AveragedModel``/Lightning);
    * ``"skip"``: left as they are: names in ``exclude`` or starting with ``exclude_prefix``, all
      buffers with ``buffers="skip"``, non-float ones with ``non_float="skip"``, and parameters
      without ``requires_grad`` when ``requires_grad_only``.
    """

    buffers: str = "average"
    non_float: str = "copy"
    complex: str = "average"
    exclude: tuple[str, ...] = ()
    exclude_prefix: tuple[str, ...] = ()
    copy_names: tuple[str, ...] = ()
    requires_grad_only: bool = False

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")

    def action(self, name: str, t: Tensor, is_param: bool) -> str:
        """``"average"``, ``"copy"``, ``"truncate"`` or ``"skip"`` for tensor ``name``."""
        if name in self.exclude or any(name.startswith(p) for p in self.exclude_prefix):
            return "skip"
        if is_param and self.requires_grad_only and not t.requires_grad:
            return "skip"
        if not is_param and self.buffers == "skip":
            return "skip"
        if not (t.is_floating_point() or t.is_complex()):
            return self.non_float
        if name in self.copy_names or (not is_param and self.buffers == "copy") or (t.is_complex() and self.complex == "copy"):
            return "copy"
        return "average"


@dataclass(frozen=True)
class Entry:
    """One tensor of the model: its name, whether it is a parameter, and its policy action."""

    name: str
    is_param: bool
    action: str


def _named(m: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    for n, p in m.named_parameters():
        yield n, p, True
    for n, b in m.named_buffers():
        yield n, b, False


def averaged_copy(model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | None = None) -> nn.Module:
    """A copy of ``model`` to hold an average: every parameter and buffer cloned directly onto
    ``device`` (None: where it is) and, for floating tensors, into ``dtype`` (None: its own), with
    no transient copy on the model's device; eval mode, no gradients. A model with DTensor
    (FSDP2) tensors gets a shard-local copy instead (:func:`_sharded_copy`)."""
    if _dtensor.any_dtensor(chain(model.parameters(), model.buffers())):
        return _sharded_copy(model, dtype, device)
    memo: dict[int, Any] = {}
    for t in chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        x = t.detach()
        x = x.to(device=device or x.device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype, copy=True)
        memo[id(t)] = nn.Parameter(x, requires_grad=False) if isinstance(t, nn.Parameter) else x
    out = copy.deepcopy(model, memo)
    out.eval()
    return out


def _sharded_copy(model: nn.Module, dtype: torch.dtype | None, device: torch.device | None) -> nn.Module:
    """The average of a sharded (FSDP2) model: plain modules holding, under the model's names, a
    copy of each tensor; a DTensor's copy is a DTensor placed like it whose local shard is a copy
    of this rank's shard (no communication, 1/world_size of the model per rank), so ``state_dict``
    is sharded as ``torch.distributed.checkpoint`` expects. The copy has no ``forward``: evaluate
    the average by swapping it into the model (``average_parameters``)."""
    out = nn.Module()
    copies: dict[int, Tensor] = {}
    for name, t, is_param in _named(model):
        x = copies.get(id(t))
        if x is None:
            data = _dtensor.local(t).detach()
            data = data.to(device=device or data.device, dtype=dtype if dtype is not None and data.is_floating_point() else data.dtype, copy=True)
            x = _dtensor.sharded_like(t, data) if _dtensor.is_dtensor(t) else data
            x = nn.Parameter(x, requires_grad=False) if is_param else x
            copies[id(t)] = x
        owner = out
        *path, key = name.split(".")
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]  # type: ignore[assignment]
        if is_param:
            owner.register_parameter(key, x)  # type: ignore[arg-type]
        else:
            owner.register_buffer(key, x)
    out.eval()
    return out


def clone_tensors(ts: Iterable[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Contiguous copies of ``ts`` (floating ones in ``dtype`` when given), e.g. an average's
    extra state such as BEMA's EMA and anchor."""
    return [
        t.detach().to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, memory_format=torch.contiguous_format, copy=True)
        for t in ts
    ]


def _unchanged(mods: list, slots: list) -> bool:
    """Whether the module tree and the tensors recorded by :meth:`Tracking.model_tensors` are
    still the ones the model holds."""
    for m, n_p, n_b, n_m, children in mods:
        if len(m._parameters) != n_p or len(m._buffers) != n_b or len(m._modules) != n_m:
            return False
        sub = m._modules
        for name, child in children:
            if sub.get(name) is not child:
                return False
    for mod, key, t in slots:
        cur = mod._parameters.get(key)
        if cur is None:
            cur = mod._buffers.get(key)
        if cur is not t:
            return False
    return True


class Tracking:
    """The tensors of ``model`` an average follows (``entries``, in ``named_parameters()`` then
    ``named_buffers()`` order, with their :class:`Policy` action), the lookup of those tensors in
    the model at each update, and the exchanges between the model and an average's tensors (the
    average's own tensors come in entry order, see :meth:`tensors_of`).

    ``who`` names the averaging class in error messages. The model is held by a weak reference;
    methods taking ``model=None`` use it."""

    def __init__(self, who: str, model: nn.Module, policy: Policy) -> None:
        self.who = who
        named = list(_named(model))
        self.entries = [Entry(n, is_param, policy.action(n, t, is_param)) for n, t, is_param in named]
        # DTensor (FSDP2) tensors are followed through their local shards (see model_tensors).
        self._shapes = [_dtensor.local(t).shape for _, t, _ in named]
        self._layouts = [_dtensor.layout(t) for _, t, _ in named]
        self.averaged = self._where("average")
        self.copied = self._where("copy")
        self.truncated = self._where("truncate")
        #: Every entry an update writes (all but the skipped ones), in entry order.
        self.followed = [i for i, e in enumerate(self.entries) if e.action != "skip"]
        self._model_ref = weakref.ref(model)
        self._cache: tuple | None = None
        self._stored: list[tuple[int, Tensor]] | None = None
        self._swapped_into: nn.Module | None = None

    def _where(self, action: str) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.action == action]

    def names(self, indices: Sequence[int]) -> list[str]:
        """The names of entries ``indices``."""
        return [self.entries[i].name for i in indices]

    # -- the model -------------------------------------------------------------------------------

    def model(self, model: nn.Module | None = None) -> nn.Module:
        """``model``, or the model the average was built from."""
        if model is None:
            model = self._model_ref()
            if model is None:
                raise InvalidArgumentError(f"{self.who}: the model it was built from is gone; pass it explicitly")
        return model

    def model_tensors(self, model: nn.Module) -> list[Tensor]:
        """The model's tensors in entry order; a clear error if its structure or the shape of a
        followed tensor changed since the average was made. A DTensor (FSDP2) tensor is given as
        its local shard: every exchange with an average is then shard-local, with no collective.

        The lookup is cached: later calls only check that the module tree, each module's
        parameter/buffer/submodule counts and every tensor object are unchanged (a few dict
        lookups per module, no ``named_parameters()`` walk)."""
        cache = self._cache
        if cache is not None and cache[0] is model and _unchanged(cache[1], cache[2]):
            return cache[3]
        named = {n: t for n, t, _ in _named(model)}
        names = [e.name for e in self.entries]
        missing = [n for n in names if n not in named]
        unexpected = [n for n in named if n not in set(names)]
        if missing or unexpected:
            raise InvalidArgumentError(
                f"{self.who}: the model's structure changed since the average was made: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        ordered = [_dtensor.local(named[n]) for n in names]
        for i in self.followed:
            if self._shapes[i] != ordered[i].shape:
                raise ShapeError(
                    f"{self.who}: '{names[i]}' has shape {tuple(ordered[i].shape)} in the model but {tuple(self._shapes[i])} in the average"
                )
        modules = dict(model.named_modules(remove_duplicate=False))
        mods = [(m, len(m._parameters), len(m._buffers), len(m._modules), list(m._modules.items()))
                for m in {id(m): m for m in modules.values()}.values()]
        slots = []
        for n in names:
            mod_name, _, key = n.rpartition(".")
            slots.append((modules[mod_name], key, named[n]))
        self._cache = (model, mods, slots, ordered)
        return ordered

    def tensors_of(self, average: nn.Module) -> list[Tensor]:
        """The tensors of ``average`` (a copy of the model, e.g. from :func:`averaged_copy`) in
        entry order (local shards of DTensors)."""
        named = {n: _dtensor.local(t).detach() for n, t, _ in _named(average)}
        return [named[e.name] for e in self.entries]

    def flat_offsets(self, average: nn.Module, indices: Sequence[int]) -> list[int] | None:
        """Where the local shard of each of entries ``indices`` of ``average`` starts in its whole
        tensor (``_dtensor.flat_offset``: the engine's stochastic rounding then draws a sharded
        average's bits as the unsharded one's), or None when the model is not sharded."""
        if not self.is_sharded:
            return None
        named = {n: t for n, t, _ in _named(average)}
        tensors = [named[self.entries[i].name] for i in indices]
        return [_dtensor.flat_offset(t) if _dtensor.is_dtensor(t) else 0 for t in tensors]

    def sharded(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        """An average's extra per-entry tensors (``tensors`` for entries ``indices``, local shards)
        as they go into its ``state_dict``: DTensors placed like the model's where the model is
        sharded (so ``torch.distributed.checkpoint`` saves each rank's part), else as they are."""
        return [_dtensor.wrap(self._layouts[i], t) for i, t in zip(indices, tensors)]

    @property
    def is_sharded(self) -> bool:
        """Whether the model has DTensor (FSDP2) tensors."""
        return any(layout is not None for layout in self._layouts)

    def local_parts(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        """The inverse of :meth:`sharded` for loaded tensors (also whole tensors of a consolidated
        checkpoint, of which each rank takes its part)."""
        return [_dtensor.unwrap(self._layouts[i], t) for i, t in zip(indices, tensors)]

    # -- exchanges --------------------------------------------------------------------------------

    def check_not_swapped(self) -> None:
        """Refuse an update while the average is swapped into the model."""
        if self._swapped_into is not None:
            raise InvalidArgumentError(f"{self.who}: the average is swapped into the model; leave average_parameters() first")

    def _split(self, thetas: Sequence[Tensor], own: Sequence[Tensor]) -> tuple[list[int], list[int]]:
        """Followed entries the native swap exchanges (same dtype and device) and the others."""
        fused, backup = [], []
        for i in self.followed:
            a, b = thetas[i], own[i]
            (fused if a.dtype == b.dtype and a.device == b.device and a.dtype in _SWAP_DTYPES else backup).append(i)
        return fused, backup

    def _native_swap(self, thetas: Sequence[Tensor], own: Sequence[Tensor], idx: list[int]) -> None:
        if idx:
            targets = [real_view(thetas[i]) for i in idx]
            native_step(f"{self.who}.swap", "swap", group({}, targets, states=[{"b": real_view(own[i])} for i in idx], slots=("b",)))

    @torch.no_grad()
    def swap(self, model: nn.Module, own: Sequence[Tensor]) -> None:
        """Exchange the model's followed tensors with ``own`` in place: one native call (16 B/param)
        for same-dtype, same-device pairs, a temporary copy for the others (whose average then
        holds the model's values in its own dtype). Calling it twice restores both."""
        thetas = self.model_tensors(model)
        fused, backup = self._split(thetas, own)
        self._native_swap(thetas, own, fused)
        for i in backup:
            tmp = thetas[i].to(own[i].device, copy=True)
            thetas[i].copy_(own[i])
            own[i].copy_(tmp)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, own: Sequence[Tensor]) -> Iterator[nn.Module]:
        """Context manager: ``model`` holds the average inside, its own weights again after, and
        the average is unchanged. Same-dtype, same-device tensors are exchanged in place by the
        native swap (no copy of the model); the others are backed up (on the average's device) and
        restored."""
        self.check_not_swapped()
        thetas = self.model_tensors(model)
        fused, other = self._split(thetas, own)
        with torch.no_grad():
            self._native_swap(thetas, own, fused)
            backup = [(i, thetas[i].to(own[i].device, copy=True)) for i in other]
            for i, _ in backup:
                thetas[i].copy_(own[i])
        self._swapped_into = model
        try:
            yield model
        finally:
            self._swapped_into = None
            with torch.no_grad():
                self._native_swap(thetas, own, fused)
                for i, t in backup:
                    thetas[i].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module, own: Sequence[Tensor]) -> None:
        """Write ``own`` into the model's followed tensors."""
        thetas = self.model_tensors(model)
        for i in self.followed:
            thetas[i].copy_(own[i])

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of the model's followed tensors (torch-ema's ``store``)."""
        thetas = self.model_tensors(model)
        self._stored = [(i, thetas[i].clone()) for i in self.followed]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write back what :meth:`store` kept."""
        stored = self._stored
        if stored is None:
            raise InvalidArgumentError(f"{self.who}.restore() without a previous store()")
        thetas = self.model_tensors(model)
        for i, t in stored:
            thetas[i].copy_(t)
        self._stored = None
