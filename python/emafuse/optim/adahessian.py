"""AdaHessian: timm's ``Adahessian`` constructor and semantics (davda54/ada-hessian), the Hutchinson
estimate from autograd, the update one fused native call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .. import _dtensor
from ..errors import InvalidArgumentError, UnsupportedOptionError
from . import _precision
from ._base import FusedOptimizer, GradClip, Rounding, StateDType, caution_hyper, check_caution_norm, check_hyper, common_hyper

__all__ = ["AdaHessian"]

# timm's fixed seed of the Rademacher vectors' generator.
_TIMM_SEED = 2147483647
# The state slot holding the estimate of the Hessian diagonal (read by the rule, never written).
_HESSIAN = "hessian"


class AdaHessian(FusedOptimizer):
    r"""AdaHessian (Z. Yao, A. Gholami, S. Shen, M. Mustafa, K. Keutzer, M. W. Mahoney, "ADAHESSIAN:
    An Adaptive Second Order Optimizer for Machine Learning", AAAI 2021, arXiv:2006.00719): Adam
    whose second moment is the EMA of the squared Hutchinson estimate of the Hessian diagonal, as
    timm's ``Adahessian`` (davda54/ada-hessian), with the update as one fused native call.

    Use it as the references: ``loss.backward(create_graph=True)``, then ``step()``. The step draws
    Rademacher vectors :math:`z` (``n_samples`` of them), differentiates the gradients once more
    (``torch.autograd.grad``, one Hessian-vector product per sample) and estimates the diagonal as
    :math:`h = \frac{1}{n}\sum z \odot Hz`; then, for each parameter :math:`p` with gradient
    :math:`g` at step :math:`t`:

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) h^2 \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,\frac{m}{(v/(1-\beta_2^t))^{k/2} + \epsilon}

    with :math:`k` = ``hessian_power``. ``update_each`` > 1 computes a new estimate only every
    ``update_each`` steps and reuses the last one in between (the paper's delayed Hessian update;
    the gradients of the steps in between need no graph). ``avg_conv_kernel``: the estimate of a
    convolution kernel is :math:`|h|` averaged over its spatial positions (the paper's spatial
    averaging).

    State: ``step``, ``exp_avg``, ``exp_hessian_diag_sq`` and ``hessian`` (the last estimate, kept
    so that a resumed run reuses it exactly; timm keeps it on the parameter, ``p.hess``). Arguments,
    defaults and ``ValueError`` messages are timm's; the paper's code (amirgholami/adahessian) uses
    ``lr=0.15``, ``eps=1e-4`` and always averages 4-D kernels.

    Decisions: the Rademacher vectors come from the optimizer's own generator, seeded with
    ``seed`` (timm's fixed seed by default, so that the same model draws the same vectors as
    timm's), one per device; its state is saved in ``state_dict()`` (param group entry
    ``hessian_rng``), so a resumed run draws what the uninterrupted one would have. When to
    refresh the estimate is decided by one optimizer-wide counter (``hessian_step``, in every
    param group), not timm's per-parameter counters: the same whenever every parameter has a
    gradient at every step; a parameter without an estimate (new, or loaded from a timm
    checkpoint) gets one at its first step. ``avg_conv_kernel`` averages the spatial dimensions of
    every kernel with 3 or more dimensions (conv1d/2d/3d; timm: 4-D only). Extra checks:
    ``weight_decay < 0``, ``update_each`` and ``n_samples`` not positive integers. Under AMP's
    ``GradScaler`` the estimate is unscaled with the gradients, and a step the scaler skips keeps
    the previous estimate. Extra keywords ``maximize`` (the gradient and the Hessian-vector products
    are of the negated loss), ``check_finite``, ``grad_clip`` (clips the gradients the moments see,
    not the estimate) and the lean-state ``state_dtype`` / ``rounding`` (see
    :class:`emafuse.AdamW`; the estimate is stored like the other slots). ``caution`` (default
    False) and ``caution_norm`` (``"mean"`` or ``"count"``): the Cautious mask (spec §20) on the
    step, as :class:`emafuse.AdamW`'s: it reads :math:`m \phi k` for :math:`\phi = 1[m g > 0]`
    (the step has the sign of the new :math:`m`; the estimate only scales it), :math:`k = 1/\max(
    \operatorname{mean}\phi, 10^{-3})` or :math:`\mathrm{numel}/(\sum\phi + 1)` per tensor; one
    extra read-only pass. ``update_each``,
    ``n_samples`` and ``seed`` are optimizer-wide. Under ``torch.compile`` the step runs eagerly (a
    graph break: its Hessian-vector product calls autograd). Not available: ``orthograd``;
    DTensor (FSDP2) parameters are refused: ``fully_shard`` frees the unsharded weights the
    gradients' graph needs, so the second differentiation fails inside torch.
    """

    _rule = "adahessian"
    _int_step_in_state_dict = True
    _takes_orthograd = False
    # (one Hessian-vector product per step serves every group)
    _optimizer_wide = ("update_each", "n_samples", "seed")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        avg_conv_kernel: bool = False,
        *,
        seed: int = _TIMM_SEED,
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
        check_hyper(lr=lr, eps=eps, betas=betas)
        check_caution_norm(caution_norm)
        if not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"Invalid Hessian power value: {hessian_power}")
        check_hyper(weight_decay=weight_decay)
        for name, value in (("update_each", update_each), ("n_samples", n_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name} value: {value!r} (a positive integer)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"AdaHessian: seed must be an int, got {seed!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power, update_each=update_each,
            n_samples=n_samples, avg_conv_kernel=avg_conv_kernel, seed=seed, maximize=maximize, hessian_step=0,
        )
        super().__init__(params, defaults)
        precision = (state_dtype, rounding, rounding_seed, weight_correction)
        self._init_emafuse_defaults(check_finite, grad_clip, precision, caution=caution, caution_norm=caution_norm)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._saved_rng: dict[str, Tensor] = {}

    @property
    def is_second_order(self) -> bool:
        """True, as timm's: its training script then calls ``loss.backward(create_graph=True)``."""
        return True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1]["hessian_step"] = self.param_groups[0]["hessian_step"]

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        return {**common_hyper(group), "hessian_power": float(group["hessian_power"]), **caution_hyper(group)}

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        rng = {**self._saved_rng, **{str(d): g.get_state() for d, g in self._generators.items()}}
        for group in sd["param_groups"]:
            group["hessian_rng"] = rng
        return sd

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        saved = self.param_groups[0].get("hessian_rng") if self.param_groups else None
        step = self.param_groups[0].get("hessian_step", 0) if self.param_groups else 0
        for group in self.param_groups:
            group.pop("hessian_rng", None)
            group["hessian_step"] = step  # timm's checkpoints lack it: refresh at the next step
        # Generators are remade from the saved states as each device needs one.
        self._generators = {}
        self._saved_rng = dict(saved) if saved else {}

    # -- the step ------------------------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step. ``closure`` (optional) re-evaluates the model, calls
        ``loss.backward(create_graph=True)`` and returns the loss. Nothing changes when the step
        is refused. Under ``torch.compile`` the step runs eagerly (a graph break): its
        Hessian-vector product calls ``torch.autograd.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # what undoes this step: the generators' and saved states, the estimates it replaces
        self._undo = ({d: g.get_state() for d, g in self._generators.items()}, dict(self._saved_rng), {})
        try:
            self._step_slots = self._estimates()
            self._undo[2].update({p: {k: v for k, v in self.state.get(p, {}).items() if k in new} for p, new in self._step_slots.items()})
            super().step()
        except BaseException:
            self._restore()
            raise
        finally:
            self.__dict__.pop("_step_slots", None)
            self.__dict__.pop("_undo", None)
        return loss

    def _end_step(self, applied: bool) -> None:
        if applied:
            for group in self.param_groups:
                group["hessian_step"] += 1
        else:
            self._restore()  # AMP skipped the step: the new estimates were committed with its state

    def _restore(self) -> None:
        """Undo this step's draws and estimates (a refused or skipped step changes nothing)."""
        generators, saved, replaced = self._undo
        self._generators = {d: g for d, g in self._generators.items() if d in generators}
        for d, state in generators.items():
            self._generators[d].set_state(state)
        self._saved_rng = saved
        for p, entries in self._step_slots.items():
            st = self.state.get(p)
            if st is not None and st.get(_HESSIAN) is entries[_HESSIAN]:
                self.state[p] = {**{k: v for k, v in st.items() if k not in entries}, **replaced[p]}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device).manual_seed(int(self.defaults["seed"]))
            saved = self._saved_rng.pop(str(device), None)
            if saved is not None:
                gen.set_state(saved)
        return gen

    def _estimates(self) -> dict[Tensor, dict[str, Tensor]]:
        """This step's Hutchinson estimates, in each parameter's stored state form, for the
        parameters due a new one: all with a gradient every ``update_each`` steps, else those
        without one yet."""
        refresh_all = int(self.param_groups[0]["hessian_step"]) % int(self.defaults["update_each"]) == 0
        due = [
            (p, group)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and (refresh_all or _HESSIAN not in self.state.get(p, {}))
        ]
        if not due:
            return {}
        params = [p for p, _ in due]
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            if _dtensor.is_dtensor(p):
                raise UnsupportedOptionError(
                    "AdaHessian does not support DTensor (FSDP2) parameters: its Hessian estimate differentiates the gradients "
                    "a second time, which fully_shard does not allow (the unsharded weights the gradients' graph needs are freed "
                    "after backward; torch raises 'setStorage ... out of bounds for storage of size 0'). Train AdaHessian on "
                    "unsharded parameters"
                )
            if p.is_complex() or g.layout != torch.strided:
                what = "complex parameters" if p.is_complex() else "sparse gradients"
                raise UnsupportedOptionError(f"AdaHessian does not support {what} (its Hessian estimate is drawn per whole dense real tensor)")
        differentiable = [i for i, g in enumerate(grads) if g.requires_grad]
        if not differentiable:
            raise InvalidArgumentError(
                "AdaHessian.step: the gradients have no graph to differentiate for the Hessian estimate; call "
                "loss.backward(create_graph=True) (not loss.backward()) before step()"
            )
        n = int(self.defaults["n_samples"])
        sums: list[Tensor | None] = [None] * len(params)
        for i in range(n):
            zs = [torch.randint(0, 2, p.size(), generator=self._generator(p.device), device=p.device) * 2.0 - 1.0 for p in params]
            hzs = torch.autograd.grad(
                [grads[j] for j in differentiable],
                params,
                grad_outputs=[zs[j].to(grads[j].dtype) for j in differentiable],
                retain_graph=i < n - 1,
                allow_unused=True,
            )
            for j, (hz, z) in enumerate(zip(hzs, zs)):
                term = hz.to(torch.float64 if hz.dtype == torch.float64 else torch.float32) * z if hz is not None else torch.zeros_like(z)
                term = term / n if n > 1 else term
                sums[j] = term if sums[j] is None else sums[j] + term
        scale = getattr(self, "grad_scale", None)
        out = {}
        for (p, group), h in zip(due, sums):
            assert h is not None
            if group["avg_conv_kernel"] and p.dim() >= 3:
                h = h.abs().mean(dim=tuple(range(2, p.dim())), keepdim=True).expand_as(h)
            if scale is not None:
                h = h / scale.to(h.device)
            st = self.state.get(p)
            dtype = st["exp_avg"].dtype if st and "exp_avg" in st else self._state_dtype(p, group)
            out[p] = _precision.stored_as(_HESSIAN, h.contiguous(), None, dtype, False)
        return out
