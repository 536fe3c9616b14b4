r"""EDM2 power-function EMA with several tracks, snapshots and post-hoc reconstruction (spec
``averaging.md`` B.4)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._guard import uninterrupted
from ..errors import InvalidArgumentError
from . import schedules as S
from ._averager import Alias, Averager, check_module_state, load_module_state, saved, saved_count
from ._engine import engine_input, group, native_step, real_view
from ._tracking import Policy, Tracking, averaged_copy
from .merge import axpby

__all__ = ["PostHocEMA", "PowerEMA", "solve_posthoc_coefficients"]

# Tracks per native call of the multi-track rule (its state slots t1..t4).
_TRACKS_PER_CALL = 5


class PowerEMA(Averager):
    r"""EDM2 power-function EMA (Karras et al., "Analyzing and Improving the Training Dynamics of
    Diffusion Models", CVPR 2024). Track j averages the trajectory with density
    :math:`p(\tau) \propto \tau^{\gamma_j}` on :math:`[0, t]`; per update

    .. math::
        \beta_j = (1 - \Delta/t)^{\gamma_j + 1}, \qquad E_j \leftarrow \mathrm{lerp}(E_j, \theta, 1 - \beta_j)

    with t the training time after the step and Δ the time since the previous update (steps, or
    samples with ``time_unit="samples"`` and ``update(model, batch_size=...)``), every
    ``update_every`` steps. Tracks are given as ``sigma_rels`` (relative widths, EDM2 default
    0.05 and 0.10) or ``gammas``; all tracks are updated in **one** native pass that reads θ once
    (spec K2). Parameters are averaged (EDM2); the model's buffers are copied into every track at
    each update.

    :attr:`module` is the first track, :meth:`module_for` ``(j)`` (or :attr:`modules`) any track;
    ``swap``, ``average_parameters`` and ``copy_to`` take ``track=`` (default 0).

    :meth:`snapshot` stores every track (cast to ``snapshot_dtype``, fp16 by default, on the CPU)
    with its (t, γ) — in memory (:attr:`snapshots`) or as files in ``snapshot_dir`` — for
    :func:`solve_posthoc_coefficients` / :class:`PostHocEMA` reconstruction.
    """

    num_steps = Alias("num_steps_seen")

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] | None = (0.05, 0.10), *, gammas: Sequence[float] | None = None,
                 time_unit: str = "steps", update_every: int = 1, ema_dtype: torch.dtype | None = None,
                 snapshot_dir: str | None = None, snapshot_dtype: torch.dtype = torch.float16) -> None:
        if gammas is not None:
            self.gammas = [float(g) for g in gammas]
            self.sigma_rels = [S.gamma_to_sigma_rel(g) for g in self.gammas]
        else:
            if not sigma_rels:
                raise ValueError("PowerEMA needs sigma_rels or gammas")
            self.sigma_rels = [float(s) for s in sigma_rels]
            self.gammas = [S.sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if time_unit not in ("steps", "samples"):
            raise ValueError(f"time_unit must be 'steps' or 'samples', got {time_unit!r}")
        if update_every < 1:
            raise ValueError("update_every must be >= 1")
        self.time_unit, self.update_every = time_unit, int(update_every)
        self._tracking = Tracking(type(self).__name__, model, Policy(buffers="copy"))
        #: One module per track.
        self.modules = [averaged_copy(model, ema_dtype) for _ in self.gammas]
        self._tracks = [self._tracking.tensors_of(m) for m in self.modules]
        self.t = 0.0
        self.t_last = 0.0
        self.num_steps_seen = 0
        self.num_updates = 0
        self.snapshot_dir = snapshot_dir
        self.snapshot_dtype = snapshot_dtype
        self.snapshots: list[dict[str, Any]] = []

    def _averaged(self) -> tuple[nn.Module, list[Tensor]]:
        return self.modules[0], self._tracks[0]

    def module_for(self, track: int) -> nn.Module:
        """Track ``track`` as a module."""
        return self.modules[track]

    def swap(self, model: nn.Module | None = None, track: int = 0) -> None:
        """Exchange the model's weights with track ``track`` in place (see ``Averager.swap``)."""
        self._tracking.swap(self._tracking.model(model), self._tracks[track])

    def average_parameters(self, model: nn.Module | None = None, track: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the model holds track ``track`` inside, its own weights again after."""
        return self._tracking.swapped(self._tracking.model(model), self._tracks[track])

    def copy_to(self, model: nn.Module | None = None, track: int = 0) -> None:
        """Write track ``track`` into ``model``."""
        self._tracking.copy_to(self._tracking.model(model), self._tracks[track])

    def betas(self, t: float, delta: float) -> list[float]:
        """β_j for an update at time ``t`` after ``delta``."""
        return [S.power_beta(t, g, delta) for g in self.gammas]

    @torch.no_grad()
    @uninterrupted
    def update(self, model: nn.Module | None = None, batch_size: int | None = None) -> bool:
        """Account for one training step (of ``batch_size`` samples with ``time_unit="samples"``)."""
        tr = self._tracking
        tr.check_not_swapped()
        if self.time_unit == "samples" and batch_size is None:
            raise InvalidArgumentError(f"{tr.who}(time_unit='samples').update needs batch_size=")
        model = tr.model(model)
        thetas = tr.model_tensors(model)  # checked at every call (cached): a refused call counts nothing
        t = self.t + (float(batch_size) if self.time_unit == "samples" else 1.0)  # type: ignore[arg-type]
        n = self.num_steps_seen + 1
        if (n - 1) % self.update_every != 0:
            self.t, self.num_steps_seen = t, n
            return False
        first = self._tracks[0]
        inputs = [real_view(engine_input(first[i], thetas[i])) for i in tr.averaged]
        weights = [1.0 - b for b in self.betas(t, t - self.t_last)]
        for lo in range(0, len(weights), _TRACKS_PER_CALL):
            ws = weights[lo:lo + _TRACKS_PER_CALL]
            tracks = self._tracks[lo:lo + _TRACKS_PER_CALL]
            hyper: dict[str, Any] = {"tracks": float(len(ws)), **{f"w{j}": w for j, w in enumerate(ws)}}
            slots = tuple(f"t{j}" for j in range(1, len(ws)))
            states = [{f"t{j}": real_view(tracks[j][i]) for j in range(1, len(ws))} for i in tr.averaged] if slots else None
            native_step(tr.who, "ema_multi", group(hyper, [real_view(tracks[0][i]) for i in tr.averaged], inputs, states, slots))
        for track in self._tracks:
            for i in tr.copied:
                track[i].copy_(thetas[i])
        self.t = self.t_last = t
        self.num_steps_seen = n
        self.num_updates += 1
        return True

    @torch.no_grad()
    def snapshot(self) -> list[dict[str, Any]]:
        """Store every track at the current time; returns the new snapshot records
        ``{"t", "gamma", "sigma_rel", "state"|"path"}``.

        Of a sharded (FSDP2) model, each rank stores its own shards: in memory as DTensors placed
        like the parameters (so ``torch.distributed.checkpoint`` saves every rank's part), or in
        a file per rank holding its local shards (the record's path says ``{rank}`` where the
        rank goes in the file name)."""
        tracking = self._tracking
        averaged = tracking.averaged
        names = tracking.names(averaged)
        suffix = "-rank{rank}" if tracking.is_sharded else ""
        new = []
        for g, s, tr in zip(self.gammas, self.sigma_rels, self._tracks):
            local = [tr[i].to("cpu", dtype=self._snapshot_dtype(tr[i]), copy=True) for i in averaged]
            rec: dict[str, Any] = {"t": self.t, "gamma": g, "sigma_rel": s}
            if self.snapshot_dir is not None:
                os.makedirs(self.snapshot_dir, exist_ok=True)
                path = os.path.join(self.snapshot_dir, f"phema-{int(self.t):010d}-{s:.3f}{suffix}.pt")
                torch.save({**rec, "state": dict(zip(names, local))}, _rank_path(path))
                rec["path"] = path
            else:
                rec["state"] = dict(zip(names, tracking.sharded(averaged, local)))
            new.append(rec)
        self.snapshots.extend(new)
        return new

    def _snapshot_dtype(self, t: Tensor) -> torch.dtype:
        """The dtype a snapshot stores tensor ``t`` in: ``snapshot_dtype`` for floating point."""
        return self.snapshot_dtype if t.is_floating_point() else t.dtype

    def _snapshot_state(self, rec: Mapping[str, Any]) -> list[Tensor]:
        """A snapshot's averaged tensors in entry order, as this rank's local parts."""
        # weights_only: the path comes from a checkpoint; never unpickle arbitrary objects.
        state = rec["state"] if "state" in rec else torch.load(_rank_path(rec["path"]), weights_only=True)["state"]
        averaged = self._tracking.averaged
        return self._tracking.local_parts(averaged, [state[n] for n in self._tracking.names(averaged)])

    def state_dict(self) -> dict[str, Any]:
        """Counters, tracks and snapshots. In-memory snapshots are under ``snapshot_states`` (index
        -> tensors; DTensors for a sharded model), their records and file snapshots' paths under
        ``snapshots`` (a tuple, which ``torch.distributed.checkpoint`` keeps as one entry). To
        load a checkpoint with in-memory snapshots through ``torch.distributed.checkpoint``, load
        into :meth:`load_target`."""
        records, states = [], {}
        for i, r in enumerate(self.snapshots):
            records.append({k: v for k, v in r.items() if k != "state"})
            if "state" in r:
                states[str(i)] = r["state"]
        return {
            "t": self.t, "t_last": self.t_last, "num_steps_seen": self.num_steps_seen, "num_updates": self.num_updates,
            "gammas": list(self.gammas), "sigma_rels": list(self.sigma_rels), "time_unit": self.time_unit,
            "update_every": self.update_every, "tracks": [m.state_dict() for m in self.modules],
            "snapshots": tuple(records), "snapshot_states": states,
        }

    def load_target(self, checkpoint_id: Any, key: str) -> dict[str, Any]:
        """What to pass to ``torch.distributed.checkpoint.load`` (as ``{key: ...}``) for the
        state of this average saved under ``key`` at ``checkpoint_id``: :meth:`state_dict` with
        room for the saved in-memory snapshots, whose records are read first (every rank calls
        this). Then ``load_state_dict`` the loaded value."""
        import torch.distributed.checkpoint as dcp

        probe: dict[str, Any] = {key: {"snapshots": ()}}
        dcp.load(probe, checkpoint_id=checkpoint_id)
        target = self.state_dict()
        target["snapshots"] = tuple(probe[key]["snapshots"])
        tracking = self._tracking
        averaged = tracking.averaged
        names = tracking.names(averaged)
        track = self._tracks[0]
        target["snapshot_states"] = {
            str(i): dict(zip(names, tracking.sharded(averaged, [
                torch.empty_like(track[j], device="cpu", dtype=self._snapshot_dtype(track[j])) for j in averaged])))
            for i, r in enumerate(target["snapshots"]) if "path" not in r
        }
        return target

    @uninterrupted
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also checkpoints of emafuse <= 0.1:
        ``num_steps``, no event count)."""
        who = self._tracking.who
        tracks = saved(who, state, "tracks")
        if len(tracks) != len(self.modules):
            raise InvalidArgumentError(f"{who}.load_state_dict: {len(tracks)} tracks saved, {len(self.modules)} here")
        if any(abs(a - b) > 1e-12 for a, b in zip(state["gammas"], self.gammas)):
            warnings.warn(f"{who}.load_state_dict: the saved tracks have other gammas", stacklevel=2)
        steps = saved_count(who, state, "num_steps_seen", "num_steps")
        every = saved_count(who, state, "update_every") if "update_every" in state else self.update_every
        if every < 1:
            raise InvalidArgumentError(f"{who}.load_state_dict: update_every={every}")
        updates = saved_count(who, state, "num_updates") if "num_updates" in state else math.ceil(steps / every)
        t, t_last = _saved_time(who, state, "t"), _saved_time(who, state, "t_last")
        for m, sd in zip(self.modules, tracks):
            check_module_state(who, m, sd)
        for m, sd in zip(self.modules, tracks):
            load_module_state(who, m, sd)
        self.t, self.t_last = t, t_last
        self.num_steps_seen, self.num_updates = steps, updates
        # Records, with in-memory snapshot tensors apart (this layout) or inside them (earlier checkpoints).
        states = state.get("snapshot_states", {})
        self.snapshots = [{**r, "state": states[str(i)]} if str(i) in states else dict(r)
                          for i, r in enumerate(state.get("snapshots", ()))]


def _rank_path(path: str) -> str:
    """A snapshot file's path for this rank (snapshots of sharded models are a file per rank)."""
    return path.replace("{rank}", str(torch.distributed.get_rank())) if "{rank}" in path else path


def _p_dot(ta: float, ga: float, tb: float, gb: float) -> float:
    """⟨p_{ta,ga}, p_{tb,gb}⟩ in L²(τ) (spec B.4.4)."""
    e = gb if ta < tb else -ga
    return (ga + 1.0) * (gb + 1.0) * (ta / tb) ** e / ((ga + gb + 1.0) * max(ta, tb))


def solve_posthoc_coefficients(ts: Sequence[float], gammas: Sequence[float], t_target: float, gamma_target: float,
                               *, normalize: bool = True, return_raw_sum: bool = False) -> Any:
    r"""EDM2 post-hoc EMA: the coefficients :math:`x` with :math:`\sum_i x_i p_{t_i,\gamma_i}
    \approx p_{t_r,\gamma_r}` in the least-squares (L²) sense, solving :math:`A x = b` in float64
    with :math:`A_{ij} = \langle p_i, p_j\rangle`, :math:`b_i = \langle p_i, p_r\rangle`, then
    normalised to sum 1 (EDM2). Snapshots with :math:`t_i > t_r` must be excluded by the caller
    (see :meth:`PostHocEMA.reconstruct`). Falls back to a least-squares (SVD) solve, with a warning,
    when A's condition number exceeds 1e12."""
    ts = np.asarray(ts, dtype=np.float64)
    gs = np.asarray(gammas, dtype=np.float64)
    n = len(ts)
    A = np.array([[_p_dot(ts[i], gs[i], ts[j], gs[j]) for j in range(n)] for i in range(n)])
    b = np.array([_p_dot(ts[i], gs[i], t_target, gamma_target) for i in range(n)])
    cond = np.linalg.cond(A)
    if cond > 1e12:
        warnings.warn(f"post-hoc EMA: ill-conditioned system (cond {cond:.2e}); using a least-squares solve", stacklevel=2)
        x = np.linalg.lstsq(A, b, rcond=None)[0]
    else:
        x = np.linalg.solve(A, b)
    raw = float(x.sum())
    if normalize:
        x = x / raw
    return (x, raw) if return_raw_sum else x


class PostHocEMA(PowerEMA):
    r""":class:`PowerEMA` that takes a :meth:`snapshot` every ``snapshot_every`` steps and
    reconstructs, after training, the EMA of any ``sigma_rel`` (EDM2 post-hoc EMA, Karras et al.
    2024, spec B.4.3–B.4.4): coefficients from :func:`solve_posthoc_coefficients` over the
    snapshots with :math:`0 < t_i \le t_r`, then :math:`\theta_r = \sum_i x_i \hat E_i`
    accumulated in float32, one snapshot resident at a time (one native call each; fp16 snapshots
    are read directly). ``t_target`` defaults to the time of the latest snapshot; emafuse allows
    any :math:`t_r \le \max t_i` (EDM2 requires a snapshot time). Buffers of the result come from
    the live model."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] | None = (0.05, 0.10), *, snapshot_every: int = 1000, **kwargs: Any) -> None:
        super().__init__(model, sigma_rels, **kwargs)
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.snapshot_every = int(snapshot_every)

    @uninterrupted
    def update(self, model: nn.Module | None = None, batch_size: int | None = None) -> bool:
        changed = super().update(model, batch_size)
        if self.num_steps_seen % self.snapshot_every == 0:
            self.snapshot()
        return changed

    @torch.no_grad()
    def reconstruct(self, sigma_rel: float, t_target: float | None = None, model: nn.Module | None = None,
                    snapshots: Sequence[dict[str, Any]] | None = None) -> nn.Module:
        """The EMA with relative width ``sigma_rel`` at time ``t_target``, as a module."""
        snaps = list(self.snapshots if snapshots is None else snapshots)
        if not snaps:
            raise InvalidArgumentError("PostHocEMA.reconstruct: no snapshots")
        t_r = max(r["t"] for r in snaps) if t_target is None else float(t_target)
        use = [r for r in snaps if 0 < r["t"] <= t_r]
        if not use:
            raise InvalidArgumentError(f"PostHocEMA.reconstruct: no snapshot at or before t={t_r}")
        x = solve_posthoc_coefficients([r["t"] for r in use], [r["gamma"] for r in use], t_r, S.sigma_rel_to_gamma(sigma_rel))
        tr = self._tracking
        out = averaged_copy(tr.model(model), torch.float32, torch.device("cpu"))
        own = tr.tensors_of(out)
        acc = [own[i] for i in tr.averaged]
        for j, (rec, c) in enumerate(zip(use, x)):
            axpby(acc, self._snapshot_state(rec), 1.0, float(c), assign=(j == 0))
        return out


def _saved_time(who: str, state: Mapping[str, Any], key: str) -> float:
    """A saved time (``t``, ``t_last``): a finite number >= 0, else a clear error."""
    value = saved(who, state, key)
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t >= 0):
        raise InvalidArgumentError(f"{who}.load_state_dict: '{key}' is {value!r}; expected a finite number >= 0")
    return t
