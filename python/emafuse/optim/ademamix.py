"""AdEMAMix: the official apple/ml-ademamix constructor and semantics, one fused step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["AdEMAMix"]


class AdEMAMix(FusedOptimizer):
    r"""AdEMAMix (M. Pagliardini, P. Ablin, D. Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", arXiv:2409.03137): Adam with a second, slow EMA of the gradient mixed into the
    numerator, as the official implementation (apple/ml-ademamix), in one fused native call.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t` (per parameter):

    .. math::
        m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g
            \qquad (\beta_1 = 0:\ m_1 = g,\ \text{no state}) \\
        m_2 &\leftarrow \beta_{3,t} m_2 + (1-\beta_{3,t}) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \mathrm{lr}\left(
            \frac{m_1/(1-\beta_1^t) + \alpha_t m_2}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
            + \lambda p\right)

    The slow EMA is not bias-corrected. Warm-ups (both off by default): with ``alpha_warmup``
    :math:`T_\alpha`, :math:`\alpha_t = \alpha\, t/T_\alpha` for :math:`t < T_\alpha`; with
    ``beta3_warmup`` :math:`T_{\beta_3}`, :math:`\beta_{3,t}` moves linearly in half-life from
    :math:`\beta_1` to :math:`\beta_3`: with :math:`a = t/T_{\beta_3}` and
    :math:`h(\beta) = \ln 0.5/\ln(\beta + 10^{-8}) - 1`,
    :math:`\beta_{3,t} = 0.5^{1/((1-a)h(\beta_1) + a h(\beta_3) + 1)}` for :math:`t < T_{\beta_3}`.
    The paper recommends :math:`T_\alpha = T_{\beta_3}` = the number of training steps and
    :math:`\alpha \in [4, 10]`.

    State: ``step``, ``exp_avg_fast`` (not kept when :math:`\beta_1 = 0`), ``exp_avg_slow``,
    ``exp_avg_sq``. Arguments, defaults and ``ValueError`` messages are the reference's.

    Decisions and differences from the reference:

    * ``t_alpha_beta3`` (pytorch_optimizer's name) is accepted as shorthand for setting
      ``alpha_warmup`` and ``beta3_warmup`` to the same value (also in a parameter group dict);
      giving it together with a different explicit warm-up raises ``ValueError``. The β3
      schedule is the reference's (no ``min(·, β3)`` clip, unlike pytorch_optimizer).
    * States are float32 for bf16/fp16 parameters (``fp32_states=True``, per group): with
      :math:`1-\beta_3 = 10^{-4}` a bf16 slow EMA stops moving. This departs from torch's
      state-dtype convention; ``fp32_states=False`` gives states of the parameter's dtype.
      ``load_state_dict`` keeps (or makes) such states float32.
    * With :math:`\beta_1 = 0` no ``exp_avg_fast`` entry is stored (the reference stores None).
    * Extra checks: ``betas`` must have three entries; negative warm-ups raise ``ValueError``.
    * ``step`` is a 0-dim float32 tensor in the live state (as torch's optimizers keep it) and
      an int in ``state_dict()`` (as the reference keeps it); ``load_state_dict`` takes either.
    * Extra keywords: ``maximize`` (negate the gradient), ``check_finite``, ``orthograd`` and the lean-state ``state_dtype`` / ``rounding`` (see
      :class:`emafuse.AdamW`).
    * ``caution`` (default False) and ``caution_norm`` (``"mean"`` or ``"count"``): Cautious
      AdEMAMix (Liang et al., arXiv:2411.16085), as pytorch_optimizer's ``AdEMAMix(cautious=True)``:
      the fast term reads :math:`m_1 \phi k` in place of :math:`m_1`, with :math:`\phi = 1[m_1 g >
      0]` (the slow EMA and the weight decay are not masked) and per tensor :math:`k =
      1/\max(\operatorname{mean}\phi, 10^{-3})` (``"mean"``, timm's) or :math:`k =
      \mathrm{numel}/(\sum\phi + 1)` (``"count"``, pytorch_optimizer's); one extra read-only pass
      over ``exp_avg_fast`` and the gradient. With :math:`\beta_1 = 0` the mask is of :math:`g`
      itself (all ones except zeros). Not combinable with ``orthograd``.
    """

    _rule = "ademamix"
    _int_step_in_state_dict = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: float | None = None,
        alpha_warmup: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0,
        *,
        t_alpha_beta3: float | None = None,
        fp32_states: bool = True,
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
        check_hyper(lr=lr, eps=eps)
        if len(betas) != 3:
            raise ValueError(f"Invalid betas: expected (beta1, beta2, beta3), got {betas}")
        check_hyper(betas=betas, weight_decay=weight_decay)
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        alpha_warmup, beta3_warmup = _warmups(alpha_warmup, beta3_warmup, t_alpha_beta3)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            alpha=alpha,
            beta3_warmup=beta3_warmup,
            alpha_warmup=alpha_warmup,
            weight_decay=weight_decay,
            fp32_states=fp32_states,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "t_alpha_beta3" in param_group:
            param_group = dict(param_group)
            t = param_group.pop("t_alpha_beta3")
            a, b = _warmups(param_group.get("alpha_warmup"), param_group.get("beta3_warmup"), t)
            param_group["alpha_warmup"], param_group["beta3_warmup"] = a, b
        super().add_param_group(param_group)


    def _default_state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        fp32 = group.get("fp32_states", self.defaults.get("fp32_states", True))
        if fp32 and p.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return p.dtype

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        _beta1, _beta2, _beta3 = group["betas"]
        aw, bw = group["alpha_warmup"], group["beta3_warmup"]
        return {
            **common_hyper(group),
            "alpha": float(group["alpha"]),
            # The reference switches a warm-up on with `step < warmup`: None and 0 never do.
            "alpha_warmup": 0.0 if aw is None else float(aw),
            "beta3_warmup": 0.0 if bw is None else float(bw),
            **caution_hyper(group),
        }


def _warmups(alpha_warmup, beta3_warmup, t_alpha_beta3):
    """Resolve the ``t_alpha_beta3`` shorthand and check the warm-ups."""
    if t_alpha_beta3 is not None:
        for name, value in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
            if value is not None and value != t_alpha_beta3:
                raise ValueError(f"t_alpha_beta3={t_alpha_beta3} conflicts with {name}={value}")
        alpha_warmup = beta3_warmup = t_alpha_beta3
    for name, value in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
        if value is not None and not 0.0 <= value:
            raise ValueError(f"Invalid {name} value: {value}")
    return alpha_warmup, beta3_warmup
