r"""``ModelEMA``: an exponential moving average of a model's weights, updated in one native call.

Spec: ``averaging.md`` §1, A.1–A.10 (conventions of timm, ema-pytorch, torch-ema, swa_utils,
Lightning), B.3 (EMA scaling rule), B.8 (teacher schedules), D.2/D.3 (fusion).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import Tensor, nn

from .. import _compile
from .._guard import deferred_interrupts, uninterrupted
from ..errors import InvalidArgumentError
from ..optim._fusion import FusedRequest
from ..optim._precision import check_group, step_key
from ._averager import Alias, Averager, load_module_state, saved, saved_count
from ._engine import CachedStep, engine_input, group, input_dtype, native_step, real_view
from ._offload import HostMirror
from ._tracking import Policy, Tracking, averaged_copy
from .presets import preset_kwargs
from .schedules import EMASchedule

__all__ = ["ModelEMA"]

_FORMULAS = ("lerp", "muladd", "sub")

# ModelEMA's options before a preset and the caller's keywords apply.
_DEFAULTS: dict[str, Any] = dict(
    decay=0.9999, schedule="constant", update_after_step=0, update_every=1, inv_gamma=1.0, power=2 / 3,
    first_update="copy", formula="lerp", buffers="average", non_float="copy", complex="average",
    final_decay=1.0, _float32_decay=False,
)


class ModelEMA(Averager):
    r"""An exponential moving average of a model's parameters and buffers (Polyak & Juditsky
    1992; the "model EMA" of timm, ema-pytorch, torch-ema, ``swa_utils``, Lightning):

    .. math::
        E \leftarrow \mathrm{lerp}(E, \theta, 1 - d_s) = E + (1 - d_s)(\theta - E)

    after each optimizer step, with all tensors updated by **one native call** per update (the
    engine groups them by device and dtype). ``lerp`` is torch's two-branch formula (spec §1.2);
    ``formula="muladd"`` (:math:`d E + (1-d)\theta`: timm V2, Lightning) and ``formula="sub"``
    (:math:`E - (1-d)(E - \theta)`: torch-ema) reproduce the other references' rounding.

    **Timing and schedules** (spec A.10; :class:`~emafuse.averaging.schedules.EMASchedule` has
    the full chain). ``update(model)`` is called once per optimizer step; ``s`` counts those
    calls (:attr:`num_steps_seen`, or passed as ``step=``, 1 after the first optimizer step, as
    timm's ``num_updates``). An update *event* happens when ``s - 1 >= start_step`` and
    ``(s - 1) % update_every == 0`` (steps 1, k+1, 2k+1, ...: ema-pytorch, Lightning, NeMo);
    :attr:`num_updates` counts them. The first event copies the model (``first_update="copy"``,
    default; ``"average"`` lerps from the construction-time copy as torch-ema and BYOL teachers
    do); later events copy while ``k = s - update_after_step - 1 <= 0`` and use decay
    ``d = schedule(k)`` afterwards. ``schedule=``: ``"constant"`` (``decay``); ``"warmup"``
    :math:`\max(\min(1 - (1 + k/\gamma_{inv})^{-p}, d), d_{min})` (timm ``use_warmup``,
    ema-pytorch; ``inv_gamma``, ``power``, ``min_decay``); ``"tf_num_updates"``
    :math:`\min(d, (1+n)/(10+n))` (torch-ema); ``"power"`` EDM2's
    :math:`(1 - \Delta/s)^{\gamma+1}` (``gamma`` or ``sigma_rel``); ``"cosine"`` BYOL,
    ``"dino"`` DINO, ``"linear"`` I-JEPA teacher momentum from ``decay`` to ``final_decay`` over
    ``total_steps`` events; ``"mean_teacher"`` :math:`\min(1 - 1/(s+1), d)`; or a callable
    ``f(k) -> decay`` evaluated on the host in f64. ``batch_scale=κ`` applies the EMA scaling rule
    of Busbridge et al. (NeurIPS 2023): :math:`\hat d(k) = d(\kappa k)^\kappa`;
    ``interval_compensation=True`` uses :math:`d^k` when updating every k steps.

    **What is averaged** (spec §1.4; :class:`~emafuse.averaging._tracking.Policy`): float
    parameters; float buffers per ``buffers=`` (``"average"`` default, ``"copy"``, ``"skip"``);
    integer/bool buffers such as BatchNorm's ``num_batches_tracked`` per ``non_float=``
    (``"copy"`` default, ``"skip"``, ``"truncate"`` — AveragedModel/Lightning's float formula
    truncated into the integer); complex tensors per ``complex=`` (``"average"`` or ``"copy"``);
    names in ``exclude`` / starting with ``exclude_prefix`` are left alone, names in
    ``copy_names`` are copied.

    **Precision and placement**. ``ema_dtype=torch.float32`` keeps an fp32 average of a
    bf16/fp16 model (the engine reads the low-precision weights directly; recommended: a bf16
    average cannot absorb small updates, spec §1.3). ``device="cpu"`` keeps the average in host
    memory; for a CUDA model the weights are copied device-to-host on a side stream into pinned
    buffers and the CPU update runs on a native background thread, overlapping training
    (``async_update``, default on for that case). The pending update is joined by the next
    ``update``, ``swap``/``copy_to``, ``module`` and ``state_dict``; call :meth:`attach` with the
    optimizer so its next step waits (on the GPU, without a host sync) for the copy to land
    before changing the weights. CUDA tensors go through the same native calls (fused CUDA
    kernels on PyTorch's current stream).

    **Use**: :attr:`module` is an ``nn.Module`` (eval mode) holding the average;
    ``copy_to(model)``; ``with ema.average_parameters(model):`` swaps the average into ``model``
    in place and back (a fused in-register swap, 16 B/param, no copy of the model; a backup copy
    only when the average has another dtype or device); ``swap``, ``store``/``restore``;
    ``state_dict()``/``load_state_dict()`` resume exactly (average, counters, schedule position).

    **Fused with the optimizer** (spec D.3): ``ema.attach(optimizer, fuse=True)`` with an
    ``emafuse.AdamW``/``Adam`` registers the average with the optimizer
    (``register_fused_average``), which then updates the averages of its fp32/fp64 parameters
    inside its own native step (the new weight is averaged while still in registers: 8 instead
    of 12 bytes per element, no separate pass); buffers and other tensors are updated right after
    in the same ``optimizer.step()``. Do not call ``update`` yourself then. Steps that AMP skips
    and steps the optimizer refuses are not counted.

    ``preset=`` one of :data:`~emafuse.averaging.presets.PRESETS` (``"timm_v3"``,
    ``"ema_pytorch"``, ``"torch_swa"``, ``"torch_ema"``, ``"lightning"``, ``"nemo"``, ``"keras"``,
    ``"teacher"``) sets the reference's defaults; explicit keywords override them.

    ``rounding="stochastic"`` (spec §1.3, timm ``ModelEmaV3(stochastic_rounding=True)``'s scheme:
    the fp32 result's bit pattern plus 16 random bits, truncated) rounds every bf16 average
    unbiasedly, so a bf16 average absorbs updates far below its ulp (2 bytes per parameter
    instead of ``ema_dtype=torch.float32``'s 4). The bits are a hash of ``rounding_seed`` (default
    0, the same on every rank), the count of earlier update events (``num_updates``, saved in
    ``state_dict``) and each element's position, so a resumed average continues bit for bit
    (timm's generator state is not saved; its bits differ from emafuse's). fp16 averages cannot
    round stochastically (``DTypeError`` at the update).

    Open questions decided (spec Q): integer buffers are copied by default (timm V3); hyper-
    parameters stored in a checkpoint that differ on load give a warning, not an error; the
    callable schedule receives ``k = s - update_after_step - 1``.
    """

    num_updates_applied = Alias("num_updates")

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = None,
        *,
        preset: str | None = None,
        schedule: str | Callable[[float], float] | None = None,
        update_after_step: int | None = None,
        update_every: int | None = None,
        start_step: int = 0,
        inv_gamma: float | None = None,
        power: float | None = None,
        min_decay: float = 0.0,
        gamma: float | None = None,
        sigma_rel: float | None = None,
        total_steps: int | None = None,
        final_decay: float | None = None,
        batch_scale: float = 1.0,
        interval_compensation: bool = False,
        first_update: str | None = None,
        formula: str | None = None,
        buffers: str | None = None,
        non_float: str | None = None,
        complex: str | None = None,
        exclude: Sequence[str] = (),
        exclude_prefix: Sequence[str] = (),
        copy_names: Sequence[str] = (),
        ema_dtype: torch.dtype | None = None,
        rounding: str = "nearest",
        rounding_seed: int = 0,
        device: str | torch.device | None = None,
        async_update: bool | None = None,
    ) -> None:
        given = dict(
            decay=decay, schedule=schedule, update_after_step=update_after_step, update_every=update_every,
            inv_gamma=inv_gamma, power=power, first_update=first_update, formula=formula, buffers=buffers,
            non_float=non_float, complex=complex, final_decay=final_decay,
        )
        cfg = {**_DEFAULTS, **(preset_kwargs(preset) if preset is not None else {})}
        cfg.update({k: v for k, v in given.items() if v is not None})
        cfg.update(
            start_step=int(start_step), min_decay=float(min_decay), gamma=gamma, sigma_rel=sigma_rel,
            total_steps=total_steps, batch_scale=float(batch_scale), interval_compensation=bool(interval_compensation),
            exclude=tuple(exclude), exclude_prefix=tuple(exclude_prefix), copy_names=tuple(copy_names),
            rounding=rounding, rounding_seed=rounding_seed,
        )
        check_group(type(self).__name__, {"rounding": rounding, "rounding_seed": rounding_seed})
        self._schedule = EMASchedule(
            schedule=cfg["schedule"], decay=cfg["decay"], update_every=cfg["update_every"],
            update_after_step=cfg["update_after_step"], start_step=cfg["start_step"], first_update=cfg["first_update"],
            inv_gamma=cfg["inv_gamma"], power=cfg["power"], min_decay=cfg["min_decay"], gamma=gamma, sigma_rel=sigma_rel,
            total_steps=total_steps, final_decay=cfg["final_decay"], batch_scale=cfg["batch_scale"],
            interval_compensation=cfg["interval_compensation"], float32_warmup=cfg["_float32_decay"],
        )
        if cfg["formula"] not in _FORMULAS:
            raise ValueError(f"formula must be one of {_FORMULAS}, got {cfg['formula']!r}")
        policy = Policy(buffers=cfg["buffers"], non_float=cfg["non_float"], complex=cfg["complex"], exclude=cfg["exclude"],
                        exclude_prefix=cfg["exclude_prefix"], copy_names=cfg["copy_names"])
        cfg["gamma"] = self._schedule.gamma
        self._cfg = cfg
        self.preset = preset

        model_device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
        self.device = torch.device(device) if device is not None else model_device
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if ema_dtype is not None and not ema_dtype.is_floating_point:
            raise ValueError(f"ema_dtype must be a floating dtype, got {ema_dtype}")
        self.ema_dtype = ema_dtype
        self.offloaded = model_device is not None and self.device != model_device
        if async_update is None:
            async_update = self.offloaded and model_device is not None and model_device.type == "cuda"
        self.async_update = bool(async_update)
        unabsorbing = (torch.float16,) if rounding == "stochastic" else (torch.bfloat16, torch.float16)
        if ema_dtype is None and any(p.dtype in unabsorbing for p in model.parameters()):
            warnings.warn(
                "ModelEMA of a bf16/fp16 model keeps a bf16/fp16 average, which cannot absorb small updates; "
                "pass ema_dtype=torch.float32 for an fp32 average (or rounding='stochastic' for a bf16 one)",
                stacklevel=2,
            )

        self._tracking = Tracking(type(self).__name__, model, policy)
        # device=None keeps every tensor where it is (models spread over several devices).
        self._module = averaged_copy(model, ema_dtype, self.device if device is not None else None)
        self._own = self._tracking.tensors_of(self._module)
        self._avg_targets = [real_view(self._own[i]) for i in self._tracking.averaged]
        self._avg_offsets = self._tracking.flat_offsets(self._module, self._tracking.averaged)
        self._step = CachedStep()
        self._compile_key = _compile.register(self)
        self._mirror = HostMirror(self.device if self.device is not None else torch.device("cpu"))
        self.num_steps_seen = 0
        self.num_updates = 0
        self._wait_hook: Any = None
        self._fused: Any = None  # the optimizer's handle while fused
        self._steps_before_fused: int | None = None  # num_steps_seen before the optimizer step in flight
        self._fused_event: tuple[list[Tensor], float] | None = None  # its (model tensors, decay)

    def _averaged(self) -> tuple[nn.Module, list[Tensor]]:
        self._mirror.join()
        return self._module, self._own

    @property
    def config(self) -> dict[str, Any]:
        """The effective hyper-parameters (after the preset)."""
        return {k: v for k, v in self._cfg.items() if not k.startswith("_")}

    # -- schedule -----------------------------------------------------------------------------

    def is_update_step(self, s: int) -> bool:
        """Whether optimizer step ``s`` (1-based) is an update event."""
        return self._schedule.is_update_step(s)

    def decay_at(self, s: int, n: int | None = None) -> float:
        """The decay used by an event at step ``s`` with ``n`` earlier events (default: the
        current count). 0 means the event copies the model."""
        return self._schedule.decay_at(s, self.num_updates if n is None else n)

    @property
    def decay(self) -> float:
        """The decay the next event would use."""
        return self.decay_at(self.num_steps_seen + 1)

    # -- update -------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, step: int | None = None, *, force: bool = False) -> bool | Tensor:
        """Account for one optimizer step (or set the step count to ``step``) and, if it is an
        update event (or ``force``), update the average from ``model`` (default: the model it was
        built from). Returns whether the average changed.

        Under ``torch.compile`` the update is one opaque custom op (``emafuse::average_update``,
        see ``emafuse._compile``) running this eager update, and the result is a 0-dim bool tensor."""
        if torch.compiler.is_compiling():
            tracked = self._tracking.model(None)
            if model is not None and model is not tracked:
                raise InvalidArgumentError(
                    f"{type(self).__name__}: under torch.compile, update() reads the model the average was built from; "
                    "pass that model (or none)"
                )
            read = [*tracked.parameters(), *tracked.buffers()]
            return _compile.average_update(self._compile_key, step, force, self.fused_outputs(), read)
        with deferred_interrupts():
            return self._eager_update(model, step, force)

    def _eager_update(self, model: nn.Module | None, step: int | None, force: bool) -> bool:
        if self._fused is not None:
            raise InvalidArgumentError(f"{type(self).__name__} is fused with an optimizer: its step() updates the average")
        self._tracking.check_not_swapped()
        self._mirror.join()
        s = self.num_steps_seen + 1 if step is None else int(step)
        # Checked at every call (cached: a few lookups), so that a refused call counts nothing.
        thetas = self._tracking.model_tensors(self._tracking.model(model))
        if not (force or self.is_update_step(s)):
            self.num_steps_seen = s
            return False
        self._apply(thetas, self.decay_at(s))
        self.num_steps_seen = s
        self.num_updates += 1
        return True

    def _hyper(self, weight: float) -> dict[str, Any]:
        f = self._cfg["formula"]
        hyper: dict[str, Any] = {"weight": weight, "muladd": f == "muladd", "sub": f == "sub"}
        if self._cfg["rounding"] == "stochastic":
            # this event's random bits: from the seed and the count of earlier events (saved)
            hyper["rounding_key"] = step_key(int(self._cfg["rounding_seed"]), self.num_updates)
        return hyper

    def _apply(self, thetas: list[Tensor], d: float, done: AbstractSet[int] = frozenset()) -> None:
        """One event with decay ``d`` from the model's tensors ``thetas``; ``done``: ids of the
        parameters whose average the optimizer's native pass already updated."""
        if self.offloaded:
            self._apply_offloaded(thetas, d)
            return
        averaged = self._tracking.averaged
        targets, offsets = self._avg_targets, self._avg_offsets
        if done:
            keep = [j for j, i in enumerate(averaged) if id(thetas[i]) not in done]
            targets, averaged = [targets[j] for j in keep], [averaged[j] for j in keep]
            offsets = None if offsets is None else [offsets[j] for j in keep]
        if targets:
            hyper = self._hyper(1.0 - d)
            inputs = None if done else self._step.inputs_for(thetas)
            if inputs is None:
                inputs = [engine_input(self._own[i], thetas[i]) for i in averaged]
                if done or any(x is not thetas[i] or x.is_complex() for x, i in zip(inputs, averaged)):
                    # Converted or viewed inputs are new tensors each time: no plan to keep.
                    native_step(type(self).__name__, "ema", group(hyper, targets, [real_view(x) for x in inputs], offsets=offsets))
                    inputs = None
            if inputs is not None:
                self._step.run(type(self).__name__, "ema", (thetas, targets), lambda: group(hyper, targets, inputs, offsets=offsets))
        self._follow(thetas, d)

    def _follow(self, src: Sequence[Tensor] | Mapping[int, Tensor], d: float) -> None:
        """The copied and truncated entries of an event, from ``src`` (by entry index)."""
        own, copied = self._own, self._tracking.copied
        if copied:
            torch._foreach_copy_([own[i] for i in copied], [src[i] for i in copied])
        for i in self._tracking.truncated:
            # AveragedModel's / Lightning's integer path: the float result truncated on copy.
            own[i].copy_(own[i] * d + src[i].to(own[i].device) * (1 - d))

    def _apply_offloaded(self, thetas: list[Tensor], d: float) -> None:
        tr, own = self._tracking, self._own
        averaged = set(tr.averaged)
        dtypes = [input_dtype(own[i], thetas[i]) if i in averaged else thetas[i].dtype for i in tr.followed]
        bufs, wait_for = self._mirror.fill([thetas[i] for i in tr.followed], dtypes, hold_compute=self._wait_hook is None)
        src = dict(zip(tr.followed, bufs))
        update = group(self._hyper(1.0 - d), self._avg_targets, [real_view(src[i]) for i in tr.averaged], offsets=self._avg_offsets) if tr.averaged else None
        self._mirror.run(type(self).__name__, "ema", update, wait_for, lambda: self._follow(src, d), background=self.async_update)

    def wait(self) -> None:
        """Block until a background update has finished."""
        self._mirror.join()

    # -- fusion with an optimizer ---------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, fuse: bool = False) -> ModelEMA:
        """Tie the average to ``optimizer``.

        * With an offloaded average, the optimizer's next step waits (GPU-side) for the
          device-to-host copy of the weights before changing them.
        * ``fuse=True`` (``emafuse.AdamW``/``Adam``): registers this average with the optimizer
          (``optimizer.register_fused_average``): the average of every fp32/fp64 parameter that
          has the parameter's dtype and device is updated inside the optimizer's native step from
          the new weights; the remaining tensors (buffers, other dtypes, parameters without
          gradient) right after, in the same ``step()``. Equal to calling ``update()`` after each
          step.
        """
        if fuse:
            register = getattr(optimizer, "register_fused_average", None)
            if register is None:
                raise InvalidArgumentError(f"{type(optimizer).__name__} cannot update a ModelEMA inside its step")
            if self.offloaded or self.async_update:
                raise InvalidArgumentError("fuse=True needs the average on the model's device (no offload)")
            if self._fused is not None:
                raise InvalidArgumentError(f"{type(self).__name__} is already fused with an optimizer; detach_optimizer() first")
            self._fused = register(self)
        elif self.offloaded:
            self._wait_hook = optimizer.register_step_pre_hook(self._mirror.wait_on_device)
        return self

    def detach_optimizer(self) -> None:
        """Undo :meth:`attach`."""
        for handle in (self._fused, self._wait_hook):
            if handle is not None:
                handle.remove()
        self._fused = None
        self._wait_hook = None

    def fused_begin(self, found_inf: Tensor | None) -> FusedRequest | None:
        """Fusion protocol (``emafuse.optim._fusion.FusedAverage``), called by the optimizer
        before its native step: counts the step unless AMP skips it, and for an update event
        returns the decay's weight and the parameters whose average the native pass can update
        (fp32/fp64 parameters with a same-dtype, same-device contiguous average, lerp formula)."""
        self._steps_before_fused = self.num_steps_seen
        if found_inf is not None and float(found_inf.item()):
            return None
        self._tracking.check_not_swapped()
        s = self.num_steps_seen + 1
        if not self.is_update_step(s):
            self.num_steps_seen = s
            return None
        tr = self._tracking
        thetas = tr.model_tensors(tr.model())
        d = self.decay_at(s)
        targets: dict[Tensor, Tensor] = {}
        if self._cfg["formula"] == "lerp":
            for i in tr.averaged:
                th, own = thetas[i], self._own[i]
                if (tr.entries[i].is_param and th.dtype in (torch.float32, torch.float64) and own.dtype == th.dtype
                        and own.device == th.device and own.is_contiguous() and th.is_contiguous()):
                    targets[th] = own
        self.num_steps_seen = s
        self._fused_event = (thetas, d)
        return FusedRequest(weight=1.0 - d, targets=targets)

    def fused_end(self, request: FusedRequest, fused: set[int]) -> None:
        """Fusion protocol: after the optimizer's native step, update what it did not and count
        the event."""
        thetas, d = self._fused_event  # type: ignore[misc]
        self._apply(thetas, d, done=fused)
        self.num_updates += 1
        self._steps_before_fused = self._fused_event = None

    def fused_outputs(self) -> list[Tensor]:
        """Fusion protocol: the average's tensors, which an update writes."""
        return [self._own[i] for i in self._tracking.followed]

    def fused_abort(self, request: FusedRequest | None) -> None:
        """Fusion protocol: the optimizer's step raised; the step is not counted."""
        if self._steps_before_fused is not None:
            self.num_steps_seen = self._steps_before_fused
        self._steps_before_fused = self._fused_event = None

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The average (``module``'s state_dict), the counters and the hyper-parameters."""
        self._mirror.join()
        return {
            "module": self._module.state_dict(),
            "num_steps_seen": self.num_steps_seen,
            "num_updates": self.num_updates,
            "config": {k: v for k, v in self._cfg.items() if not callable(v)},
            "preset": self.preset,
        }

    @uninterrupted
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also checkpoints of emafuse <= 0.1, which
        name ``num_updates`` ``num_updates_applied``); a mismatched average raises, differing
        hyper-parameters warn."""
        self._mirror.join()
        who = type(self).__name__
        steps = saved_count(who, state, "num_steps_seen")
        updates = saved_count(who, state, "num_updates", "num_updates_applied")
        load_module_state(who, self._module, saved(who, state, "module"))
        self.num_steps_seen, self.num_updates = steps, updates
        theirs = state.get("config", {})
        diff = {k: (theirs[k], v) for k, v in self._cfg.items() if k in theirs and theirs[k] != v and not callable(v)}
        if diff:
            warnings.warn(f"{who}.load_state_dict: hyper-parameters differ from the checkpoint's (saved, now): {diff}", stacklevel=2)

    def __repr__(self) -> str:
        c = self._cfg
        sch = c["schedule"] if not callable(c["schedule"]) else "callable"
        return (f"{type(self).__name__}(decay={c['decay']}, schedule={sch}, update_every={c['update_every']}, "
                f"device={self.device}, updates={self.num_updates})")


