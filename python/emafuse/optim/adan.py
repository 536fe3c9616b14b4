"""Adan: the official sail-sg/Adan constructor and semantics, one fused native step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["Adan"]


class Adan(FusedOptimizer):
    r"""Adan, adaptive Nesterov momentum (Xie, Zhou, Li, Lin, Yan, "Adan: Adaptive Nesterov
    Momentum Algorithm for Faster Optimizing Deep Models", arXiv:2208.06677, IEEE TPAMI 2024),
    matching the official ``adan.Adan`` (sail-sg/Adan) with one fused native call per step.

    With the group's step counter :math:`k`, the clipped gradient :math:`\hat g = c\,g` and its
    difference to the previous one :math:`\Delta = \hat g - \hat g_{prev}` (0 at :math:`k = 1`
    and on a parameter's first step):

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1)\hat g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\Delta \\
        n &\leftarrow \beta_3 n + (1-\beta_3)(\hat g + \beta_2\Delta)^2 \\
        D &= \sqrt{n}/\sqrt{1-\beta_3^k} + \epsilon \\
        p &\leftarrow \Big(p - \tfrac{\mathrm{lr}}{1-\beta_1^k}\tfrac{m}{D}
              - \tfrac{\mathrm{lr}\,\beta_2}{1-\beta_2^k}\tfrac{v}{D}\Big) / (1 + \mathrm{lr}\,\lambda)

    (``no_prox=True``: :math:`p \leftarrow p(1-\mathrm{lr}\,\lambda)` before the update instead of
    the division after it). The betas are the code's, i.e. one minus the paper's.

    ``max_grad_norm > 0`` clips by the global norm of all gradients of all groups:
    :math:`c = \min(\text{max\_grad\_norm} / (\lVert g\rVert + \epsilon), 1)`, the norm computed
    by the native engine in float64 before any parameter moves (``eps`` is the last group's, as in
    the official code; ``max_grad_norm`` is the constructor's, optimizer-wide).

    State: ``exp_avg`` (m), ``exp_avg_sq`` (n), ``exp_avg_diff`` (v), ``neg_pre_grad``
    (:math:`-\hat g_{prev}`) per parameter, ``step`` per group (as the official, so checkpoints
    move both ways). The group step advances on every ``step()``, also for groups without any
    gradient; a parameter whose first gradient arrives at :math:`k > 1` starts with
    :math:`\Delta = 0` but is bias-corrected with the group's :math:`k`, as in the reference.

    :meth:`restart` (alias ``restart_opt``) zeroes m, n, v and every group step, as the official
    ``restart_opt``. ``foreach`` and ``fused`` are accepted and ignored (emafuse always runs
    fused). Differences from the reference, on purpose: ``p.grad`` is never written (the official
    clips it in place and leaves it scaled); ``weight_decay < 0`` raises ``ValueError``. Extra
    keywords: ``maximize`` (negate gradients), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`).
    Complex parameters are not supported (neither are they by the official code).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: both terms are multiplied by
    :math:`\phi k` for :math:`\phi = 1[d \hat g > 0]`, the update's direction
    :math:`d = m/(1-\beta_1^k) + \beta_2 v/(1-\beta_2^k)` and :math:`k = 1/\max(\operatorname{mean}
    \phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as :class:`emafuse.AdamW`'s
    ``caution``; the decay is not masked. One extra read-only pass; not combinable with ``orthograd``.
    """

    _rule = "adan"
    _flags_fresh_state = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        no_prox: bool = False,
        foreach: bool = True,
        fused: bool = False,
        *,
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
        if not 0.0 <= max_grad_norm:
            raise ValueError(f"Invalid Max grad norm: {max_grad_norm}")
        check_hyper(lr=lr, eps=eps, betas=betas[:3], weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            no_prox=no_prox,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )
        self._clip = 1.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._clip = 1.0

    @torch.no_grad()
    def restart(self) -> None:
        """Restart the moments: zero ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff`` and every group's
        ``step``. The next step treats every gradient as a first one (no difference term)."""
        for group in self.param_groups:
            group["step"] = 0
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                    if name in st:
                        st[name].zero_()

    restart_opt = restart

    def _begin_step(self) -> None:
        max_norm = float(self.defaults["max_grad_norm"])
        self._clip = 1.0
        if max_norm <= 0 or not self.param_groups:
            return
        # the norm of the gradients grad_clip= hands the rule
        norm = self._clipped_grad_norm(getattr(self, "grad_scale", None))
        eps_last = float(self.param_groups[-1]["eps"])
        self._clip = min(max_norm / (norm + eps_last), 1.0)

    def _end_step(self, applied: bool) -> None:
        if applied:
            for group in self.param_groups:
                group["step"] = group.get("step", 0) + 1


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        k = int(group.get("step", 0)) + 1
        return {
            **common_hyper(group),
            "clip": float(self._clip),
            "step": float(k),
            "no_prox": bool(group["no_prox"]),
            "first": k == 1,
            **caution_hyper(group),
        }
