"""SGD with momentum: torch's constructor and semantics, one fused native step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd as torch_sgd

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, common_hyper, scalar

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
    ``differentiable=True`` raises :class:`emafuse.UnsupportedOptionError`. Extra keywords
    ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` as in :class:`emafuse.AdamW` (SGD⊥ with
    ``orthograd=True``).

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): Cautious SGD
    (Liang et al., arXiv:2411.16085; spec §20): the step reads :math:`d \phi k` for the final
    direction :math:`d` (the buffer, or its Nesterov look-ahead) with :math:`\phi = 1[d g > 0]`
    (:math:`g` with its weight decay), :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` or
    :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor; the buffer keeps the unmasked direction.
    One extra read-only pass; not combinable with ``orthograd``, nor with sparse gradients
    (:class:`emafuse.UnsupportedOptionError`). Without momentum the mask only drops zero gradients.
    """

    _rule = "sgd"
    _supports_complex = True
    _flags_fresh_state = True
    _supports_sparse_grads = True

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
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )


    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "nesterov": bool(group["nesterov"]),
            **caution_hyper(group),
        }

    def _step_sparse(self, params: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Sparse gradients (e.g. ``nn.Embedding(sparse=True)``): torch's own single-tensor SGD,
        group by group, with the momentum buffers kept in ``self.state`` as torch keeps them. With
        AMP the gradients are unscaled in place first (as the fused kernel leaves dense ones), and
        a step with inf/NaN anywhere changes none of them (reading the flag is a host sync, paid
        only when there are sparse gradients)."""
        if found_inf is not None and float(found_inf.sum()) != 0.0:
            return
        chosen = {id(p) for p in params}
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in chosen]
            if not ps:
                continue

            grads = [p.grad for p in ps]
            if grad_scale is not None:
                inv = 1.0 / float(grad_scale.sum())
                for g in grads:
                    g.mul_(inv)
            momentum = group["momentum"]
            buffers = [self.state[p].get("momentum_buffer") if p in self.state else None for p in ps]
            torch_sgd(
                ps, grads, buffers, has_sparse_grad=True, foreach=False,
                weight_decay=group["weight_decay"], momentum=momentum, lr=scalar(group["lr"]),
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            )
            if momentum != 0:
                for p, buf in zip(ps, buffers):
                    self.state[p]["momentum_buffer"] = buf
