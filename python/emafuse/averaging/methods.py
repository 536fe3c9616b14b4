r"""Research averaging methods (spec ``averaging.md`` B.1–B.8): BEMA, Switch EMA, EDM2 power EMA
with snapshots and post-hoc reconstruction, LAWA, SWA and teacher EMA. Each update is one native
call over all tensors."""

from __future__ import annotations

import copy

import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError, ShapeError
from . import schedules as S
from ._engine import native_step, real_view
from .merge import _axpby
from .model_ema import ModelEMA, _model_device

__all__ = [
    "BEMA",
    "SwitchEMA",
    "PowerEMA",
    "PostHocEMA",
    "solve_posthoc_coefficients",
    "LAWA",
    "SWA",
    "TeacherEMA",
]


class _Tracked:
    """The float parameters (and optionally float buffers) of a model, by name, with a check that
    the model still has them."""

    def __init__(self, model: nn.Module, params_only: bool = True, requires_grad_only: bool = False) -> None:
        names = []
        for n, p in model.named_parameters():
            if (p.is_floating_point() or p.is_complex()) and (p.requires_grad or not requires_grad_only):
                names.append(n)
        if not params_only:
            names += [n for n, b in model.named_buffers() if b.is_floating_point() or b.is_complex()]
        self.names = names
        self.params_only = params_only

    def tensors(self, model: nn.Module, like: Sequence[Tensor] | None = None) -> list[Tensor]:
        named = dict(model.named_parameters())
        if not self.params_only:
            named.update(model.named_buffers())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise InvalidArgumentError(f"the model's structure changed: missing {missing[:5]}")
        out = [named[n].detach() for n in self.names]
        if like is not None:
            for n, a, b in zip(self.names, out, like):
                if a.shape != b.shape:
                    raise ShapeError(f"'{n}' has shape {tuple(a.shape)} in the model but {tuple(b.shape)} in the average")
        return out


def _clone_to(ts: Iterable[Tensor], dtype: torch.dtype | None, device: torch.device | None) -> list[Tensor]:
    out = []
    for t in ts:
        kw: dict[str, Any] = {"device": device or t.device, "copy": True}
        if dtype is not None and t.is_floating_point():
            kw["dtype"] = dtype
        out.append(t.detach().to(memory_format=torch.contiguous_format, **kw))
    return out


def _swap_lists(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """a ⇄ b element-wise: one native call for same-dtype, same-device pairs, a temporary for
    the others."""
    fused = [(x, y) for x, y in zip(a, b) if x.dtype == y.dtype and x.device == y.device]
    if fused:
        native_step("swap", "swap", [({}, [real_view(x) for x, _ in fused], None, [{"b": real_view(y)} for _, y in fused], ("b",))])
    for x, y in zip(a, b):
        if x.dtype != y.dtype or x.device != y.device:
            tmp = x.to(y.device, copy=True)
            x.copy_(y)
            y.copy_(tmp)


def _copy_buffers(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for (n, d), (_, s) in zip(dst.named_buffers(), src.named_buffers()):
            d.copy_(s)


# ---------------------------------------------------------------------------------------------
# BEMA


class BEMA:
    r"""Bias-corrected EMA (Block & Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging
    Schemes", arXiv 2508.00180). For optimizer step :math:`t` (``update`` counts them) with
    burn-in :math:`\tau` (``update_after``) and period :math:`\varphi` (``update_freq``):

    .. math::
        t \le \tau:&\quad \theta_0 \leftarrow \theta_t,\ E \leftarrow \theta_t,\ O \leftarrow \theta_t \\
        (t-\tau) \bmod \varphi = 0:&\quad s = t - \tau,\ b = \rho + \gamma s,\
            \beta = \max(b^{-\kappa}, \beta_{min}),\ \alpha = b^{-\eta} \\
        &\quad E \leftarrow \mathrm{lerp}(E, \theta_t, \beta),\quad O \leftarrow \alpha(\theta_t - \theta_0) + E

    :math:`\beta` is an update *weight* (not a decay). ``ema_power`` κ (0.5), ``bias_power`` η
    (0.2), ``lag`` ρ (10), ``multiplier`` γ (1), ``update_after`` τ (0), ``update_freq`` φ (400,
    TRL's default), ``min_ema_multiplier`` (0). ``bias_power=None`` disables the correction
    (:math:`\alpha = 0`, O = E); ``ema_power=None`` gives :math:`\beta = 1` (pure debiasing) —
    "disabled" is never encoded as 0, since :math:`b^0 = 1` (spec B.1).

    One fused native pass per event reads θ, θ₀, E and writes E and O (spec K3). ``module`` holds O
    (the BEMA weights, for evaluation/export); its buffers are copied from the model at each
    event. ``compat="trl"`` uses the absolute step t instead of :math:`s = t - \tau` in b
    (huggingface/trl ``BEMACallback``; identical for τ = 0). Open question Q1 decided: the
    canonical form counts s from the end of the burn-in. Parameters only (TRL also restricts to
    ``requires_grad`` ones: ``requires_grad_only=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_power: float | None = 0.5,
        bias_power: float | None = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_after: int = 0,
        update_freq: int = 400,
        min_ema_multiplier: float = 0.0,
        compat: str = "canonical",
        ema_dtype: torch.dtype | None = None,
        requires_grad_only: bool = False,
    ) -> None:
        if compat not in ("canonical", "trl"):
            raise ValueError(f"compat must be 'canonical' or 'trl', got {compat!r}")
        if update_freq < 1 or update_after < 0:
            raise ValueError("update_freq must be >= 1 and update_after >= 0")
        if lag + multiplier <= 0:
            raise ValueError("lag + multiplier must be positive")
        self.ema_power, self.bias_power, self.lag, self.multiplier = ema_power, bias_power, float(lag), float(multiplier)
        self.update_after, self.update_freq, self.min_ema_multiplier, self.compat = int(update_after), int(update_freq), float(min_ema_multiplier), compat
        self._tracked = _Tracked(model, params_only=True, requires_grad_only=requires_grad_only)
        thetas = self._tracked.tensors(model)
        self.module = _averaged_copy(model, ema_dtype)
        own = dict(self.module.named_parameters())
        self._out = [own[n].detach() for n in self._tracked.names]
        self._ema = _clone_to(thetas, ema_dtype, None)
        self._anchor = _clone_to(thetas, ema_dtype, None)
        self.step = 0
        self.last_event = 0
        self._model = model

    def coefficients(self, t: int) -> tuple[float, float]:
        """(α, β) of an event at step ``t``."""
        s = t if self.compat == "trl" else t - self.update_after
        b = self.lag + self.multiplier * s
        beta = 1.0 if self.ema_power is None else max(b ** (-self.ema_power), self.min_ema_multiplier)
        alpha = 0.0 if self.bias_power is None else b ** (-self.bias_power)
        return alpha, min(beta, 1.0)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> bool:
        """Account for one optimizer step; returns whether E/O changed."""
        model = model if model is not None else self._model
        self.step += 1
        t = self.step
        thetas = None
        if t <= self.update_after:
            thetas = self._tracked.tensors(model, self._out)
            hyper = {"alpha": 0.0, "beta": 1.0, "reset": True}
        elif (t - self.update_after) % self.update_freq == 0:
            thetas = self._tracked.tensors(model, self._out)
            alpha, beta = self.coefficients(t)
            hyper = {"alpha": alpha, "beta": beta, "reset": False}
        if thetas is None:
            return False
        states = [{"out": o, "anchor": a} for o, a in zip(self._out, self._anchor)]
        native_step("BEMA", "bema", [(hyper, [real_view(e) for e in self._ema], [real_view(x) for x in thetas],
                                      [{k: real_view(v) for k, v in st.items()} for st in states], ("out", "anchor"))])
        _copy_buffers(self.module, model)
        self.last_event = t
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "last_event": self.last_event, "module": self.module.state_dict(),
            "ema": list(self._ema), "anchor": list(self._anchor),
            "hyper": dict(ema_power=self.ema_power, bias_power=self.bias_power, lag=self.lag, multiplier=self.multiplier,
                          update_after=self.update_after, update_freq=self.update_freq,
                          min_ema_multiplier=self.min_ema_multiplier, compat=self.compat),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["ema"]) != len(self._ema) or len(state["anchor"]) != len(self._anchor):
            raise InvalidArgumentError("BEMA.load_state_dict: the saved state tracks another number of tensors")
        self.module.load_state_dict(state["module"])
        with torch.no_grad():
            for dst, src in zip(self._ema + self._anchor, list(state["ema"]) + list(state["anchor"])):
                if dst.shape != src.shape:
                    raise ShapeError(f"BEMA.load_state_dict: shape {tuple(src.shape)} where {tuple(dst.shape)} is expected")
                dst.copy_(src)
        self.step, self.last_event = int(state["step"]), int(state["last_event"])


def _averaged_copy(model: nn.Module, dtype: torch.dtype | None, device: torch.device | None = None) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        x = t.detach().to(device=device or t.device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(x, requires_grad=False) if isinstance(t, nn.Parameter) else x
    m = copy.deepcopy(model, memo)
    m.eval()
    return m


# ---------------------------------------------------------------------------------------------
# Switch EMA, SWA, teacher


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
    Other keywords as :class:`ModelEMA`.
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

    @torch.no_grad()
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
        st = super().state_dict()
        st.update(epoch=self.epoch, num_switches=self.num_switches)
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self.num_switches = int(state.get("epoch", 0)), int(state.get("num_switches", 0))


class SWA(ModelEMA):
    r"""Stochastic weight averaging (Izmailov et al., UAI 2018): the equal-weight running mean
    :math:`E \leftarrow E + (\theta - E)/(n+1)` (a lerp with :math:`w = 1/(n+1)`; the first call
    copies), as ``torch.optim.swa_utils.AveragedModel``'s default. Call :meth:`update` at each
    averaging point (e.g. epoch ends from ``swa_start``). Buffers are copied by default
    (AveragedModel's ``use_buffers=False``); recompute BatchNorm statistics of :attr:`module`
    with :meth:`update_bn` afterwards, or pass ``buffers="average"``.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("buffers", "copy")
        super().__init__(model, 0.0, **kwargs)

    def decay_at(self, s: int, n: int | None = None) -> float:
        n = self.num_updates_applied if n is None else n
        return n / (n + 1.0)

    @property
    def n_averaged(self) -> int:
        return self.num_updates_applied

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
    ``k = step - 1`` (the update index when updating every step). The teacher is :attr:`module` (a separate module: nothing is swapped)."""

    def __init__(self, student: nn.Module, base: float = 0.996, final: float = 1.0, total_steps: int | None = None,
                 schedule: str | Callable[[float], float] = "cosine", **kwargs: Any) -> None:
        kwargs.setdefault("first_update", "average")
        kwargs.setdefault("buffers", "skip")
        super().__init__(student, base, schedule=schedule, total_steps=total_steps, final_decay=final, **kwargs)


# ---------------------------------------------------------------------------------------------
# EDM2 power EMA and post-hoc reconstruction


class PowerEMA:
    r"""EDM2 power-function EMA (Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024). Track j averages the trajectory with density
    :math:`p(\tau) \propto \tau^{\gamma_j}` on :math:`[0, t]`; per update

    .. math::
        \beta_j = (1 - \Delta/t)^{\gamma_j + 1}, \qquad E_j \leftarrow \mathrm{lerp}(E_j, \theta, 1 - \beta_j)

    with t the training time after the step and Δ the time since the previous update (steps, or
    samples with ``time_unit="samples"`` and ``update(model, batch_size=...)``). Tracks are given
    as ``sigma_rels`` (relative widths, EDM2 default 0.05 and 0.10) or ``gammas``; all tracks are
    updated in **one** native pass that reads θ once (spec K2). Parameters only (EDM2); the live
    buffers are copied into a track when it is exported (:meth:`module`).

    :meth:`snapshot` stores every track (cast to ``snapshot_dtype``, fp16 by default, on the CPU)
    with its (t, γ) — in memory (:attr:`snapshots`) or as files in ``snapshot_dir`` — for
    :func:`solve_posthoc_coefficients` / :class:`PostHocEMA` reconstruction.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] | None = (0.05, 0.10), *, gammas: Sequence[float] | None = None,
                 time_unit: str = "steps", update_every: int = 1, ema_dtype: torch.dtype | None = None,
                 snapshot_dir: str | None = None, snapshot_dtype: torch.dtype = torch.float16) -> None:
        if gammas is not None:
            self.gammas = [float(g) for g in gammas]
            self.sigma_rels = [S.gamma_to_sigma_rel(g) for g in self.gammas]
        else:
            if not sigma_rels:
                raise ValueError("PowerEMA needs sigma_rels or gammas")
            self.sigma_rels = [float(s) for s in sigma_rels]
            self.gammas = [S.sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if time_unit not in ("steps", "samples"):
            raise ValueError(f"time_unit must be 'steps' or 'samples', got {time_unit!r}")
        if update_every < 1:
            raise ValueError("update_every must be >= 1")
        self.time_unit, self.update_every = time_unit, int(update_every)
        self._tracked = _Tracked(model, params_only=True)
        self.modules = [_averaged_copy(model, ema_dtype) for _ in self.gammas]
        self._tracks = []
        for m in self.modules:
            own = dict(m.named_parameters())
            self._tracks.append([own[n].detach() for n in self._tracked.names])
        self.t = 0.0
        self.t_last = 0.0
        self.num_steps = 0
        self.snapshot_dir = snapshot_dir
        self.snapshot_dtype = snapshot_dtype
        self.snapshots: list[dict[str, Any]] = []
        self._model = model

    def betas(self, t: float, delta: float) -> list[float]:
        """β_j for an update at time ``t`` after ``delta``."""
        return [S.power_beta(t, g, delta) for g in self.gammas]

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, batch_size: int | None = None) -> bool:
        """Account for one training step (of ``batch_size`` samples with ``time_unit="samples"``)."""
        model = model if model is not None else self._model
        if self.time_unit == "samples":
            if batch_size is None:
                raise InvalidArgumentError("PowerEMA(time_unit='samples').update needs batch_size=")
            self.t += float(batch_size)
        else:
            self.t += 1.0
        self.num_steps += 1
        if (self.num_steps - 1) % self.update_every != 0:
            return False
        thetas = [real_view(x) for x in self._tracked.tensors(model, self._tracks[0])]
        weights = [1.0 - b for b in self.betas(self.t, self.t - self.t_last)]
        self.t_last = self.t
        for lo in range(0, len(weights), 5):
            ws = weights[lo:lo + 5]
            tracks = self._tracks[lo:lo + 5]
            hyper: dict[str, Any] = {"tracks": float(len(ws))}
            hyper.update({f"w{j}": w for j, w in enumerate(ws)})
            slots = tuple(f"t{j}" for j in range(1, len(ws)))
            states = [{f"t{j}": real_view(tracks[j][i]) for j in range(1, len(ws))} for i in range(len(thetas))] if slots else None
            native_step("PowerEMA", "ema_multi", [(hyper, [real_view(e) for e in tracks[0]], thetas, states, slots)])
        return True

    def module(self, track: int = 0, model: nn.Module | None = None) -> nn.Module:
        """Track ``track`` as a module, with the live model's buffers copied in (EDM2 ``get``)."""
        m = self.modules[track]
        src = model if model is not None else self._model
        if src is not None:
            _copy_buffers(m, src)
        return m

    @torch.no_grad()
    def swap(self, model: nn.Module | None = None, track: int = 0) -> None:
        """Exchange the model's parameters with track ``track`` in place (the fused swap for
        same-dtype, same-device tensors); calling it again restores both."""
        model = model if model is not None else self._model
        thetas = self._tracked.tensors(model, self._tracks[track])
        _swap_lists(thetas, self._tracks[track])

    @torch.no_grad()
    def snapshot(self) -> list[dict[str, Any]]:
        """Store every track at the current time; returns the new snapshot records
        ``{"t", "gamma", "sigma_rel", "state"|"path"}``."""
        new = []
        for g, s, tr in zip(self.gammas, self.sigma_rels, self._tracks):
            state = {n: x.detach().to("cpu", dtype=self.snapshot_dtype if x.is_floating_point() else x.dtype, copy=True)
                     for n, x in zip(self._tracked.names, tr)}
            rec: dict[str, Any] = {"t": self.t, "gamma": g, "sigma_rel": s}
            if self.snapshot_dir is not None:
                os.makedirs(self.snapshot_dir, exist_ok=True)
                path = os.path.join(self.snapshot_dir, f"phema-{int(self.t):010d}-{s:.3f}.pt")
                torch.save({**rec, "state": state}, path)
                rec["path"] = path
            else:
                rec["state"] = state
            new.append(rec)
        self.snapshots.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t, "t_last": self.t_last, "num_steps": self.num_steps, "gammas": list(self.gammas),
            "sigma_rels": list(self.sigma_rels), "time_unit": self.time_unit, "update_every": self.update_every,
            "tracks": [m.state_dict() for m in self.modules],
            "snapshots": [{k: v for k, v in r.items() if k != "state"} if "path" in r else r for r in self.snapshots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["tracks"]) != len(self.modules):
            raise InvalidArgumentError(f"PowerEMA.load_state_dict: {len(state['tracks'])} tracks saved, {len(self.modules)} here")
        if any(abs(a - b) > 1e-12 for a, b in zip(state["gammas"], self.gammas)):
            warnings.warn("PowerEMA.load_state_dict: the saved tracks have other gammas", stacklevel=2)
        for m, sd in zip(self.modules, state["tracks"]):
            m.load_state_dict(sd)
        self.t, self.t_last, self.num_steps = float(state["t"]), float(state["t_last"]), int(state["num_steps"])
        self.snapshots = list(state.get("snapshots", []))


def _p_dot(ta: float, ga: float, tb: float, gb: float) -> float:
    """⟨p_{ta,ga}, p_{tb,gb}⟩ in L²(τ) (spec B.4.4)."""
    e = gb if ta < tb else -ga
    return (ga + 1.0) * (gb + 1.0) * (ta / tb) ** e / ((ga + gb + 1.0) * max(ta, tb))


def solve_posthoc_coefficients(ts: Sequence[float], gammas: Sequence[float], t_target: float, gamma_target: float,
                               *, normalize: bool = True, return_raw_sum: bool = False) -> Any:
    r"""EDM2 post-hoc EMA: the coefficients :math:`x` with :math:`\sum_i x_i p_{t_i,\gamma_i}
    \approx p_{t_r,\gamma_r}` in the least-squares (L²) sense, solving :math:`A x = b` in float64
    with :math:`A_{ij} = \langle p_i, p_j\rangle`, :math:`b_i = \langle p_i, p_r\rangle`, then
    normalised to sum 1 (EDM2). Snapshots with :math:`t_i > t_r` must be excluded by the caller
    (see :meth:`PostHocEMA.reconstruct`). Falls back to a least-squares (SVD) solve, with a warning,
    when A's condition number exceeds 1e12."""
    ts = np.asarray(ts, dtype=np.float64)
    gs = np.asarray(gammas, dtype=np.float64)
    n = len(ts)
    A = np.array([[_p_dot(ts[i], gs[i], ts[j], gs[j]) for j in range(n)] for i in range(n)])
    b = np.array([_p_dot(ts[i], gs[i], t_target, gamma_target) for i in range(n)])
    cond = np.linalg.cond(A)
    if cond > 1e12:
        warnings.warn(f"post-hoc EMA: ill-conditioned system (cond {cond:.2e}); using a least-squares solve", stacklevel=2)
        x = np.linalg.lstsq(A, b, rcond=None)[0]
    else:
        x = np.linalg.solve(A, b)
    raw = float(x.sum())
    if normalize:
        x = x / raw
    return (x, raw) if return_raw_sum else x


class PostHocEMA(PowerEMA):
    r""":class:`PowerEMA` that takes a :meth:`snapshot` every ``snapshot_every`` steps and
    reconstructs, after training, the EMA of any ``sigma_rel`` (EDM2 post-hoc EMA, Karras et al.
    2024, spec B.4.3–B.4.4): coefficients from :func:`solve_posthoc_coefficients` over the
    snapshots with :math:`0 < t_i \le t_r`, then :math:`\theta_r = \sum_i x_i \hat E_i`
    accumulated in float32, one snapshot resident at a time (one native call each; fp16 snapshots
    are read directly). ``t_target`` defaults to the time of the latest snapshot; emafuse allows
    any :math:`t_r \le \max t_i` (EDM2 requires a snapshot time). Buffers of the result come from
    the live model."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] | None = (0.05, 0.10), *, snapshot_every: int = 1000, **kwargs: Any) -> None:
        super().__init__(model, sigma_rels, **kwargs)
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.snapshot_every = int(snapshot_every)

    def update(self, model: nn.Module | None = None, batch_size: int | None = None) -> bool:
        changed = super().update(model, batch_size)
        if self.num_steps % self.snapshot_every == 0:
            self.snapshot()
        return changed

    @torch.no_grad()
    def reconstruct(self, sigma_rel: float, t_target: float | None = None, model: nn.Module | None = None,
                    snapshots: Sequence[dict[str, Any]] | None = None) -> nn.Module:
        """The EMA with relative width ``sigma_rel`` at time ``t_target``, as a module."""
        snaps = list(self.snapshots if snapshots is None else snapshots)
        if not snaps:
            raise InvalidArgumentError("PostHocEMA.reconstruct: no snapshots")
        t_r = max(r["t"] for r in snaps) if t_target is None else float(t_target)
        use = [r for r in snaps if 0 < r["t"] <= t_r]
        if not use:
            raise InvalidArgumentError(f"PostHocEMA.reconstruct: no snapshot at or before t={t_r}")
        x = solve_posthoc_coefficients([r["t"] for r in use], [r["gamma"] for r in use], t_r, S.sigma_rel_to_gamma(sigma_rel))
        out = _averaged_copy(model if model is not None else self._model, torch.float32, torch.device("cpu"))
        own = dict(out.named_parameters())
        acc = [own[n].detach() for n in self._tracked.names]
        for j, (rec, c) in enumerate(zip(use, x)):
            state = rec["state"] if "state" in rec else torch.load(rec["path"])["state"]
            _axpby(acc, [state[n] for n in self._tracked.names], 1.0, float(c), assign=(j == 0))
        return out


# ---------------------------------------------------------------------------------------------
# LAWA


class LAWA:
    r"""Latest weight averaging (Kaddour 2022; Sanyal et al., "Early Weight Averaging meets High
    Learning Rates for LLM Pre-training", 2023): keep the ``k`` most recent snapshots, taken at
    steps :math:`t \ge` ``start_step`` with :math:`(t - \text{start\_step}) \bmod \nu = 0`
    (``every`` = ν, no default: spec Q6), and evaluate their uniform mean

    .. math:: \bar\theta = \frac1n \sum_{j=\text{oldest}}^{\text{newest}} \text{ring}_j, \quad n = \min(\text{count}, k)

    computed by :meth:`average` with float32 accumulation in a fixed order (deterministic).
    Float parameters and buffers are averaged; non-float tensors come from the newest snapshot
    (held by :attr:`module`). ``device="cpu"`` keeps the ring in host memory."""

    def __init__(self, model: nn.Module, k: int = 5, *, every: int, start_step: int = 0, device: str | torch.device | None = None) -> None:
        if k < 1 or every < 1 or start_step < 0:
            raise ValueError("LAWA needs k >= 1, every >= 1, start_step >= 0")
        self.k, self.every, self.start_step = int(k), int(every), int(start_step)
        self._tracked = _Tracked(model, params_only=False)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.module = _averaged_copy(model, None, self.device)
        self._ring: list[list[Tensor] | None] = [None] * self.k
        self.slot_steps: list[int | None] = [None] * self.k
        self.slot = 0
        self.count = 0
        self.step = 0
        self._model = model

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> bool:
        """Account for one optimizer step; snapshot if due."""
        model = model if model is not None else self._model
        self.step += 1
        t = self.step
        if t < self.start_step or (t - self.start_step) % self.every != 0:
            return False
        thetas = self._tracked.tensors(model)
        ring = self._ring[self.slot]
        if ring is None:
            ring = self._ring[self.slot] = [x.to(self.device, copy=True) for x in thetas]
        else:
            torch._foreach_copy_(ring, thetas)
        self.slot_steps[self.slot] = t
        self.slot = (self.slot + 1) % self.k
        self.count += 1
        # Non-float entries and skipped tensors follow the newest snapshot.
        names = set(self._tracked.names)
        for (n, dst), (_, src) in zip(self.module.named_buffers(), model.named_buffers()):
            if n not in names:
                dst.copy_(src)
        return True

    @torch.no_grad()
    def average(self) -> nn.Module:
        """Write the mean of the stored snapshots into :attr:`module` and return it."""
        n = min(self.count, self.k)
        if n == 0:
            raise InvalidArgumentError("LAWA.average: no snapshot yet")
        order = [(self.slot - n + j) % self.k for j in range(n)]  # oldest -> newest
        named = dict(self.module.named_parameters())
        named.update(self.module.named_buffers())
        outs = [named[nm].detach() for nm in self._tracked.names]
        f32 = [o if o.dtype in (torch.float32, torch.float64) or o.is_complex() else torch.empty(o.shape, dtype=torch.float32, device=o.device) for o in outs]
        for j, slot in enumerate(order):
            _axpby(f32, self._ring[slot], 1.0, 1.0 / n, assign=(j == 0))  # type: ignore[arg-type]
        for o, a in zip(outs, f32):
            if o is not a:
                o.copy_(a)
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "every": self.every, "start_step": self.start_step, "slot": self.slot, "count": self.count,
                "step": self.step, "slot_steps": list(self.slot_steps), "ring": [None if r is None else list(r) for r in self._ring],
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["k"]) != self.k:
            raise InvalidArgumentError(f"LAWA.load_state_dict: k={state['k']} saved, k={self.k} here")
        self.module.load_state_dict(state["module"])
        self._ring = [None if r is None else [x.to(self.device, copy=True) for x in r] for r in state["ring"]]
        for r in self._ring:
            if r is not None and len(r) != len(self._tracked.names):
                raise InvalidArgumentError("LAWA.load_state_dict: the saved ring tracks another number of tensors")
        self.slot, self.count, self.step = int(state["slot"]), int(state["count"]), int(state["step"])
        self.slot_steps = list(state["slot_steps"])
        self.every, self.start_step = int(state["every"]), int(state["start_step"])


