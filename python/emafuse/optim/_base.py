"""Shared machinery of emafuse's optimizers: state handling, AMP, and the one native call per step.

A concrete optimizer supplies three things: the native rule name (``_rule``), the names of the
per-parameter state tensors for a group (``_slots``) and the rule's scalar hyper-parameters for a
group (``_hyper``). Everything else (lazy state, grouping by device and dtype, GradScaler
support, complex and non-contiguous parameters, atomic error handling) lives here.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .. import _native
from ..errors import DTypeError, LayoutError, UnsupportedOptionError

__all__ = ["FusedOptimizer", "scalar"]


def _step_dtype() -> torch.dtype:
    """torch's dtype for step counters: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scalar(x: float | Tensor) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: ``step()`` runs one native call that updates every parameter of every group.

    Subclasses set ``_rule`` and implement ``_slots`` and ``_hyper``. Semantics kept from
    ``torch.optim``: lazy state creation on the first step that sees a gradient, parameters whose
    ``.grad`` is None are skipped (no state, no step count), ``closure`` support, step hooks,
    ``state_dict``/``load_state_dict`` with torch's state names, and
    ``_step_supports_amp_scaling`` (``torch.amp.GradScaler`` hands its scale and found-inf flag to
    the native step, which unscales gradients on the fly and skips the step when inf/NaN was
    found, without writing ``.grad``).
    """

    _rule: ClassVar[str]
    # Keys of the per-parameter scalar state (0-dim CPU float tensors) the rule reads and updates,
    # e.g. torch's step counter ("step",). The first one, if any, is treated as the step counter.
    _scalar_keys: ClassVar[tuple[str, ...]] = ("step",)
    # Whether complex parameters are updated as real views (as torch's Adam/AdamW/SGD do).
    _supports_complex: ClassVar[bool] = False
    # Whether fresh state must be flagged to the rule (SGD's momentum buffer starts as a copy).
    _flags_fresh_state: ClassVar[bool] = False
    # Whether the rule can update a model EMA in the same pass (flag "ema", slot "ema" last,
    # hyper-parameter "ema_weight"); see ModelEMA.attach(optimizer, fuse=True).
    _supports_fused_ema: ClassVar[bool] = False
    _step_supports_amp_scaling = True

    # -- what a concrete optimizer provides --------------------------------------------------

    def _slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the state tensors (same shape as the parameter) the rule keeps."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        """The rule's numbers and flags for ``group``."""
        raise NotImplementedError

    # -- torch.optim plumbing ----------------------------------------------------------------

    def _init_emafuse_defaults(self, check_finite: bool) -> None:
        self.defaults["check_finite"] = check_finite
        for group in self.param_groups:
            group.setdefault("check_finite", check_finite)
            self._reject_unsupported(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._reject_unsupported(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("check_finite", False)
        self._normalize_steps()

    def _reject_unsupported(self, group: dict[str, Any]) -> None:
        if group.get("differentiable", False):
            raise UnsupportedOptionError(
                f"{type(self).__name__}: differentiable=True is not supported: emafuse's fused "
                "native step cannot be differentiated through. Use torch.optim for that."
            )
        if group.get("capturable", False):
            raise UnsupportedOptionError(
                f"{type(self).__name__}: capturable=True needs emafuse's CUDA backend, which this "
                "build does not have yet."
            )

    def _normalize_steps(self) -> None:
        """Make every step counter a 0-dim CPU float tensor, as torch keeps it for non-capturable
        optimizers (old checkpoints store ints; capturable/fused ones keep it on the device)."""
        if not self._scalar_keys:
            return
        key = self._scalar_keys[0]
        for st in self.state.values():
            s = st.get(key) if isinstance(st, dict) else None
            if s is None:
                continue
            ok = (
                isinstance(s, Tensor)
                and s.device.type == "cpu"
                and s.dtype in (torch.float32, torch.float64)
                and s.numel() == 1
            )
            if not ok:
                st[key] = torch.tensor(float(s), dtype=_step_dtype())

    def _new_state(self, p: Tensor, slots: tuple[str, ...]) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {key: torch.tensor(0.0, dtype=_step_dtype()) for key in self._scalar_keys}
        for name in slots:
            st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        ema = self.__dict__.get("_emafuse_ema")
        ema_plan = None
        if ema is not None:
            ema_steps = ema.num_steps_seen
            ema_plan = ema._fused_plan(float(found_inf.item()) if found_inf is not None else 0.0)
        ema_targets = ema_plan[1] if ema_plan is not None else None
        try:
            return self._step_calls(loss, grad_scale, found_inf, ema, ema_plan, ema_targets)
        except BaseException:
            if ema is not None:
                ema.num_steps_seen = ema_steps  # a refused step is not counted by the average
            raise

    def _step_calls(self, loss: Any, grad_scale: Any, found_inf: Any, ema: Any, ema_plan: Any, ema_targets: Any) -> Any:
        """The native call(s) of one step; with a fused ModelEMA (``ema``) the averages of the
        parameters it maps (``ema_targets``) are updated in the same pass, the rest right after."""
        calls: list[tuple] = []
        created: dict[Tensor, dict[str, Tensor]] = {}
        for group in self.param_groups:
            self._collect(group, calls, created)
        if ema_targets:
            calls = self._with_fused_ema(calls, ema_targets, 1.0 - ema_plan[0])
        if not calls:
            if ema_plan is not None:
                ema._fused_done(ema_plan, set())
            return loss

        who = type(self).__name__
        try:
            _native.step(who, self._rule, calls, grad_scale, found_inf)
        except LayoutError:
            self._staged_step(who, calls, grad_scale, found_inf)
        self.state.update(created)
        if ema_plan is not None:
            done = {id(p) for c in calls if c[0].get("ema") for p in c[1]}
            ema._fused_done(ema_plan, done)
        return loss

    @staticmethod
    def _with_fused_ema(calls: list[tuple], targets: dict[Tensor, Tensor], weight: float) -> list[tuple]:
        """Split each call into parameters whose average is updated in the same pass (extra slot
        "ema") and the rest. Only calls without fresh-state flags are fused."""
        out: list[tuple] = []
        for hyper, params, grads, states, slots, scalar_keys in calls:
            if states is None or hyper.get("first"):
                out.append((hyper, params, grads, states, slots, scalar_keys))
                continue
            fp, fg, fs, rp, rg, rs = [], [], [], [], [], []
            for p, g, st in zip(params, grads, states):
                e = targets.get(p)
                if e is not None and e.dtype == p.dtype and all(st[name].dtype == e.dtype for name in slots):
                    fp.append(p)
                    fg.append(g)
                    fs.append({**st, "ema": e})
                else:
                    rp.append(p)
                    rg.append(g)
                    rs.append(st)
            if fp:
                out.append(({**hyper, "ema": True, "ema_weight": weight}, fp, fg, fs, slots + ("ema",), scalar_keys))
            if rp:
                out.append((hyper, rp, rg, rs, slots, scalar_keys))
        return out

    def _collect(self, group: dict[str, Any], calls: list[tuple], created: dict[Tensor, dict[str, Tensor]]) -> None:
        """Append ``group``'s native call(s): (hyper, params, grads, state dicts, slots, scalars)."""
        self._reject_unsupported(group)
        slots = self._slots(group)
        scalar_keys = self._scalar_keys
        keeps_state = bool(slots) or bool(scalar_keys)
        want = len(slots) + len(scalar_keys)
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[dict[str, Tensor]] = []
        fresh: tuple[list, list, list] | None = ([], [], []) if self._flags_fresh_state else None
        get_state = self.state.get
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if not keeps_state:
                params.append(p)
                grads.append(g)
                continue
            st = get_state(p)
            is_new = False
            if st is None or len(st) < want:
                st, is_new = self._complete_state(p, st, slots, created)
            if fresh is not None and is_new:
                fresh[0].append(p)
                fresh[1].append(g)
                fresh[2].append(st)
            else:
                params.append(p)
                grads.append(g)
                states.append(st)
        hyper = self._hyper(group)
        hyper["maximize"] = bool(group.get("maximize", False))
        hyper["check_finite"] = bool(group.get("check_finite", False))
        if params:
            calls.append((hyper, params, grads, states if keeps_state else None, slots, scalar_keys))
        if fresh is not None and fresh[0]:
            calls.append(({**hyper, "first": True}, fresh[0], fresh[1], fresh[2], slots, scalar_keys))

    def _complete_state(
        self,
        p: Tensor,
        st: dict[str, Tensor] | None,
        slots: tuple[str, ...],
        created: dict[Tensor, dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], bool]:
        """State for ``p`` with every slot present; new tensors are zeros. Returns (state, new?).

        Nothing is stored in ``self.state`` here: new state is committed only after the native
        step succeeded, so a refused step leaves the optimizer exactly as it was.
        """
        if not st:
            st = created.setdefault(p, self._new_state(p, slots))
            return st, True
        missing = [name for name in slots if name not in st]
        for key in self._scalar_keys:
            if key not in st:
                raise KeyError(f"{type(self).__name__}: state of a parameter lacks '{key}'")
        if not missing:
            return st, False
        fixed = dict(st)
        for name in missing:
            fixed[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        created[p] = fixed
        return fixed, False

    def _staged_step(self, who: str, calls: list[tuple], grad_scale, found_inf) -> None:
        """The slow path for complex parameters and tensors that cannot be walked linearly
        together (non-dense parameters, gradients strided differently): run the native step on
        real views / contiguous copies, then copy results back."""
        copy_back: list[tuple[Tensor, Tensor]] = []

        def stage(t: Tensor, writable: bool) -> Tensor:
            if t.is_complex():
                if not self._supports_complex:
                    raise DTypeError(f"{who} does not support complex parameters")
                t = torch.view_as_real(t)
            if t.is_contiguous():
                return t
            c = t.contiguous()
            if writable:
                copy_back.append((t, c))
            return c

        staged = []
        for hyper, params, grads, states, slots, scalar_keys in calls:
            ps = [stage(p, True) for p in params]
            gs = None if grads is None else [stage(g, False) for g in grads]
            if states is None:
                ss = None
            else:
                ss = []
                for st in states:
                    d = {name: stage(st[name], True) for name in slots}
                    d.update((key, st[key]) for key in scalar_keys)
                    ss.append(d)
            staged.append((hyper, ps, gs, ss, slots, scalar_keys))
        _native.step(who, self._rule, staged, grad_scale, found_inf)
        for orig, copy in copy_back:
            orig.copy_(copy)
