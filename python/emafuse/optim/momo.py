"""MoMo and MoMo-Adam: the official constructors and semantics (fabian-sp/MoMo, ``momo-opt``), the
element-wise passes native."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..errors import NonFiniteError
from ._base import (
    FusedOptimizer,
    GradClip,
    Precision,
    Rounding,
    StateDType,
    caution_hyper,
    check_caution_norm,
    check_hyper,
    common_hyper,
    scalar,
)

__all__ = ["Momo", "MomoAdam"]

# Optimizer-wide counters, kept (equal) in every param group so that state_dict() saves them:
# the step k, the loss average f̄ and the current lower bound of the loss (the official's
# ``_number_steps``, ``loss_avg`` and ``lb``; the constructor's ``lb`` stays the initial one).
_COUNTERS = ("momo_step", "loss_avg", "lb_current")


def _loss_value(who: str, loss: Any) -> float:
    """The loss of the current mini-batch as a float; it must be one finite number."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{who}.step: the loss must be a single number, got a tensor of shape {tuple(loss.shape)}")
        loss = loss.detach().item()
    try:
        value = float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"{who}.step: the loss must be a number or a one-element tensor, got {type(loss).__name__}") from None
    if not math.isfinite(value):
        raise NonFiniteError(f"{who}.step: the loss is {value}; MoMo's step size needs the finite loss of the mini-batch")
    return value


class _MomoBase(FusedOptimizer):
    """What MoMo and MoMo-Adam share: ``step(closure=None, loss=None)``, the optimizer-wide counters
    and the Polyak step size from sums over every parameter (spec §16)."""

    _takes_orthograd = False
    _reads_global_sums = True

    def _init_counters(self, check_finite: bool, grad_clip: GradClip, precision: Precision, caution: bool, caution_norm: str) -> None:
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(check_finite, grad_clip, precision, caution=caution, caution_norm=caution_norm)
        for group in self.param_groups:
            self._set_counters(group, (0, 0.0, float(self.defaults["lb"])))
        self._pending: tuple[int, float, float] | None = None
        self._loss: float | None = None

    @staticmethod
    def _set_counters(group: dict[str, Any], values: tuple[int, float, float]) -> None:
        for key, value in zip(_COUNTERS, values):
            group[key] = value

    def _counters(self) -> tuple[int, float, float]:
        first = self.param_groups[0]
        return int(first["momo_step"]), float(first["loss_avg"]), float(first["lb_current"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if _COUNTERS[0] in self.param_groups[0]:  # not while the constructor adds the first groups
            self._set_counters(group, self._counters())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # The official's checkpoints lack the counters (it keeps them as attributes): start over.
        for group in self.param_groups:
            for key, value in zip(_COUNTERS, (0, 0.0, float(self.defaults["lb"]))):
                group.setdefault(key, value)
        self._pending = None
        self._loss = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: Any = None) -> Any:  # type: ignore[override]
        """One step. Exactly one of ``closure`` (re-evaluates the model and returns the loss) and
        ``loss`` (the loss of the current mini-batch, already backpropagated) must be given: the
        step size is computed from it."""
        who = type(self).__name__
        if (closure is None) == (loss is None):
            raise ValueError(
                f"{who}.step: pass exactly one of closure= (re-evaluates the model and returns the loss) or loss= "
                "(the loss of the current mini-batch, after loss.backward()); MoMo's step size is computed from it"
            )
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._loss = _loss_value(who, loss)
        try:
            super().step()
        finally:
            self._loss = None
        return loss

    def _begin_step(self) -> None:
        if self._loss is None:
            raise ValueError(f"{type(self).__name__}.step: the loss is missing (pass closure= or loss=)")
        k, loss_avg, lb = self._counters()
        self._pending = (k + 1, self._next_loss_avg(k + 1, loss_avg, self._loss), lb)

    def _end_step(self, applied: bool) -> None:
        pending, self._pending = self._pending, None
        if applied and pending is not None:
            for group in self.param_groups:
                self._set_counters(group, pending)

    def _next_loss_avg(self, k: int, loss_avg: float, loss: float) -> float:
        """f̄ after step ``k`` (spec §16 (d) step 2, (d') step 3)."""
        raise NotImplementedError

    def _rho(self, group: dict[str, Any], k: int) -> float:
        """The bias correction ρ of the loss model at step ``k``."""
        raise NotImplementedError

    def _gamma_weights(self, group: dict[str, Any], first: bool) -> tuple[float, float]:
        """``(a, b)`` of the per-tensor update ``γ ← a·γ + b·⟨p, g⟩`` that the rule applies (see
        src/rules/momo.rs), for the total Γ the step size needs before the update."""
        raise NotImplementedError

    def _global_hypers(self, calls: list[Any], sums: list[Tensor], hypers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """τ of every group from the global sums Dot = Σ⟨p, d⟩, Γ = Σγ and N = Σ‖d‖² (MoMo-Adam:
        Σ⟨d, d/D⟩) over every parameter of the step (spec §16 (d) steps 4-5), with the lower
        bound's update when ``use_fstar``; the new bound is committed with the step."""
        assert self._pending is not None
        k, loss_avg, lb = self._pending
        dot = gamma = norm = 0.0
        for call, rows in zip(calls, sums):
            pg, pd, dd = (float(x) for x in rows[:, :3].sum(0).tolist())
            keep, take = self._gamma_weights(self.param_groups[call.group_index], bool(call.extra.get("first")))
            old = torch.stack([st["grad_dot_w"] for st in call.states]).to(torch.float64).sum().item() if keep else 0.0
            dot, gamma, norm = dot + pd, gamma + keep * old + take * pg, norm + dd
        if not all(map(math.isfinite, (dot, gamma, norm))):
            if getattr(self, "found_inf", None) is not None and bool(self.found_inf):  # type: ignore[attr-defined]
                return [{**h, "tau": 0.0} for h in hypers]  # AMP found inf/NaN: the native step skips the update
            raise NonFiniteError(
                f"{type(self).__name__}: sums over the gradients are not finite (<p, d> = {dot}, Γ = {gamma}, ‖d‖² = {norm}): "
                "the gradients hold inf or NaN. Nothing was updated; pass check_finite=True to find the parameter"
            )
        taus = []
        lb0 = float(self.defaults["lb"])
        use_fstar = bool(self.defaults["use_fstar"])
        for group in self.param_groups:
            lr, wd = scalar(group["lr"]), float(group["weight_decay"])
            q, rho = 1.0 + lr * wd, self._rho(group, k)
            if use_fstar:
                cap = q * loss_avg + dot - q * gamma
                if cap < q * rho * lb:
                    lb = max(cap / (2 * q * rho), lb0)
            h = q * (loss_avg - rho * lb) + dot - q * gamma
            tau = lr / rho if norm == 0.0 else min(lr / rho, max(h, 0.0) / norm)
            if use_fstar:
                lb = max((loss_avg + dot - gamma - 0.5 * tau * norm) / rho, lb0)
            taus.append(tau)
        self._pending = (k, loss_avg, lb)
        return [{**h, "tau": taus[call.group_index]} for call, h in zip(calls, hypers)]

    def _scalar_dtype(self, key: str) -> torch.dtype:
        return torch.float64 if key == "grad_dot_w" else super()._scalar_dtype(key)


class Momo(_MomoBase):
    r"""MoMo (F. Schaipp, R. Ohana, M. Eickenberg, A. Defazio, R. M. Gower, "MoMo: Momentum Models
    for Adaptive Learning Rates", ICML 2024), matching the official ``momo.Momo`` (``momo-opt``):
    SGD with momentum whose step size is the Polyak step of a model of the loss built from momentum.

    ``step(closure=None, loss=None)`` needs the mini-batch loss :math:`\ell` (exactly one of the two).
    With :math:`d` = ``grad_avg`` and :math:`\gamma` = ``grad_dot_w`` per parameter, at step
    :math:`k` (:math:`\rho = 1-\beta^k` with ``bias_correction``, else 1; :math:`q = 1 + \alpha\lambda`):

    .. math::
        \bar f &\leftarrow \beta \bar f + (1-\beta)\ell \\
        d &\leftarrow \beta d + (1-\beta) g, \qquad \gamma \leftarrow \beta\gamma + (1-\beta)\langle p, g\rangle \\
        \tau &= \min\Big(\frac{\alpha}{\rho},\ \frac{\max(q(\bar f - \rho\,\mathrm{lb}) + \sum\langle p, d\rangle
              - q\sum\gamma,\ 0)}{\sum\lVert d\rVert^2}\Big) \\
        p &\leftarrow (p - \tau d)/q

    the sums running over every parameter of every group (τ is per group, with its lr and weight
    decay). Without bias correction a parameter's first step starts :math:`d = g` and
    :math:`\gamma = \langle p, g\rangle` (and :math:`\bar f = \ell`); with it they start at zero.
    ``use_fstar=True`` estimates the lower bound online (spec §16 (d)).

    The element-wise passes are native: one read-only pass gathers :math:`\langle p, g\rangle`,
    :math:`\langle p, d\rangle` and :math:`\lVert d\rVert^2` per tensor (new :math:`d`, f64 sums), the
    step size is computed from their totals, and one pass writes :math:`d` and :math:`p`. On CUDA
    the totals are read on the host (one synchronisation per step, as the official's ``.item()``).

    Decisions (spec §16 (g)): ``beta``, ``lb``, ``bias_correction`` and ``use_fstar`` are
    optimizer-wide as in the official (a param group cannot override them); the step counter, the
    loss average and the current lower bound are saved in every param group (``momo_step``,
    ``loss_avg``, ``lb_current``) so that a checkpoint resumes exactly (the official loses them);
    parameters without a gradient are skipped, and a parameter's state starts lazily on its first
    step with the step-1 rule above (the official crashes); the sums are accumulated in float64;
    with :math:`\sum\lVert d\rVert^2 = 0`, :math:`\tau = \alpha/\rho`. A non-finite loss is a
    :class:`~emafuse.NonFiniteError`. ``orthograd`` is not taken (the sums would have to be over the
    projected gradient). Extra keywords: ``maximize``, ``check_finite``, ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (spec §20) on the move: :math:`p \leftarrow (p - \tau\, d \phi k)/q` for :math:`\phi = 1[d g > 0]`
    and :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` (or :math:`\mathrm{numel}/(\sum\phi +
    1)`) per tensor, counted in the same read-only pass as the sums. Decision: :math:`\tau` is the
    Polyak step of the unmasked model (the sums are of :math:`d`), as the mask is defined on the
    base optimizer's update direction.
    """

    _rule = "momo"
    _flags_fresh_state = True
    _optimizer_wide = ("beta", "lb", "bias_correction", "use_fstar")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0,
        beta: float = 0.9,
        lb: float = 0,
        bias_correction: bool = False,
        use_fstar: bool = False,
        *,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
        caution: bool = False,
        caution_norm: str = "mean",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight decay: {weight_decay}")
        if (beta < 0.0) or (beta > 1.0):
            raise ValueError(f"Invalid beta parameter: {beta}")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, beta=beta, lb=lb, bias_correction=bias_correction, use_fstar=use_fstar, maximize=maximize
        )
        super().__init__(params, defaults)
        self._init_counters(check_finite, grad_clip, (state_dtype, rounding, rounding_seed, weight_correction), caution, caution_norm)

    def _next_loss_avg(self, k: int, loss_avg: float, loss: float) -> float:
        beta = float(self.defaults["beta"])
        if k == 1:
            loss_avg = 0.0 if self.defaults["bias_correction"] else loss
        return beta * loss_avg + (1 - beta) * loss

    def _rho(self, group: dict[str, Any], k: int) -> float:
        return 1.0 - float(self.defaults["beta"]) ** k if self.defaults["bias_correction"] else 1.0

    def _gamma_weights(self, group: dict[str, Any], first: bool) -> tuple[float, float]:
        beta = float(self.defaults["beta"])
        return (0.0, 1.0) if first and not self.defaults["bias_correction"] else (beta, 1.0 - beta)

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            "lr": scalar(group["lr"]),
            "weight_decay": float(group["weight_decay"]),
            "beta": float(self.defaults["beta"]),
            "bias_correction": bool(self.defaults["bias_correction"]),
            "tau": 0.0,  # the sums pass does not read it; _global_hypers sets the update's
            **caution_hyper(group),
        }


class MomoAdam(_MomoBase):
    r"""MoMo-Adam (Schaipp et al., ICML 2024, see :class:`Momo`), matching the official
    ``momo.MomoAdam`` (``momo-opt``): Adam's moments with MoMo's Polyak step size.

    ``step(closure=None, loss=None)`` needs the mini-batch loss :math:`\ell`. Per parameter
    (``grad_avg`` :math:`d`, ``grad_avg_sq`` :math:`v`, ``grad_dot_w`` :math:`\gamma`), at the
    optimizer's step :math:`k`:

    .. math::
        d &\leftarrow \beta_1 d + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        \gamma \leftarrow \beta_1\gamma + (1-\beta_1)\langle p, g\rangle \\
        D &= \sqrt{v/(1-\beta_2^k)} + \epsilon, \qquad \bar f \leftarrow (1-\beta_1)\ell + \beta_1\bar f \\
        \tau &= \min\Big(\frac{\alpha}{\rho},\ \frac{\max(q(\bar f - \rho\,\mathrm{lb}) + \sum\langle p, d\rangle
              - q\sum\gamma,\ 0)}{\sum\langle d, d/D\rangle}\Big), \quad \rho = 1-\beta_1^k,\ q = 1+\alpha\lambda \\
        p &\leftarrow (p - \tau\, d/D)/q \quad (\text{``divide=False``: } p \leftarrow p(1-\alpha\lambda) - \tau\, d/D)

    Native passes, float64 sums, host synchronisation on CUDA, lazy state, saved counters
    (``momo_step``, ``loss_avg``, ``lb_current`` in every group) and the optimizer-wide ``lb``,
    ``divide`` and ``use_fstar`` as :class:`Momo`; f̄ uses :math:`\beta_1` of the last group, as the
    official. Decision (spec §16 (g)): :math:`D` in the sums uses the optimizer's step :math:`k`, as the
    update does; the official uses the parameter's own step count there, which differs only for
    parameters that skipped steps (the per-parameter ``step`` is still kept and saved).
    ``caution`` / ``caution_norm``: the Cautious mask on :math:`d/D` as :class:`Momo`'s.
    """

    _rule = "momo_adam"
    _int_step_in_state_dict = True
    _optimizer_wide = ("lb", "divide", "use_fstar")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        lb: float = 0,
        divide: bool = True,
        use_fstar: bool = False,
        *,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
        caution: bool = False,
        caution_norm: str = "mean",
    ) -> None:
        check_hyper(lr=lr, eps=eps, betas=betas)
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight decay: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lb=lb, divide=divide, use_fstar=use_fstar, maximize=maximize)
        super().__init__(params, defaults)
        self._init_counters(check_finite, grad_clip, (state_dtype, rounding, rounding_seed, weight_correction), caution, caution_norm)

    def _next_loss_avg(self, k: int, loss_avg: float, loss: float) -> float:
        beta1 = scalar(self.param_groups[-1]["betas"][0])
        return (1 - beta1) * loss + beta1 * loss_avg

    def _rho(self, group: dict[str, Any], k: int) -> float:
        return 1.0 - scalar(group["betas"][0]) ** k

    def _gamma_weights(self, group: dict[str, Any], first: bool) -> tuple[float, float]:
        beta1 = scalar(group["betas"][0])
        return beta1, 1.0 - beta1

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        assert self._pending is not None
        return {**common_hyper(group), "divide": bool(self.defaults["divide"]), "step": float(self._pending[0]), "tau": 0.0, **caution_hyper(group)}
