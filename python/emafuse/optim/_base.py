"""Shared machinery of emafuse's optimizers: state handling, AMP, and the one native call per step.

A concrete optimizer supplies two things: the native rule's name (``_rule``) and the rule's
hyper-parameters for a group (``_hyper``). The rule itself says which state it keeps (its
description in the engine, ``_native.rule_info`` / ``rule_slots``), so the state names are
stated once, in Rust. Optimizers with group- or optimizer-level counters (Adan, SPAM) also use the
``_begin_step`` / ``_end_step`` hooks. Everything else (lazy state, grouping by device and dtype, GradScaler
support, complex and non-contiguous parameters, atomic error handling) lives here.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from itertools import chain
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .. import _compile, _dtensor, _native
from .._cuda import capturing, current_streams, per_device
from .._guard import deferred_interrupts, refuse_subclass
from .._staging import stage_groups
from ..errors import DTypeError, InvalidArgumentError, LayoutError, NonFiniteError, SparseGradError, UnsupportedOptionError
from . import _precision
from ._fusion import FusedAverage, FusedRequest, fused_average, register_fused_average
from ._precision import WEIGHT_CORRECTION, Rounding, StateDType

__all__ = ["FusedOptimizer", "Precision", "Rounding", "StateDType", "scalar", "sum_squares", "tensor_sum_squares"]

#: What each param group's state holds, in the order of the groups: its state slots, whether it
#: keeps weight corrections, and its ``state_dtype`` (``FusedOptimizer._state_layout``; a step plan
#: is kept while equal).
StateLayout = list[tuple[tuple[str, ...], bool, str]]

#: A constructor's ``(state_dtype, rounding, rounding_seed, weight_correction)``, as it hands them
#: to ``FusedOptimizer._init_emafuse_defaults``.
Precision = tuple[StateDType, "Rounding | None", int, bool]

if TYPE_CHECKING:
    from typing import TypeAlias

    from ..clipping import AdaGC, ZClip

    #: What every optimizer's ``grad_clip=`` takes: a maximal global norm, a ZClip or an AdaGC.
    GradClip: TypeAlias = float | ZClip | AdaGC | None
else:
    GradClip = Any


class _Boxed:
    """A state tensor hidden from torch's ``load_state_dict`` casts (see ``_shield_state_dtypes``):
    torch's loader casts tensors and rebuilds dicts and iterables, and passes other objects as is."""

    __slots__ = ("scalar", "tensor")

    def __init__(self, tensor: Tensor, scalar: bool = False) -> None:
        self.tensor = tensor
        self.scalar = scalar  # scalar state: placed by _scalar_state on unboxing


def _step_dtype() -> torch.dtype:
    """torch's dtype for step counters: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _scalar_state(p: Tensor, value: float | Tensor, cpu_dtype: torch.dtype) -> Tensor:
    """A scalar state entry for parameter ``p``: ``value`` as a 0-dim tensor where the kernels
    keep it (see ``FusedOptimizer._normalize_steps``), of ``cpu_dtype`` on the CPU and float32 on
    CUDA; returned unchanged when already right."""
    if p.is_cuda:
        if isinstance(value, Tensor) and value.device == p.device and value.dtype == torch.float32 and value.numel() == 1:
            return value
        if isinstance(value, Tensor):
            return value.detach().reshape(()).to(device=p.device, dtype=torch.float32)
        return torch.tensor(float(value), dtype=torch.float32, device=p.device)
    if isinstance(value, Tensor) and value.device.type == "cpu" and value.dtype in (torch.float32, torch.float64) and value.numel() == 1:
        return value
    return torch.tensor(float(value), dtype=cpu_dtype)


def check_hyper(*, lr: float | Tensor | None = None, eps: float | None = None, betas: tuple = (), weight_decay: float | None = None) -> None:
    """The argument checks most reference optimizers share, with torch's messages: lr >= 0,
    eps >= 0, every beta in [0, 1), weight_decay >= 0 (NaN fails every one)."""
    if lr is not None and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if weight_decay is not None and not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def common_hyper(group: dict[str, Any]) -> dict[str, float]:
    """The hyper-parameters most rules share, by the names the rules read: ``lr``, the betas as
    ``beta1``, ``beta2``, ..., and ``eps`` / ``weight_decay`` where the group has them."""
    hyper = {"lr": scalar(group["lr"])}
    for i, beta in enumerate(group.get("betas", ())):
        hyper[f"beta{i + 1}"] = scalar(beta)
    for key in ("eps", "weight_decay"):
        if key in group:
            hyper[key] = scalar(group[key])
    return hyper


def check_caution_norm(caution_norm: str) -> None:
    """The Cautious mask's normalisations (spec §20)."""
    if caution_norm not in ("mean", "count"):
        raise ValueError(f"Invalid caution_norm: {caution_norm!r} (expected 'mean' or 'count')")


def caution_hyper(group: dict[str, Any]) -> dict[str, bool]:
    """The rule flags of the Cautious mask (``caution``, ``caution_norm`` in ``group``)."""
    return {"caution": bool(group.get("caution", False)), "caution_count": group.get("caution_norm", "mean") == "count"}


def scalar(x: float | Tensor) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


# Added to the norm in a clip coefficient (as torch.nn.utils.clip_grad_norm_ and the references).
CLIP_COEF_EPS = 1e-6


def cap_coefficient(norm: float, max_norm: float | None) -> float | None:
    """``torch.nn.utils.clip_grad_norm_``'s coefficient for the global norm ``norm``: None when
    it would not scale down (or there is no cap, or the norm is NaN)."""
    if max_norm is None:
        return None
    coef = max_norm / (norm + CLIP_COEF_EPS)
    return coef if coef < 1.0 else None


def check_grad_clip(who: str, grad_clip: Any) -> None:
    """``grad_clip``: None, a maximal global norm (a number > 0), or a clipper with a
    ``state_dict()`` that decides from the global norm (``coefficient(norm)``:
    :class:`emafuse.ZClip`) or from each tensor's (``tensor_factors(positions, sums)``:
    :class:`emafuse.AdaGC`)."""
    if grad_clip is None or (hasattr(grad_clip, "state_dict") and (hasattr(grad_clip, "coefficient") or hasattr(grad_clip, "tensor_factors"))):
        return
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip > 0.0 or not math.isfinite(grad_clip):
        raise ValueError(f"{who}: grad_clip must be None, a max norm > 0, emafuse.ZClip(...) or emafuse.AdaGC(...), got {grad_clip!r}")


def sum_squares(tensors: list[Tensor]) -> float:
    """``Σ x²`` over all elements of ``tensors``: the sums of :func:`tensor_sum_squares` added in
    order."""
    return sum(tensor_sum_squares(tensors))


def tensor_sum_squares(tensors: list[Tensor]) -> list[float]:
    """``Σ x²`` of each tensor, accumulated in float64 by the native engine in one parallel pass
    over all of them (reproducible: the order does not depend on threads). Complex tensors count
    as their real views; tensors with gaps are copied first. DTensor (FSDP2) shards are summed
    across their mesh (see ``emafuse._dtensor``)."""
    if _dtensor.any_dtensor(tensors):
        return _dtensor.tensor_sum_squares(tensors, _local_tensor_sum_squares)
    return _local_tensor_sum_squares(tensors)


def _local_tensor_sum_squares(tensors: list[Tensor]) -> list[float]:
    """:func:`tensor_sum_squares` of plain tensors (CPU: the native engine; CUDA: torch)."""
    ts = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    out = [0.0] * len(ts)
    cuda = [i for i, t in enumerate(ts) if t.is_cuda]
    if cuda:
        # On the device with torch's fused norms (tree-ordered fp32 accumulation), squared in
        # float64, read back once: a host synchronisation, the price of norms that the host turns
        # into factors.
        norms = torch.stack(torch._foreach_norm([ts[i] for i in cuda])).double()
        for i, x in zip(cuda, (norms * norms).tolist()):
            out[i] = x
    cpu = [i for i, t in enumerate(ts) if not t.is_cuda]
    if cpu:
        try:
            sums = _native.tensor_sum_squares([ts[i] for i in cpu])
        except LayoutError:
            sums = _native.tensor_sum_squares([ts[i].contiguous() for i in cpu])
        for i, x in zip(cpu, sums):
            out[i] = x
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: ``step()`` runs one native call that updates every parameter of every group.

    Subclasses set ``_rule`` and implement ``_hyper``. Semantics kept from
    ``torch.optim``: lazy state creation on the first step that sees a gradient, parameters whose
    ``.grad`` is None are skipped (no state, no step count), ``closure`` support, step hooks,
    ``state_dict``/``load_state_dict`` with torch's state names, and
    ``_step_supports_amp_scaling`` (``torch.amp.GradScaler`` hands its scale and found-inf flag to
    the native step, which unscales gradients on the fly and skips the step when inf/NaN was
    found, without writing ``.grad``).

    Every optimizer also takes ``grad_clip=``: a maximal global gradient norm (as
    ``torch.nn.utils.clip_grad_norm_``), an :class:`emafuse.ZClip` (one coefficient) or an
    :class:`emafuse.AdaGC` (a factor per tensor), applied inside the native step
    (``_begin_clip``): the gradients are multiplied by their clip factor as they are loaded,
    ``.grad`` is not written, and the clipper (optimizer-wide, held by every param group) is saved
    in the state dict.

    And lean state (per param group, see ``optim/_precision.py``): ``state_dtype=`` stores the
    state tensors in float32 or bfloat16 whatever the parameters' dtype (math stays in float32),
    or as ``"8bit"``: blockwise 8-bit codes (uint8, shaped like the parameter) with one float32
    scale per block of 256 elements (``<slot>_absmax``), as bitsandbytes' 8-bit optimizers, the
    second moments with the unsigned map; decoded, updated and re-encoded inside the one native
    pass, always rounded to nearest. Parameters under 4096 elements keep float32 state then (as
    bitsandbytes), and so do DTensor parameters whose shards would cut blocks (8-bit DTensor state
    is sharded like its parameter where the parameter's rows are whole blocks:
    ``_precision.blocks_follow_shards``); parameters in another memory format than row-major
    (channels_last) are stepped through a staged copy;
    ``rounding=`` rounds every bfloat16 store of the step (parameters and state) to nearest or
    stochastically (the default for ``state_dtype=torch.bfloat16``), with counter-based random
    bits from ``rounding_seed`` and the group's applied-step count ``rounding_step``, both saved in
    the state dict; ``weight_correction=True`` gives each bf16 or fp16 parameter an int8 state
    tensor (``weight_correction``) holding what rounding its weight to 16 bits lost, read and
    written by the engine with the weight. ``load_state_dict`` keeps the optimizer's own ``state_dtype``,
    ``rounding`` and ``weight_correction`` and converts the checkpoint's state to them.
    """

    _rule: ClassVar[str]
    # Whether complex parameters are updated as real views (as torch's Adam/AdamW/SGD do).
    _supports_complex: ClassVar[bool] = False
    # Whether parameters with sparse gradients are stepped (by ``_step_sparse``, outside the
    # fused engine, which walks dense memory); else a sparse gradient is a SparseGradError.
    _supports_sparse_grads: ClassVar[bool] = False
    # Whether the class takes ``orthograd`` (⊥Grad, the engine's gradient projection).
    _takes_orthograd: ClassVar[bool] = True
    # Whether fresh state must be flagged to the rule (SGD's momentum buffer starts as a copy).
    _flags_fresh_state: ClassVar[bool] = False
    # Whether state_dict() stores the step counter as a Python int, as the reference
    # implementations of most non-torch optimizers do (torch's own keep a tensor). The live state
    # keeps the 0-dim tensor the engine updates; load_state_dict accepts either.
    _int_step_in_state_dict: ClassVar[bool] = False
    # Whether the rule can update a weight average in the same pass (flag "ema", slot "ema" last,
    # hyper-parameter "ema_weight"); see register_fused_average and optim/_fusion.py.
    _supports_fused_ema: ClassVar[bool] = False
    # Whether the rule gathers its sums per row (dim-0 slice) of tensors of 2+ dims and updates
    # each row with its own coefficients (AdamP's channel view): such tensors keep 8-bit state only
    # where their rows are whole blocks, and as DTensors must be sharded on dim 0 (or replicated).
    _row_sums: ClassVar[bool] = False
    # The state names of a rule with factored state (Adafactor's): its row and column factors,
    # not shaped like the parameter (see ``_dtensor.factor_placements`` for DTensor parameters).
    _factor_names: ClassVar[tuple[str, ...]] = ()
    # Whether the rule's update needs sums over every tensor of the step (a global reduction,
    # e.g. MoMo's Polyak step size): ``_global_hypers`` then runs between the engine's sums pass
    # and its update.
    _reads_global_sums: ClassVar[bool] = False
    # This step's values of state slots the rule only reads (AdaHessian's Hessian estimate), by
    # parameter, in their stored form: they replace the stored ones in the step's calls and are
    # committed with the step's new state (``_collect``), so a refused step keeps the old ones.
    _step_slots: Mapping[Tensor, dict[str, Tensor]] = MappingProxyType({})
    # Hyper-parameters that are the optimizer's, not a group's (e.g. MoMo's lower bound, AdaHessian's
    # sampling): a param group may not set other values than the constructor's.
    _optimizer_wide: ClassVar[tuple[str, ...]] = ()

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``step()`` unscales gradients itself (``torch.amp.GradScaler`` then hands it
        ``grad_scale`` / ``found_inf`` instead of unscaling, and ``.grad`` is left unscaled by the
        kernel, as torch's fused optimizers leave it). True, except when PyTorch Lightning asks:
        Lightning reads this flag as "the optimizer cannot be clipped under AMP" and refuses
        ``gradient_clip_val``. emafuse can be: when gradients were unscaled before the step (Lightning
        calls ``scaler.unscale_`` before clipping when the flag is False), GradScaler passes no scale
        and the kernel unscales nothing, so gradients are unscaled exactly once."""
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return not caller.startswith(_LIGHTNING_MODULES)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        """torch's constructors set it for ``fused=True``; emafuse always decides it as above."""

    # -- what a concrete optimizer provides --------------------------------------------------

    def _begin_step(self) -> None:
        """Called once per ``step()``, after the closure and ``grad_clip``'s decision
        (``_clipped_grad_norm``) and before any state is read: compute
        per-step values that span groups (e.g. a global gradient norm), for ``_hyper`` to use.
        Must not change anything that ``_end_step`` would not commit."""

    def _end_step(self, applied: bool) -> None:
        """Called once per ``step()`` after the native step succeeded (also when no parameter had
        a gradient). ``applied`` is False when AMP's found-inf flag skipped the step: counters
        kept outside ``self.state[p]`` (group steps, optimizer-level counters) advance only when
        it is True, as the per-parameter step counters do in the native step."""

    def _scalar_dtype(self, key: str) -> torch.dtype:
        """dtype of the 0-dim CPU tensor holding scalar state ``key`` (float32, or float64)."""
        return _step_dtype()

    @property
    def _scalar_keys(self) -> tuple[str, ...]:
        """Keys of the per-parameter scalar state (0-dim float tensors) the rule reads and
        updates, e.g. torch's step counter ``("step",)``; the first one, if any, is the step
        counter."""
        return _rule_info(self._rule)["scalars"]

    def _slots(self, hyper: dict[str, Any]) -> tuple[str, ...]:
        """Names of the state tensors (shaped like the parameter) the rule keeps with these
        hyper-parameters (they follow its flags, e.g. ``max_exp_avg_sq`` with amsgrad)."""
        return _native.rule_slots(self._rule, hyper)

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        """The rule's numbers and flags for ``group``."""
        raise NotImplementedError

    def _param_flags(self, p: Tensor) -> dict[str, bool]:
        """The rule's flags that follow the parameter rather than its group (e.g. Adafactor's
        ``factored`` for tensors of two or more dimensions): its native call carries them, and its
        state slots are those of the group's flags with these."""
        return {}

    def _new_slot(self, p: Tensor, name: str, dtype: torch.dtype) -> Tensor:
        """A new state slot ``name`` of ``p`` holding zeros (shaped like ``p`` unless an optimizer
        keeps other shapes, e.g. Adafactor's row and column factors)."""
        return _precision.new_slot(p, name, dtype)

    def _global_hypers(self, calls: list[_Call], sums: list[Tensor], hypers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With ``_reads_global_sums``: each call's hyper-parameters for the update, given
        ``hypers`` (those of the sums pass) and the per-tensor sums of every call (``sums[i]``: an
        ``n × MAX_SUMS`` float64 array, one row per parameter of ``calls[i]``, added across the
        shards of sharded tensors). Must not change the optimizer: the step may still be refused
        or skipped (``_end_step`` commits)."""
        raise NotImplementedError

    def _default_state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        """The dtype of ``p``'s state tensors when ``group`` sets no ``state_dtype``: torch's
        convention (the parameter's dtype) unless an optimizer overrides it; the engine also
        accepts float32 states for bf16/fp16 parameters and bf16 states for fp32 ones. ``group``
        may be a group of a checkpoint being loaded (keys may be missing)."""
        return p.dtype

    def _state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        """The dtype of ``p``'s state tensors: its group's ``state_dtype`` or the default."""
        return _precision.state_dtype_for(type(self).__name__, p, group.get("state_dtype"), self._default_state_dtype(p, group), self._row_sums)

    # -- torch.optim plumbing ----------------------------------------------------------------

    def _init_emafuse_defaults(self, check_finite: bool, grad_clip: Any, precision: Precision, **options: Any) -> None:
        """Add emafuse's options to the defaults and groups: ``check_finite``, ``grad_clip``
        (optimizer-wide: every group holds the same object), the lean-state ``precision``
        (``state_dtype``, ``rounding``, ``rounding_seed``, ``weight_correction``) and those the
        optimizer takes beyond its reference's (``orthograd``, ``orthograd_rescale``; Adam's
        ``caution``, ``caution_norm``)."""
        who = type(self).__name__
        for key, value in {"check_finite": check_finite, **options}.items():
            if key != "caution_norm" and not isinstance(value, bool):
                raise TypeError(f"{who}: {key} must be a bool, got {value!r}")
        check_grad_clip(who, grad_clip)
        options = {"check_finite": check_finite, "grad_clip": grad_clip, **_precision.precision_options(who, *precision), **options}
        self.defaults.update(options)
        for group in self.param_groups:
            for key, value in options.items():
                group.setdefault(key, value)
            self._reject_unsupported(group)
        self.state = _StateDict(dict, self.state)
        self._compile_key = _compile.register(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups and "grad_clip" in param_group and param_group["grad_clip"] is not self.param_groups[0].get("grad_clip"):
            raise ValueError(
                f"{type(self).__name__}: grad_clip is optimizer-wide (it clips the norm of every gradient); a param group cannot "
                f"set its own (got {param_group['grad_clip']!r})"
            )
        for name in self._optimizer_wide:
            if name in param_group and param_group[name] != self.defaults[name]:
                raise ValueError(
                    f"{type(self).__name__}: {name} is optimizer-wide (one value serves every group); a param group cannot set "
                    f"{name}={param_group[name]!r} (optimizer: {self.defaults[name]!r})"
                )
        super().add_param_group(param_group)
        self._reject_unsupported(self.param_groups[-1])
        self.__dict__.pop("_step_plan", None)  # release the tensors the plan holds
        self._sync_param_lists()

    def _sync_param_lists(self) -> None:
        """``_param_lists``: each group's ``params`` list, read by ``_compile_inputs`` (which dynamo
        traces; reading ``param_groups`` there would make it guard on every hyper-parameter)."""
        lists = [g["params"] for g in self.param_groups]
        current = self.__dict__.get("_param_lists")
        if current is None or len(current) != len(lists) or any(a is not b for a, b in zip(current, lists)):
            self._param_lists = lists

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = _StateDict(dict, self.state)
        self.__dict__.pop("_step_plan", None)
        self._compile_key = _compile.register(self)
        self._sync_param_lists()
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            # Checkpoints of reference implementations (or older emafuse) may lack options that
            # this optimizer keeps per group: take them from the constructor's values (torch's
            # own __setstate__ adds "differentiable" to the defaults of every optimizer, which
            # groups of optimizers without that option do not carry).
            for key, value in defaults.items():
                if key != "differentiable":
                    group.setdefault(key, value)
        self._normalize_steps()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._int_step_in_state_dict and self._scalar_keys:
            key = self._scalar_keys[0]
            sd["state"] = {
                pid: {**st, key: int(st[key].item())}
                if isinstance(st, dict) and isinstance(st.get(key), Tensor)
                else st
                for pid, st in sd["state"].items()
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that nothing is rounded on the way in: state
        tensors of optimizers that keep them in another dtype than the parameter's
        (``_state_dtype``, e.g. float32 states for bf16 parameters) keep that dtype, and scalar
        state other than ``step`` (e.g. SGD-SaI's ``gsnr``) keeps its full value, where torch
        would cast both to the parameter's dtype; so a resumed run continues bit for bit. User
        hooks see the checkpoint unchanged: the shield runs after every other pre-hook and is
        lifted before every other post-hook."""
        self._check_loaded_counters(state_dict)
        pre = self.register_load_state_dict_pre_hook(FusedOptimizer._shield_state_dtypes)
        post = self.register_load_state_dict_post_hook(FusedOptimizer._unshield_state_dtypes, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _check_loaded_counters(self, state_dict: dict[str, Any]) -> None:
        """Refuse (before anything is loaded) a checkpoint whose step counters are negative or not
        finite numbers: the bias corrections would turn every parameter into NaN."""
        if "step" not in self._scalar_keys:
            return
        for pid, st in state_dict.get("state", {}).items():
            step = st.get("step") if isinstance(st, dict) else None
            if step is None:
                continue
            try:
                value = float(step.item() if isinstance(step, Tensor) else step)
            except (TypeError, ValueError, RuntimeError):
                value = float("nan")
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(
                    f"{type(self).__name__}.load_state_dict: state of parameter {pid} has step={step!r}; a step counter must "
                    "be a finite number >= 0 (a corrupted checkpoint?). Nothing was loaded."
                )

    @staticmethod
    def _shield_state_dtypes(self: FusedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Pre-hook: keep this optimizer's ``state_dtype``, ``rounding`` and ``weight_correction``
        in the loaded groups, store state slots as this optimizer does (``_state_dtype``: cast to
        it, quantized to 8-bit codes and scales, or dequantized from them; converting a checkpoint
        of another state precision), put scalar state other than ``step`` in its own dtype, keep
        weight corrections where this optimizer keeps them (dropping them elsewhere; missing ones
        start at zero), and box all these so that torch's loader does not cast them."""
        kept = ("state_dtype", "rounding", "weight_correction")
        loaded = [{**g, **{k: own[k] for k in kept if k in own}} for g, own in zip(state_dict["param_groups"], self.param_groups)]
        ids = chain.from_iterable(g["params"] for g in loaded)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        groups = {pid: g for g in loaded for pid in g["params"]}
        saved = state_dict["state"]
        nonnegative = _rule_info(self._rule)["nonnegative_slots"]
        suffix = _precision.ABSMAX_SUFFIX
        state = None
        for pid, p in zip(ids, params):
            st = saved.get(pid)
            if not isinstance(st, dict) or not p.is_floating_point():
                continue
            want = self._state_dtype(p, groups[pid])
            exact = [key for key in self._scalar_keys if key != "step" and key in st]
            quantized = any(key.endswith(suffix) for key in st)
            if want == p.dtype and not exact and WEIGHT_CORRECTION not in st and not quantized:
                continue
            if state is None:
                state = dict(saved)
            corrects = _precision.corrects(groups[pid], p)
            converted: dict[str, Any] = {}
            for key, v in st.items():
                if key in exact:
                    converted[key] = _Boxed(torch.as_tensor(float(v), dtype=self._scalar_dtype(key)), scalar=True)
                elif key == WEIGHT_CORRECTION:
                    if corrects:
                        converted[key] = _Boxed(v)
                elif key.endswith(suffix) and key[: -len(suffix)] in st:
                    continue  # converted with its slot
                elif isinstance(v, Tensor) and key not in self._scalar_keys and (v.is_floating_point() or v.dtype == torch.uint8):
                    stored = _precision.stored_as(key, v, st.get(key + suffix), want, key in nonnegative)
                    converted.update((k, _Boxed(t)) for k, t in stored.items())
                else:
                    converted[key] = v
            state[pid] = converted
        return {**state_dict, "param_groups": loaded + state_dict["param_groups"][len(loaded) :], "state": saved if state is None else state}

    @staticmethod
    def _unshield_state_dtypes(self: FusedOptimizer) -> None:
        """Post-hook: unbox what ``_shield_state_dtypes`` boxed, on the parameter's device."""
        for p, st in self.state.items():
            if not isinstance(st, dict):
                continue
            for key, v in st.items():
                if isinstance(v, _Boxed) and v.scalar:
                    st[key] = _scalar_state(p, v.tensor, v.tensor.dtype)
                elif isinstance(v, _Boxed):
                    device = p.device if isinstance(p, Tensor) else v.tensor.device
                    st[key] = v.tensor.to(device=device)

    def _reject_unsupported(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        _precision.check_group(name, group)
        if group.get("differentiable", False):
            raise UnsupportedOptionError(
                f"{name}: differentiable=True is not supported: emafuse's fused "
                "native step cannot be differentiated through. Use torch.optim for that."
            )
        if group.get("orthograd", False):
            if not self._takes_orthograd:
                raise UnsupportedOptionError(f"{name} does not take orthograd=True (see its docstring); remove the key from the param group")
            if group.get("caution", False):
                raise UnsupportedOptionError(
                    f"{name}: orthograd=True cannot be combined with caution=True: the cautious mask's per-tensor "
                    "sums would have to be taken over the projected gradient (a second pass emafuse does not run). "
                    "Drop one of the two."
                )

    def _normalize_steps(self) -> None:
        """Put scalar state (e.g. ``step``) where the kernels keep it: a 0-dim float tensor on the
        CPU for CPU parameters (as torch's default optimizers do) and a float32 tensor on the
        parameter's device for CUDA parameters (as torch's fused and capturable ones do). Old
        checkpoints store plain numbers."""
        if not self._scalar_keys:
            return
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for key in self._scalar_keys:
                    if key in st and not isinstance(st[key], _Boxed):  # boxed: placed when unboxed
                        st[key] = _scalar_state(p, st[key], self._scalar_dtype(key))

    def _new_state(self, p: Tensor, slots: tuple[str, ...], group: dict[str, Any]) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {key: _scalar_state(p, 0.0, self._scalar_dtype(key)) for key in self._scalar_keys}
        dtype = self._state_dtype(p, group)
        for name in slots:
            st[name] = self._new_slot(p, name, dtype)
        return st

    # -- the step ----------------------------------------------------------------------------

    def register_fused_average(self, average: FusedAverage) -> torch.utils.hooks.RemovableHandle:
        """Update ``average`` (a :class:`~emafuse.optim._fusion.FusedAverage`, e.g. a
        :class:`~emafuse.ModelEMA`) inside every ``step()``: the parameters it maps are averaged in
        the same native pass, the rest by the average right after. At most one per optimizer;
        ``remove()`` on the returned handle unregisters it. Needs a rule with
        ``_supports_fused_ema`` (e.g. Adam, AdamW)."""
        return register_fused_average(self, average)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step is one opaque custom op (``emafuse::optimizer_step``,
        see ``emafuse._compile``) whose implementation is this eager step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            params: list[Tensor] = []
            grads: list[Tensor] = []
            written: list[Tensor] = []
            self._compile_inputs(params, grads, written)
            _compile.optimizer_step(self._compile_key, params, grads, written, grad_scale, found_inf)
        else:
            self._update(grad_scale, found_inf)
        return loss

    def _compile_inputs(self, params: list[Tensor], grads: list[Tensor], written: list[Tensor]) -> None:
        """For ``torch.compile`` (traced by dynamo, which guards on what it reads: the parameter
        lists, which gradients exist, the state; not the hyper-parameters or counters, which the
        step's custom op reads when it runs): the tensors the op reads and writes: every parameter with a gradient, its
        gradient, its state tensors, and the tensors a fused average writes."""
        for group_params in self._param_lists:
            for p in group_params:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
        for p in params:  # after every gradient was read (dynamo's sources then stay the lists')
            written.extend(v for v in self.state.get(p, {}).values() if isinstance(v, Tensor))
        average = fused_average(self)
        if average is not None:
            written.extend(average.fused_outputs())

    def _update(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The step after the closure: one native call, with a fused average's update. All or
        nothing: an error changes nothing, and a Ctrl-C is held back until the step, its lazily
        created state and its counters are complete (``emafuse._guard``)."""
        with deferred_interrupts():
            self._update_now(grad_scale, found_inf)

    def _update_now(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        self._sync_param_lists()  # a group's params list may have been replaced
        try:
            self._begin_clip(grad_scale, found_inf)
            self._begin_step()
            average = fused_average(self)
            request = average.fused_begin(found_inf) if average is not None else None
            try:
                fused = self._run_step(grad_scale, found_inf, request)
            except BaseException:
                if average is not None:
                    average.fused_abort(request)  # a refused step is not counted by the average
                raise
        finally:
            self._grad_factor, self._tensor_factors, self._clip_trial, self._grad_sums = None, None, None, None  # one step's decision
        if request is not None:
            average.fused_end(request, fused)

    def _begin_clip(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """With ``grad_clip``: the norms of the (unscaled) gradients, one native read-only pass
        (DTensor shards summed across their mesh), and the factor the step multiplies every
        gradient by as it loads it (``grad_factor``), or with AdaGC each tensor's
        (``_tensor_factors``, by parameter id; ``.grad`` is not written). A clipper decides on a
        copy of itself, which ``_finish_step`` keeps once the step is applied."""
        self._grad_factor, self._tensor_factors, self._clip_trial, self._grad_sums = None, None, None, None
        clip = self.param_groups[0].get("grad_clip") if self.param_groups else None
        if clip is None or (found_inf is not None and scalar(found_inf) != 0.0):  # AMP skips this step
            return
        if capturing():
            raise UnsupportedOptionError(
                f"{type(self).__name__}: grad_clip decides on the host from the gradients' norms (one synchronisation per step), "
                "which a captured CUDA graph cannot replay; clip outside the graph, or leave grad_clip unset for captured steps"
            )
        if isinstance(clip, (int, float)):
            self._grad_factor = cap_coefficient(self._unscaled_grad_norm(grad_scale), float(clip))
            return
        self._clip_trial = copy.deepcopy(clip)
        if not hasattr(clip, "tensor_factors"):
            self._grad_factor = self._clip_trial.coefficient(self._unscaled_grad_norm(grad_scale))
            return
        params, positions, sums = self._unscaled_grad_sums(grad_scale)
        factors = self._clip_trial.tensor_factors(positions, sums)
        if factors is None:
            return
        if not all(math.isfinite(h) and h >= 0.0 for h in factors):
            raise NonFiniteError(
                f"{type(self).__name__}: grad_clip={type(clip).__name__}(nonfinite='reference') made a non-finite clip factor from "
                "a NaN/inf gradient norm; nothing was updated. Use nonfinite='skip' (the default) to step such gradients unclipped "
                "(a step AMP's scaler skips), or check_finite=True to refuse them"
            )
        self._tensor_factors = {id(p): h for p, h in zip(params, factors)}

    def _unscaled_grad_sums(self, grad_scale: Tensor | None) -> tuple[list[Tensor], list[int], list[float]]:
        """The parameters with a gradient, their positions over all param groups (their index in
        the state dict) and the squared norms of their gradients divided by AMP's
        ``grad_scale`` squared: one native read-only pass (DTensor shards summed across their
        mesh), taken once per step, which ``grad_clip`` and an optimizer's own clipping (Adan's
        ``max_grad_norm``) share."""
        cached = self.__dict__.get("_grad_sums")
        if cached is None:
            every = list(chain.from_iterable(group["params"] for group in self.param_groups))
            positions = [i for i, p in enumerate(every) if p.grad is not None]
            params = [every[i] for i in positions]
            grads = [p.grad for p in params]
            if any(g.layout != torch.strided for g in grads):
                what = "grad_clip" if self.param_groups[0].get("grad_clip") is not None else "the global gradient norm"
                raise SparseGradError(f"{type(self).__name__}: {what} needs dense gradients; a gradient is sparse (call .to_dense())")
            cached = self._grad_sums = (params, positions, tensor_sum_squares(grads) if grads else [])
        params, positions, raw = cached
        if grad_scale is None:
            return params, positions, raw
        # (GradScaler's scales are powers of two: these equal the unscaled gradients' sums exactly)
        square = scalar(grad_scale) ** 2
        return params, positions, [s / square for s in raw]

    def _unscaled_grad_norm(self, grad_scale: Tensor | None) -> float:
        """The global norm of this step's gradients (divided by AMP's ``grad_scale``), from
        ``_unscaled_grad_sums``' pass."""
        _, _, raw = self._unscaled_grad_sums(None)
        return math.sqrt(sum(raw)) / (1.0 if grad_scale is None else scalar(grad_scale))

    def _clipped_grad_norm(self, grad_scale: Tensor | None) -> float:
        """The global norm of the (unscaled) gradients as ``grad_clip=`` hands them to the rule,
        for ``_begin_step`` (e.g. Adan's own clipping)."""
        tensor_factors = self.__dict__.get("_tensor_factors")
        if tensor_factors is None:
            factor = self.__dict__.get("_grad_factor")
            return self._unscaled_grad_norm(grad_scale) * (1.0 if factor is None else factor)
        params, _, sums = self._unscaled_grad_sums(grad_scale)
        return math.sqrt(sum(tensor_factors[id(p)] ** 2 * s for p, s in zip(params, sums)))

    def _finish_step(self, applied: bool) -> None:
        """After the native step: keep the clipper's decision (its statistics) when the step was
        applied, then the optimizer's own counters (``_end_step``)."""
        trial = self.__dict__.get("_clip_trial")
        if applied and trial is not None:
            vars(self.param_groups[0]["grad_clip"]).update(vars(trial))
        if applied:
            _precision.advance(self.param_groups)
        self._end_step(applied)

    def _group_hyper(self, gi: int, group: dict[str, Any]) -> dict[str, float | bool]:
        """The rule's hyper-parameters for group ``gi``, with the options every rule takes."""
        self._reject_unsupported(group)
        hyper = self._hyper(group)
        hyper["maximize"] = bool(group.get("maximize", False))
        hyper["check_finite"] = bool(group.get("check_finite", False))
        if self.__dict__.get("_grad_factor") is not None:
            hyper["grad_factor"] = self._grad_factor
        key = _precision.rounding_key(group, gi)
        if key is not None:
            if capturing():
                raise UnsupportedOptionError(
                    f"{type(self).__name__}: stochastic rounding draws new random bits every step, which a captured CUDA graph "
                    "would replay unchanged; use rounding='nearest' (or float32 state) for steps captured in a graph"
                )
            hyper["rounding_key"] = key
        if group.get("orthograd", False):
            hyper["orthograd"] = True
            hyper["orthograd_rescale"] = bool(group.get("orthograd_rescale", True))
        return hyper

    def _run_step(self, grad_scale: Tensor | None, found_inf: Tensor | None, request: FusedRequest | None) -> set[int]:
        """The native call of one step, through the cached plan while it still describes the
        tensors (see ``_StepPlan``), else through a new one. With a fused average's ``request``
        the averages of the parameters it maps are updated in the same pass; returns the ids of
        those parameters."""
        hypers = [self._group_hyper(gi, g) for gi, g in enumerate(self.param_groups)]
        slots = [self._slots(h) for h in hypers]
        amp = (per_device(grad_scale), per_device(found_inf), current_streams())
        targets = request.targets if request is not None else None
        plan = self.__dict__.get("_step_plan")
        applied = None
        if plan is not None and not targets and not self._step_slots and plan.describes(self.state, self._state_layout(slots)):
            try:
                applied = plan.run(hypers, amp, self.__dict__.get("_tensor_factors"))
            except LayoutError:
                applied = None  # e.g. a gradient strided unlike its parameter: staged below
            except SparseGradError:
                if not self._supports_sparse_grads:
                    raise
                applied = None  # a gradient became sparse: collected below
        if applied is None:
            self._step_plan = None
            plan = self._new_plan(hypers, slots, request)
            if plan is None:  # no parameter has a gradient
                self._finish_step(True)
                return set()
            try:
                applied = plan.run(hypers, amp, self.__dict__.get("_tensor_factors"))
            except LayoutError:
                # Tensors the engine cannot walk linearly together: stage them (below).
                self._normalize_steps()  # e.g. a step counter left on the CPU by a model moved to CUDA
                applied = self._staged_step(plan, amp)
            if plan.sparse and applied:
                self._step_sparse(plan.sparse, grad_scale, found_inf)
            plan.commit(self.state)
            if plan.cacheable:
                self._step_plan = plan
        # The kernels wrote parameter memory directly: tell autograd, as an in-place op would, so
        # that a graph that saved a parameter before this step refuses to backpropagate.
        torch._C._increment_version(plan.params)
        self._finish_step(bool(applied))
        return plan.fused

    def _new_plan(self, hypers: list[dict[str, Any]], slots: list[tuple[str, ...]], request: FusedRequest | None) -> _StepPlan | None:
        """Collect every group's native call(s) and validate them in a new plan (which also holds
        the lazily created state, committed once a run succeeded); None if no parameter has a
        gradient."""
        calls: list[_Call] = []
        created: dict[Tensor, dict[str, Tensor]] = {}
        sparse: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            self._collect(gi, group, hypers[gi], slots[gi], calls, created, sparse)
        if request is not None and request.targets:
            calls = _with_fused_average(calls, request)
        if not calls and not sparse:
            return None
        who = type(self).__name__
        sharded = None
        if _dtensor.any_dtensor(p for c in calls for p in c.params):
            calls, originals, rows = _local_calls(who, self._rule, calls, hypers, self._row_sums, self._factor_names)
            split = _dtensor.split_rows(originals) if self._factor_names else {}
            sharded = (originals, rows, split)
        reduce = self._global_hypers if self._reads_global_sums else None
        return _StepPlan(
            who, self._rule, calls, [g["params"] for g in self.param_groups], created, self.state, self._state_layout(slots), sparse, sharded, reduce
        )

    def _state_layout(self, slots: list[tuple[str, ...]]) -> StateLayout:
        """What the state of each group holds (given its slots): a plan built for other slots, or
        with weight corrections or the state dtype switched since, no longer describes the
        optimizer."""
        return [(s, bool(g.get("weight_correction", False)), str(g.get("state_dtype"))) for s, g in zip(slots, self.param_groups)]

    def _collect(
        self,
        gi: int,
        group: dict[str, Any],
        hyper: dict[str, Any],
        slots: tuple[str, ...],
        calls: list[_Call],
        created: dict[Tensor, dict[str, Tensor]],
        sparse: list[Tensor],
    ) -> None:
        """Append group ``gi``'s native call(s): its parameters with a gradient, with their state
        (completed where missing: ``created``), fresh state in a call of its own for rules that
        are told (``_flags_fresh_state``), parameters with other flags of their own
        (``_param_flags``, with the slots those flags keep) in calls of their own; parameters with
        a sparse gradient go to ``sparse`` where the optimizer steps them itself
        (``_step_sparse``)."""
        scalar_keys = self._scalar_keys
        keeps_state = bool(slots) or bool(scalar_keys)
        stateless = _Call(gi, {}, slots, scalar_keys, False)
        # One call per stored layout (8-bit state adds the slots' scales; a 16-bit parameter's
        # weight correction comes last), per fresh-state flag and per parameter flags.
        calls_by: dict[tuple[tuple[str, ...], bool, tuple], _Call] = {}
        flagged_slots: dict[tuple, tuple[str, ...]] = {(): slots}
        get_state = self.state.get
        sparse_ok = self._supports_sparse_grads
        for position, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            self._check_operands(gi, p, g)
            if sparse_ok and g.layout != torch.strided:
                if group.get("caution", False):  # refused before anything is stepped
                    raise UnsupportedOptionError(
                        f"{type(self).__name__}: param group {gi}: caution=True needs dense gradients (the mask's per-tensor counts "
                        "run in the fused step) and a gradient is sparse; call .to_dense() on it or give its parameter a group "
                        "with caution=False"
                    )
                sparse.append(p)
                continue
            corrects = _precision.corrects(group, p)
            if not keeps_state and not corrects:
                stateless.add(p, g, None, position)
                continue
            flags = tuple(self._param_flags(p).items())
            p_slots = flagged_slots.get(flags)
            if p_slots is None:
                p_slots = flagged_slots[flags] = self._slots({**hyper, **dict(flags)})
            st = get_state(p)
            quantized = _precision.is_quantized(st, p_slots)
            if quantized is None:
                quantized = bool(p_slots) and self._state_dtype(p, group) == torch.uint8
            needed = _precision.stored_slots(p_slots, quantized) + ((WEIGHT_CORRECTION,) if corrects else ())
            is_new = False
            if st is None or any(k not in st for k in chain(needed, scalar_keys)):
                st, is_new = self._complete_state(p, st, needed, group, created)
            supplied = self._step_slots.get(p)
            if supplied is not None:  # this step's values of read-only slots, committed with the step
                st = created[p] = {**st, **supplied}
            if not corrects and WEIGHT_CORRECTION in st:
                # weight_correction was switched off: the correction would go stale
                st = created[p] = {k: v for k, v in st.items() if k != WEIGHT_CORRECTION}
            first = is_new and self._flags_fresh_state
            call = calls_by.get((needed, first, flags))
            if call is None:
                extra = {"first": True, **dict(flags)} if first else dict(flags)
                call = calls_by[needed, first, flags] = _Call(gi, extra, needed, scalar_keys, True)
            call.add(p, g, st, position)
        calls.extend(c for c in (stateless, *calls_by.values()) if c.params)

    def _check_operands(self, gi: int, p: Tensor, g: Tensor) -> None:
        """Refuse, before any state is made, a parameter or gradient the engine cannot update
        natively (a tensor subclass with its own dispatch) and a gradient of another dtype than its
        parameter (as torch does). DTensor parameters pass: the step runs on their local shards
        (``emafuse._dtensor`` unwraps them and checks their gradients and state)."""
        plain = type(p) is torch.nn.Parameter and type(g) is Tensor  # the common case costs two type checks
        if not plain and not _dtensor.is_dtensor(p):
            refuse_subclass(p, f"{type(self).__name__}: param group {gi}: a parameter")
            refuse_subclass(g, f"{type(self).__name__}: param group {gi}: a parameter's grad")
        if g.dtype != p.dtype:
            raise DTypeError(
                f"{type(self).__name__}: param group {gi}: a gradient has dtype {g.dtype} but its parameter has dtype {p.dtype}; "
                "gradients must have their parameter's dtype"
            )

    def _step_sparse(self, params: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Step the parameters whose gradient is sparse (``_supports_sparse_grads``), after the
        fused step of the others; AMP's found-inf flag skips them too."""
        raise NotImplementedError

    def _complete_state(
        self,
        p: Tensor,
        st: dict[str, Tensor] | None,
        slots: tuple[str, ...],
        group: dict[str, Any],
        created: dict[Tensor, dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], bool]:
        """State for ``p`` with every slot present; new tensors are zeros. Returns (state, new?).

        Nothing is stored in ``self.state`` here: new state is committed only after the native
        step succeeded, so a refused step leaves the optimizer exactly as it was.
        """
        if not st:
            st = created.setdefault(p, self._new_state(p, slots, group))
            return st, True
        missing = [name for name in slots if name not in st]
        for key in self._scalar_keys:
            if key not in st:
                raise InvalidArgumentError(f"{type(self).__name__}: the state of a parameter lacks '{key}' (a corrupted checkpoint?)")
        if not missing:
            return st, False
        fixed = dict(st)
        # New slots (e.g. amsgrad switched on) take the dtype of the slots already there.
        present = [st[name] for name in slots if name in st and name != WEIGHT_CORRECTION and not name.endswith(_precision.ABSMAX_SUFFIX)]
        dtype = present[0].dtype if present else self._state_dtype(p, group)
        for name in missing:
            fixed[name] = self._new_slot(p, name, dtype)
        created[p] = fixed
        return fixed, False

    def _staged_step(self, plan: _StepPlan, amp: tuple) -> bool:
        """The slow path for complex parameters, tensors that cannot be walked linearly together
        (non-dense parameters, gradients strided differently) and scalar state found away from its
        parameter: run the native step on real views / contiguous copies, then copy back."""
        no_complex = None if self._supports_complex else f"{plan.who} does not support complex parameters"
        groups = [c.group(plan.hypers[c.group_index]) for c in plan.calls]
        staged, copy_back = stage_groups(groups, no_complex, plan.who)
        applied = plan.run_native(_native.StepPlan(plan.who, self._rule, staged), None, amp, factors=self.__dict__.get("_tensor_factors"))
        for orig, staged_copy in copy_back:
            orig.copy_(staged_copy)
        plan.cacheable = False
        return bool(applied)


# Modules of PyTorch Lightning, whose precision plugins read ``_step_supports_amp_scaling``.
_LIGHTNING_MODULES = ("lightning.", "lightning_fabric.", "pytorch_lightning.")


@functools.cache
def _rule_info(rule: str) -> dict[str, Any]:
    return _native.rule_info(rule)


class _StateDict(defaultdict):
    """``optimizer.state`` (a ``defaultdict(dict)``, as torch keeps it) that counts changes to its
    per-parameter entries, so that a cached step plan knows when a parameter's state dict was
    replaced (changes inside one are seen by the native plan itself). Entries under other keys
    (optimizer-level counters some reference implementations keep there) are not counted."""

    __slots__ = ("version",)

    def __init__(self, default_factory: Callable[[], Any] | None = dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(default_factory, *args, **kwargs)
        self.version = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, Tensor):
            self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def _changed(name: str):  # noqa: N805 - a decorator factory used in the class body
        def method(self: _StateDict, *args: Any, **kwargs: Any) -> Any:
            self.version += 1
            return getattr(defaultdict, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    pop = _changed("pop")
    popitem = _changed("popitem")
    clear = _changed("clear")
    update = _changed("update")
    setdefault = _changed("setdefault")
    __ior__ = _changed("__ior__")
    del _changed


class _Call:
    """The tensors of one native call while a plan is collected: a parameter group's parameters
    with a gradient (or those among them that share ``extra`` flags)."""

    __slots__ = ("extra", "grads", "group_index", "offsets", "params", "positions", "scalars", "slots", "states")

    def __init__(self, group_index: int, extra: dict[str, Any], slots: tuple[str, ...], scalars: tuple[str, ...], keeps_state: bool) -> None:
        self.group_index = group_index
        self.extra = extra
        self.slots = slots
        self.scalars = scalars
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.states: list[dict[str, Tensor]] | None = [] if keeps_state else None
        # each parameter's index in its param group (for the engine's messages)
        self.positions: list[int] = []
        # shards of DTensors: each local shard's position in its whole tensor (_dtensor.flat_offset)
        self.offsets: list[int] | None = None

    def add(self, p: Tensor, g: Tensor, st: dict[str, Tensor] | None, position: int) -> None:
        self.params.append(p)
        self.grads.append(g)
        self.positions.append(position)
        if self.states is not None:
            self.states.append(st)  # type: ignore[arg-type]

    def hyper(self, group_hyper: dict[str, Any]) -> dict[str, Any]:
        return {**group_hyper, **self.extra} if self.extra else group_hyper

    def group(self, group_hyper: dict[str, Any]) -> _native.Group:
        return _native.Group(
            hyper=self.hyper(group_hyper),
            params=self.params,
            inputs=self.grads,
            states=self.states,
            slots=self.slots,
            scalars=self.scalars,
            offsets=self.offsets,
            place=(self.group_index, self.positions),
        )


class _StepPlan:
    """An optimizer's native step plan (``_native.StepPlan``) with what decides whether it still
    describes the optimizer: the ``optimizer.state`` it was built from (its object and change
    count) and each group's state layout (its slots, which follow the group's flags, and whether
    it keeps weight corrections). The native plan checks the rest at every run (the parameter
    lists and their gradients, each state dict's entries, every tensor's memory and metadata) and
    refuses to run, writing nothing, when anything changed; the optimizer then builds a new plan.

    A plan also carries the state created lazily for its parameters, committed into
    ``optimizer.state`` once a run succeeded (``commit``)."""

    def __init__(
        self,
        who: str,
        rule: str,
        calls: list[_Call],
        watch: list[list[Tensor]],
        created: dict[Tensor, dict[str, Tensor]],
        state: _StateDict,
        layout: StateLayout,
        sparse: list[Tensor],
        sharded: tuple[list[list[Tensor]], _dtensor.ShardRows, _dtensor.SplitRows] | None = None,
        reduce: Callable[[list[_Call], list[Tensor], list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.who = who
        self.calls = calls
        self.created = created
        self.layout = layout
        self.params = [p for c in calls for p in c.params]
        self.fused = {id(p) for c in calls if c.extra.get("ema") for p in c.params}
        self.sparse = sparse
        # Fresh-state flags and fused averages hold for one step only (the flags that follow a
        # parameter, `_param_flags`, hold while it does); sparse gradients are checked for in
        # Python, at every step.
        self.cacheable = not any(c.extra.get("first") or c.extra.get("ema") for c in calls) and not sparse
        self.hypers: list[dict[str, Any]] = []
        self._state = state
        self._version = -1
        self._rule = rule
        self._watch = watch if self.cacheable else None  # one run only: the inputs are the gradients given
        self._native: _native.StepPlan | None = None
        self._reduce = reduce
        # DTensor (FSDP2) parameters: the calls hold their local shards, and the per-tensor sums
        # of the sharded ones are added across their mesh (`run_native`). No parameter holds the
        # local shards of the gradients, so every run is given them (`_shard_grads`), and checks
        # what the native plan cannot see: the groups' parameter lists, the DTensors' local shards
        # and state tensors. Factored state of matrices whose rows are split across ranks reads
        # factor statistics added across the mesh (`_split_rows`).
        self._shard_rows: _dtensor.ShardRows = {}
        self._split_rows: _dtensor.SplitRows = {}
        self._factor_stats: list[list[Tensor | None]] | None = None
        self._originals: list[list[Tensor]] | None = None
        if sharded is not None:
            self._originals, self._shard_rows, self._split_rows = sharded
            self.params.extend(p for ps in self._originals for p in ps if _dtensor.is_dtensor(p))
            self._lists = [(ps, tuple(ps)) for ps in watch]
            self._planned = {id(p) for ps in self._originals for p in ps}
            self._watch = None

    def run_native(
        self,
        native: _native.StepPlan,
        hypers: list[dict[str, Any]] | None,
        amp: tuple,
        grads: list[Tensor] | None = None,
        factors: dict[int, float] | None = None,
    ) -> bool | None:
        """One run of ``native`` (this plan's calls, or staged copies of them; ``hypers``: one per
        call, None for those it was built with; ``grads``: the gradients of a plan that is given
        them; ``factors``: what each parameter's gradient is multiplied by, by parameter id, e.g.
        AdaGC's). Where calls hold shards of tensors whose rule reads sums over each whole tensor,
        the sums are computed on the shards first, added across the mesh, then the update reads
        them. A rule that reads sums over every tensor (``reduce``) gets its update's
        hyper-parameters from them in between. Factored state of matrices whose rows are split
        across ranks first has its factor statistics added across the mesh; every later pass reads
        them."""
        given: dict[str, Any] = {} if grads is None else {"grads": grads}
        if factors is not None:
            originals = self._originals if self._originals is not None else [c.params for c in self.calls]
            # (a parameter without a factor has no gradient now: the native plan finds itself stale)
            given["grad_factors"] = [[factors.get(id(p), 1.0) for p in ps] for ps in originals]
        if self._split_rows:
            local = [c.params for c in self.calls]
            if self._factor_stats is None:  # (kept: every step overwrites every element)
                self._factor_stats = _dtensor.factor_stats_arrays(local)
            stats = self._factor_stats
            if native.factor_stats(stats, hypers, *amp, **given) is None:
                return None
            _dtensor.add_factor_stats(stats, local, self._split_rows)
            given["factor_stats"] = stats
        if not self._shard_rows and self._reduce is None:
            return native.run(hypers, *amp, **given)
        built_with = [c.hyper(self.hypers[c.group_index]) for c in self.calls]
        sums = [torch.zeros((len(c.params), _native.MAX_SUMS), dtype=torch.float64, device=c.params[0].device) for c in self.calls]
        # (pass, is_max) of each sum of each call: a pass may read the sums of the earlier ones,
        # so each is added across the mesh before the next runs
        kinds = [_native.rule_sums(self._rule, h) for h in (hypers if hypers is not None else built_with)] if self._shard_rows else []
        for sum_pass in range(max((k[-1][0] + 1 for k in kinds if k), default=1)):
            if native.sums(sums, hypers, *amp, sum_pass=sum_pass, **given) is None:
                return None
            _dtensor.add_shard_sums(sums, self._shard_rows, [[(col, is_max) for col, (p, is_max) in enumerate(k) if p == sum_pass] for k in kinds])
        if self._reduce is not None:
            hypers = self._reduce(self.calls, sums, hypers if hypers is not None else built_with)
        return native.run(hypers, *amp, sums=sums, **given)

    def _shard_grads(self) -> list[Tensor] | None:
        """This run's gradients for a plan over DTensor shards, in the calls' order (local shards
        of DTensor gradients, checked to be placed like their parameter); None when the groups'
        parameters, which of them have a gradient, a DTensor's local shard or one of its state
        tensors changed since the plan was built."""
        assert self._originals is not None
        for ps, built in self._lists:
            if len(ps) != len(built) or any(a is not b for a, b in zip(ps, built)):
                return None
            if any((p.grad is not None) != (id(p) in self._planned) for p in ps):
                return None
        grads: list[Tensor] = []
        state = self._state
        for call, originals in zip(self.calls, self._originals):
            for i, p in enumerate(originals):
                g = p.grad
                if _dtensor.is_dtensor(p):
                    if p._local_tensor is not call.params[i]:  # type: ignore[attr-defined]
                        return None
                    if call.states is not None:
                        st, local = state.get(p, {}), call.states[i]
                        if any(getattr(st.get(k), "_local_tensor", None) is not local[k] for k in call.slots) or any(
                            st.get(k) is not local[k] for k in call.scalars
                        ):
                            return None
                    g = _dtensor.check_partner(p, g, self.who, "the gradient")
                grads.append(g)
        return grads

    def describes(self, state: Any, layout: StateLayout) -> bool:
        return state is self._state and state.version == self._version and layout == self.layout

    def run(self, hypers: list[dict[str, Any]], amp: tuple, factors: dict[int, float] | None = None) -> bool | None:
        """One step (the first run validates every tensor into a native plan; ``factors``: see
        ``run_native``); None if the tensors changed since."""
        self.hypers = hypers
        call_hypers = [c.hyper(hypers[c.group_index]) for c in self.calls]
        if not self.calls:
            return True
        grads = None
        if self._native is None:
            groups = [c.group(h) for c, h in zip(self.calls, call_hypers)]
            sharded = self._originals is not None
            self._native = _native.StepPlan(self.who, self._rule, groups, self._watch, grads_given=sharded)
            if sharded:
                grads = [g for c in self.calls for g in c.grads]
        elif self._originals is not None:
            grads = self._shard_grads()
            if grads is None:
                return None
        return self.run_native(self._native, call_hypers, amp, grads, factors)

    def commit(self, state: _StateDict) -> None:
        """After the first run: store the lazily created state, and forget the gradients
        collected for it (later runs read them from the parameters; the plan must not keep them
        alive)."""
        if self.created:
            state.update(self.created)
            self.created = {}
        for c in self.calls:
            c.grads = []
        self._version = state.version


def _local_calls(
    who: str, rule: str, calls: list[_Call], hypers: list[dict[str, Any]], row_sums: bool, factor_names: tuple[str, ...]
) -> tuple[list[_Call], list[list[Tensor]], _dtensor.ShardRows]:
    """``calls`` with DTensor (FSDP2) parameters replaced by their local shards, each call's
    original parameters, and where the per-tensor sums of sharded ones lie in calls whose rule
    (with the call's flags) reads such sums. ``row_sums``: the rule gathers sums per row (dim-0
    slice), which a shard holds whole only when it is sharded on dim 0. ``factor_names``: the
    row and column factors of a rule with factored state."""
    out: list[_Call] = []
    originals: list[list[Tensor]] = []
    summed: list[list[Tensor]] = []
    for c in calls:
        if row_sums:
            for p in c.params:
                dim = _dtensor.shard_dim(p)
                if dim is not None and dim > 0 and p.dim() >= 2:
                    raise UnsupportedOptionError(
                        f"{who}: a parameter of shape {tuple(p.shape)} is a DTensor sharded on dim {dim}; {who} reduces over each "
                        "row (dim-0 slice) of a parameter, which needs whole rows on every rank: shard it on dim 0 (as FSDP2's "
                        "fully_shard does) or replicate it"
                    )
        local = _Call(c.group_index, c.extra, c.slots, c.scalars, c.states is not None)
        local.params, local.grads, local.states, local.offsets = _dtensor.local_call(
            c.params, c.grads, c.states, c.slots, who, scales=[k for k in c.slots if k.endswith(_precision.ABSMAX_SUFFIX)], factors=factor_names
        )
        local.positions = c.positions
        originals.append(list(c.params))
        summed.append(c.params if _native.rule_sums(rule, c.hyper(hypers[c.group_index])) else [])
        out.append(local)
    return out, originals, _dtensor.shard_rows(summed)


def _with_fused_average(calls: list[_Call], request: FusedRequest) -> list[_Call]:
    """Split each call into the parameters whose average ``request`` maps, updated in the same
    pass (the extra slot ``ema``, last, and the flag ``ema``), and the rest. Calls that flag fresh
    state are not fused."""
    targets, weight = request.targets, request.weight
    out: list[_Call] = []
    for c in calls:
        if c.states is None or c.extra:
            out.append(c)
            continue
        fused = _Call(c.group_index, {"ema": True, "ema_weight": weight}, c.slots + ("ema",), c.scalars, True)
        rest = _Call(c.group_index, {}, c.slots, c.scalars, True)
        for p, g, st, position in zip(c.params, c.grads, c.states, c.positions):
            e = targets.get(p)
            if e is not None and e.dtype == p.dtype and all(st[name].dtype == e.dtype for name in c.slots):
                fused.add(p, g, {**st, "ema": e}, position)
            else:
                rest.add(p, g, st, position)
        out.extend(x for x in (fused, rest) if x.params)
    return out
