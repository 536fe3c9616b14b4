"""SGD-SaI: the official constructor and semantics (sgd_sai 1.0.3), one fused native step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["SGDSaI"]


class SGDSaI(FusedOptimizer):
    r"""SGD-SaI, SGD with momentum and learning-rate scaling at initialisation (Xu, Xiang, Cai, Wen,
    "No More Adam: Learning Rate Scaling at Initialization is All You Need", arXiv:2412.11768),
    matching the official ``sgd_sai.SGD_sai`` 1.0.3 with one fused native call per step.

    On a parameter's first step the gradient signal-to-noise ratio is measured once and kept:

    .. math::
        \text{gsnr} = \frac{\lVert g\rVert}{\sigma(g) + \epsilon}
        \qquad (\sigma \text{: unbiased standard deviation; } 0 \text{ when numel} = 1)

    and every step (:math:`\mu` = ``momentum``, decoupled weight decay :math:`\lambda`)

    .. math::
        b &\leftarrow \mu b + (1-\mu) g \qquad (b \leftarrow g \text{ on the first step}) \\
        p &\leftarrow p\,(1 - \lambda\,\mathrm{lr}) - \mathrm{lr}\cdot\text{gsnr}\cdot b

    State: ``gsnr`` (a 0-dim float64 CPU tensor) and ``momentum_buffer`` (none when
    :math:`\mu = 0`: then :math:`b = g`; the official crashes there). ‖g‖ and σ come from float64
    sums (Σg, Σg²) gathered by the native engine in the same step.

    Decisions on the spec's open questions: gsnr is computed lazily, the first time each parameter
    has a gradient (the official computes it for all parameters at the first ``step()`` and crashes
    later on parameters that had no gradient then); gsnr is saved in the state dict and never
    recomputed on resume (the official recomputes it from the current batch after every reload);
    the closure is evaluated once. Kept from the reference and worth knowing: a one-element
    parameter gets gsnr = |g|/eps (≈ 1e8·|g|: an enormous step), and a parameter whose first
    gradient is exactly zero gets gsnr = 0 and never moves again except by weight decay. Changing
    ``momentum`` from 0 to non-zero later starts the buffer at zero. Extra keywords: ``maximize``
    ``check_finite`` and ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`). ``p.grad`` is never written. ``orthograd``
    is not taken: gsnr would have to be computed from the projected gradient, which needs the
    projection's sums first (a dependent second pass the engine does not run yet).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`b \phi k` for
    :math:`\phi = 1[b g > 0]`, :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` or
    :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as :class:`emafuse.AdamW`'s ``caution``; the
    buffer keeps the unmasked :math:`b`, the decay is not masked. On a parameter's first step
    :math:`b = g`, so only its zero gradients are masked. The counting shares the read-only pass
    of gsnr's sums (one extra pass on the other steps).
    """

    _rule = "sgd_sai"
    _takes_orthograd = False
    _flags_fresh_state = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
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
        check_hyper(lr=lr, eps=eps)
        check_caution_norm(caution_norm)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum parameter value: {momentum}")
        check_hyper(weight_decay=weight_decay)
        defaults = dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(check_finite, grad_clip, precision, caution=caution, caution_norm=caution_norm)

    def _scalar_dtype(self, key: str) -> torch.dtype:
        return torch.float64


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**common_hyper(group), "momentum": float(group["momentum"]), **caution_hyper(group)}
