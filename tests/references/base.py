"""The one interface every float64 reference implements.

A reference holds one parameter group: float64 copies of the parameters and their state under the
official (= emafuse's) state names, updated by the spec's numbered rule.

* ``Ref(params, **kw)``: ``kw`` are the emafuse constructor's keyword arguments (same names and
  defaults, from the spec's table (b)); the parameters are copied, never modified.
* ``.step(grads)``: one step; ``grads[i] is None`` skips parameter ``i`` (no state, no counter).
  The gradients are read, never written.
* ``.params``: the float64 parameters.
* ``.state_of(i)``: parameter ``i``'s state under emafuse's names: tensors, and the per-parameter
  scalar state (``scalars``, e.g. ``step``) as Python floats.
* ``.load_from(opt, params)``: take the values of ``params``, their state, their group's current
  hyper-parameters and the counters kept outside ``opt.state[p]`` from the emafuse optimizer
  ``opt``, so that one step can be compared from identical state.
* ``.follow(group)``: take the current values of the hyper-parameters this reference shares with
  the param group ``group`` (what a scheduler changes: lr, betas, momentum, ...).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


def f64(t: Tensor) -> Tensor:
    """A float64 copy of ``t``, detached."""
    return t.detach().to(torch.float64).clone()


def orthogonal(p: Tensor, g: Tensor, rescale: bool) -> Tensor:
    """⊥Grad's gradient (spec §19 (d)): ``g`` minus its projection on ``p`` (both flattened),
    rescaled to ``g``'s norm with ``rescale``; a one-element tensor keeps ``g`` (§22.5)."""
    if p.numel() <= 1:
        return g
    w, u = p.reshape(-1), g.reshape(-1)
    perp = u - (w @ u) / (w @ w + 1e-30) * w
    if rescale:
        perp = perp * (u.norm() / (perp.norm() + 1e-30))
    return perp.reshape(g.shape)


def cautious(u: Tensor, g: Tensor, norm: str) -> Tensor:
    """The Cautious optimizers' masked update (spec §20 (d)): ``u·φ`` with ``φ = 1[u·g > 0]``,
    normalised per tensor by ``1/max(mean φ, 1e-3)`` (``norm="mean"``) or ``numel/(Σφ + 1)``."""
    phi = (u * g > 0).double()
    k = 1 / max(phi.mean().item(), 1e-3) if norm == "mean" else phi.numel() / (phi.sum().item() + 1)
    return u * phi * k


def _plain(v: Any) -> Any:
    """A hyper-parameter with tensors read as Python floats (a tensor lr, tensor betas)."""
    if isinstance(v, Tensor):
        return float(v)
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


class Reference:
    """Base class: subclasses implement ``update`` (one parameter) and, where the rule has
    counters beyond the parameter's own, ``begin`` / ``end`` and ``load_counters``."""

    # Names of the per-parameter scalar state entries (kept as Python floats).
    scalars: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, params: list[Tensor], *, maximize: bool = False, orthograd: bool = False, orthograd_rescale: bool = True, **hyper: Any
    ) -> None:
        self.params = [f64(p) for p in params]
        self.state: list[dict[str, Any]] = [{} for _ in self.params]
        self.maximize = maximize
        self.orthograd = (orthograd, orthograd_rescale)
        self.h = {k: _plain(v) for k, v in hyper.items()}

    # -- what a rule provides -----------------------------------------------------------------

    def update(self, p: Tensor, g: Tensor, st: dict[str, Any]) -> None:
        """One step of one parameter ``p`` (updated in place) with gradient ``g`` (already
        negated under ``maximize``) and its state ``st`` (empty on its first step)."""
        raise NotImplementedError

    def begin(self, grads: list[Tensor | None]) -> None:
        """Before any parameter moves (e.g. a global gradient norm, a group counter)."""

    def end(self) -> None:
        """After every parameter moved (e.g. optimizer-level counters)."""

    def load_counters(self, opt: torch.optim.Optimizer, group: dict[str, Any]) -> None:
        """Take the counters kept outside ``opt.state[p]`` (group or optimizer level)."""

    def to_emafuse(self, st: dict[str, Any]) -> dict[str, Any]:
        """This reference's state of one parameter under emafuse's names (default: the same)."""
        return dict(st)

    def from_emafuse(self, st: dict[str, Any]) -> dict[str, Any]:
        """The inverse of ``to_emafuse``."""
        return dict(st)

    # -- the interface ------------------------------------------------------------------------

    def step(self, grads: list[Tensor | None]) -> None:
        grads = [None if g is None else f64(g) for g in grads]
        if self.orthograd[0]:
            grads = [None if g is None else orthogonal(p, g, self.orthograd[1]) for p, g in zip(self.params, grads)]
        grads = [None if g is None else (-g if self.maximize else g) for g in grads]
        self.begin(grads)
        for p, g, st in zip(self.params, grads, self.state):
            if g is not None:
                self.update(p, g, st)
        self.end()

    def state_of(self, i: int) -> dict[str, Any]:
        return self.to_emafuse(self.state[i])

    def follow(self, group: dict[str, Any]) -> None:
        self.h.update({k: _plain(v) for k, v in group.items() if k in self.h})

    def load_from(self, opt: torch.optim.Optimizer, params: list[Tensor]) -> None:
        group = next(g for g in opt.param_groups if any(q is params[0] for q in g["params"]))
        self.params = [f64(p) for p in params]
        self.state = []
        for p in params:
            st = opt.state.get(p, {})
            ours = {k: float(v) if k in self.scalars else f64(v) for k, v in st.items()}
            self.state.append(self.from_emafuse(ours) if ours else {})
        self.follow(group)
        self.load_counters(opt, group)
