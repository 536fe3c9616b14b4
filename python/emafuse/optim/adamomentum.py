"""AdaMomentum: the paper's algorithm (no official code exists), one fused step."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["AdaMomentum"]


class AdaMomentum(FusedOptimizer):
    r"""AdaMomentum (Y. Wang et al., "Rethinking Adam: A Twofold Exponential Moving Average
    Approach", arXiv:2106.11514): Adam whose second moment is the EMA of the squared *momentum*
    instead of the squared gradient, in one fused native call.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t` (per parameter):

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \quad\text{(weight\_decouple; } p(1-\lambda)
            \text{ with fixed\_decay; else } g \leftarrow g + \lambda p) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) m^2 + \epsilon \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}}

    :math:`\epsilon` is accumulated inside :math:`v` every step and there is no :math:`\epsilon`
    outside the root (the paper's algorithm), so the bias-corrected denominator never falls
    below :math:`\sqrt{\epsilon/(1-\beta_2)}` (≈ 3.2e-3 for the defaults), far above Adam's
    :math:`\epsilon`. With ``eps=0`` and :math:`m = 0` the update is NaN (0/0).

    State: ``step``, ``exp_avg``, ``exp_avg_sq`` (the second moment of the momentum).

    Decisions (no official implementation exists; spec §22.3):

    * Defaults are Adam's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0).
    * Weight decay is decoupled by default (``weight_decouple=True``, AdamW placement, before
      the update); ``fixed_decay=True`` drops the lr factor; ``weight_decouple=False`` is L2
      decay added to a local copy of the gradient (``p.grad`` is never written).
    * No AMSGrad or rectification (not part of the paper).
    * ``ValueError`` for lr < 0, eps < 0, betas outside [0, 1), weight_decay < 0, with Adam's
      messages.
    * ``step`` is a 0-dim float32 tensor in the live state and an int in ``state_dict()`` (as
      the other reference implementations keep it); ``load_state_dict`` takes either.
    * Extra keywords: ``maximize`` (negate the gradient), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (see
      :class:`emafuse.AdamW`).
    * ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious
      mask (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
      :math:`\phi = 1[m g > 0]` (:math:`g` with its L2 decay), :math:`k = 1/\max(\operatorname{mean}
      \phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as
      :class:`emafuse.AdamW`'s ``caution``; :math:`v` keeps the unmasked :math:`m`. One extra
      read-only pass; not combinable with ``orthograd``.
    """

    _rule = "adamomentum"
    _int_step_in_state_dict = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
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
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "weight_decouple": bool(group["weight_decouple"]),
            "fixed_decay": bool(group["fixed_decay"]),
            **caution_hyper(group),
        }
