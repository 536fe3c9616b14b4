"""Shared test tools: random data (never zeros), odd sizes, per-dtype tolerances, snapshots."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

# Odd sizes that exercise block and chunk boundaries of the CPU driver.
ODD_SHAPES: list[tuple[int, ...]] = [(1,), (3,), (4097,), (7, 5), (3, 4, 2), (278011,)]
SMALL_SHAPES: list[tuple[int, ...]] = [(1,), (3,), (7, 5), (3, 4, 2), (33, 17)]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Relative tolerance of one value computed in fp32 (fp64 for fp64) and rounded once to the dtype:
# one unit of the dtype's precision (plus fp32 round-off).
ULP_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7 + 1e-6, torch.float16: 2**-10 + 1e-6}


def make_params(shapes: Iterable[tuple[int, ...]], dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    """Random parameters (normal, never zero), one per shape."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) * scale + 0.1).to(dtype))
        for s in shapes
    ]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def random_grads(params: list[torch.Tensor], step: int, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    """Deterministic random gradients for ``step`` (normal, never all zero), in each param's dtype."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype) for p in params]


def spiky_grads(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """Random gradients with a few 30x spikes (exercises SPAM's and Adan's clipping)."""
    grads = random_grads(params, step, seed)
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    return [torch.where(torch.rand(g.shape, generator=gen) < 0.02, g * 30, g) for g in grads]


def grads_with_gaps(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor | None]:
    """``spiky_grads`` where parameter 1 has no gradient on steps 0 and 1 (it is first seen
    later) and parameter 2 none on step 3."""
    grads: list[torch.Tensor | None] = list(spiky_grads(params, step, seed))
    if step < 2:
        grads[1] = None
    if step == 3:
        grads[2] = None
    return grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """``p.grad`` = a copy of each gradient (None: no gradient)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def run_steps(opt: torch.optim.Optimizer, params, steps: int, seed: int = 1, scale: float = 1.0, on_step: Callable | None = None,
              *, first: int = 0, grads: Callable | None = None) -> None:
    """Run ``steps`` optimizer steps (t = first, first + 1, ...) on fresh gradients:
    ``random_grads(params, t, seed, scale)``, or ``grads(params, t, seed)``."""
    for t in range(first, first + steps):
        set_grads(params, random_grads(params, t, seed, scale) if grads is None else grads(params, t, seed))
        opt.step()
        if on_step is not None:
            on_step(t)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def scale_of(t: torch.Tensor) -> float:
    """max(1, max |t|): the magnitude absolute tolerances scale with."""
    return max(1.0, float(t.detach().abs().max()))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def raw_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state`` and ``opt.param_groups`` as a state-dict-shaped deep copy, read directly
    (``state_dict()`` may itself refuse state a test corrupted)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: dict(opt.state[p]) for i, p in enumerate(params) if p in opt.state}
    state.update({k: v for k, v in opt.state.items() if isinstance(k, str)})  # optimizer-level counters
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy({"state": state, "param_groups": groups})


def snapshot(params, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """Parameter values and a deep copy of the optimizer's state, for ``assert_unchanged``."""
    return [p.detach().clone() for p in params], raw_state(opt)


def assert_same_state_dict(now: dict, before: dict, what: str = "state") -> None:
    """Two state dicts hold the same entries, tensors bit for bit (NaN equal to NaN)."""
    assert now["state"].keys() == before["state"].keys(), f"{what}: entries created or removed"
    for k, st in before["state"].items():
        if not isinstance(st, dict):  # optimizer-level counters (SPAM)
            assert now["state"][k] == st, f"{what}: {k} changed"
            continue
        assert now["state"][k].keys() == st.keys(), f"{what}: entries of {k} changed"
        for name, value in st.items():
            got = now["state"][k][name]
            if not isinstance(value, torch.Tensor):  # an int step counter, or planted by the test
                assert type(got) is type(value) and str(got) == str(value), f"{what}: {name} of {k} changed"
                continue
            if value.is_meta:  # planted by the test
                assert got.is_meta, f"{what}: {name} of {k} changed"
                continue
            assert got.dtype == value.dtype and torch.equal(got.nan_to_num(), value.nan_to_num()), f"{what}: {name} of {k} changed"
    def groups(sd):
        return [{k: str(v) for k, v in g.items()} for g in sd["param_groups"]]

    assert groups(now) == groups(before), f"{what}: param groups changed"


def assert_unchanged(params, opt: torch.optim.Optimizer, snap: tuple[list[torch.Tensor], dict]) -> None:
    """Nothing changed since ``snapshot``: parameters and state, bit for bit."""
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p, q), "a parameter changed during a refused step"
    assert_same_state_dict(raw_state(opt), sd, "refused step")


def _shaped_after(v: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether state tensor ``v`` is shaped after ``p``: its shape, or (Adafactor's factors) its
    shape with one of the last two sizes 1 (torch's) or dropped (transformers')."""
    if v.shape == p.shape:
        return True
    mats, rows, cols = p.shape[:-2], p.shape[-2:-1], p.shape[-1:]
    return p.dim() >= 2 and v.shape in ((*mats, *rows, 1), (*mats, 1, *cols), (*mats, *rows), (*mats, *cols))


def state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[str]:
    """Names of ``p``'s state tensors shaped after it (the slots, not scalar state or 8-bit
    scales), in order."""
    return [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim() > 0 and _shaped_after(v, p)]
