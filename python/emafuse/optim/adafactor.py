"""Adafactor: ``torch.optim.Adafactor``'s constructor and semantics, one fused native step with
the factored second moments' row and column statistics gathered inside it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .. import _dtensor
from ..errors import UnsupportedOptionError
from ._base import FusedOptimizer, GradClip, Rounding, StateDType, scalar

__all__ = ["Adafactor"]


class Adafactor(FusedOptimizer, torch.optim.Adafactor):
    r"""Adafactor (Shazeer, Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018, arXiv:1804.04235), a drop-in replacement for :class:`torch.optim.Adafactor` (torch
    >= 2.5: its arguments, validation, state and checkpoints) whose step is one fused native call.

    With :math:`t` the parameter's step, :math:`w = t^{\text{beta2\_decay}}`,
    :math:`\rho = \min(\mathrm{lr}, 1/\sqrt{t})` and :math:`\alpha = \max(\epsilon_2,
    \mathrm{RMS}(p))\,\rho` (RMS of the weights before the step):

    .. math::
        R &\leftarrow \mathrm{lerp}(R, \overline{g^2}^{\,\text{row}}, w), \qquad
        C \leftarrow \mathrm{lerp}(C, \overline{g^2}^{\,\text{col}}, w), \qquad
        \hat V = \frac{R\,C}{\max(\bar R, \epsilon_1)} \\
        U &= g / \sqrt{\max(\hat V, \epsilon_1^2)}, \qquad
        p \leftarrow p\,(1 - \mathrm{lr}\,\lambda) - \frac{\alpha}{\max(1, \mathrm{RMS}(U)/d)}\,U

    for a parameter of two or more dimensions, factored over its last two (the leading ones index
    separate matrices; state ``row_var`` of shape ``[..., rows, 1]`` and ``col_var`` of shape
    ``[..., 1, cols]``, in the parameter's dtype); vectors and scalars keep a full second moment
    ``variance``, :math:`v \leftarrow \mathrm{lerp}(v, g^2, w)`, :math:`\hat V = v`. ``eps=(None,
    ...)`` takes :math:`\epsilon_1` as the machine epsilon of the dtype of the group's first
    parameter with a gradient, as torch does (large for bfloat16: 7.8e-3, so :math:`\hat V` is
    floored at 6.1e-5 there). State: ``step`` (a float32 tensor, as torch's), ``row_var`` /
    ``col_var`` or ``variance``; checkpoints load both ways with ``torch.optim.Adafactor``.

    The reductions run inside the step: a read-only pass adds g² over every row and column
    (float64, reproducible bit for bit), the small factors are updated on the host, a second pass
    gathers :math:`\|p\|^2` and :math:`\|U\|^2`, and the update pass recomputes :math:`U`. torch
    computes the norms in the parameter's dtype and divides the product :math:`R\,C` by the rows'
    mean, where emafuse divides :math:`C` first (rounding differences of an ulp).

    Extra keywords: ``check_finite``, ``grad_clip`` and the lean-state ``state_dtype`` /
    ``rounding`` / ``weight_correction`` (as :class:`emafuse.AdamW`). With ``state_dtype="8bit"``
    only the full ``variance`` of vectors is stored as 8-bit codes; the factors keep float32 (they
    are already a vanishing share of the memory), and with ``rounding="stochastic"`` they are
    rounded to nearest (they are stored apart from the elements' stores). ``foreach`` is accepted
    and ignored (there is one fused path). Not taken: ``orthograd``, ``caution``. On CUDA devices
    Adafactor raises: the CUDA backend does not update factored state yet. DTensor (FSDP2)
    parameters of two or more dimensions are refused: their row and column statistics would have
    to be added across ranks, which emafuse does not do yet.
    """

    _rule = "adafactor"
    _takes_orthograd = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
    ) -> None:
        # torch's checks and messages, and its defaults (foreach, maximize)
        torch.optim.Adafactor.__init__(
            self, params, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach, maximize=maximize
        )
        self._init_emafuse_defaults(check_finite, grad_clip, (state_dtype, rounding, rounding_seed, weight_correction))

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch: the machine epsilon of the first parameter stepped
            first = next((p for p in group["params"] if p.grad is not None), None)
            eps1 = torch.finfo(first.dtype).eps if first is not None else 0.0
        return {
            "lr": scalar(group["lr"]),
            "beta2_decay": float(group["beta2_decay"]),
            "eps1": float(eps1),
            "eps2": float(eps2),
            "d": float(group["d"]),
            "weight_decay": float(group["weight_decay"]),
        }

    def _state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        dtype = super()._state_dtype(p, group)
        # the factors (a value per row and per column) stay float32 under "8bit"
        return torch.float32 if dtype == torch.uint8 and p.dim() >= 2 else dtype

    def _param_flags(self, p: Tensor) -> dict[str, bool]:
        return {"factored": p.dim() >= 2}

    def _new_slot(self, p: Tensor, name: str, dtype: torch.dtype) -> Tensor:
        shape = list(p.shape)
        if name == "row_var":
            shape[-1] = 1
        elif name == "col_var":
            shape[-2] = 1
        else:
            return super()._new_slot(p, name, dtype)
        return p.new_zeros(shape, dtype=dtype)

    def _check_operands(self, gi: int, p: Tensor, g: Tensor) -> None:
        super()._check_operands(gi, p, g)
        if p.dim() >= 2 and _dtensor.is_dtensor(p):
            raise UnsupportedOptionError(
                f"Adafactor: param group {gi}: a parameter of shape {tuple(p.shape)} is a DTensor; Adafactor's factored second "
                "moments need sums over whole rows and columns, which emafuse does not add across ranks: use torch.optim."
                "Adafactor for DTensor (FSDP2) parameters of two or more dimensions"
            )
