"""Stable-SPAM: the official constructor and semantics (galore_torch/stablespam.py), one fused
native step with the per-tensor reductions inside it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["StableSPAM"]

# The per-parameter scalar state kept at full precision (the step counter is torch's float).
_NORMS = ("m_max_t", "m_norm_t", "v_norm_t")


class StableSPAM(FusedOptimizer):
    r"""Stable-SPAM (Huang, Hu, Zhang, Jin, Li, Shen, Chen, Liu, Wen, Wang, Liu, "Stable-SPAM: How
    to Train in 4-Bit More Stably than 16-Bit Adam", arXiv:2502.17055), matching the official class
    (``galore_torch/stablespam.py``, ``StableSPAM``) with one fused native call per step: the two
    per-tensor reductions it needs (the largest gradient magnitude, then the norm of the clipped
    gradient) are read-only passes of the same call.

    With :math:`T` the number of this ``step()`` call (optimizer-wide), :math:`k` the parameter's
    step counter, :math:`\sigma = \eta_{min} + (1-\eta_{min})(1 + \cos(\pi T/(T_{total}+1)))/2`
    (1 without ``total_T``), :math:`\beta_1' = \sigma\beta_1`, :math:`\gamma_1' = \sigma\gamma_1`,
    :math:`\theta` = ``gamma3``:

    .. math::
        &p \leftarrow p\,(1 - \mathrm{lr}\,\lambda), \qquad k \leftarrow k + 1 \\
        &M = \max|g|, \quad m_{max} \leftarrow \theta m_{max} + (1-\theta) M, \quad
            \tau = m_{max}/(1-\theta^k) \\
        &g \leftarrow g\,\tau/M \quad\text{where } |g| > \tau \quad\text{(AdaClip)} \\
        &n = \lVert g\rVert, \quad m_n \leftarrow \gamma_1' m_n + (1-\gamma_1') n, \quad
            v_n \leftarrow \gamma_2 v_n + (1-\gamma_2) n^2 \\
        &g \leftarrow g\,\frac{c}{n}, \quad c = \frac{m_n/(1-\gamma_1'^k)}{\sqrt{v_n/(1-\gamma_2^k)} + \epsilon}
            \quad\text{(AdaNorm; skipped when } n = 0) \\
        &m \leftarrow \beta_1' m + (1-\beta_1') g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        &p \leftarrow p - \frac{\mathrm{lr}}{1-\beta_1'^{k}}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^{k}} + \epsilon}

    (``amsgrad``: the running maximum of :math:`v` in the denominator). Every ``update_proj_gap``
    steps (:math:`T \bmod \Delta T = 0`; 0 disables it) the moments are reset and :math:`k` restarts
    at 1 for the bias corrections.

    The reset, an open question of the spec (§11, §22): ``reset_mode="faithful"`` (default)
    reproduces the official code, which replaces the moments with zeros *after* binding the old
    ones, so the reset step itself is computed from the old moments with :math:`k = 1` bias
    corrections and the zeros take effect from the next step; ``reset_mode="clean"`` is the
    paper's evident intent: the reset step starts from zero moments (a fresh first Adam step).
    Either way AdaClip and AdaNorm use the counter before the reset, as the official does, and
    :math:`m_{max}, m_n, v_n` are never reset.

    State per parameter: ``step`` (an int in ``state_dict()``, as the official keeps it),
    ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and the scalars ``m_max_t``,
    ``m_norm_t``, ``v_norm_t`` (0-dim float64 CPU tensors; float32 on CUDA; the official keeps them
    in the gradient's dtype). The optimizer-level counter ``total_steps`` (the official's
    attribute, not saved by it) lives in every param group, where ``state_dict()`` saves it;
    official checkpoints load with it at 0. ``gamma1``, ``gamma2``, ``gamma3``, ``total_T``,
    ``eta_min`` and ``update_proj_gap`` are optimizer-wide (the official keeps them as
    attributes): a param group giving another value raises ``ValueError``. ``gamma1=-1`` means
    ``betas[0]``, as in the official. Steps skipped by AMP (``GradScaler`` found inf/NaN) advance
    no counter.

    Differences, on purpose: ``p.grad`` is never written (the official clips it in place); the
    step returns the loss only (the official returns ``(loss, norm)`` and prints three norms);
    extra ``ValueError`` checks (spec §11 (b)): ``weight_decay`` < 0, ``gamma1`` neither -1 nor in
    [0, 1), ``gamma2``, ``gamma3`` not in [0, 1), ``total_T`` < 1, ``eta_min`` not in [0, 1],
    ``update_proj_gap`` < 0. Sums are accumulated in float64 (the official: in the gradient's
    dtype). Extra keywords: ``reset_mode``, ``maximize``, ``check_finite``, ``grad_clip`` and the
    lean-state ``state_dtype`` / ``rounding`` (as :class:`emafuse.AdamW`). ``orthograd`` is not
    taken: the clipping statistics would have to be gathered over the projected gradient.

    ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask
    (Liang et al., arXiv:2411.16085; spec §20) on the step: it reads :math:`m \phi k` for
    :math:`\phi = 1[m g > 0]` (:math:`g` clipped and rescaled: the gradient the moments see),
    :math:`k = 1/\max(\operatorname{mean}\phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)`
    per tensor; the decay is not masked. One more read-only pass.
    """

    _rule = "stable_spam"
    _int_step_in_state_dict = True
    _takes_orthograd = False
    _optimizer_wide = ("gamma1", "gamma2", "gamma3", "total_T", "eta_min", "update_proj_gap", "reset_mode")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        total_T: int | None = None,
        eta_min: float = 0.5,
        update_proj_gap: int = 1000,
        *,
        reset_mode: str = "faithful",
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
        check_caution_norm(caution_norm)
        check_hyper(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
        if gamma1 != -1 and not 0.0 <= gamma1 < 1.0:
            raise ValueError(f"Invalid gamma1: {gamma1} (expected -1, meaning betas[0], or a value in [0, 1))")
        for name, value in (("gamma2", gamma2), ("gamma3", gamma3)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid {name}: {value} (expected a value in [0, 1))")
        if total_T is not None and not total_T >= 1:
            raise ValueError(f"Invalid total_T: {total_T} (expected None or a number of steps >= 1)")
        if not 0.0 <= eta_min <= 1.0:
            raise ValueError(f"Invalid eta_min: {eta_min} (expected a value in [0, 1])")
        if not 0 <= update_proj_gap:
            raise ValueError(f"Invalid update_proj_gap: {update_proj_gap} (expected 0, meaning no momentum reset, or a period >= 1)")
        if reset_mode not in ("faithful", "clean"):
            raise ValueError(f"Invalid reset_mode: {reset_mode!r} (expected 'faithful', as the official code, or 'clean')")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            gamma1=float(betas[0]) if gamma1 == -1 else gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            total_T=total_T,
            eta_min=eta_min,
            update_proj_gap=update_proj_gap,
            reset_mode=reset_mode,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(check_finite, grad_clip, precision, caution=caution, caution_norm=caution_norm)
        self._this_step: tuple[float, bool] = (1.0, False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # the counter is optimizer-wide: every group holds it
        self.param_groups[-1]["total_steps"] = self.param_groups[0].get("total_steps", 0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("total_steps", 0)
        self._this_step = (1.0, False)

    def _scalar_dtype(self, key: str) -> torch.dtype:
        return torch.float64 if key in _NORMS else super()._scalar_dtype(key)

    def _begin_step(self) -> None:
        d = self.defaults
        t = int(self.param_groups[0]["total_steps"]) + 1
        total = d["total_T"]
        sigma = 1.0 if total is None else d["eta_min"] + (1.0 - d["eta_min"]) * (1.0 + math.cos(math.pi * t / (total + 1))) / 2.0
        gap = d["update_proj_gap"]
        self._this_step = (sigma, gap != 0 and t % gap == 0)

    def _end_step(self, applied: bool) -> None:
        if applied:
            total = int(self.param_groups[0]["total_steps"]) + 1
            for group in self.param_groups:
                group["total_steps"] = total

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        sigma, reset = self._this_step
        d = self.defaults
        hyper = common_hyper(group)
        return {
            **hyper,
            "beta1": hyper["beta1"] * sigma,
            "gamma1": float(d["gamma1"]) * sigma,
            "gamma2": float(d["gamma2"]),
            "theta": float(d["gamma3"]),
            "amsgrad": bool(group["amsgrad"]),
            "reset": reset,
            "clean_reset": d["reset_mode"] == "clean",
            **caution_hyper(group),
        }
