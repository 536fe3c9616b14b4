r"""``ModelEMA``: an exponential moving average of a model's weights, updated in one native call.

Spec: ``averaging.md`` §1, A.1–A.10 (conventions of timm, ema-pytorch, torch-ema, swa_utils,
Lightning), B.3 (EMA scaling rule), B.8 (teacher schedules), D.2/D.3 (fusion).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError, ShapeError
from . import schedules as S
from ._engine import native_step, native_step_async, real_view

__all__ = ["ModelEMA", "PRESETS", "preset_kwargs"]

_SCHEDULES = ("constant", "warmup", "tf_num_updates", "power", "cosine", "dino", "linear", "mean_teacher")

#: Keyword arguments of :class:`ModelEMA` that reproduce each reference tool (spec A.2–A.8).
PRESETS: dict[str, dict[str, Any]] = {
    # timm ModelEmaV3 called as timm's train.py does (update(model, step=num_updates), 1-based):
    # copy while step <= update_after_step + 1, float entries lerped, everything else copied
    # (complex too: timm tests is_floating_point()).
    "timm_v3": dict(decay=0.9999, schedule="constant", buffers="average", non_float="copy", complex="copy"),
    # lucidrains ema-pytorch EMA: copy at the first call and while step <= update_after_step,
    # warm-up always on (decay computed in float32 as it does), every update_every calls,
    # non-float buffers never touched.
    "ema_pytorch": dict(
        decay=0.9999, schedule="warmup", update_after_step=100, update_every=10, inv_gamma=1.0, power=2 / 3,
        non_float="skip", _float32_decay=True,
    ),
    # torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay)), use_buffers=False:
    # first call copies, parameters lerped, every buffer copied.
    "torch_swa": dict(decay=0.999, schedule="constant", buffers="copy"),
    # torch-ema ExponentialMovingAverage(parameters, decay): no initial copy, TF num_updates cap,
    # E - (1-d)(E - theta), parameters only.
    "torch_ema": dict(schedule="tf_num_updates", first_update="average", formula="sub", buffers="skip"),
    # Lightning EMAWeightAveraging (AveragedModel + get_ema_avg_fn, use_buffers=True): first
    # update copies, d*E + (1-d)*theta for floats, integer buffers truncated.
    "lightning": dict(decay=0.999, schedule="constant", formula="muladd", buffers="average", non_float="truncate"),
    # NVIDIA NeMo EMA callback (EMAOptimizer): parameters only, E starts as the pre-step clone (no
    # initial copy), d*E + (1-d)*theta, every every_n_steps steps (steps 1, n+1, ...).
    "nemo": dict(decay=0.999, schedule="constant", first_update="average", formula="muladd", buffers="skip"),
    # Keras 3 use_ema: trainable variables only, momentum 0 at the first update (a copy),
    # m*E + (1-m)*theta afterwards.
    "keras": dict(decay=0.99, schedule="constant", formula="muladd", buffers="skip"),
    # BYOL/DINO-style teacher: parameters only, no initial copy (the teacher starts as the
    # student's initial weights), cosine momentum 0.996 -> 1.
    "teacher": dict(decay=0.996, schedule="cosine", final_decay=1.0, first_update="average", buffers="skip"),
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` (see :data:`PRESETS`)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


@dataclass
class _Entry:
    name: str
    is_param: bool
    action: str  # "average" | "copy" | "truncate" | "skip"


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def _decide(name: str, t: Tensor, is_param: bool, cfg: dict[str, Any]) -> str:
    if name in cfg["exclude"] or any(name.startswith(p) for p in cfg["exclude_prefix"]):
        return "skip"
    if not is_param and cfg["buffers"] == "skip":
        return "skip"
    if not (_is_float(t) or t.is_complex()):
        return {"copy": "copy", "skip": "skip", "truncate": "truncate"}[cfg["non_float"]]
    if name in cfg["copy_names"]:
        return "copy"
    if not is_param and cfg["buffers"] == "copy":
        return "copy"
    if t.is_complex() and cfg["complex"] == "copy":
        return "copy"
    return "average"


class ModelEMA:
    r"""An exponential moving average of a model's parameters and buffers (Polyak & Juditsky
    1992; the "model EMA" of timm, ema-pytorch, torch-ema, ``swa_utils``, Lightning):

    .. math::
        E \leftarrow \mathrm{lerp}(E, \theta, 1 - d_s) = E + (1 - d_s)(\theta - E)

    after each optimizer step, with all tensors updated by **one native call** per update (the
    engine groups them by device and dtype). ``lerp`` is torch's two-branch formula (spec §1.2);
    ``formula="muladd"`` (:math:`d E + (1-d)\theta`: timm V2, Lightning) and ``formula="sub"``
    (:math:`E - (1-d)(E - \theta)`: torch-ema) reproduce the other references' rounding.

    **Timing** (spec A.10). ``update(model)`` is called once per optimizer step; ``s`` counts
    those calls (or is passed as ``step=``, 1 after the first optimizer step, as timm's
    ``num_updates``). An update *event* happens when ``s - 1 >= start_step`` and
    ``(s - 1) % update_every == 0`` (steps 1, k+1, 2k+1, ...: ema-pytorch, Lightning, NeMo). The
    first event copies the model (``first_update="copy"``, default; ``"average"`` lerps from the
    construction-time copy as torch-ema and BYOL teachers do); later events copy while
    ``k = s - update_after_step - 1 <= 0`` and use decay ``d = schedule(k)`` afterwards.

    **Schedules** (``schedule=``): ``"constant"`` (``decay``); ``"warmup"``
    :math:`\max(\min(1 - (1 + k/\gamma_{inv})^{-p}, d), d_{min})` (timm ``use_warmup``,
    ema-pytorch; ``inv_gamma``, ``power``, ``min_decay``); ``"tf_num_updates"``
    :math:`\min(d, (1+n)/(10+n))` with n the number of events including this one (torch-ema);
    ``"power"`` EDM2's :math:`(1 - \Delta/s)^{\gamma+1}` (``gamma`` or ``sigma_rel``,
    Δ = ``update_every``); ``"cosine"`` BYOL, ``"dino"`` DINO, ``"linear"`` I-JEPA teacher
    momentum from ``decay`` to ``final_decay`` over ``total_steps`` events; ``"mean_teacher"``
    :math:`\min(1 - 1/(s+1), d)`; or a callable ``f(k) -> decay`` evaluated on the host in f64.
    ``batch_scale=κ`` applies the EMA scaling rule of Busbridge et al. (NeurIPS 2023) for a
    κ-times larger batch: :math:`\hat d(k) = d(\kappa k)^\kappa` (constant: :math:`d^\kappa`).
    ``interval_compensation=True`` uses :math:`d^k` when updating every k steps.

    **What is averaged** (spec §1.4): float parameters; float buffers per ``buffers=``
    (``"average"`` default, ``"copy"``, ``"skip"``); integer/bool buffers such as BatchNorm's
    ``num_batches_tracked`` per ``non_float=`` (``"copy"`` default, ``"skip"``, ``"truncate"`` —
    AveragedModel/Lightning's float formula truncated into the integer); complex tensors per
    ``complex=`` (``"average"`` or ``"copy"``); names in ``exclude`` / starting with
    ``exclude_prefix`` are left alone, names in ``copy_names`` are copied.

    **Precision and placement**. ``ema_dtype=torch.float32`` keeps an fp32 average of a
    bf16/fp16 model (the engine reads the low-precision weights directly; recommended: a bf16
    average cannot absorb small updates, spec §1.3). ``device="cpu"`` keeps the average in host
    memory; for a CUDA model the weights are copied device-to-host on a side stream into pinned
    buffers and the CPU update runs on a native background thread, overlapping training
    (``async_update``, default on for that case). The pending update is joined by the next
    ``update``, ``swap``/``copy_to``/``store``, ``module`` and ``state_dict``; call
    :meth:`attach` with the optimizer so its next step waits (on the GPU, without a host sync)
    for the copy to land before changing the weights.

    CUDA tensors go through the same native calls (fused CUDA kernels on PyTorch's current
    stream).

    **Use**: ``module`` is an ``nn.Module`` (eval mode) holding the average; ``copy_to(model)``;
    ``with ema.average_parameters(model):`` swaps the average into ``model`` in place and back
    (a fused in-register swap, 16 B/param, no copy of the model; a backup copy only when the
    average has another dtype or device); ``state_dict()``/``load_state_dict()`` resume exactly
    (average, counters, schedule position).

    **Fused with the optimizer** (spec D.3): ``ema.attach(optimizer, fuse=True)`` with an
    ``emafuse.AdamW``/``Adam`` updates the averages of its fp32/fp64 parameters inside the
    optimizer's own native step (the new weight is averaged while still in registers: 8 instead
    of 12 bytes per element, no separate pass); buffers and other tensors are updated right after
    in the same ``optimizer.step()``. Do not call ``update`` yourself then. Steps that AMP skips
    are not counted.

    ``preset=`` one of :data:`PRESETS` (``"timm_v3"``, ``"ema_pytorch"``, ``"torch_swa"``,
    ``"torch_ema"``, ``"lightning"``, ``"nemo"``, ``"keras"``, ``"teacher"``) sets the
    reference's defaults; explicit keywords override them. Parity is tested against timm,
    ema-pytorch, torch-ema, ``swa_utils`` and Lightning; the NeMo and Keras presets follow the spec's
    description (A.7, A.8) and are not tested against those frameworks. Not implemented: timm's
    stochastic rounding of bf16 averages (``rounding="stochastic"``; use ``ema_dtype=float32``).

    Open questions decided (spec Q): integer buffers are copied by default (timm V3); hyper-
    parameters stored in a checkpoint that differ on load give a warning, not an error; the
    callable schedule receives ``k = s - update_after_step - 1``.
    """

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
        complex: str | None = None,  # noqa: A002 (the spec's name for the policy)
        exclude: tuple[str, ...] | list[str] = (),
        exclude_prefix: tuple[str, ...] | list[str] = (),
        copy_names: tuple[str, ...] | list[str] = (),
        ema_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        async_update: bool | None = None,
    ) -> None:
        base = preset_kwargs(preset) if preset is not None else {}
        given = dict(
            decay=decay, schedule=schedule, update_after_step=update_after_step, update_every=update_every,
            inv_gamma=inv_gamma, power=power, first_update=first_update, formula=formula, buffers=buffers,
            non_float=non_float, complex=complex, final_decay=final_decay,
        )
        cfg: dict[str, Any] = dict(
            decay=0.9999, schedule="constant", update_after_step=0, update_every=1, inv_gamma=1.0, power=2 / 3,
            first_update="copy", formula="lerp", buffers="average", non_float="copy", complex="average",
            final_decay=1.0, _float32_decay=False,
        )
        cfg.update(base)
        cfg.update({k: v for k, v in given.items() if v is not None})
        cfg.update(
            start_step=int(start_step), min_decay=float(min_decay), gamma=gamma, sigma_rel=sigma_rel,
            total_steps=total_steps, batch_scale=float(batch_scale), interval_compensation=bool(interval_compensation),
            exclude=tuple(exclude), exclude_prefix=tuple(exclude_prefix), copy_names=tuple(copy_names),
        )
        self._validate(cfg)
        if cfg["schedule"] == "power":
            if (gamma is None) == (sigma_rel is None):
                raise ValueError("schedule='power' needs exactly one of gamma= or sigma_rel=")
            cfg["gamma"] = float(gamma) if gamma is not None else S.sigma_rel_to_gamma(float(sigma_rel))
        self._cfg = cfg
        self.preset = preset

        model_device = _model_device(model)
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if ema_dtype is not None and not ema_dtype.is_floating_point:
            raise ValueError(f"ema_dtype must be a floating dtype, got {ema_dtype}")
        self.ema_dtype = ema_dtype
        self.offloaded = model_device is not None and self.device != model_device
        if async_update is None:
            async_update = self.offloaded and model_device is not None and model_device.type == "cuda"
        self.async_update = bool(async_update)

        # The average: a copy of the model built directly on the target device and dtype (no
        # transient copy on the model's device).
        memo: dict[int, Any] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in memo:
                continue
            x = t.detach()
            # device=None keeps every tensor where it is (models spread over several devices).
            dev = x.device if device is None else self.device
            if ema_dtype is not None and x.is_floating_point():
                x = x.to(device=dev, dtype=ema_dtype, copy=True)
            else:
                x = x.to(device=dev, copy=True)
            memo[id(t)] = nn.Parameter(x, requires_grad=False) if isinstance(t, nn.Parameter) else x
        self._module: nn.Module = copy.deepcopy(model, memo)
        self._module.eval()
        for p in self._module.parameters():
            p.requires_grad_(False)
        if ema_dtype is None and any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            warnings.warn(
                "ModelEMA of a bf16/fp16 model keeps a bf16/fp16 average, which cannot absorb small updates; "
                "pass ema_dtype=torch.float32 for an fp32 average",
                stacklevel=2,
            )

        self._entries: list[_Entry] = []
        own = dict(self._named_tensors(self._module))
        for name, t, is_param in self._named_tensors_with_kind(model):
            self._entries.append(_Entry(name, is_param, _decide(name, t, is_param, cfg)))
        self._own = [own[e.name] for e in self._entries]
        self._idx = {a: [i for i, e in enumerate(self._entries) if e.action == a] for a in ("average", "copy", "truncate")}
        self._avg_targets = [real_view(self._own[i]) for i in self._idx["average"]]
        self._model_ref = weakref.ref(model)
        self._model_cache: tuple | None = None

        self.num_steps_seen = 0
        self.num_updates_applied = 0
        self.initialized = True
        self._pending: Any = None
        self._pending_post: list[tuple[Tensor, Tensor]] = []
        self._pending_trunc: list[tuple[Tensor, Tensor, float]] = []
        self._wait_hook: Any = None
        self._stored: list[tuple[int, Tensor]] | None = None
        self._host_bufs: list[Tensor] | None = None
        self._copy_event: Any = None
        self._side_stream: Any = None
        self._swapped: Any = None
        self._fused_opt: Any = None

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no gradients); joins a pending background update."""
        self._join()
        return self._module

    # -- configuration ------------------------------------------------------------------------

    @staticmethod
    def _validate(cfg: dict[str, Any]) -> None:
        d = cfg["decay"]
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {d}")
        sch = cfg["schedule"]
        if not callable(sch) and sch not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES} or a callable, got {sch!r}")
        if sch in ("cosine", "dino", "linear") and not cfg.get("total_steps"):
            raise ValueError(f"schedule={sch!r} needs total_steps=")
        if int(cfg["update_every"]) < 1:
            raise ValueError(f"update_every must be >= 1, got {cfg['update_every']}")
        if int(cfg["update_after_step"]) < 0 or cfg["start_step"] < 0:
            raise ValueError("update_after_step and start_step must be >= 0")
        choices = dict(
            first_update=("copy", "average"), formula=("lerp", "muladd", "sub"), buffers=("average", "copy", "skip"),
            non_float=("copy", "skip", "truncate"), complex=("average", "copy"),
        )
        for key, allowed in choices.items():
            if cfg[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {cfg[key]!r}")
        if cfg["batch_scale"] <= 0:
            raise ValueError(f"batch_scale must be positive, got {cfg['batch_scale']}")

    @property
    def config(self) -> dict[str, Any]:
        """The effective hyper-parameters (after the preset)."""
        return {k: v for k, v in self._cfg.items() if not k.startswith("_")}

    # -- tensors ------------------------------------------------------------------------------

    @staticmethod
    def _named_tensors(m: nn.Module) -> Iterator[tuple[str, Tensor]]:
        yield from m.named_parameters()
        yield from m.named_buffers()

    @staticmethod
    def _named_tensors_with_kind(m: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
        for n, p in m.named_parameters():
            yield n, p, True
        for n, b in m.named_buffers():
            yield n, b, False

    def _model_tensors(self, model: nn.Module) -> list[Tensor]:
        """The model's tensors in entry order; a clear error if its structure changed.

        The lookup is cached: later calls only check that the module tree, each module's
        parameter/buffer/submodule counts and every tensor object are unchanged (a few dict
        lookups per module, no ``named_parameters()`` walk)."""
        cache = self._model_cache
        if cache is not None and cache[0] is model and _unchanged(cache[1], cache[2]):
            return cache[3]
        named = dict(self._named_tensors(model))
        names = [e.name for e in self._entries]
        missing = [n for n in names if n not in named]
        unexpected = [n for n in named if n not in set(names)]
        if missing or unexpected:
            raise InvalidArgumentError(
                "ModelEMA: the model's structure changed since the average was made: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        ordered = [named[n] for n in names]
        for e, own, t in zip(self._entries, self._own, ordered):
            if e.action != "skip" and own.shape != t.shape:
                raise ShapeError(f"ModelEMA: '{e.name}' has shape {tuple(t.shape)} in the model but {tuple(own.shape)} in the average")
        modules = dict(model.named_modules(remove_duplicate=False))
        mods = [(m, len(m._parameters), len(m._buffers), len(m._modules), list(m._modules.items())) for m in
                {id(m): m for m in modules.values()}.values()]
        slots = []
        for n in names:
            mod_name, _, key = n.rpartition(".")
            mod = modules[mod_name]
            slots.append((mod, key, named[n]))
        self._model_cache = (model, mods, slots, ordered)
        return ordered

    def _resolve_model(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            model = self._model_ref()
            if model is None:
                raise InvalidArgumentError("ModelEMA: the model it was built from is gone; pass it explicitly")
        return model

    # -- schedule -----------------------------------------------------------------------------

    def is_update_step(self, s: int) -> bool:
        """Whether optimizer step ``s`` (1-based) is an update event."""
        c = self._cfg
        return s - 1 >= c["start_step"] and (s - 1) % int(c["update_every"]) == 0

    def decay_at(self, s: int, n: int | None = None) -> float:
        """The decay used by an event at step ``s`` with ``n`` earlier events (default: the
        current count). 0 means the event copies the model."""
        c = self._cfg
        n = self.num_updates_applied if n is None else n
        k = s - int(c["update_after_step"]) - 1
        if c["first_update"] == "copy" and (n == 0 or k <= 0):
            return 0.0
        kappa = c["batch_scale"]
        sch = c["schedule"]
        d = c["decay"]
        if sch == "constant":
            out = d
        elif sch == "warmup":
            if c["_float32_decay"]:
                out = _warmup_f32(k * kappa, d, c["inv_gamma"], c["power"], c["min_decay"])
            else:
                out = S.warmup_decay(k * kappa, d, c["inv_gamma"], c["power"], c["min_decay"])
        elif sch == "tf_num_updates":
            out = S.tf_num_updates_decay((n + 1) * kappa, d)
        elif sch == "power":
            return S.power_beta(float(s), c["gamma"], float(c["update_every"]))
        elif sch == "cosine":
            out = S.byol_cosine(n, c["total_steps"], d, c["final_decay"])
        elif sch == "dino":
            out = S.dino_cosine(n, c["total_steps"], d, c["final_decay"])
        elif sch == "linear":
            out = S.linear_momentum(n, c["total_steps"], d, c["final_decay"])
        elif sch == "mean_teacher":
            out = S.mean_teacher_decay(int(s * kappa), d)
        else:
            out = float(sch(k * kappa))
            if not 0.0 <= out <= 1.0:
                raise ValueError(f"schedule returned decay {out} outside [0, 1] at k={k}")
        if kappa != 1.0:
            out = out**kappa
        if c["interval_compensation"] and int(c["update_every"]) > 1:
            out = out ** int(c["update_every"])
        return out

    @property
    def decay(self) -> float:
        """The decay the next event would use."""
        return self.decay_at(self.num_steps_seen + 1)

    # -- update -------------------------------------------------------------------------------

    def _hyper(self, weight: float) -> dict[str, Any]:
        f = self._cfg["formula"]
        return {"weight": weight, "muladd": f == "muladd", "sub": f == "sub"}

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, step: int | None = None, *, force: bool = False) -> bool:
        """Account for one optimizer step (or set the step count to ``step``) and, if it is an
        update event (or ``force``), update the average from ``model`` (default: the model it was
        built from). Returns whether the average changed."""
        if self._fused_opt is not None:
            raise InvalidArgumentError("ModelEMA is fused with an optimizer: its step() updates the average")
        self._check_not_swapped()
        self._join()
        s = self.num_steps_seen + 1 if step is None else int(step)
        self.num_steps_seen = s
        if not (force or self.is_update_step(s)):
            return False
        model = self._resolve_model(model)
        d = self.decay_at(s)
        self._apply(self._model_tensors(model), d)
        self.num_updates_applied += 1
        return True

    def _apply(self, thetas: list[Tensor], d: float, skip_avg: set[int] | None = None) -> None:
        w = 1.0 - d
        idx = self._idx
        if self.offloaded:
            self._apply_offloaded(thetas, w)
            return
        avg_i = idx["average"]
        if skip_avg:
            pairs = [(t, real_view(thetas[i])) for t, i in zip(self._avg_targets, avg_i) if i not in skip_avg]
            targets, inputs = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            targets, inputs = self._avg_targets, [real_view(thetas[i]) for i in avg_i]
        if targets:
            inputs = _engine_inputs(targets, inputs)
            native_step("ModelEMA", "ema", [(self._hyper(w), targets, inputs, None, ())])
        self._copy_and_truncate(thetas, d)

    def _copy_and_truncate(self, thetas: list[Tensor], d: float) -> None:
        own = self._own
        for i in self._idx["copy"]:
            own[i].copy_(thetas[i])
        for i in self._idx["truncate"]:
            # AveragedModel's / Lightning's integer path: the float result truncated on copy.
            own[i].copy_(own[i] * d + thetas[i].to(own[i].device) * (1 - d))

    # -- offloaded / asynchronous update ------------------------------------------------------

    def _staged_indices(self) -> list[int]:
        return self._idx["average"] + self._idx["copy"] + self._idx["truncate"]

    def _apply_offloaded(self, thetas: list[Tensor], w: float) -> None:
        staged = self._staged_indices()
        if self._host_bufs is None:
            pin = torch.cuda.is_available() and self.device.type == "cpu"
            self._host_bufs = [
                torch.empty(thetas[i].shape, dtype=thetas[i].dtype, device=self.device, pin_memory=pin) for i in staged
            ]
        bufs = dict(zip(staged, self._host_bufs))
        src_dev = thetas[staged[0]].device if staged else self.device
        wait_for = None
        if src_dev.type == "cuda":
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=src_dev)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(src_dev))
            with torch.cuda.stream(side):
                for i in staged:
                    bufs[i].copy_(thetas[i], non_blocking=True)
                    # The model tensor must outlive the copy (the caching allocator must not hand
                    # its memory out before the side stream is done with it).
                    thetas[i].record_stream(side)
            ev = torch.cuda.Event()
            ev.record(side)
            self._copy_event = ev
            wait_for = ev.synchronize
            if self._fused_opt is None and self._wait_hook is None:
                # No optimizer told us when the weights change next: make the compute stream wait
                # for the copy now (on the GPU; the host does not block).
                torch.cuda.current_stream(src_dev).wait_event(ev)
        else:
            torch._foreach_copy_([bufs[i] for i in staged], [thetas[i] for i in staged])
        targets = self._avg_targets
        inputs = _engine_inputs(targets, [real_view(bufs[i]) for i in self._idx["average"]])
        d = 1.0 - w
        post = [(self._own[i], bufs[i]) for i in self._idx["copy"]]
        self._pending_post = post
        self._pending_trunc = [(self._own[i], bufs[i], d) for i in self._idx["truncate"]]
        if targets:
            call = [(self._hyper(w), targets, inputs, None, ())]
            if self.async_update:
                self._pending = native_step_async("ModelEMA", "ema", call, wait_for)
            else:
                if wait_for is not None:
                    wait_for()
                native_step("ModelEMA", "ema", call)
        elif wait_for is not None:
            self._pending = _Waiter(wait_for)
        if self._pending is None:
            self._finish_post()

    def _finish_post(self) -> None:
        for own, buf in self._pending_post:
            own.copy_(buf)
        for own, buf, d in self._pending_trunc:
            own.copy_(own * d + buf * (1 - d))
        self._pending_post = []
        self._pending_trunc = []

    def _join(self) -> None:
        """Wait for a pending background update."""
        p = self._pending
        if p is not None:
            self._pending = None
            p.wait()
            self._finish_post()

    def wait(self) -> None:
        """Block until a background update has finished."""
        self._join()

    def _wait_copy_on_device(self, *args: Any, **kwargs: Any) -> None:
        ev = self._copy_event
        if ev is not None:
            torch.cuda.current_stream(ev.device if hasattr(ev, "device") else None).wait_event(ev)
            self._copy_event = None

    # -- fusion with an optimizer ---------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, fuse: bool = False) -> "ModelEMA":
        """Tie the average to ``optimizer``.

        * With an offloaded average, the optimizer's next step waits (GPU-side) for the
          device-to-host copy of the weights before changing them.
        * ``fuse=True`` (``emafuse.AdamW``/``Adam``): the average of every fp32/fp64 parameter
          that has the parameter's dtype and device is updated inside the optimizer's native step
          from the new weights; the remaining tensors (buffers, other dtypes, parameters without
          gradient) right after, in the same ``step()``. Equal to calling ``update()`` after each
          step.
        """
        if fuse:
            if not getattr(optimizer, "_supports_fused_ema", False):
                raise InvalidArgumentError(f"{type(optimizer).__name__} cannot update a ModelEMA inside its step")
            if self.offloaded or self.async_update:
                raise InvalidArgumentError("fuse=True needs the average on the model's device (no offload)")
            optimizer._emafuse_ema = self  # type: ignore[attr-defined]
            self._fused_opt = weakref.ref(optimizer)
        elif self.offloaded:
            self._wait_hook = optimizer.register_step_pre_hook(self._wait_copy_on_device)
        return self

    def detach_optimizer(self) -> None:
        """Undo :meth:`attach`."""
        opt = self._fused_opt() if self._fused_opt is not None else None
        if opt is not None and getattr(opt, "_emafuse_ema", None) is self:
            del opt._emafuse_ema
        self._fused_opt = None
        if self._wait_hook is not None:
            self._wait_hook.remove()
            self._wait_hook = None

    def _fused_plan(self, found_inf: float) -> tuple[float, dict[Tensor, Tensor], list[Tensor]] | None:
        """Called by the optimizer before its native step: ``(weight, {param: average}, model
        tensors)`` if this step is an update event, else None (the step is still counted)."""
        if found_inf:
            return None
        self._check_not_swapped()
        s = self.num_steps_seen + 1
        self.num_steps_seen = s
        if not self.is_update_step(s):
            return None
        model = self._resolve_model(None)
        thetas = self._model_tensors(model)
        d = self.decay_at(s)
        fusable: dict[Tensor, Tensor] = {}
        if self._cfg["formula"] == "lerp":
            params = dict(model.named_parameters())
            for i in self._idx["average"]:
                e, th = self._entries[i], thetas[i]
                own = self._own[i]
                if (
                    e.is_param
                    and th.dtype in (torch.float32, torch.float64)
                    and own.dtype == th.dtype
                    and own.device == th.device
                    and own.is_contiguous()
                    and th.is_contiguous()
                ):
                    p = params.get(e.name)
                    if p is not None:
                        fusable[p] = own
        return (d, fusable, thetas)

    def _fused_done(self, plan: tuple[float, dict[Tensor, Tensor], list[Tensor]], done: set[int]) -> None:
        """Called by the optimizer after its native step: update what it did not, count."""
        d, fusable, thetas = plan
        own_done = {id(t) for p, t in fusable.items() if id(p) in done}
        skip = {i for i in self._idx["average"] if id(self._own[i]) in own_done}
        self._apply(thetas, d, skip_avg=skip)
        self.num_updates_applied += 1

    # -- evaluation helpers -------------------------------------------------------------------

    def _check_not_swapped(self) -> None:
        if self._swapped is not None:
            raise InvalidArgumentError("ModelEMA: the average is swapped into the model; leave average_parameters() first")

    def _swap_sets(self, model: nn.Module) -> tuple[list[int], list[int]]:
        thetas = self._model_tensors(model)
        fused, other = [], []
        for i in self._idx["average"] + self._idx["copy"] + self._idx["truncate"]:
            th, own = thetas[i], self._own[i]
            if th.dtype == own.dtype and th.device == own.device and th.dtype in _NATIVE_DTYPES | _COMPLEX:
                fused.append(i)
            else:
                other.append(i)
        return fused, other

    @torch.no_grad()
    def swap(self, model: nn.Module | None = None) -> None:
        """Exchange the model's weights with the average in place (fused, 16 B/param for
        same-dtype, same-device tensors; others go through a backup on the average's device).
        Calling it twice restores both."""
        self._join()
        model = self._resolve_model(model)
        thetas = self._model_tensors(model)
        fused, other = self._swap_sets(model)
        if fused:
            native_step("ModelEMA.swap", "swap", [({}, [real_view(thetas[i]) for i in fused], None,
                                                   [{"b": real_view(self._own[i])} for i in fused], ("b",))])
        for i in other:
            tmp = thetas[i].to(self._own[i].device, copy=True)
            thetas[i].copy_(self._own[i])
            self._own[i].copy_(tmp)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the average into ``model`` (parameters and the buffers it tracks)."""
        self._join()
        model = self._resolve_model(model)
        thetas = self._model_tensors(model)
        for i in self._staged_indices():
            thetas[i].copy_(self._own[i])

    @torch.no_grad()
    def store(self, model: nn.Module | None = None) -> None:
        """Save a copy of the model's tracked weights (torch-ema's ``store``)."""
        model = self._resolve_model(model)
        thetas = self._model_tensors(model)
        self._stored = [(i, thetas[i].clone()) for i in self._staged_indices()]

    @torch.no_grad()
    def restore(self, model: nn.Module | None = None) -> None:
        """Write back what :meth:`store` saved."""
        stored = self._stored
        if stored is None:
            raise InvalidArgumentError("ModelEMA.restore() without a previous store()")
        thetas = self._model_tensors(self._resolve_model(model))
        for i, t in stored:
            thetas[i].copy_(t)
        self._stored = None

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Context manager: the model holds the average inside, its own weights again after.
        Same-dtype, same-device tensors are exchanged in place by the fused swap (no copy of the
        model); tensors whose average has another dtype or device are backed up (on the average's
        device) and restored."""
        self._join()
        self._check_not_swapped()
        model = self._resolve_model(model)
        thetas = self._model_tensors(model)
        fused, other = self._swap_sets(model)
        with torch.no_grad():
            if fused:
                native_step("ModelEMA.swap", "swap", [({}, [real_view(thetas[i]) for i in fused], None,
                                                       [{"b": real_view(self._own[i])} for i in fused], ("b",))])
            backup = [(i, thetas[i].to(self._own[i].device, copy=True)) for i in other]
            for i, _ in backup:
                thetas[i].copy_(self._own[i])
        self._swapped = model
        try:
            yield model
        finally:
            self._swapped = None
            with torch.no_grad():
                if fused:
                    native_step("ModelEMA.swap", "swap", [({}, [real_view(thetas[i]) for i in fused], None,
                                                           [{"b": real_view(self._own[i])} for i in fused], ("b",))])
                for i, t in backup:
                    thetas[i].copy_(t)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The average (``module``'s state_dict), the counters and the hyper-parameters."""
        self._join()
        cfg = {k: v for k, v in self._cfg.items() if not callable(v)}
        return {
            "module": self.module.state_dict(),
            "num_steps_seen": self.num_steps_seen,
            "num_updates_applied": self.num_updates_applied,
            "initialized": self.initialized,
            "config": cfg,
            "preset": self.preset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a mismatched average raises, differing
        hyper-parameters warn."""
        self._join()
        for key in ("module", "num_steps_seen", "num_updates_applied"):
            if key not in state:
                raise InvalidArgumentError(f"ModelEMA.load_state_dict: missing '{key}'")
        own = self.module.state_dict()
        theirs = state["module"]
        missing = [k for k in own if k not in theirs]
        unexpected = [k for k in theirs if k not in own]
        if missing or unexpected:
            raise InvalidArgumentError(
                f"ModelEMA.load_state_dict: the saved average does not match this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for k, v in own.items():
            if tuple(theirs[k].shape) != tuple(v.shape):
                raise ShapeError(f"ModelEMA.load_state_dict: '{k}' has shape {tuple(theirs[k].shape)}, expected {tuple(v.shape)}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(theirs[k])
        self.num_steps_seen = int(state["num_steps_seen"])
        self.num_updates_applied = int(state["num_updates_applied"])
        self.initialized = bool(state.get("initialized", True))
        saved = state.get("config", {})
        diff = {k: (saved[k], v) for k, v in self._cfg.items() if k in saved and saved[k] != v and not callable(v)}
        if diff:
            warnings.warn(f"ModelEMA.load_state_dict: hyper-parameters differ from the checkpoint's (saved, now): {diff}", stacklevel=2)

    def __repr__(self) -> str:
        c = self._cfg
        sch = c["schedule"] if not callable(c["schedule"]) else "callable"
        return (f"ModelEMA(decay={c['decay']}, schedule={sch}, update_every={c['update_every']}, "
                f"device={self.device}, updates={self.num_updates_applied})")


_NATIVE_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16}
_COMPLEX = {torch.complex64, torch.complex128}


def _unchanged(mods: list, slots: list) -> bool:
    """Whether the module tree and the tensors recorded by ``ModelEMA._model_tensors`` are still
    the ones the model holds."""
    for m, n_p, n_b, n_m, children in mods:
        if len(m._parameters) != n_p or len(m._buffers) != n_b or len(m._modules) != n_m:
            return False
        sub = m._modules
        for name, child in children:
            if sub.get(name) is not child:
                return False
    for mod, key, t in slots:
        cur = mod._parameters.get(key)
        if cur is None:
            cur = mod._buffers.get(key)
        if cur is not t:
            return False
    return True


def _engine_inputs(targets: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Inputs the engine can read for these targets: the target's dtype, or bf16/fp16 for an fp32
    target; anything else (e.g. an fp64 average of an fp32 model) is converted first."""
    out = inputs
    for j, (t, x) in enumerate(zip(targets, inputs)):
        if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
            if out is inputs:
                out = list(inputs)
            out[j] = x.to(t.dtype)
    return out


class _Waiter:
    def __init__(self, f: Callable[[], Any]) -> None:
        self._f = f

    def wait(self) -> None:
        self._f()

    def done(self) -> bool:
        return False


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _warmup_f32(k: float, decay: float, inv_gamma: float, power: float, min_decay: float) -> float:
    """ema-pytorch's warm-up, evaluated in float32 tensors as it does."""
    if k <= 0:
        return 0.0
    epoch = torch.tensor(float(k), dtype=torch.float32)
    value = 1 - (1 + epoch / inv_gamma) ** -power
    return float(value.clamp(min=min_decay, max=decay).item())
