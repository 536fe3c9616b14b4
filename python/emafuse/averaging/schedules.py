r"""Decay schedules for weight averaging, as pure functions of counters (host, float64).

Every schedule maps an *update index* to a decay :math:`d` (the weight of the old average; the
new weights enter with :math:`w = 1 - d`). Being pure functions of counters, they resume exactly
from a checkpoint that stores the counters (no generator state).

References (spec ``averaging.md``): timm ``ModelEmaV3`` and lucidrains ``ema-pytorch`` warm-up
(A.2, A.3), TensorFlow/torch-ema ``num_updates`` (A.5), EDM2 power function (B.4, Karras et al.,
CVPR 2024), BYOL (Grill et al., NeurIPS 2020) and DINO (Caron et al., ICCV 2021) teacher cosine
schedules, I-JEPA linear (Assran et al., CVPR 2023), mean teacher (Tarvainen & Valpola, NeurIPS
2017), and the EMA scaling rule :math:`\hat\rho = \rho^\kappa` (Busbridge et al., "How to Scale
Your EMA", NeurIPS 2023), SWA's running mean (Izmailov et al., UAI 2018) and BEMA's
coefficients (Block & Zhang 2025).

:class:`EMASchedule` chains them the way :class:`~emafuse.ModelEMA` uses them: which optimizer
steps are update events, the copy at the first event and during ``update_after_step``, the named
schedule or a callable, the EMA scaling rule and interval compensation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "SCHEDULES",
    "EMASchedule",
    "bema_coefficients",
    "byol_cosine",
    "dino_cosine",
    "gamma_to_sigma_rel",
    "linear_momentum",
    "mean_teacher_decay",
    "power_beta",
    "scale_momentum",
    "scaled_schedule",
    "sigma_rel_to_gamma",
    "swa_decay",
    "tf_num_updates_decay",
    "warmup_decay",
]


def warmup_decay(
    k: float, decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0, *, float32: bool = False
) -> float:
    r"""timm/ema-pytorch warm-up (after @crowsonkb): :math:`d = \max(\min(1 - (1 + k/\gamma)^{-p},
    d_{max}), d_{min})` for :math:`k > 0`, and 0 (copy) for :math:`k \le 0`. ``k`` counts steps
    after ``update_after_step`` (timm's ``step - update_after_step - 1``). ``float32=True``
    evaluates it in float32 tensors, as ema-pytorch does (its ``ema_pytorch`` preset)."""
    if k <= 0:
        return 0.0
    if float32:
        value = 1 - (1 + torch.tensor(float(k), dtype=torch.float32) / inv_gamma) ** -power
        return float(value.clamp(min=min_decay, max=decay).item())
    return max(min(1.0 - (1.0 + k / inv_gamma) ** (-power), decay), min_decay)


def tf_num_updates_decay(n: int, decay: float) -> float:
    r"""TensorFlow ``ExponentialMovingAverage(num_updates=...)`` / torch-ema:
    :math:`d = \min(d_{max}, (1 + n)/(10 + n))`, ``n`` = number of updates including this one."""
    return min(decay, (1.0 + n) / (10.0 + n))


def power_beta(t: float, gamma: float, delta: float = 1.0) -> float:
    r"""EDM2 power-function EMA: :math:`\beta_t = (1 - \Delta/t)^{\gamma + 1}`, with ``t`` the
    training time after the step and ``delta`` the time since the previous update."""
    if t <= 0:
        raise ValueError(f"power EMA time must be positive, got {t}")
    return max(0.0, 1.0 - delta / t) ** (gamma + 1.0)


def byol_cosine(k: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    r"""BYOL target momentum: :math:`m_k = m_f - (m_f - m_0)(\cos(\pi \min(k,K)/K) + 1)/2`
    (reaches ``final`` at ``k = total``)."""
    k = min(k, total)
    return final - (final - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


def dino_cosine(i: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    r"""DINO ``cosine_scheduler``: :math:`m_i = m_f + \tfrac12 (m_0 - m_f)(1 + \cos(\pi i / N))`,
    ``i = 0..N-1`` (denominator N: the last value stays just below ``final``); ``final`` after."""
    if i >= total:
        return final
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / total))


def linear_momentum(i: int, total: float, base: float = 0.996, final: float = 1.0) -> float:
    r"""I-JEPA / V-JEPA linear momentum :math:`m_i = m_0 + i (m_1 - m_0)/N` (``total`` = ipe ·
    epochs · ipe_scale), clamped at ``final``."""
    m = base + i * (final - base) / total
    return min(m, final) if final >= base else max(m, final)


def mean_teacher_decay(t: int, alpha: float = 0.999) -> float:
    r"""Mean teacher: :math:`\alpha_t = \min(1 - 1/(t + 1), \alpha)`, ``t`` the 1-based step."""
    return min(1.0 - 1.0 / (t + 1.0), alpha)


def swa_decay(n: int) -> float:
    r"""SWA's equal-weight running mean as a decay: :math:`d = n/(n+1)` after ``n`` averaged
    models (``torch.optim.swa_utils.AveragedModel``'s default)."""
    return n / (n + 1.0)


def bema_coefficients(
    s: float, *, lag: float, multiplier: float, ema_power: float | None, bias_power: float | None, min_ema_multiplier: float
) -> tuple[float, float]:
    r"""BEMA's :math:`(\alpha, \beta)` at time ``s`` (spec B.1): :math:`b = \rho + \gamma s`,
    :math:`\beta = \min(\max(b^{-\kappa}, \beta_{min}), 1)` (an update *weight*),
    :math:`\alpha = b^{-\eta}`; ``ema_power=None`` gives :math:`\beta = 1`, ``bias_power=None``
    gives :math:`\alpha = 0` ("disabled" is never encoded as 0, since :math:`b^0 = 1`)."""
    b = lag + multiplier * s
    beta = 1.0 if ema_power is None else max(b ** (-ema_power), min_ema_multiplier)
    alpha = 0.0 if bias_power is None else b ** (-bias_power)
    return alpha, min(beta, 1.0)


def scale_momentum(rho: float, kappa: float) -> float:
    r"""The EMA scaling rule (Busbridge et al. 2023): for a batch ``kappa`` times larger use
    :math:`\hat\rho = \rho^\kappa`."""
    if kappa <= 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    return rho**kappa


def scaled_schedule(schedule: Callable[[float], float], kappa: float) -> Callable[[float], float]:
    r"""A per-step decay schedule for a run with a ``kappa``-times larger batch:
    :math:`\hat d(\hat t) = d(\kappa \hat t)^\kappa` (derived from the scaling rule, spec B.3)."""
    return lambda t: schedule(kappa * t) ** kappa


def gamma_to_sigma_rel(gamma: float) -> float:
    r"""EDM2: :math:`\sigma_{rel}(\gamma) = \sqrt{(\gamma+1) / ((\gamma+2)^2 (\gamma+3))}`."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""EDM2: the largest real root of :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma^{-2})\gamma +
    (12 - \sigma^{-2}) = 0`, for :math:`0 < \sigma_{rel} < 1/\sqrt{12}`."""
    if not 0.0 < sigma_rel < 12.0**-0.5:
        raise ValueError(f"sigma_rel must be in (0, {12.0 ** -0.5:.5f}), got {sigma_rel}")
    import numpy as np

    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    g = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    # Polish with Newton steps on sigma_rel(gamma) = sigma_rel (the root finder leaves ~1e-13).
    for _ in range(3):
        f = gamma_to_sigma_rel(g) - sigma_rel
        h = 1e-7 * max(1.0, g)
        df = (gamma_to_sigma_rel(g + h) - gamma_to_sigma_rel(g - h)) / (2 * h)
        if df == 0:
            break
        g -= f / df
    return g


#: The named schedules of :class:`EMASchedule` (and ``ModelEMA(schedule=...)``).
SCHEDULES = ("constant", "warmup", "tf_num_updates", "power", "cosine", "dino", "linear", "mean_teacher")

_FIRST_UPDATES = ("copy", "average")


@dataclass
class EMASchedule:
    r"""When a model EMA updates and with which decay (spec A.2-A.10, B.3, B.8), as a pure
    function of two counters: ``s``, the optimizer step (1 after the first one), and ``n``, the
    number of earlier update events.

    * Events: ``s - 1 >= start_step`` and ``(s - 1) % update_every == 0`` (steps 1, k+1, 2k+1,
      ...: ema-pytorch, Lightning, NeMo).
    * ``first_update="copy"``: the first event, and every event while
      ``k = s - update_after_step - 1 <= 0``, copies the model (decay 0); ``"average"`` lerps from
      the start (torch-ema, BYOL teachers).
    * Otherwise ``schedule``: ``"constant"`` (``decay``); ``"warmup"`` (:func:`warmup_decay` of k;
      ``inv_gamma``, ``power``, ``min_decay``; ``float32_warmup`` as ema-pytorch computes it);
      ``"tf_num_updates"`` (:func:`tf_num_updates_decay` of n + 1); ``"power"``
      (:func:`power_beta` of s with Δ = ``update_every``; ``gamma`` or ``sigma_rel``);
      ``"cosine"``, ``"dino"``, ``"linear"`` (:func:`byol_cosine`, :func:`dino_cosine`,
      :func:`linear_momentum` of n, from ``decay`` to ``final_decay`` over ``total_steps``);
      ``"mean_teacher"`` (:func:`mean_teacher_decay` of s); or a callable ``f(k) -> decay``.
    * ``batch_scale`` κ: the EMA scaling rule :math:`\hat d(k) = d(\kappa k)^\kappa` (not for
      ``"power"``); ``interval_compensation``: :math:`d^{\Delta}` when updating every Δ steps.

    Bad values raise ``ValueError`` at construction.
    """

    schedule: str | Callable[[float], float] = "constant"
    decay: float = 0.9999
    update_every: int = 1
    update_after_step: int = 0
    start_step: int = 0
    first_update: str = "copy"
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0
    gamma: float | None = None
    sigma_rel: float | None = None
    total_steps: int | None = None
    final_decay: float = 1.0
    batch_scale: float = 1.0
    interval_compensation: bool = False
    float32_warmup: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        sch = self.schedule
        if not callable(sch) and sch not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable, got {sch!r}")
        if sch in ("cosine", "dino", "linear") and not self.total_steps:
            raise ValueError(f"schedule={sch!r} needs total_steps=")
        if int(self.update_every) < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if int(self.update_after_step) < 0 or self.start_step < 0:
            raise ValueError("update_after_step and start_step must be >= 0")
        if self.first_update not in _FIRST_UPDATES:
            raise ValueError(f"first_update must be one of {_FIRST_UPDATES}, got {self.first_update!r}")
        if self.batch_scale <= 0:
            raise ValueError(f"batch_scale must be positive, got {self.batch_scale}")
        if sch == "power":
            if (self.gamma is None) == (self.sigma_rel is None):
                raise ValueError("schedule='power' needs exactly one of gamma= or sigma_rel=")
            self.gamma = float(self.gamma) if self.gamma is not None else sigma_rel_to_gamma(float(self.sigma_rel))
        self.update_every = int(self.update_every)
        self.update_after_step = int(self.update_after_step)

    def is_update_step(self, s: int) -> bool:
        """Whether optimizer step ``s`` (1-based) is an update event."""
        return s - 1 >= self.start_step and (s - 1) % self.update_every == 0

    def decay_at(self, s: int, n: int) -> float:
        """The decay of an event at step ``s`` after ``n`` earlier events; 0 copies the model."""
        k = s - self.update_after_step - 1
        if self.first_update == "copy" and (n == 0 or k <= 0):
            return 0.0
        sch, d, kappa = self.schedule, self.decay, self.batch_scale
        if sch == "power":
            return power_beta(float(s), self.gamma, float(self.update_every))  # type: ignore[arg-type]
        if sch == "constant":
            out = d
        elif sch == "warmup":
            out = warmup_decay(k * kappa, d, self.inv_gamma, self.power, self.min_decay, float32=self.float32_warmup)
        elif sch == "tf_num_updates":
            out = tf_num_updates_decay((n + 1) * kappa, d)  # type: ignore[arg-type]
        elif sch == "cosine":
            out = byol_cosine(n, self.total_steps, d, self.final_decay)  # type: ignore[arg-type]
        elif sch == "dino":
            out = dino_cosine(n, self.total_steps, d, self.final_decay)  # type: ignore[arg-type]
        elif sch == "linear":
            out = linear_momentum(n, self.total_steps, d, self.final_decay)  # type: ignore[arg-type]
        elif sch == "mean_teacher":
            out = mean_teacher_decay(int(s * kappa), d)
        else:
            out = float(sch(k * kappa))  # type: ignore[operator]
            if not 0.0 <= out <= 1.0:
                raise ValueError(f"schedule returned decay {out} outside [0, 1] at k={k}")
        if kappa != 1.0:
            out = out**kappa
        if self.interval_compensation and self.update_every > 1:
            out = out**self.update_every
        return out
