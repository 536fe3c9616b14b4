"""Adafactor in both its reference semantics, ``torch.optim.Adafactor``'s (:class:`Adafactor`)
and Hugging Face transformers' (:class:`AdafactorHF`): their constructors, each one fused native
step with the factored second moments' row and column statistics gathered inside it."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .. import _dtensor
from ..errors import UnsupportedOptionError
from ._base import FusedOptimizer, GradClip, Rounding, StateDType, check_hyper, scalar

__all__ = ["Adafactor", "AdafactorHF"]


class _Factored(FusedOptimizer):
    """What both Adafactors share: the rule's ``factored`` flag follows the parameter (two or more
    dimensions), whose two factors hold a value per row and one per column of its matrices (the
    last two dimensions), and stay float32 under ``state_dtype="8bit"``."""

    _takes_orthograd = False
    # The state names of the row and column factors, and whether they keep the factored dimension
    # (torch: [..., rows, 1] and [..., 1, cols]) or drop it (transformers: [..., rows], [..., cols]).
    _factor_names: ClassVar[tuple[str, str]]
    _factor_keepdim: ClassVar[bool]

    def _param_flags(self, p: Tensor) -> dict[str, bool]:
        return {"factored": p.dim() >= 2}

    def _new_slot(self, p: Tensor, name: str, dtype: torch.dtype) -> Tensor:
        if name not in self._factor_names:
            return super()._new_slot(p, name, dtype)
        shape = list(p.shape)
        dim = -1 if name == self._factor_names[0] else -2
        if self._factor_keepdim:
            shape[dim] = 1
        else:
            del shape[dim]
        if _dtensor.is_dtensor(p):
            return _dtensor.new_factor(p, self._factor_names.index(name), shape, dtype)
        return p.new_zeros(shape, dtype=dtype)

    def _state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        dtype = super()._state_dtype(p, group)
        # the factors (a value per row and per column) stay float32 under "8bit"
        return torch.float32 if dtype == torch.uint8 and p.dim() >= 2 else dtype

    def _check_operands(self, gi: int, p: Tensor, g: Tensor) -> None:
        super()._check_operands(gi, p, g)
        if p.dim() >= 2 and _dtensor.shard_dim(p) == p.dim() - 1:
            raise UnsupportedOptionError(
                f"{type(self).__name__}: param group {gi}: a parameter of shape {tuple(p.shape)} is a DTensor sharded on its last "
                f"dim ({p.placements}); Adafactor's factored second moments add each row across its columns, which emafuse does "
                "on whole rows only: shard it on dim 0 (as FSDP2's fully_shard does) or another dim but the last, or replicate it"
            )


class Adafactor(_Factored, torch.optim.Adafactor):
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
    computes the norms in the parameter's dtype and takes the root of :math:`R\,C/\bar R` per
    element, where emafuse folds :math:`\bar R` into :math:`C` and takes the roots of :math:`R` and
    :math:`C` once per row and column, :math:`U = g/\max(\sqrt R\sqrt{C'}, \epsilon_1)`
    (rounding differences of an ulp or two). The row and
    column sums live in a float64 working array that emafuse keeps from one step to the next
    (allocating it afresh costs more than the step): 8 bytes per factor value, under 2 MB for
    GPT-2 or ViT-B/16 shapes, but 254 MB for ResNet-50's, whose 1×1 and 3×3 kernels torch factors
    too (their factors are as large as the weights).

    Extra keywords: ``check_finite``, ``grad_clip`` and the lean-state ``state_dtype`` /
    ``rounding`` / ``weight_correction`` (as :class:`emafuse.AdamW`). With ``state_dtype="8bit"``
    only the full ``variance`` of vectors is stored as 8-bit codes; the factors keep float32 (they
    are already a vanishing share of the memory), and with ``rounding="stochastic"`` they are
    rounded to nearest (they are stored apart from the elements' stores). ``foreach`` is accepted
    and ignored (there is one fused path). Not taken: ``orthograd``, ``caution``. On CUDA devices
    Adafactor raises: the CUDA backend does not update factored state yet.

    DTensor (FSDP2) parameters step on their local shards. ``row_var`` is sharded like the
    parameter; ``col_var`` too where the parameter is sharded on a leading dim, but replicated
    (``Replicate()``, whole on every rank) where the matrices' rows are split (``fully_shard``'s
    dim-0 sharding of a 2-D weight): its column sums, and the rows' mean :math:`\bar R`, are then
    added across the mesh, one float64 ``all_reduce`` of a value per column and two per matrix
    per step, besides the one for :math:`\|p\|^2` and :math:`\|U\|^2` per pass. The sharded step
    equals the unsharded one to round-off (float64 sums added in another order). Sharding on the
    last dim (splitting rows) is refused.
    """

    _rule = "adafactor"
    _factor_names = ("row_var", "col_var")
    _factor_keepdim = True

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


class AdafactorHF(_Factored):
    r"""Adafactor as Hugging Face transformers implements it (``transformers.optimization.Adafactor``,
    after fairseq's; Shazeer, Stern, ICML 2018, arXiv:1804.04235), a drop-in replacement for it
    (its arguments, validation, state and checkpoints) whose step is one fused native call.

    With :math:`t` the parameter's step, :math:`b = 1 - t^{\text{decay\_rate}}`, :math:`q = g^2 +
    \epsilon_1`, the step size :math:`\rho = \min(10^{-2}, 1/\sqrt t)` (``relative_step``; with
    ``warmup_init`` the cap is :math:`10^{-6} t`) or ``lr``, and :math:`\alpha = \max(\epsilon_2,
    \mathrm{RMS}(p))\,\rho` (``scale_parameter``; else :math:`\rho`), RMS of the weights before the
    step:

    .. math::
        R &\leftarrow b R + (1-b)\,\bar q^{\,\text{row}}, \qquad
        C \leftarrow b C + (1-b)\,\bar q^{\,\text{col}}, \qquad
        U = g \Big/ \sqrt{\frac{R}{\bar R}\,C} \\
        u &= \frac{\alpha}{\max(1, \mathrm{RMS}(U)/\text{clip\_threshold})}\,U, \qquad
        m \leftarrow \beta_1 m + (1-\beta_1)\,u \ (\text{with } \beta_1), \qquad
        p \leftarrow p\,(1 - \alpha\lambda) - (m \text{ or } u)

    for a parameter of two or more dimensions, factored over its last two (the leading ones index
    separate matrices; state ``exp_avg_sq_row`` of shape ``[..., rows]`` and ``exp_avg_sq_col`` of
    shape ``[..., cols]``); vectors and scalars keep a full second moment ``exp_avg_sq``,
    :math:`v \leftarrow b v + (1-b) q`, :math:`U = g/\sqrt v`. State: ``step`` (saved as a Python
    int, as transformers' is), ``RMS`` (the weights' RMS before the last step, a float64 tensor
    beside the step, where transformers' has the parameter's dtype; ``_get_lr`` reads it, so
    ``transformers.optimization.AdafactorSchedule`` reports the step sizes),
    ``exp_avg`` with ``beta1``, and the second moments; checkpoints load both ways with
    transformers' class. The differences from :class:`emafuse.Adafactor` (torch's semantics): ε1
    added to g² rather than flooring V̂, relative step sizes, weight decay scaled by α rather than
    lr, the optional first moment.

    As transformers does, bfloat16 and float16 parameters keep float32 state and are updated in
    float32 (the result rounded once; with ``rounding="stochastic"`` stochastically). The
    reductions run inside the step: a read-only pass adds q over every row and column (float64,
    reproducible bit for bit), the small factors are updated on the host, a second pass gathers
    :math:`\|p\|^2` and :math:`\|U\|^2`, and the update pass recomputes :math:`U`; transformers
    reduces in float32 (rounding differences of a few ulps). The sums' working array is kept
    between steps, as :class:`Adafactor`'s.

    Differences, on purpose: ``relative_step=False`` without ``lr`` raises ``ValueError`` here
    (transformers fails at its first step with a ``TypeError``), and so do numbers out of range,
    which transformers runs: ``lr``, ``eps`` or ``weight_decay`` < 0, ``clip_threshold`` <= 0,
    ``decay_rate`` > 0, ``beta1`` outside [0, 1) (also when a param group is changed later: the step
    refuses them and changes nothing). Extra keywords: ``maximize``,
    ``check_finite``, ``grad_clip`` and the lean-state ``state_dtype`` / ``rounding`` /
    ``weight_correction`` (as :class:`emafuse.AdamW`); under ``state_dtype="8bit"`` only vectors'
    state is stored as 8-bit codes (the factors, and then a matrix's ``exp_avg``, keep float32).
    Not taken: ``orthograd``, ``caution``. On CUDA devices matrices raise (the CUDA backend does
    not update factored state yet). DTensor (FSDP2) parameters step on their local shards as for
    :class:`Adafactor`: ``exp_avg_sq_col`` is replicated where the matrices' rows are split across
    ranks, and its column sums and the rows' mean added across the mesh (one more float64
    ``all_reduce`` per step).
    """

    _rule = "adafactor_hf"
    _int_step_in_state_dict = True
    _factor_names = ("exp_avg_sq_row", "exp_avg_sq_col")
    _factor_keepdim = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        maximize: bool = False,
        check_finite: bool = False,
        grad_clip: GradClip = None,
        state_dtype: StateDType = None,
        rounding: Rounding | None = None,
        rounding_seed: int = 0,
        weight_correction: bool = False,
    ) -> None:
        # transformers' checks and messages
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        if lr is None and not relative_step:
            raise ValueError("relative_step=False needs a step size: pass lr=... (or relative_step=True for Adafactor's own)")
        # checks transformers lacks (spec §18.B (b)): numbers that only make sense in range
        check_hyper(lr=lr, weight_decay=weight_decay)
        for i, e in enumerate(eps):
            if not 0.0 <= e:
                raise ValueError(f"Invalid epsilon value at index {i}: {e}")
        if not 0.0 < clip_threshold:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold} (expected a value > 0)")
        if not decay_rate <= 0.0:
            raise ValueError(f"Invalid decay_rate: {decay_rate} (expected a value <= 0: the weight of new data is t^decay_rate)")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1} (expected None or a value in [0, 1))")
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        self._init_emafuse_defaults(check_finite, grad_clip, (state_dtype, rounding, rounding_seed, weight_correction))

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        return {
            # (with relative steps lr is unused: None, or what a scheduler such as
            # AdafactorSchedule wrote there)
            "lr": 0.0 if group["relative_step"] or group["lr"] is None else scalar(group["lr"]),
            "eps1": float(eps1),
            "eps2": float(eps2),
            "clip_threshold": float(group["clip_threshold"]),
            "decay_rate": float(group["decay_rate"]),
            "beta1": 0.0 if beta1 is None else float(beta1),
            "weight_decay": float(group["weight_decay"]),
            "relative_step": float(bool(group["relative_step"])),
            "scale_parameter": float(bool(group["scale_parameter"])),
            "warmup_init": float(bool(group["warmup_init"])),
            "first_moment": beta1 is not None,
        }

    def _default_state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        # transformers keeps the state of bf16/fp16 parameters in float32 (their upcast gradient's)
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _scalar_dtype(self, key: str) -> torch.dtype:
        return torch.float64 if key == "RMS" else super()._scalar_dtype(key)

    @staticmethod
    def _get_lr(param_group: dict[str, Any], param_state: dict[str, Any]) -> float:
        """The step size α of the parameter's last step (transformers' ``_get_lr``, which
        ``AdafactorSchedule`` calls)."""
        step = float(param_state["step"])
        rho = param_group["lr"]
        if param_group["relative_step"]:
            cap = 1e-6 * step if param_group["warmup_init"] else 1e-2
            rho = min(cap, 1.0 / math.sqrt(step))
        scale = max(param_group["eps"][1], float(param_state["RMS"])) if param_group["scale_parameter"] else 1.0
        return scale * rho
