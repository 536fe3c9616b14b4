"""SPAM: the official constructor and semantics (galore_torch/SPAM.py), one fused native step."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, common_hyper

__all__ = ["SPAM"]

# Hyper-parameters that drive the optimizer-level counters: one value for the whole optimizer.
_GLOBAL = ("warmup_steps", "threshold", "DeltaT", "grad_accu_steps")


class SPAM(FusedOptimizer):
    r"""SPAM, spike-aware Adam with momentum reset (Huang, Zhu, Jin, Liu, Wang, Liu, "SPAM:
    Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025, arXiv:2501.06842),
    matching the official class (``galore_torch/SPAM.py``, exported as ``SPAM``) with one fused
    native call per step.

    With :math:`t` the number of this ``step()`` call (optimizer-wide), :math:`k` the parameter's
    own step counter (never reset), :math:`\theta` = ``threshold``, :math:`\Delta T` = ``DeltaT``:

    .. math::
        &m, v \leftarrow 0 \quad\text{when } t \bmod \Delta T = 0 \text{ (momentum reset)} \\
        &g \leftarrow \operatorname{sign}(g)\sqrt{\theta v} \quad\text{where } g^2 > \theta v
            \text{ (spike clipping, once } t \ge N_a \text{ and } t \bmod \Delta T \ge N_a) \\
        &m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        &p \leftarrow p - \mathrm{lr}\,\frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}\, s\,
            \frac{m}{\sqrt{v} + \epsilon}, \qquad p \leftarrow p - \mathrm{lr}\,\lambda\, p

    (:math:`N_a` = ``grad_accu_steps``; without ``correct_bias`` the step is :math:`\mathrm{lr}\,s`.)
    The warm-up factor after a reset is
    :math:`s = 1 - 0.99\,(1 + \cos(\pi j/(N+1)))/2` for :math:`j < N` (= ``warmup_steps``), else 1,
    where :math:`j` counts the steps since the last reset (``current_step``). The weight decay comes
    after the update and is not warmed up, as in the official code.

    State: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter; the optimizer-level counters
    ``total_step`` (completed steps) and ``current_step`` (warm-up position, starts at N + 1) live
    in every param group (the same values in each), where ``torch.distributed.checkpoint`` and
    ``state_dict()`` expect optimizer-wide values; the official code keeps them in
    ``optimizer.state`` under those string keys, and such checkpoints (and those of emafuse before
    0.2) load: the counters move into the groups. ``warmup_steps``, ``threshold``, ``DeltaT`` and ``grad_accu_steps`` are
    optimizer-wide (the official keeps them as attributes): a parameter group giving another value
    raises ``ValueError``. Steps skipped by AMP (``GradScaler`` found inf/NaN) advance no counter.

    Behaviour kept from the reference: bias correction uses the never-reset :math:`k`, so the first
    updates after a reset are small; an element whose :math:`v` is exactly 0 while clipping is
    active (no gradient since the last reset, e.g. an unused embedding row) is clipped to 0 and
    stays frozen until the next reset. Differences, on purpose: ``p.grad`` is never written (the
    official clips it in place); the sparse-momentum ``density`` groups are not supported; extra
    ``ValueError`` checks: ``weight_decay``, ``warmup_steps``, ``threshold``, ``grad_accu_steps``
    < 0 and ``DeltaT`` < 1. ``no_deprecation_warning`` is accepted and ignored (no warning is
    given). Extra keywords: ``maximize``, ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
    :math:`\phi = 1[m g > 0]` (:math:`g` as spike-clipped: the gradient the moments see),
    :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per
    tensor, as :class:`emafuse.AdamW`'s ``caution``; the decay is not masked. One extra read-only
    pass; not combinable with ``orthograd``.
    """

    _rule = "spam"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        warmup_steps: int = 150,
        threshold: int = 5000,
        DeltaT: int = 500,
        grad_accu_steps: int = 20,
        *,
        no_deprecation_warning: bool = False,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
        orthograd: bool = False,
        orthograd_rescale: bool = True,
        caution: bool = False,
        caution_norm: str = "mean",
    ) -> None:
        check_caution_norm(caution_norm)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[0]} - should be in [0.0, 1.0)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[1]} - should be in [0.0, 1.0)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} - should be >= 0.0")
        for name, value in (("warmup_steps", warmup_steps), ("threshold", threshold), ("grad_accu_steps", grad_accu_steps)):
            if not 0 <= value:
                raise ValueError(f"Invalid {name}: {value} - should be >= 0")
        if not 1 <= DeltaT:
            raise ValueError(f"Invalid DeltaT: {DeltaT} - should be >= 1")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            warmup_steps=warmup_steps,
            threshold=threshold,
            DeltaT=DeltaT,
            grad_accu_steps=grad_accu_steps,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )
        self._this_step: tuple[int, float, bool] = (1, 1.0, False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first = self.param_groups[0]  # the counters are optimizer-wide: every group holds them
        group["total_step"] = first.get("total_step", 0)
        group["current_step"] = first.get("current_step", int(group["warmup_steps"]) + 1)
        for name in _GLOBAL:
            if group[name] != self.defaults[name]:
                raise ValueError(
                    f"SPAM: {name} is optimizer-wide (it drives the optimizer-level counters); "
                    f"a param group cannot set {name}={group[name]!r} (optimizer: {self.defaults[name]!r})"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Checkpoints of the official code (and of emafuse before 0.2) keep the counters in
        # optimizer.state under string keys; they now live in every param group.
        counters = {k: int(self.state.pop(k)) for k in ("total_step", "current_step") if k in self.state}
        for group in self.param_groups:
            for key, value in counters.items():
                group.setdefault(key, value)
            group.setdefault("total_step", 0)
            group.setdefault("current_step", int(self.defaults.get("warmup_steps", 150)) + 1)
        self._this_step = (1, 1.0, False)

    def _begin_step(self) -> None:
        n_warm = self.defaults["warmup_steps"]
        first = self.param_groups[0]
        t = int(first["total_step"]) + 1
        j = int(first["current_step"])
        scale = 1.0 - 0.99 * (1.0 + math.cos(math.pi * j / (n_warm + 1))) / 2.0 if j < n_warm else 1.0
        self._this_step = (t, scale, t % self.defaults["DeltaT"] == 0)

    def _end_step(self, applied: bool) -> None:
        if not applied:
            return
        first = self.param_groups[0]
        total = int(first["total_step"]) + 1
        current = 0 if (total + 1) % self.defaults["DeltaT"] == 0 else int(first["current_step"]) + 1
        for group in self.param_groups:
            group["total_step"], group["current_step"] = total, current


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        t, scale, reset = self._this_step
        d = self.defaults
        accu = d["grad_accu_steps"]
        return {
            **common_hyper(group),
            "threshold": float(d["threshold"]),
            "scale": float(scale),
            "reset": bool(reset),
            "clip": d["threshold"] != 0 and t >= accu and t % d["DeltaT"] >= accu,
            "correct_bias": bool(group["correct_bias"]),
            **caution_hyper(group),
        }
