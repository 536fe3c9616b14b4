"""SGD with momentum: torch's constructor and semantics, one fused native step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, common_hyper

__all__ = ["SGD"]


class SGD(FusedOptimizer, torch.optim.SGD):
    r"""Stochastic gradient descent with momentum, dampening and Nesterov momentum (Sutskever et
    al., ICML 2013), a drop-in replacement for :class:`torch.optim.SGD` whose step is one fused
    native call.

    .. math::
        d &\leftarrow g + \lambda p \\
        b &\leftarrow \mu b + (1-\tau) d \qquad (b \leftarrow d \text{ on the buffer's first step}) \\
        d &\leftarrow d + \mu b \text{ (nesterov)}, \quad d \leftarrow b \text{ otherwise} \\
        p &\leftarrow p - \mathrm{lr}\cdot d

    State: ``momentum_buffer`` (only when ``momentum != 0``), as torch. Arguments, validation and
    checkpoints are torch's; ``foreach``/``fused`` are accepted and ignored;
    ``differentiable=True`` raises :class:`emafuse.UnsupportedOptionError`. Extra keyword
    ``check_finite`` as in :class:`emafuse.AdamW`.
    """

    _rule = "sgd"
    _supports_complex = True
    _flags_fresh_state = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        check_finite: bool = False,
    ) -> None:
        torch.optim.SGD.__init__(
            self,
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._init_emafuse_defaults(check_finite)


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "nesterov": bool(group["nesterov"]),
        }
