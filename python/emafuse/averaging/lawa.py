r"""LAWA, the average of the latest checkpoints (spec ``averaging.md`` B.5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._guard import uninterrupted
from ..errors import InvalidArgumentError
from ._averager import Alias, Averager, load_module_state, renamed, saved, saved_count
from ._tracking import Policy, Tracking, averaged_copy
from .merge import axpby

__all__ = ["LAWA"]


class LAWA(Averager):
    r"""Latest weight averaging (Kaddour 2022; Sanyal et al., "Early Weight Averaging meets High
    Learning Rates for LLM Pre-training", 2023): keep the ``k`` most recent snapshots, taken at
    steps :math:`t \ge` ``start_step`` with :math:`(t - \text{start\_step}) \bmod \nu = 0`
    (``update_every`` = ν, no default: spec Q6; ``every`` is accepted as the old spelling), and
    evaluate their uniform mean

    .. math:: \bar\theta = \frac1n \sum_{j=\text{oldest}}^{\text{newest}} \text{ring}_j, \quad n = \min(\text{count}, k)

    with float32 accumulation in a fixed order (deterministic). :attr:`module` holds the mean,
    recomputed when read after a new snapshot (or by :meth:`average`); :attr:`num_updates` counts
    the snapshots, :attr:`n_averaged` is n. Float parameters and buffers are averaged; non-float
    tensors come from the newest snapshot. ``device="cpu"`` keeps the ring in host memory."""

    every = Alias("update_every")
    count = Alias("num_updates")
    step = Alias("num_steps_seen")

    def __init__(self, model: nn.Module, k: int = 5, *, update_every: int | None = None, start_step: int = 0,
                 device: str | torch.device | None = None, every: int | None = None) -> None:
        spacing = renamed("LAWA", "update_every", update_every, "every", every, None)
        if spacing is None:
            raise InvalidArgumentError("LAWA needs update_every= (the step spacing of its snapshots; there is no default)")
        if k < 1 or spacing < 1 or start_step < 0:
            raise ValueError("LAWA needs k >= 1, update_every >= 1, start_step >= 0")
        self.k, self.update_every, self.start_step = int(k), int(spacing), int(start_step)
        self._tracking = Tracking("LAWA", model, Policy())
        first = next((t.device for t in (*model.parameters(), *model.buffers())), None)
        self.device = torch.device(device) if device is not None else first
        self._module = averaged_copy(model, None, self.device)
        self._own = self._tracking.tensors_of(self._module)
        self._ring: list[list[Tensor] | None] = [None] * self.k
        self.slot_steps: list[int | None] = [None] * self.k
        self.slot = 0
        self.num_updates = 0
        self.num_steps_seen = 0
        self._stale = False  # a snapshot arrived since the mean was computed

    def _averaged(self) -> tuple[nn.Module, list[Tensor]]:
        if self._stale:
            self.average()
        return self._module, self._own

    @property
    def n_averaged(self) -> int:
        """The number of snapshots in the mean."""
        return min(self.num_updates, self.k)

    @torch.no_grad()
    @uninterrupted
    def update(self, model: nn.Module | None = None) -> bool:
        """Account for one optimizer step; snapshot if due."""
        tr = self._tracking
        tr.check_not_swapped()
        model = tr.model(model)
        thetas = tr.model_tensors(model)  # checked at every call (cached): a refused call counts nothing
        t = self.num_steps_seen + 1
        if t < self.start_step or (t - self.start_step) % self.update_every != 0:
            self.num_steps_seen = t
            return False
        src = [thetas[i].detach() for i in tr.averaged]
        ring = self._ring[self.slot]
        if ring is None:
            self._ring[self.slot] = [x.to(self.device, copy=True) for x in src]
        else:
            torch._foreach_copy_(ring, src)
        for i in tr.copied:
            self._own[i].copy_(thetas[i])
        self.slot_steps[self.slot] = t
        self.slot = (self.slot + 1) % self.k
        self.num_steps_seen = t
        self.num_updates += 1
        self._stale = True
        return True

    @torch.no_grad()
    def average(self) -> nn.Module:
        """Write the mean of the stored snapshots into :attr:`module` and return it."""
        n = self.n_averaged
        if n == 0:
            raise InvalidArgumentError("LAWA.average: no snapshot yet")
        order = [(self.slot - n + j) % self.k for j in range(n)]  # oldest -> newest
        outs = [self._own[i] for i in self._tracking.averaged]
        f32 = [o if o.dtype in (torch.float32, torch.float64) or o.is_complex() else torch.empty(o.shape, dtype=torch.float32, device=o.device)
               for o in outs]
        for j, slot in enumerate(order):
            axpby(f32, self._ring[slot], 1.0, 1.0 / n, assign=(j == 0))  # type: ignore[arg-type]
        for o, a in zip(outs, f32):
            if o is not a:
                o.copy_(a)
        self._stale = False
        return self._module

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "update_every": self.update_every, "start_step": self.start_step, "slot": self.slot,
                "num_updates": self.num_updates, "num_steps_seen": self.num_steps_seen, "slot_steps": list(self.slot_steps),
                "ring": [None if r is None else self._tracking.sharded(self._tracking.averaged, r) for r in self._ring], "module": self._module.state_dict()}

    @uninterrupted
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also checkpoints of emafuse <= 0.1: ``every``,
        ``count``, ``step``)."""
        if int(state["k"]) != self.k:
            raise InvalidArgumentError(f"LAWA.load_state_dict: k={state['k']} saved, k={self.k} here")
        ring = [None if r is None else list(r) for r in state["ring"]]
        if any(r is not None and len(r) != len(self._tracking.averaged) for r in ring):
            raise InvalidArgumentError("LAWA.load_state_dict: the saved ring tracks another number of tensors")
        slot, slot_steps = saved_count("LAWA", state, "slot"), list(saved("LAWA", state, "slot_steps"))
        updates = saved_count("LAWA", state, "num_updates", "count")
        steps = saved_count("LAWA", state, "num_steps_seen", "step")
        every = saved_count("LAWA", state, "update_every", "every")
        start = saved_count("LAWA", state, "start_step")
        if slot >= self.k or every < 1 or len(slot_steps) != self.k:
            raise InvalidArgumentError(f"LAWA.load_state_dict: slot={slot}, update_every={every}, {len(slot_steps)} slot steps do not fit k={self.k}")
        if any(r is not None and not all(isinstance(x, Tensor) for x in r) for r in ring):
            raise InvalidArgumentError("LAWA.load_state_dict: the saved ring holds something other than tensors")
        parts = [None if r is None else self._tracking.local_parts(self._tracking.averaged, r) for r in ring]
        load_module_state("LAWA", self._module, saved("LAWA", state, "module"))
        self._ring = [None if r is None else [x.to(self.device, copy=True) for x in r] for r in parts]
        self.slot, self.slot_steps = slot, slot_steps
        self.num_updates, self.num_steps_seen, self.update_every, self.start_step = updates, steps, every, start
        self._stale = self.num_updates > 0
