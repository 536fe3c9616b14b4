r"""BEMA, the bias-corrected EMA (spec ``averaging.md`` B.1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._guard import uninterrupted
from ..errors import InvalidArgumentError, ShapeError
from . import schedules as S
from ._averager import Alias, Averager, load_module_state, renamed, saved, saved_count
from ._engine import engine_input, group, native_step, real_view
from ._tracking import Policy, Tracking, averaged_copy, clone_tensors

__all__ = ["BEMA"]


def _events_until(t: int, after: int, every: int) -> int:
    """BEMA's update events among steps 1..t: every burn-in step, then every ``every``-th."""
    return min(t, after) + max(0, t - after) // every


class BEMA(Averager):
    r"""Bias-corrected EMA (Block & Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging
    Schemes", arXiv 2508.00180). For optimizer step :math:`t` (:attr:`num_steps_seen`) with
    burn-in :math:`\tau` (``update_after_step``) and period :math:`\varphi` (``update_every``):

    .. math::
        t \le \tau:&\quad \theta_0 \leftarrow \theta_t,\ E \leftarrow \theta_t,\ O \leftarrow \theta_t \\
        (t-\tau) \bmod \varphi = 0:&\quad s = t - \tau,\ b = \rho + \gamma s,\
            \beta = \max(b^{-\kappa}, \beta_{min}),\ \alpha = b^{-\eta} \\
        &\quad E \leftarrow \mathrm{lerp}(E, \theta_t, \beta),\quad O \leftarrow \alpha(\theta_t - \theta_0) + E

    :math:`\beta` is an update *weight* (not a decay). ``ema_power`` κ (0.5), ``bias_power`` η
    (0.2), ``lag`` ρ (10), ``multiplier`` γ (1), ``update_after_step`` τ (0), ``update_every`` φ
    (400, TRL's default; ``update_after`` and ``update_freq`` are accepted as the old spellings),
    ``min_ema_multiplier`` (0). ``bias_power=None`` disables the correction (:math:`\alpha = 0`,
    O = E); ``ema_power=None`` gives :math:`\beta = 1` (pure debiasing) — "disabled" is never
    encoded as 0, since :math:`b^0 = 1` (spec B.1;
    :func:`~emafuse.averaging.schedules.bema_coefficients`).

    One fused native pass per event (burn-in steps included; :attr:`num_updates` counts them)
    reads θ, θ₀, E and writes E and O (spec K3). :attr:`module` holds O (the BEMA weights, for
    evaluation/export; ``swap``/``average_parameters`` exchange it with the model); its buffers
    are copied from the model at each event. ``compat="trl"`` uses the absolute step t instead of
    :math:`s = t - \tau` in b (huggingface/trl ``BEMACallback``; identical for τ = 0). Open
    question Q1 decided: the canonical form counts s from the end of the burn-in. Parameters only
    (TRL also restricts to ``requires_grad`` ones: ``requires_grad_only=True``).
    """

    update_after = Alias("update_after_step")
    update_freq = Alias("update_every")
    step = Alias("num_steps_seen")

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_power: float | None = 0.5,
        bias_power: float | None = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_after_step: int | None = None,
        update_every: int | None = None,
        min_ema_multiplier: float = 0.0,
        compat: str = "canonical",
        ema_dtype: torch.dtype | None = None,
        requires_grad_only: bool = False,
        update_after: int | None = None,
        update_freq: int | None = None,
    ) -> None:
        self.update_after_step = int(renamed("BEMA", "update_after_step", update_after_step, "update_after", update_after, 0))
        self.update_every = int(renamed("BEMA", "update_every", update_every, "update_freq", update_freq, 400))
        if compat not in ("canonical", "trl"):
            raise ValueError(f"compat must be 'canonical' or 'trl', got {compat!r}")
        if self.update_every < 1 or self.update_after_step < 0:
            raise ValueError("update_every must be >= 1 and update_after_step >= 0")
        if lag + multiplier <= 0:
            raise ValueError("lag + multiplier must be positive")
        self.ema_power, self.bias_power, self.lag, self.multiplier = ema_power, bias_power, float(lag), float(multiplier)
        self.min_ema_multiplier, self.compat = float(min_ema_multiplier), compat
        self._tracking = Tracking("BEMA", model, Policy(buffers="copy", requires_grad_only=requires_grad_only))
        thetas = self._tracking.model_tensors(model)
        averaged = [thetas[i] for i in self._tracking.averaged]
        self._module = averaged_copy(model, ema_dtype)
        self._own = self._tracking.tensors_of(self._module)
        self._ema = clone_tensors(averaged, ema_dtype)
        self._anchor = clone_tensors(averaged, ema_dtype)
        self.num_steps_seen = 0
        self.num_updates = 0
        #: The step of the latest update event.
        self.last_event = 0

    def _averaged(self) -> tuple[nn.Module, list[Tensor]]:
        return self._module, self._own

    def coefficients(self, t: int) -> tuple[float, float]:
        """(α, β) of an event at step ``t``."""
        s = t if self.compat == "trl" else t - self.update_after_step
        return S.bema_coefficients(s, lag=self.lag, multiplier=self.multiplier, ema_power=self.ema_power,
                                   bias_power=self.bias_power, min_ema_multiplier=self.min_ema_multiplier)

    @torch.no_grad()
    @uninterrupted
    def update(self, model: nn.Module | None = None) -> bool:
        """Account for one optimizer step; returns whether E/O changed."""
        tr = self._tracking
        tr.check_not_swapped()
        model = tr.model(model)
        thetas = tr.model_tensors(model)  # checked at every call (cached): a refused call counts nothing
        t = self.num_steps_seen + 1
        if t <= self.update_after_step:
            hyper = {"alpha": 0.0, "beta": 1.0, "reset": True}
        elif (t - self.update_after_step) % self.update_every == 0:
            alpha, beta = self.coefficients(t)
            hyper = {"alpha": alpha, "beta": beta, "reset": False}
        else:
            self.num_steps_seen = t
            return False
        inputs = [real_view(engine_input(e, thetas[i])) for e, i in zip(self._ema, tr.averaged)]
        states = [{"out": real_view(self._own[i]), "anchor": real_view(a)} for i, a in zip(tr.averaged, self._anchor)]
        native_step("BEMA", "bema", group(hyper, [real_view(e) for e in self._ema], inputs, states, ("out", "anchor")))
        for i in tr.copied:
            self._own[i].copy_(thetas[i])
        self.num_steps_seen = self.last_event = t
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_steps_seen": self.num_steps_seen, "num_updates": self.num_updates, "last_event": self.last_event,
            "module": self._module.state_dict(), "ema": self._tracking.sharded(self._tracking.averaged, self._ema),
            "anchor": self._tracking.sharded(self._tracking.averaged, self._anchor),
            "hyper": dict(ema_power=self.ema_power, bias_power=self.bias_power, lag=self.lag, multiplier=self.multiplier,
                          update_after_step=self.update_after_step, update_every=self.update_every,
                          min_ema_multiplier=self.min_ema_multiplier, compat=self.compat),
        }

    @uninterrupted
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also checkpoints of emafuse <= 0.1: ``step``,
        ``update_after``/``update_freq``, no event count)."""
        ema, anchor = list(saved("BEMA", state, "ema")), list(saved("BEMA", state, "anchor"))
        if len(ema) != len(self._ema) or len(anchor) != len(self._anchor):
            raise InvalidArgumentError("BEMA.load_state_dict: the saved state tracks another number of tensors")
        ema, anchor = (self._tracking.local_parts(self._tracking.averaged, x) for x in (ema, anchor))
        for dst, src in zip(self._ema + self._anchor, ema + anchor):
            if not isinstance(src, Tensor):
                raise InvalidArgumentError(f"BEMA.load_state_dict: a saved tensor is a {type(src).__name__}")
            if dst.shape != src.shape:
                raise ShapeError(f"BEMA.load_state_dict: shape {tuple(src.shape)} where {tuple(dst.shape)} is expected")
        steps = saved_count("BEMA", state, "num_steps_seen", "step")
        if "num_updates" in state:
            updates = saved_count("BEMA", state, "num_updates")
        else:
            hyper = state.get("hyper", {})
            updates = _events_until(steps, int(hyper.get("update_after", self.update_after_step)),
                                         int(hyper.get("update_freq", self.update_every)))
        last_event = saved_count("BEMA", state, "last_event")
        load_module_state("BEMA", self._module, saved("BEMA", state, "module"))
        with torch.no_grad():
            for dst, src in zip(self._ema + self._anchor, ema + anchor):
                dst.copy_(src)
        self.num_steps_seen, self.num_updates, self.last_event = steps, updates, last_event
