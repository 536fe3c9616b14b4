"""Shared machinery of emafuse's optimizers: state handling, AMP, and the one native call per step.

A concrete optimizer supplies three things: the native rule name (``_rule``), the names of the
per-parameter state tensors for a group (``_slots``) and the rule's scalar hyper-parameters for a
group (``_hyper``). Everything else (lazy state, grouping by device and dtype, GradScaler
support, complex and non-contiguous parameters, atomic error handling) lives here.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .. import _native
from ..errors import DTypeError, LayoutError, UnsupportedOptionError

__all__ = ["FusedOptimizer", "scalar"]


class _Boxed:
    """A state tensor hidden from torch's ``load_state_dict`` casts (see ``_shield_state_dtypes``):
    torch's loader casts tensors and rebuilds dicts and iterables, and passes other objects as is."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


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
    # Whether state_dict() stores the step counter as a Python int, as the reference
    # implementations of most non-torch optimizers do (torch's own keep a tensor). The live state
    # keeps the 0-dim tensor the engine updates; load_state_dict accepts either.
    _int_step_in_state_dict: ClassVar[bool] = False
    _step_supports_amp_scaling = True

    # -- what a concrete optimizer provides --------------------------------------------------

    def _slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the state tensors (same shape as the parameter) the rule keeps."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, float | bool]:
        """The rule's numbers and flags for ``group``."""
        raise NotImplementedError

    def _state_dtype(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        """The dtype of ``p``'s state tensors. torch's convention (the parameter's dtype) unless
        an optimizer overrides it; the engine also accepts float32 states for bf16/fp16
        parameters. ``group`` may be a group of a checkpoint being loaded (keys may be missing)."""
        return p.dtype

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
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            group.setdefault("check_finite", False)
            # Checkpoints of reference implementations (or older emafuse) may lack options that
            # this optimizer keeps per group: take them from the constructor's values.
            for key, value in defaults.items():
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
        """torch's ``load_state_dict``, except that state tensors of optimizers that keep them in
        a dtype other than the parameter's (``_state_dtype``, e.g. float32 states for bf16
        parameters) are loaded in that dtype instead of being cast to the parameter's dtype,
        so that a resumed run continues bit for bit. User hooks see the checkpoint unchanged:
        the shield runs after every other pre-hook and is lifted before every other post-hook."""
        pre = self.register_load_state_dict_pre_hook(FusedOptimizer._shield_state_dtypes)
        post = self.register_load_state_dict_post_hook(FusedOptimizer._unshield_state_dtypes, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    @staticmethod
    def _shield_state_dtypes(self: FusedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Pre-hook: cast float state tensors to ``_state_dtype`` where it differs from the
        parameter's dtype, and box them so that torch's loader does not cast them back."""
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        groups = {pid: g for g in state_dict["param_groups"] for pid in g["params"]}
        saved = state_dict["state"]
        state = None
        for pid, p in zip(ids, params):
            st = saved.get(pid)
            if not isinstance(st, dict) or not p.is_floating_point():
                continue
            want = self._state_dtype(p, groups[pid])
            if want == p.dtype:
                continue
            if state is None:
                state = dict(saved)
            state[pid] = {
                key: _Boxed(v.to(dtype=want))
                if isinstance(v, Tensor) and v.is_floating_point() and key not in self._scalar_keys
                else v
                for key, v in st.items()
            }
        if state is None:
            return state_dict
        return {**state_dict, "state": state}

    @staticmethod
    def _unshield_state_dtypes(self: FusedOptimizer) -> None:
        """Post-hook: unbox what ``_shield_state_dtypes`` boxed, on the parameter's device."""
        for p, st in self.state.items():
            if not isinstance(st, dict):
                continue
            for key, v in st.items():
                if isinstance(v, _Boxed):
                    device = p.device if isinstance(p, Tensor) else v.tensor.device
                    st[key] = v.tensor.to(device=device)

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

    def _new_state(self, p: Tensor, slots: tuple[str, ...], group: dict[str, Any]) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {key: torch.tensor(0.0, dtype=_step_dtype()) for key in self._scalar_keys}
        dtype = self._state_dtype(p, group)
        for name in slots:
            st[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return st

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        calls: list[tuple] = []
        created: dict[Tensor, dict[str, Tensor]] = {}
        for group in self.param_groups:
            self._collect(group, calls, created)
        if not calls:
            return loss

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        who = type(self).__name__
        try:
            _native.step(who, self._rule, calls, grad_scale, found_inf)
        except LayoutError:
            self._staged_step(who, calls, grad_scale, found_inf)
        self.state.update(created)
        return loss

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
                st, is_new = self._complete_state(p, st, slots, group, created)
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
                raise KeyError(f"{type(self).__name__}: state of a parameter lacks '{key}'")
        if not missing:
            return st, False
        fixed = dict(st)
        # New slots (e.g. amsgrad switched on) take the dtype of the slots already there.
        present = [st[name] for name in slots if name in st]
        dtype = present[0].dtype if present else self._state_dtype(p, group)
        for name in missing:
            fixed[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
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
