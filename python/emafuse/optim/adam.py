"""Adam and AdamW: torch's constructors and semantics, one fused native step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import FusedOptimizer, GradClip, Precision, Rounding, StateDType, caution_hyper, check_caution_norm, common_hyper

__all__ = ["Adam", "AdamW"]


class _AdamRule(FusedOptimizer):
    """The Adam rule's slots and scalars, shared by Adam and AdamW."""

    _rule = "adam"
    _supports_complex = True
    _supports_fused_ema = True

    def _init_adam_options(
        self,
        check_finite: bool,
        grad_clip: GradClip,
        precision: Precision,
        orthograd: bool,
        orthograd_rescale: bool,
        caution: bool,
        caution_norm: str,
    ) -> None:
        """emafuse's options beyond torch's, in ``defaults`` and every group."""
        check_caution_norm(caution_norm)
        self._init_emafuse_defaults(
            check_finite, grad_clip, precision, orthograd=orthograd, orthograd_rescale=orthograd_rescale, caution=caution, caution_norm=caution_norm
        )

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {
            **common_hyper(group),
            "amsgrad": bool(group["amsgrad"]),
            "decoupled": bool(group.get("decoupled_weight_decay", False)),
            **caution_hyper(group),
        }


class AdamW(_AdamRule, torch.optim.AdamW):
    r"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), a
    drop-in replacement for :class:`torch.optim.AdamW` whose step is one fused native call.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t`:

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \qquad (\hat v = \max(\hat v, v) \text{ with amsgrad}) \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    Arguments, defaults, validation messages, state names (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict`` layout are torch's, so checkpoints move
    between ``torch.optim.AdamW`` and ``emafuse.AdamW`` in both directions. ``foreach`` and
    ``fused`` are accepted and ignored (emafuse always runs fused). For CUDA parameters ``step``
    lives on the device and is advanced inside the kernel (as torch's fused AdamW keeps it), so
    the step can be captured in a CUDA graph whatever ``capturable`` says; ``differentiable=True``
    raises :class:`emafuse.UnsupportedOptionError`.

    Extra keyword: ``check_finite`` (default False). When True, a step whose gradients hold NaN
    or infinity raises :class:`emafuse.NonFiniteError` and changes nothing (torch's behaviour,
    the default, lets NaN flow into the parameters).

    Extra keyword: ``grad_clip`` (default None), taken by every emafuse optimizer: a maximal
    global gradient norm (``torch.nn.utils.clip_grad_norm_``'s), an :class:`emafuse.ZClip` or an
    :class:`emafuse.AdaGC` (a factor per tensor), applied inside the step: one extra read-only
    pass for the norms of the unscaled gradients, then the update multiplies each gradient by its
    clip factor as it loads it (``p.grad`` is not written). Optimizer-wide; the clipper is saved
    in the state dict.

    Extra keywords ``orthograd`` (default False) and ``orthograd_rescale`` (default True), taken
    by every emafuse optimizer but SGD-SaI: ⊥Grad (L. Prieto et al., "Grokking at the Edge of
    Numerical Stability", ICLR 2025). Each parameter is stepped with its gradient :math:`u` made
    orthogonal to the parameter :math:`w` (both flattened, the whole tensor one vector):

    .. math::
        c = \frac{\langle w, u\rangle}{\langle w, w\rangle + 10^{-30}}, \qquad
        u_\perp = (u - c\,w)\,\frac{\|u\|}{\|u - c\,w\| + 10^{-30}}

    (the rescale to the original norm is the official code's; ``orthograd_rescale=False`` gives
    the paper's equation without it). AdamW⊥ is ``AdamW(..., orthograd=True)``, used by the paper
    without weight decay. The sums come from one extra read-only pass over the parameters and
    gradients, in float64, and :math:`u_\perp` is evaluated in float64 (rounded once to the
    compute type, so cancellation where :math:`u \approx c\,w` costs no accuracy);
    ``p.grad`` is never written (the official wrapper and
    pytorch_optimizer's ``OrthoGrad`` overwrite it). Decisions: a parameter with one element keeps
    its gradient (its :math:`u_\perp` is rounding noise that the rescale would blow up to
    :math:`|u|`; pytorch_optimizer 4.1 zeroes it instead); :math:`\|u_\perp\|` is derived from the
    three sums, so for a gradient parallel to its parameter to within about 1e-8 it differs from
    the norm of the materialised :math:`u_\perp`, which is rounding noise there anyway. Options
    that read per-tensor sums of the gradient themselves (Lion's ``caution``) cannot be combined
    with it (:class:`emafuse.UnsupportedOptionError`). Per param group, like ``maximize``.

    Extra keywords ``caution`` (default False) and ``caution_norm`` (``"mean"``, the default, or
    ``"count"``), on Adam too: Cautious AdamW (K. Liang, L. Chen, B. Liu, Q. Liu, "Cautious
    Optimizers: Improving Training with One Line of Code", arXiv:2411.16085), as timm's
    ``AdamWLegacy(caution=True)``. With the mask :math:`\phi = 1[m g > 0]` of the new first
    moment and this step's gradient (the update's sign is :math:`m`'s), the step reads
    :math:`m \phi k` in place of :math:`m`, with per tensor :math:`k = 1/\max(\operatorname{mean}
    \phi, 10^{-3})` (``"mean"``, timm's) or :math:`k = \mathrm{numel}/(\sum\phi + 1)`
    (``"count"``, the paper's first release); weight decay is not masked, and with Adam's L2
    decay :math:`g` includes it (the gradient the moments see). It costs one extra read-only pass
    over ``exp_avg`` and the gradient; if no element agrees, only decay moves the parameter.

    fp32, fp64, bf16 and fp16 parameters are supported; math runs in fp32 (fp64 for fp64
    parameters) and the state has the parameter's dtype, as in torch. Complex parameters are
    updated as real views, as torch does.

    Lean state, taken by every emafuse optimizer (per param group; bytes per parameter for AdamW
    in the README):

    * ``state_dtype`` (default None: the parameter's dtype, as torch): ``torch.bfloat16`` stores
      the moments in bf16 (4 bytes per parameter instead of 8 for fp32 parameters; math stays
      fp32), ``torch.float32`` keeps fp32 moments for bf16/fp16 parameters. float64 and complex
      parameters keep their own state dtype; fp16 parameters take float32 only. It applies to
      state created from then on, and to state loaded by ``load_state_dict``, which converts a
      checkpoint of another precision (rounding to nearest when narrowing) and keeps this
      optimizer's ``state_dtype`` and ``rounding``.
    * ``rounding`` (``"nearest"`` or ``"stochastic"``; default None: stochastic exactly when
      ``state_dtype=torch.bfloat16``): how every bf16 store of the step is rounded, the state's
      and the parameters'. Stochastic rounding is unbiased, so updates smaller than a bf16 ulp
      still move the weights on average: with bf16 parameters and ``rounding="stochastic"``
      there is no need for an fp32 master copy. fp16 tensors cannot be rounded stochastically
      (a ``DTypeError`` says so).
    * ``rounding_seed`` (default 0, the same on every rank, so data-parallel replicas stay
      identical): the random bits are a hash of the seed, the group's count of applied steps
      (``rounding_step``, in the param group and so in ``state_dict``) and each element's
      position, so a resumed run rounds bit for bit as the uninterrupted one. Steps captured in
      a CUDA graph cannot round stochastically (the key would be replayed).
    * ``weight_correction`` (default False): bf16 and fp16 parameters keep an int8 state tensor
      ``weight_correction`` with what rounding the weight to 16 bits lost, in 1/256 of its ulp,
      so that weight and correction hold 8 more significant bits of the weight, enough for
      updates far below a bf16 ulp, without randomness: bf16 weights, bf16 moments and the
      correction take 7 bytes per parameter (an fp32 master copy with fp32 moments: 14 with the
      bf16 weights). The engine reads the corrected weight, updates it in fp32 and stores it
      back rounded to nearest with its new correction; ``rounding`` then applies to the state
      only. float32 and float64 parameters need none (they are their own master copy) and keep
      none.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
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
        torch.optim.AdamW.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_adam_options(check_finite, grad_clip, precision, orthograd, orthograd_rescale, caution, caution_norm)


class Adam(_AdamRule, torch.optim.Adam):
    r"""Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015), a drop-in
    replacement for :class:`torch.optim.Adam` whose step is one fused native call.

    Same update as :class:`AdamW` except that weight decay is L2 regularisation added to the
    gradient, :math:`g \leftarrow g + \lambda p`, unless ``decoupled_weight_decay=True`` (then it
    is AdamW). AMSGrad (Reddi et al., ICLR 2018) keeps the running maximum of the raw :math:`v`
    in ``max_exp_avg_sq``. Everything else (arguments, checkpoints, ``check_finite``,
    ``orthograd``, ``caution``) as :class:`AdamW`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
        torch.optim.Adam.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_adam_options(check_finite, grad_clip, precision, orthograd, orthograd_rescale, caution, caution_norm)
