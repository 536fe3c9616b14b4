"""Lion: the official google/automl constructor and semantics, one fused step."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper, scalar

__all__ = ["Lion"]


class Lion(FusedOptimizer):
    r"""Lion, EvoLved Sign Momentum (X. Chen et al., "Symbolic Discovery of Optimization
    Algorithms", NeurIPS 2023, arXiv:2302.06675), as the official implementation
    (google/automl ``lion_pytorch.py``), in one fused native call.

    For each parameter :math:`p` with gradient :math:`g`:

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        p &\leftarrow p - \mathrm{lr}\cdot\operatorname{sign}(\beta_1 m + (1-\beta_1) g) \\
        m &\leftarrow \beta_2 m + (1-\beta_2) g

    (:math:`\operatorname{sign}(0) = 0`). Every element moves by exactly lr (plus decay), so lr
    is typically 3-10x smaller than AdamW's and weight decay 3-10x larger. With decoupled decay
    :math:`\lambda`, Lion minimises the loss subject to :math:`\|p\|_\infty \le 1/\lambda`
    (L. Chen et al., "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts",
    ICLR 2024).

    State: ``exp_avg`` only (no step counter). Arguments, defaults and ``ValueError`` messages
    are the official implementation's (``lion-pytorch`` has the same math with default flags).

    Decisions and options:

    * ``lr_independent_decay=True`` is ``lion-pytorch``'s ``decoupled_weight_decay=True``
      (renamed, since it is not AdamW-style decoupling; spec §22.12): the decay factor becomes
      :math:`1 - \mathrm{lr}\cdot\lambda/\mathrm{lr}_0`, where :math:`\mathrm{lr}_0` is the
      group's ``decay_base_lr`` (default: the constructor's lr), so the decay follows the lr
      schedule's shape but not its scale. ``decoupled_weight_decay=`` (lion-pytorch's spelling)
      is accepted for it; giving both raises ``ValueError``.
    * Extra check: ``weight_decay < 0`` raises ``ValueError``.
    * ``caution=True``: Cautious Lion (K. Liang, L. Chen, B. Liu, Q. Liu, "Cautious Optimizers:
      Improving Training with One Line of Code", arXiv:2411.16085). With
      :math:`u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g)` and the mask
      :math:`\phi = 1[u g > 0]`, the step is :math:`p \leftarrow p - \mathrm{lr}\, u \phi k`
      (decay unmasked), where per tensor :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})`
      with ``caution_norm="mean"`` (the default, as timm's ``Lion(caution=True)``) or
      :math:`k = \mathrm{numel}/(\sum\phi + 1)` with ``caution_norm="count"`` (the paper's
      first release, C-Optim ``c_lion.py``). This costs one extra read-only pass over
      ``exp_avg`` and the gradient.
    * Extra keywords: ``maximize`` (negate the gradient), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (see
      :class:`emafuse.AdamW`).
    """

    _rule = "lion"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        lr_independent_decay: bool = False,
        decoupled_weight_decay: bool | None = None,
        caution: bool = False,
        caution_norm: str = "mean",
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
        orthograd: bool = False,
        orthograd_rescale: bool = True,
    ) -> None:
        if decoupled_weight_decay is not None:
            if lr_independent_decay:
                raise ValueError("give lr_independent_decay or its lion-pytorch spelling decoupled_weight_decay, not both")
            lr_independent_decay = bool(decoupled_weight_decay)
        check_hyper(lr=lr, betas=betas[:2], weight_decay=weight_decay)
        check_caution_norm(caution_norm)
        if lr_independent_decay and not scalar(lr) > 0.0:
            raise ValueError(f"lr_independent_decay needs lr > 0, got {lr}")
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            lr_independent_decay=lr_independent_decay,
            decay_base_lr=scalar(lr),
            caution=caution,
            caution_norm=caution_norm,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale)

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "lr_independent_decay": bool(group["lr_independent_decay"]),
            "decay_base_lr": float(group["decay_base_lr"]),
            **caution_hyper(group),
        }
