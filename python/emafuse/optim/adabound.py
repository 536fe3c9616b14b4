"""AdaBound / AMSBound and AdaBoundW: the official constructors and semantics (Luolc/AdaBound),
one fused native step."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper, scalar

__all__ = ["AdaBound", "AdaBoundW"]


class AdaBound(FusedOptimizer):
    r"""AdaBound and AMSBound (Luo, Xiong, Liu, Sun, "Adaptive Gradient Methods with Dynamic Bound
    of Learning Rate", ICLR 2019, arXiv:1902.09843), matching the official ``adabound.AdaBound``
    0.0.5 with one fused native call per step.

    Adam whose per-element step size is clipped into bounds that close in on an SGD learning rate
    :math:`f` as :math:`t` grows:

    .. math::
        g &\leftarrow g + \lambda p \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2
            \qquad (\bar v = \max(\bar v, v) \text{ with amsbound, else } \bar v = v) \\
        f &= \text{final\_lr}\cdot \mathrm{lr} / \text{base\_lr}, \quad
            \eta_l = f\Big(1 - \frac{1}{\gamma t + 1}\Big), \quad \eta_u = f\Big(1 + \frac{1}{\gamma t}\Big) \\
        p &\leftarrow p - \operatorname{clamp}\Big(\mathrm{lr}\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            \Big/ (\sqrt{\bar v} + \epsilon),\ \eta_l,\ \eta_u\Big)\, m

    ``base_lr`` is the group's learning rate when the group was added, so the final learning rate
    follows an LR scheduler's ratio. emafuse stores it in each param group (key ``base_lr``), so it
    survives ``state_dict()`` and groups added later get their own (the official keeps a list made
    in ``__init__``, is not saved, and silently skips groups added later). State: ``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsbound).

    Extra ``ValueError`` checks (open question settled for users): ``lr == 0`` (``base_lr`` is a
    divisor), ``gamma == 0`` (division by zero at the first step) and ``weight_decay < 0``. Extra
    keywords: ``maximize``, ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`). ``p.grad`` is never
    written.

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
    :math:`\phi = 1[m g > 0]` (:math:`g` with its L2 term), :math:`k = 1/\max(\operatorname{mean}
    \phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor, as :class:`emafuse.AdamW`'s
    ``caution`` (the bounded step size is positive, so :math:`m` carries the update's sign;
    AdaBoundW's decay is not masked). One extra read-only pass; not combinable with ``orthograd``.
    """

    _rule = "adabound"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsbound: bool = False,
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
        check_caution_norm(caution_norm)
        if not 0.0 <= final_lr:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma}")
        if lr == 0:
            raise ValueError(f"Invalid learning rate: {lr} (AdaBound divides by the initial learning rate)")
        if gamma == 0:
            raise ValueError(f"Invalid gamma parameter: {gamma} (the upper bound divides by gamma)")
        check_hyper(weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsbound=amsbound,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", scalar(group["lr"]))
        if not group["base_lr"] > 0:
            raise ValueError(f"Invalid learning rate: {group['base_lr']} (AdaBound divides by the initial learning rate)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; a checkpoint of the official AdaBound has no ``base_lr`` in
        its groups: each group then keeps this optimizer's ``base_lr`` (the official code, too,
        takes its base learning rates from its constructor, not from the checkpoint)."""
        own = [g["base_lr"] for g in self.param_groups]
        missing = ["base_lr" not in g for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        for group, base_lr, was_missing in zip(self.param_groups, own, missing):
            if was_missing:
                group["base_lr"] = base_lr

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("base_lr", scalar(group["lr"]))

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "final_lr": float(group["final_lr"]),
            "gamma": float(group["gamma"]),
            "base_lr": float(group["base_lr"]),
            "amsbound": bool(group["amsbound"]),
            **caution_hyper(group),
        }


class AdaBoundW(AdaBound):
    r"""AdaBoundW: :class:`AdaBound` with decoupled weight decay, as the official
    ``adabound.AdaBoundW`` (Luolc/AdaBound ``adabound/adabound.py``; the PyPI package 0.0.5 ships
    only ``AdaBound``), with one fused native call per step.

    The same arguments, defaults, checks, state and checkpoints as :class:`AdaBound`; only the
    decay differs. The gradient gets no L2 term, and the decay is subtracted after the bounded
    step, from the parameter as it was before the step and **not scaled by the learning rate**
    (so a schedule does not decay it, and useful values are small, e.g. ``1e-4``):

    .. math::
        p \leftarrow p_{old} - \operatorname{clamp}(\ldots)\, m - \lambda\, p_{old}

    pytorch_optimizer's ``AdaBound(weight_decouple=True, fixed_decay=True)`` computes the same
    update (it scales ``p`` by :math:`1-\lambda` first). A checkpoint of either class loads into
    the other: their state is the same.
    """

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**super()._hyper(group), "decoupled": True}
