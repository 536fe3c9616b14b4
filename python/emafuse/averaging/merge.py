r"""Offline merges of models that share an architecture: weighted sums, model soups, SLERP and
LITI (spec ``averaging.md`` B.6, B.7). Inputs are ``nn.Module``\ s or state dicts; outputs are
state dicts (float tensors in float32 unless ``dtype=`` says otherwise; non-float tensors taken
from the first/base input). Every pass is one native call over all tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _dtensor
from ..errors import InvalidArgumentError, ShapeError, UnsupportedOptionError
from ._engine import engine_input, group, native_step, real_view

__all__ = ["greedy_soup", "liti", "slerp", "uniform_soup", "weighted_sum"]

StateLike = "nn.Module | Mapping[str, Tensor]"


def _state(x: Any) -> dict[str, Tensor]:
    if isinstance(x, nn.Module):
        st = {k: v.detach() for k, v in x.state_dict().items()}
    elif isinstance(x, Mapping):
        st = {k: v.detach() if isinstance(v, Tensor) else v for k, v in x.items()}
    else:
        raise InvalidArgumentError(f"expected an nn.Module or a state dict, got {type(x).__name__}")
    if _dtensor.any_dtensor(st.values()):
        raise UnsupportedOptionError(
            "merges read whole tensors (SLERP and the soups' scores need them), and this input holds DTensors (FSDP2 shards); "
            "pass whole tensors: an average's full_state_dict(), or get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)) for a sharded model"
        )
    return st


def _check_same(states: Sequence[dict[str, Tensor]], what: str) -> None:
    keys = list(states[0])
    for j, s in enumerate(states[1:], 1):
        if list(s) != keys and set(s) != set(keys):
            missing = [k for k in keys if k not in s][:5]
            extra = [k for k in s if k not in states[0]][:5]
            raise InvalidArgumentError(f"{what}: input {j} has other entries than input 0 (missing {missing}, unexpected {extra})")
        for k in keys:
            a, b = states[0][k], s[k]
            if isinstance(a, Tensor) and tuple(a.shape) != tuple(b.shape):
                raise ShapeError(f"{what}: '{k}' has shape {tuple(b.shape)} in input {j} but {tuple(a.shape)} in input 0")


def _float_keys(st: dict[str, Tensor]) -> list[str]:
    return [k for k, v in st.items() if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())]


def _out_like(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    if t.is_complex():
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return torch.empty(t.shape, dtype=dtype or torch.float32, device=t.device)


def axpby(outs: list[Tensor], xs: list[Tensor], a: float, b: float, assign: bool = False) -> None:
    """``out ← a·out + b·x`` (``out ← b·x`` with ``assign``) for every pair, one native call
    (inputs of other dtypes or devices converted first); the streaming step of every weighted
    sum (soups, LAWA's mean, post-hoc reconstruction)."""
    xs = [engine_input(o, x if x.device == o.device else x.to(o.device)) for o, x in zip(outs, xs)]
    hyper: dict[str, Any] = {"b": float(b), "assign": assign}
    if not assign:
        hyper["a"] = float(a)
    native_step("weighted_sum", "axpby", group(hyper, [real_view(o) for o in outs], [real_view(x) for x in xs]))


def weighted_sum(inputs: Sequence[Any], weights: Sequence[float], *, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
    r""":math:`\sum_i c_i \theta_i` over models/state dicts, streamed one input at a time with
    float32 accumulation (spec D.1 K5); bf16/fp16 inputs are read directly. Non-float entries come
    from ``inputs[0]``."""
    if len(inputs) != len(weights) or not inputs:
        raise InvalidArgumentError("weighted_sum: need as many weights as inputs, at least one")
    states = [_state(x) for x in inputs]
    _check_same(states, "weighted_sum")
    keys = _float_keys(states[0])
    out = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in states[0].items()}
    acc = [_out_like(states[0][k], dtype) for k in keys]
    for i, (st, c) in enumerate(zip(states, weights)):
        axpby(acc, [st[k] for k in keys], 1.0, c, assign=(i == 0))
    out.update(zip(keys, acc))
    return out


def uniform_soup(models: Sequence[Any], *, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
    r"""Uniform model soup (Wortsman et al., ICML 2022): :math:`\frac1N \sum_i \theta_i`."""
    n = len(models)
    return weighted_sum(models, [1.0 / n] * n, dtype=dtype)


def greedy_soup(
    models: Sequence[Any],
    evaluate: Callable[[dict[str, Tensor]], float],
    *,
    scores: Sequence[float] | None = None,
    accept: str = "ge",
    dtype: torch.dtype | None = torch.float32,
) -> tuple[dict[str, Tensor], list[int]]:
    r"""Greedy soup (Wortsman et al., ICML 2022): sort ingredients by held-out score (``scores``,
    or ``evaluate`` of each), start from the best, and add each next candidate if the soup's
    score does not drop. The running soup with ``n`` ingredients is
    :math:`S_{n+1} = S_n \frac{n}{n+1} + \theta/(n+1)`.

    ``evaluate(state_dict) -> score`` (higher is better). ``accept="ge"`` keeps a candidate whose
    soup scores at least as well (the paper's rule, default; spec Q5), ``"gt"`` only if strictly
    better (the official script). Returns the soup and the indices of its ingredients."""
    if accept not in ("ge", "gt"):
        raise ValueError(f"accept must be 'ge' or 'gt', got {accept!r}")
    states = [_state(m) for m in models]
    _check_same(states, "greedy_soup")
    if scores is None:
        scores = [float(evaluate(st)) for st in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    keys = _float_keys(states[0])
    soup = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in states[order[0]].items()}
    acc = [_out_like(states[0][k], dtype) for k in keys]
    axpby(acc, [states[order[0]][k] for k in keys], 0.0, 1.0, assign=True)
    soup.update(zip(keys, acc))
    best = scores[order[0]]
    chosen = [order[0]]
    for i in order[1:]:
        n = len(chosen)
        cand_acc = [a.clone() for a in acc]
        axpby(cand_acc, [states[i][k] for k in keys], n / (n + 1), 1.0 / (n + 1))
        cand = dict(soup)
        cand.update(zip(keys, cand_acc))
        score = float(evaluate(cand))
        if score > best or (accept == "ge" and score == best):
            acc, soup, best = cand_acc, cand, score
            chosen.append(i)
    return soup, chosen


def slerp(base: Any, models: Any, t: float | None = None, *, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
    r"""Spherical interpolation of task vectors (WARP, Ramé et al. 2024), per tensor:
    :math:`\delta_i = \theta_i - \theta_{init}`, :math:`\cos\Omega = \langle\delta_1,\delta_2\rangle
    /(\|\delta_1\|\|\delta_2\|)`,

    .. math::
        \theta = \theta_{init} + \frac{\sin((1-\lambda)\Omega)}{\sin\Omega}\delta_1
               + \frac{\sin(\lambda\Omega)}{\sin\Omega}\delta_2

    falling back to LERP when :math:`|\cos\Omega| > 0.9995` or a norm is ≤ 1e-8 (mergekit's
    convention). Dot products and norms are accumulated in float64 in the same native call that
    then writes the result (spec K7 + K9).

    ``models`` is a pair ``(θ1, θ2)`` with ``t`` = λ (default 0.5), or a list of M > 2 models,
    folded as :math:`\theta^{(m)} = \mathrm{slerp}(\theta_{init}, \theta^{(m-1)}, \theta_m,
    1/m)` so every model gets equal weight (spec B.6; ``t`` must then be None). Non-float
    entries come from ``base``."""
    models = list(models)
    if len(models) < 2:
        raise InvalidArgumentError("slerp needs at least two models")
    if len(models) > 2 and t is not None:
        raise InvalidArgumentError("slerp of more than two models folds with t = 1/m; do not pass t")
    b = _state(base)
    states = [_state(m) for m in models]
    _check_same([b, *states], "slerp")
    keys = [k for k in _float_keys(b) if not b[k].is_complex()]
    cur = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in b.items()}
    bases = [b[k].to(dtype) if b[k].dtype != dtype else b[k] for k in keys]
    out = [states[0][k].to(dtype=dtype, copy=True) for k in keys]
    for m in range(2, len(states) + 1):
        lam = (0.5 if t is None else float(t)) if len(states) == 2 else 1.0 / m
        other = [states[m - 1][k].to(dtype) if states[m - 1][k].dtype != dtype else states[m - 1][k] for k in keys]
        native_step("slerp", "slerp", group({"t": lam}, out, other, [{"base": x} for x in bases], ("base",)))
    cur.update(zip(keys, out))
    return cur


def liti(init: Any, merged: Any, eta: float, *, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
    r"""Linear interpolation towards initialization (WARP):
    :math:`\theta = (1-\eta)\,\theta_{init} + \eta\,\theta_{merged}` (a lerp, one native call)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    a, b = _state(init), _state(merged)
    _check_same([a, b], "liti")
    keys = _float_keys(a)
    out = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in a.items()}
    acc = [a[k].to(dtype=dtype, copy=True) if not a[k].is_complex() else a[k].clone() for k in keys]
    ins = [engine_input(o, b[k]) for o, k in zip(acc, keys)]
    native_step("liti", "ema", group({"weight": float(eta)}, [real_view(o) for o in acc], [real_view(x) for x in ins]))
    out.update(zip(keys, acc))
    return out
