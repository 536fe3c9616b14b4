r"""Decay schedules for weight averaging, as pure functions of counters (host, float64).

Every schedule maps an *update index* to a decay :math:`d` (the weight of the old average; the
new weights enter with :math:`w = 1 - d`). Being pure functions of counters, they resume exactly
from a checkpoint that stores the counters (no generator state).

References (spec ``averaging.md``): timm ``ModelEmaV3`` and lucidrains ``ema-pytorch`` warm-up
(A.2, A.3), TensorFlow/torch-ema ``num_updates`` (A.5), EDM2 power function (B.4, Karras et al.,
CVPR 2024), BYOL (Grill et al., NeurIPS 2020) and DINO (Caron et al., ICCV 2021) teacher cosine
schedules, I-JEPA linear (Assran et al., CVPR 2023), mean teacher (Tarvainen & Valpola, NeurIPS
2017), and the EMA scaling rule :math:`\hat\rho = \rho^\kappa` (Busbridge et al., "How to Scale
Your EMA", NeurIPS 2023).
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = [
    "warmup_decay",
    "tf_num_updates_decay",
    "power_beta",
    "byol_cosine",
    "dino_cosine",
    "linear_momentum",
    "mean_teacher_decay",
    "scale_momentum",
    "scaled_schedule",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
]


def warmup_decay(k: float, decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0) -> float:
    r"""timm/ema-pytorch warm-up (after @crowsonkb): :math:`d = \max(\min(1 - (1 + k/\gamma)^{-p},
    d_{max}), d_{min})` for :math:`k > 0`, and 0 (copy) for :math:`k \le 0`. ``k`` counts steps
    after ``update_after_step`` (timm's ``step - update_after_step - 1``)."""
    if k <= 0:
        return 0.0
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
