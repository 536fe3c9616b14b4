"""AdamP: the official constructor and semantics (clovaai adamp.py), one fused native step with
the per-row and per-tensor reductions inside it."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, check_hyper, common_hyper

__all__ = ["AdamP"]


class AdamP(FusedOptimizer):
    r"""AdamP (Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for
    Momentum Optimizers on Scale-invariant Weights", ICLR 2021, arXiv:2006.08217), matching the
    official ``adamp.AdamP`` (clovaai/AdamP) with one fused native call per step.

    Adam, whose step loses its radial component on weights that look scale-invariant (e.g. those
    followed by a normalisation layer), so that their norm stops growing:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        u &= \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
            \quad\Big(\text{nesterov: } \frac{\beta_1 m + (1-\beta_1) g}{\cdots}\Big) \\
        \cos_i &= \frac{|\langle g_i, p_i\rangle|}{\max(\|g_i\|, \epsilon)\,\max(\|p_i\|, \epsilon)}

    For a parameter of two or more dimensions, with rows :math:`i` its dim-0 slices of :math:`L`
    elements (output channels): if :math:`\max_i \cos_i < \delta/\sqrt{L}` every row is projected,
    :math:`u_i \leftarrow u_i - p_i \langle p_i, u_i\rangle / (\|p_i\| + \epsilon)^2`; else the same
    test and projection run over the whole tensor as one row (:math:`L` = numel). A projected
    tensor's weight decay is multiplied by ``wd_ratio``; then
    :math:`p \leftarrow p (1 - \mathrm{lr}\,\lambda\, r) - \frac{\mathrm{lr}}{1-\beta_1^t} u`. Vectors
    and scalars take the plain Adam step. Every projection quantity reads the weights before the
    step. State: ``step`` (per parameter, saved as a Python int as the official does),
    ``exp_avg``, ``exp_avg_sq``.

    The reductions run inside the step: one read-only pass gathers, per row, the four sums the
    tests and projections need (the direction recomputed from the new moments without storing
    them), then the update pass applies each row's own coefficient. The sums are float64 and
    reproducible bit for bit; the official computes them in the parameter's dtype.

    Differences, on purpose: extra ``ValueError`` checks (spec §9 (b)): ``lr``, ``eps``,
    ``weight_decay``, ``delta`` < 0, a beta outside [0, 1), ``wd_ratio`` outside [0, 1] (the
    official checks nothing). Rows are dim-0 slices in logical order whatever the memory layout
    (the official's ``view`` fails on channels_last weights). Extra keywords: ``maximize``,
    ``check_finite``, ``grad_clip`` and the lean-state ``state_dtype`` / ``rounding`` (as
    :class:`emafuse.AdamW`). With ``state_dtype="8bit"`` a parameter whose rows are not whole
    blocks of 256 elements keeps float32 state (each row is updated on its own). As a DTensor
    (FSDP2), a parameter must be sharded on dim 0 or replicated: a row must be whole on one rank.
    Not taken: ``orthograd`` (AdamP's own projection reads the raw gradient) and ``caution``.
    On CUDA devices AdamP raises: the CUDA backend does not gather per-row sums yet.
    """

    _rule = "adamp"
    _int_step_in_state_dict = True
    _takes_orthograd = False
    _row_sums = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
    ) -> None:
        check_hyper(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
        if not 0.0 <= delta:
            raise ValueError(f"Invalid delta: {delta} (expected a value >= 0)")
        if not 0.0 <= wd_ratio <= 1.0:
            raise ValueError(f"Invalid wd_ratio: {wd_ratio} (expected a value in [0, 1])")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(check_finite, grad_clip, precision)

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**common_hyper(group), "delta": float(group["delta"]), "wd_ratio": float(group["wd_ratio"]), "nesterov": bool(group["nesterov"])}
