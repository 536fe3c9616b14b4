"""diffGrad: the official constructor and semantics (diffGrad_v2.py), one fused native step."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["DiffGrad"]


class DiffGrad(FusedOptimizer):
    r"""diffGrad (Dubey, Chakraborty, Roy, Mukherjee, Singh, Chaudhuri, "diffGrad: An
    Optimization Method for Convolutional Neural Networks", IEEE TNNLS 2020, arXiv:1909.11015),
    matching the official fixed version ``diffGrad_v2.py`` (shivram1987/diffGrad) with one fused
    native call per step.

    Adam whose first moment is damped by a "friction" :math:`\xi` that is small where the gradient
    hardly changes:

    .. math::
        g &\leftarrow g + \lambda p \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \xi &= \operatorname{sigmoid}(|g_{prev} - g|) \in [0.5, 1), \qquad g_{prev} \leftarrow g \\
        p &\leftarrow p - \mathrm{lr}\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            \frac{\xi\, m}{\sqrt{v} + \epsilon}

    (:math:`g_{prev} = 0` at :math:`t = 1`, so :math:`\xi = \operatorname{sigmoid}(|g|)` then.)
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``previous_grad`` (a copy of the gradient
    including the L2 term, as v2 stores it). Weight decay is L2, added to the gradient.

    Differences from the reference, on purpose: ``p.grad`` is never written (the official adds the
    decay to it in place); ``weight_decay < 0`` raises ``ValueError``. The v1 file and the
    torch-optimizer port store a *reference* to ``p.grad`` as ``previous_grad``, which makes
    :math:`\xi = 0.5` from step 2 on when gradients are accumulated in place
    (``zero_grad(set_to_none=False)``); emafuse always keeps a copy, as v2. Extra keywords:
    ``maximize``, ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
    :math:`\phi = 1[m g > 0]` (:math:`g` with its L2 decay), :math:`k = 1/\max(\operatorname{mean}
    \phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as
    :class:`emafuse.AdamW`'s ``caution`` (the friction :math:`\xi > 0` keeps the update's sign).
    One extra read-only pass; not combinable with ``orthograd``.
    """

    _rule = "diffgrad"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**common_hyper(group), **caution_hyper(group)}
