r"""Methods that are a :class:`~emafuse.ModelEMA` with another schedule or an extra step (spec
``averaging.md`` B.2, B.7, B.8): Switch EMA, SWA and teacher EMA."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import schedules as S
from ._averager import saved_count
from .model_ema import ModelEMA

__all__ = ["SWA", "SwitchEMA", "TeacherEMA"]


class SwitchEMA(ModelEMA):
    r"""Switch EMA (Li et al., "Switch EMA: A Free Lunch for Better Flatness and Sharpness", arXiv
    2402.09240): an ordinary per-step EMA, :math:`E \leftarrow \mathrm{lerp}(E, \theta, 1 - d)`,
    whose value is copied into the live model at the end of every switching period
    (:math:`\theta \leftarrow E`); training continues from it, the EMA and the optimizer state are
    not reset.

    ``switch_every`` periods of ``switch_unit`` (``"epoch"``, the paper's, or ``"step"``), active
    from ``switch_start`` to ``switch_end`` (inclusive, None = forever). Call
    :meth:`end_of_epoch` (or :meth:`end_of_step` for step units) after the last step of the
    period, before validation; :meth:`switch` copies unconditionally. Defaults: the EMA starts
    from the construction-time copy and lerps from the first step (``first_update="average"``, as
    the reference hooks; spec B.2 test vector). Spec Q4: the switch fires when
    ``(period + 1) % switch_every == 0`` (MMDet-style hook), counting periods from 0.
    Other keywords as :class:`~emafuse.ModelEMA`.
    """

    def __init__(self, model: nn.Module, decay: float | None = 0.9999, *, switch_every: int = 1, switch_unit: str = "epoch",
                 switch_start: int = 0, switch_end: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("first_update", "average")
        super().__init__(model, decay, **kwargs)
        if switch_unit not in ("epoch", "step"):
            raise ValueError(f"switch_unit must be 'epoch' or 'step', got {switch_unit!r}")
        if switch_every < 1:
            raise ValueError("switch_every must be >= 1")
        self.switch_every, self.switch_unit, self.switch_start, self.switch_end = int(switch_every), switch_unit, int(switch_start), switch_end
        self.epoch = 0
        self.num_switches = 0

    def _due(self, period: int) -> bool:
        if period < self.switch_start or (self.switch_end is not None and period > self.switch_end):
            return False
        return (period + 1) % self.switch_every == 0

    def switch(self, model: nn.Module | None = None) -> None:
        """Copy the average into the model (θ ← E)."""
        self.copy_to(model)
        self.num_switches += 1

    def end_of_epoch(self, model: nn.Module | None = None, epoch: int | None = None) -> bool:
        """Call after the last step of epoch ``epoch`` (default: an internal counter); switches if
        due. Returns whether it switched."""
        e = self.epoch if epoch is None else int(epoch)
        self.epoch = e + 1
        if self.switch_unit == "epoch" and self._due(e):
            self.switch(model)
            return True
        return False

    def end_of_step(self, model: nn.Module | None = None) -> bool:
        """With ``switch_unit="step"``: call after ``update``; switches if due."""
        if self.switch_unit == "step" and self._due(self.num_steps_seen - 1):
            self.switch(model)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "num_switches": self.num_switches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        who = type(self).__name__
        epoch = saved_count(who, state, "epoch") if "epoch" in state else 0
        switches = saved_count(who, state, "num_switches") if "num_switches" in state else 0
        super().load_state_dict(state)
        self.epoch, self.num_switches = epoch, switches


class SWA(ModelEMA):
    r"""Stochastic weight averaging (Izmailov et al., UAI 2018): the equal-weight running mean
    :math:`E \leftarrow E + (\theta - E)/(n+1)` (a lerp with :math:`w = 1/(n+1)`,
    :func:`~emafuse.averaging.schedules.swa_decay`; the first call copies), as
    ``torch.optim.swa_utils.AveragedModel``'s default; :attr:`n_averaged` is ``n``. Call
    :meth:`update` at each averaging point (e.g. epoch ends from ``swa_start``). Buffers are
    copied by default (AveragedModel's ``use_buffers=False``); recompute BatchNorm statistics of
    :attr:`module` with :meth:`update_bn` afterwards, or pass ``buffers="average"``.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("buffers", "copy")
        super().__init__(model, 0.0, **kwargs)

    def decay_at(self, s: int, n: int | None = None) -> float:
        return S.swa_decay(self.num_updates if n is None else n)

    def update_bn(self, loader: Iterable[Any], device: torch.device | str | None = None) -> None:
        """Recompute the BatchNorm statistics of :attr:`module` with one pass over ``loader``
        (``torch.optim.swa_utils.update_bn``)."""
        torch.optim.swa_utils.update_bn(loader, self.module, device=device)


class TeacherEMA(ModelEMA):
    r"""Teacher EMA with a momentum schedule (mean teacher: Tarvainen & Valpola, NeurIPS 2017;
    BYOL: Grill et al., NeurIPS 2020; DINO: Caron et al., ICCV 2021; I-JEPA: Assran et al., CVPR
    2023; spec B.8):
    :math:`\theta_T \leftarrow m_k \theta_T + (1 - m_k)\theta_S` after each student step, over
    parameters only (the teacher's BatchNorm statistics come from its own forward passes), the
    teacher starting as the student's initial copy. ``schedule`` ``"cosine"`` (BYOL, reaches
    ``final`` at ``total_steps``), ``"dino"`` (DINO's ``cosine_scheduler``), ``"linear"``
    (I-JEPA, pass ``total_steps = ipe·epochs·ipe_scale``), ``"constant"`` or a callable ``f(k)`` of
    ``k = step - 1`` (the update index when updating every step). The teacher is :attr:`module`
    (a separate module: nothing needs swapping)."""

    def __init__(self, student: nn.Module, base: float = 0.996, final: float = 1.0, total_steps: int | None = None,
                 schedule: str | Callable[[float], float] = "cosine", **kwargs: Any) -> None:
        kwargs.setdefault("first_update", "average")
        kwargs.setdefault("buffers", "skip")
        super().__init__(student, base, schedule=schedule, total_steps=total_steps, final_decay=final, **kwargs)
