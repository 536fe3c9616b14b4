"""AdaBelief: the official ``adabelief-pytorch`` 0.2.1 constructor and semantics, one fused step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["AdaBelief"]


class AdaBelief(FusedOptimizer):
    r"""AdaBelief (J. Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients", NeurIPS 2020, arXiv:2010.07468), with the defaults and options of the
    official package ``adabelief-pytorch`` 0.2.1, whose step is one fused native call.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t` (per parameter):

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \quad\text{(weight\_decouple; } p(1-\lambda)
            \text{ with fixed\_decay; else } g \leftarrow g + \lambda p) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        s &\leftarrow \beta_2 s + (1-\beta_2)(g - m)^2 + \epsilon
            \qquad (s_{\max} \leftarrow \max(s_{\max}, s) \text{ with amsgrad}) \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
            \frac{m}{\sqrt{s}/\sqrt{1-\beta_2^t} + \epsilon}
            \quad\text{(rectify=False; } s_{\max} \text{ with amsgrad)}

    With ``rectify=True`` (the official default) the update is RAdam's: with
    :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`, if :math:`\rho_t \ge 5`,
    :math:`p \leftarrow p - \mathrm{lr}\,\frac{r_t}{1-\beta_1^t}\frac{m}{\sqrt{s}+\epsilon}` with
    :math:`r_t = \sqrt{\frac{(1-\beta_2^t)(\rho_t-4)(\rho_t-2)\rho_\infty}
    {(\rho_\infty-4)(\rho_\infty-2)\rho_t}}` (no bias correction of :math:`s`, and
    :math:`s_{\max}` is kept but unused, as in the reference); otherwise, with
    ``degenerated_to_sgd``, :math:`p \leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t} m`, and
    without it the parameter does not move (states do). With :math:`\beta_2 = 0.999` the first
    five steps take that branch.

    State: ``step``, ``exp_avg``, ``exp_avg_var`` and ``max_exp_avg_var`` (amsgrad), as the
    reference. Arguments, defaults and ``ValueError`` messages are the reference's.

    Decisions and differences from the reference:

    * ``weight_decouple``, ``fixed_decay``, ``rectify`` and ``degenerated_to_sgd`` are kept per
      parameter group (the reference keeps them on the optimizer), so they are saved in
      ``state_dict``; a reference checkpoint lacking them gets the constructor's values.
    * ``print_change_log`` is accepted and ignored: nothing is printed.
    * ``state_dict()`` groups carry an empty ``buffer`` (the reference's cache of
      rectification terms) so that checkpoints load into ``adabelief-pytorch`` too.
    * Extra check: ``weight_decay < 0`` raises ``ValueError``.
    * L2 decay (``weight_decouple=False``) is applied to a local copy of the gradient;
      ``p.grad`` is never written (the reference adds to ``p.grad`` in place).
    * fp16 parameters keep float32 state, as the reference (0.2.1 upcasts fp16 parameters for
      the step); bf16 parameters keep bf16 state (torch's convention, as the reference).
      ``eps`` = 1e-16 inside the state would flush to zero in fp16.
    * ``step`` is a 0-dim float32 tensor in the live state (as torch's optimizers keep it) and
      an int in ``state_dict()`` (as the reference keeps it); ``load_state_dict`` takes either.
    * Extra keywords: ``maximize`` (negate the gradient), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (see
      :class:`emafuse.AdamW`).
    * ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious
      mask (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
      :math:`\phi = 1[m g > 0]` (:math:`g` with its L2 decay), :math:`k = 1/\max(\operatorname{mean}
      \phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as
      :class:`emafuse.AdamW`'s ``caution`` (in every regime of the rectified update, the SGD
      fallback included); :math:`s` keeps the unmasked :math:`m`. One extra read-only pass; not
      combinable with ``orthograd``.
    """

    _rule = "adabelief"
    _int_step_in_state_dict = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        print_change_log: bool = True,
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
        check_hyper(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
        check_caution_norm(caution_norm)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # adabelief-pytorch's rectified step reads a per-group cache of the rectification terms
        # ("buffer", a pure function of the step): give it an empty one so that the checkpoint
        # also loads there.
        for g in sd["param_groups"]:
            g.setdefault("buffer", [[None, None, None] for _ in range(10)])
        return sd


    def _default_state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        return torch.float32 if p.dtype == torch.float16 else p.dtype

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "amsgrad": bool(group["amsgrad"]),
            "weight_decouple": bool(group["weight_decouple"]),
            "fixed_decay": bool(group["fixed_decay"]),
            "rectify": bool(group["rectify"]),
            "degenerated_to_sgd": bool(group["degenerated_to_sgd"]),
            **caution_hyper(group),
        }
