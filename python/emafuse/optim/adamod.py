"""AdaMod: the official lancopku/AdaMod (``adamod`` 0.0.3) constructor and semantics, one fused step."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["AdaMod"]


class AdaMod(FusedOptimizer):
    r"""AdaMod (J. Ding, X. Ren, R. Luo, X. Sun, "An Adaptive and Momental Bound Method for
    Stochastic Learning", arXiv:1910.12249): Adam whose element-wise step sizes are bounded by
    their own EMA, as the official implementation (``adamod`` 0.0.3), in one fused native call.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t` (per parameter):

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        \eta &\leftarrow \frac{\mathrm{lr}\sqrt{1-\beta_2^t}/(1-\beta_1^t)}{\sqrt{v} + \epsilon} \\
        s &\leftarrow \beta_3 s + (1-\beta_3)\eta \\
        p &\leftarrow p - \min(\eta, s)\, m

    :math:`s` starts at 0, so the first steps are damped (a built-in warm-up), and the bound
    tames the huge step sizes of elements whose :math:`v` is near zero.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_lr``. Arguments, defaults
    (``beta3=0.999`` as the reference's code; its docstring says 0.9999) and ``ValueError``
    messages are the reference's.

    Decisions: weight decay is decoupled, as the reference (written there as
    :math:`p \leftarrow p - \mathrm{lr}\lambda p`); extra check ``weight_decay < 0`` raises
    ``ValueError``; extra keywords ``maximize`` (negate the gradient), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (see
    :class:`emafuse.AdamW`). ``step`` is a 0-dim float32 tensor in the live state
    (as torch's optimizers keep it) and an int in ``state_dict()`` (as the reference keeps it);
    ``load_state_dict`` takes either.

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
    :math:`\phi = 1[m g > 0]`, :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` or
    :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as :class:`emafuse.AdamW`'s ``caution`` (the
    bounded step size is positive, so :math:`m` carries the update's sign). One extra read-only
    pass; not combinable with ``orthograd``.
    """

    _rule = "adamod"
    _int_step_in_state_dict = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
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
        check_hyper(lr=lr, eps=eps, betas=betas[:2])
        if not 0.0 <= beta3 < 1.0:
            raise ValueError(f"Invalid beta3 parameter: {beta3}")
        check_hyper(weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**common_hyper(group), "beta3": float(group["beta3"]), **caution_hyper(group)}
