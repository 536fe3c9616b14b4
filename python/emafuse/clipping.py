r"""Gradient stabilizers applied to a model's gradients before the optimizer step (spec
``averaging.md`` part C): :class:`ZClip` (global norm against its EMA statistics) and
:class:`AdaGC` (each tensor's norm against an EMA of its own clipped norm).

The norms are one native pass over every gradient (per-tensor float64 sums, reproducible;
DTensor/FSDP2 shards are summed across their mesh, one ``all_reduce``), the decisions are host
arithmetic in float64 (one host synchronisation per step for CUDA gradients), and a clip scales
the gradients in place with torch's multi-tensor multiply (one kernel per device and dtype on
CUDA). Both refuse sparse gradients, ignore parameters without a gradient, and by default leave
gradients and statistics untouched on a NaN/inf norm (``nonfinite="skip"``: a step AMP's scaler
will skip, spec C.4).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _dtensor
from .errors import InvalidArgumentError, SparseGradError
from .optim._base import CLIP_COEF_EPS, cap_coefficient, sum_squares, tensor_sum_squares

__all__ = ["AdaGC", "ZClip"]



def _gradients(who: str, params: nn.Module | Iterable[Tensor]) -> list[tuple[int, Tensor]]:
    """The gradients of ``params`` (a module's parameters, or tensors) that exist, with each
    parameter's position."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, nn.Module):
        params = params.parameters()
    present = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
    for _, g in present:
        if g.layout != torch.strided:
            raise SparseGradError(f"{who}: a gradient is {g.layout}; norm-based clipping needs dense gradients (call .to_dense())")
    return present


def _scale(grads: list[Tensor], coef: float | list[float]) -> None:
    """Multiply every gradient by ``coef`` (or each by its own) in place (DTensors through their
    local shards)."""
    torch._foreach_mul_([_dtensor.local(g) for g in grads], coef)


def _check_nonfinite(who: str, nonfinite: str) -> None:
    if nonfinite not in ("skip", "reference"):
        raise ValueError(f"{who}: nonfinite must be 'skip' or 'reference', got {nonfinite!r}")


class ZClip:
    r"""ZClip (Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv
    2504.02507): clip the global gradient norm :math:`g` where it is an outlier against an EMA of
    its own mean :math:`\mu` and variance :math:`v`, as the reference ``zclip.ZClip`` 1.0.0
    (bluorion-com/ZClip), with the same arguments and defaults. Call :meth:`step` after
    ``backward()`` (and after ``GradScaler.unscale_``), before ``optimizer.step()``; it returns
    :math:`g` before clipping.

    * Warm-up: the first ``warmup_steps`` norms are collected; then :math:`\mu` is their mean and
      :math:`v` their population variance. Meanwhile only ``max_grad_norm`` clips (as
      ``torch.nn.utils.clip_grad_norm_``).
    * Then, with :math:`\sigma = \sqrt v`: ``mode="zscore"``: :math:`z = (g - \mu)/(\sigma +
      \text{eps})`; if :math:`z > z_{th}` the threshold is :math:`c = (\mu + z_{th}^2\sigma/z)
      \cdot \text{clip\_factor}` (``clip_option="adaptive_scaling"``) or :math:`c = \mu`
      (``"mean"``). ``mode="percentile"``: :math:`c = \mu + z_{th}\sigma` when :math:`g` exceeds it.
      The gradients are scaled by :math:`e/(g + 10^{-6})` when :math:`g > e = \min(c \text{ (or }
      g), \text{max\_grad\_norm})`: the default ``max_grad_norm=1.0`` keeps a fixed cap active
      (``None`` for pure ZClip).
    * The statistics are fed :math:`x = c` (before the cap) or :math:`g`: :math:`\mu \leftarrow
      \alpha\mu + (1-\alpha)x`, then :math:`v \leftarrow \alpha v + (1-\alpha)(x - \mu)^2` with the
      new :math:`\mu`; not at all on a spike with ``skip_update_on_spike=True``.

    Decisions beyond the reference (spec C.2): ``nonfinite="skip"`` (default) leaves gradients and
    statistics untouched when :math:`g` is NaN or infinite (a step AMP's scaler will skip);
    ``"reference"`` proceeds as the reference does. :meth:`state_dict` / :meth:`load_state_dict`
    save and restore the statistics for an exact resume (the reference keeps none). :math:`g` is
    accumulated in float64 by the native engine (the reference: per-tensor norms in the first
    parameter's dtype); DTensor (FSDP2) shards are summed across their mesh. Invalid options raise
    ``ValueError`` (the reference asserts).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        *,
        nonfinite: str = "skip",
    ) -> None:
        mode = mode.lower()
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"ZClip: mode must be 'zscore' or 'percentile', got {mode!r}")
        if mode == "zscore" and clip_option.lower() not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZClip: clip_option must be 'adaptive_scaling' or 'mean' in zscore mode, got {clip_option!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"ZClip: alpha must be in [0, 1), got {alpha}")
        if not z_thresh > 0.0 or not eps >= 0.0 or not clip_factor > 0.0:
            raise ValueError(f"ZClip: z_thresh and clip_factor must be > 0 and eps >= 0, got {z_thresh}, {clip_factor}, {eps}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"ZClip: warmup_steps must be an integer >= 1, got {warmup_steps}")
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"ZClip: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        _check_nonfinite("ZClip", nonfinite)
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = float(alpha), float(z_thresh), max_grad_norm, float(eps)
        self.warmup_steps, self.mode, self.clip_factor = int(warmup_steps), mode, float(clip_factor)
        self.clip_option = clip_option.lower() if mode == "zscore" else None
        self.skip_update_on_spike, self.nonfinite = bool(skip_update_on_spike), nonfinite
        #: Warm-up norms collected so far.
        self.buffer: list[float] = []
        self.initialized = False
        #: The EMA of the norm and of its variance (None during warm-up).
        self.mean: float | None = None
        self.var: float | None = None
        #: Calls of :meth:`step` that counted (not skipped as non-finite).
        self.num_steps = 0

    def threshold(self, g: float) -> float | None:
        """The adaptive clip threshold :math:`c` for norm ``g`` after warm-up (None: no spike)."""
        assert self.mean is not None and self.var is not None
        std = math.sqrt(self.var)
        if self.mode == "percentile":
            c = self.mean + self.z_thresh * std
            return c if g > c else None
        z = (g - self.mean) / (std + self.eps)
        if not z > self.z_thresh:
            return None
        if self.clip_option == "mean":
            return self.mean
        return (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor

    @torch.no_grad()
    def step(self, params: nn.Module | Iterable[Tensor]) -> float:
        """Clip the gradients of ``params`` (a module, or its parameters) in place if due, update
        the statistics, and return the global norm before clipping."""
        grads = [g for _, g in _gradients("ZClip", params)]
        g = math.sqrt(sum_squares(grads)) if grads else 0.0
        coef = self.coefficient(g)
        if coef is not None:
            # As torch.nn.utils.clip_grad_norm_ (which also multiplies by 1: the same bits).
            _scale(grads, coef)
        return g

    def coefficient(self, g: float) -> float | None:
        """Feed the global norm ``g`` (of unscaled gradients) to the statistics and return what
        the gradients are to be multiplied by: None when no clip is due (and when ``g`` is not
        finite with ``nonfinite="skip"``, which leaves the statistics untouched). :meth:`step` and
        the optimizers' ``grad_clip=`` (which applies it inside the native step) call it."""
        if not math.isfinite(g) and self.nonfinite == "skip":
            return None
        self.num_steps += 1
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            return cap_coefficient(g, self.max_grad_norm)
        c = self.threshold(g)
        effective = g if c is None else c
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        coef = effective / (g + CLIP_COEF_EPS) if g > effective else None
        if c is None or not self.skip_update_on_spike:
            x = g if c is None else c
            assert self.mean is not None and self.var is not None
            self.mean = self.alpha * self.mean + (1.0 - self.alpha) * x
            self.var = self.alpha * self.var + (1.0 - self.alpha) * (x - self.mean) ** 2
        return coef

    def state_dict(self) -> dict[str, Any]:
        """The statistics and counters (what an exact resume needs) and the options."""
        return {
            "mean": self.mean, "var": self.var, "initialized": self.initialized, "buffer": list(self.buffer),
            "num_steps": self.num_steps,
            "options": dict(alpha=self.alpha, z_thresh=self.z_thresh, max_grad_norm=self.max_grad_norm, eps=self.eps,
                            warmup_steps=self.warmup_steps, mode=self.mode, clip_option=self.clip_option,
                            clip_factor=self.clip_factor, skip_update_on_spike=self.skip_update_on_spike),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the options stay this object's."""
        try:
            initialized, buffer = bool(state["initialized"]), [float(x) for x in state["buffer"]]
            mean, var = state["mean"], state["var"]
            mean, var = (None, None) if not initialized else (float(mean), float(var))
            num_steps = int(state.get("num_steps", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgumentError(f"ZClip.load_state_dict: not a ZClip state ({e!r}); pass what ZClip.state_dict() returned") from None
        if not initialized and len(buffer) >= self.warmup_steps:
            raise InvalidArgumentError(
                f"ZClip.load_state_dict: {len(buffer)} warm-up norms saved but warmup_steps={self.warmup_steps} here; "
                "build ZClip with the options it was saved with"
            )
        self.initialized, self.buffer, self.mean, self.var, self.num_steps = initialized, buffer, mean, var, num_steps

    def __repr__(self) -> str:
        state = f"mean={self.mean}, var={self.var}" if self.initialized else f"warm-up {len(self.buffer)}/{self.warmup_steps}"
        return f"ZClip(mode={self.mode!r}, clip_option={self.clip_option!r}, z_thresh={self.z_thresh}, {state})"


class AdaGC:
    r"""AdaGC (Wang et al., "AdaGC: Improving Training Stability for Large Language Model
    Pretraining", arXiv 2502.11034): each gradient tensor :math:`g_i` is clipped relative to
    :math:`\gamma_i`, an EMA of its own clipped norm (spec ``averaging.md`` C.3, pytorch_optimizer's
    defaults). Call :meth:`step` after ``backward()`` (and after ``GradScaler.unscale_``), before
    ``optimizer.step()``; it returns the global norm before clipping.

    At step :math:`t` (counted from 1), while :math:`t <` ``warmup_steps`` or for a tensor without
    :math:`\gamma_i` yet: global clipping, :math:`h = \min(\lambda_{abs}/(G + \text{eps}), 1)`
    with :math:`G` the global norm, and :math:`\gamma_i` is the running minimum of the clipped
    norms :math:`h\lVert g_i\rVert`. After: :math:`h_i = \min(\lambda_{rel}\max(\gamma_i,
    \text{eps})/\max(\lVert g_i\rVert, \text{eps}), 1)` and :math:`\gamma_i \leftarrow \beta\gamma_i
    + (1-\beta)h_i\lVert g_i\rVert`. Gradients are scaled in place by :math:`h` or :math:`h_i`.

    Every emafuse optimizer also takes it as ``grad_clip=AdaGC(...)``, which applies the factors
    inside its native step (``p.grad`` is not written) and keys :math:`\gamma_i` by the
    parameter's index in the optimizer's state dict (its position over all param groups).

    Decisions (no stand-alone reference exists: the official code is PaddlePaddle's, and
    pytorch_optimizer fuses AdaGC into an Adam): :math:`\gamma_i` is kept on the host in float64,
    keyed by the tensor's position in what :meth:`step` is given (a module's ``parameters()``, or a
    list: pass the same one every step); the clipped norm is :math:`h\lVert g_i\rVert` (no second
    norm pass; spec C.3); parameters without a gradient keep their :math:`\gamma_i`;
    :meth:`state_dict` / :meth:`load_state_dict` save :math:`\gamma` and the step count for an exact
    resume; ``nonfinite`` as :class:`ZClip`.
    """

    def __init__(self, beta: float = 0.98, lambda_rel: float = 1.05, lambda_abs: float = 1.0, warmup_steps: int = 100,
                 eps: float = 1e-8, *, nonfinite: str = "skip") -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdaGC: beta must be in [0, 1), got {beta}")
        if not lambda_rel > 0.0 or not lambda_abs > 0.0:
            raise ValueError(f"AdaGC: lambda_rel and lambda_abs must be > 0, got {lambda_rel} and {lambda_abs}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"AdaGC: warmup_steps must be an integer >= 1, got {warmup_steps}")
        if not eps >= 0.0:
            raise ValueError(f"AdaGC: eps must be >= 0, got {eps}")
        _check_nonfinite("AdaGC", nonfinite)
        self.beta, self.lambda_rel, self.lambda_abs, self.eps = float(beta), float(lambda_rel), float(lambda_abs), float(eps)
        self.warmup_steps, self.nonfinite = int(warmup_steps), nonfinite
        #: γ_i by the tensor's position in the parameters :meth:`step` is given.
        self.gamma: dict[int, float] = {}
        #: Calls of :meth:`step` that counted (not skipped as non-finite): t.
        self.num_steps = 0

    @torch.no_grad()
    def step(self, params: nn.Module | Iterable[Tensor]) -> float:
        r"""Clip each gradient of ``params`` (a module, or its parameters, in the same order at
        every step) in place, update :math:`\gamma`, and return the global norm before clipping."""
        present = _gradients("AdaGC", params)
        grads = [g for _, g in present]
        sums = tensor_sum_squares(grads) if grads else []
        factors = self.tensor_factors([i for i, _ in present], sums)
        clipped = [(g, h) for g, h in zip(grads, factors or []) if h < 1.0]  # a factor of 1 changes nothing
        if clipped:
            _scale([g for g, _ in clipped], [h for _, h in clipped])
        return math.sqrt(sum(sums))

    def tensor_factors(self, positions: list[int], sums: list[float]) -> list[float] | None:
        """Feed the squared norms ``sums`` of the gradients (unscaled) of the tensors at
        ``positions`` to the statistics and return what each gradient is to be multiplied by;
        None when their global norm is not finite with ``nonfinite="skip"`` (the statistics are
        left untouched). :meth:`step` and the optimizers' ``grad_clip=`` (which applies the
        factors inside the native step) call it."""
        total = math.sqrt(sum(sums))
        if not math.isfinite(total) and self.nonfinite == "skip":
            return None
        self.num_steps += 1
        h_global = min(self.lambda_abs / (total + self.eps), 1.0)
        # Every tensor at once, in float64 with the operations of the scalar rule (Python's min
        # and max as comparisons: the same values, NaN included): γ is NaN where not yet set.
        norm = torch.tensor(sums, dtype=torch.float64).sqrt()
        gamma = torch.tensor([self.gamma.get(i, math.nan) for i in positions], dtype=torch.float64)
        fresh = gamma.isnan()
        if self.num_steps < self.warmup_steps:  # warm-up: the global clip, γ the running minimum
            h = torch.full_like(norm, h_global)
            clipped = h * norm
            gamma = torch.where(fresh | (clipped < gamma), clipped, gamma)
        else:
            floor = torch.tensor(self.eps, dtype=torch.float64)
            ratio = self.lambda_rel * torch.where(floor > gamma, floor, gamma) / torch.where(floor > norm, floor, norm)
            h = torch.where(fresh, h_global, torch.where(ratio > 1.0, 1.0, ratio))
            gamma = torch.where(fresh, h * norm, self.beta * gamma + (1.0 - self.beta) * h * norm)
        self.gamma.update(zip(positions, gamma.tolist()))
        return h.tolist()

    def __deepcopy__(self, memo: dict[int, Any]) -> AdaGC:
        """A copy with its own γ (the optimizers decide on a copy; floats need no deeper copy)."""
        twin = copy.copy(self)
        twin.gamma = dict(self.gamma)
        return twin

    def state_dict(self) -> dict[str, Any]:
        """γ (by tensor position), the step count and the options."""
        return {"gamma": dict(self.gamma), "num_steps": self.num_steps,
                "options": dict(beta=self.beta, lambda_rel=self.lambda_rel, lambda_abs=self.lambda_abs,
                                warmup_steps=self.warmup_steps, eps=self.eps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the options stay this object's."""
        try:
            gamma = {int(k): float(v) for k, v in state["gamma"].items()}
            num_steps = int(state["num_steps"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgumentError(f"AdaGC.load_state_dict: not an AdaGC state ({e!r}); pass what AdaGC.state_dict() returned") from None
        self.gamma, self.num_steps = gamma, num_steps

    def __repr__(self) -> str:
        return f"AdaGC(beta={self.beta}, lambda_rel={self.lambda_rel}, lambda_abs={self.lambda_abs}, " \
               f"warmup_steps={self.warmup_steps}, t={self.num_steps}, tensors={len(self.gamma)})"
