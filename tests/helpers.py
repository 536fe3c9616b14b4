"""Shared test tools: random data (never zeros), odd sizes, per-dtype tolerances."""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

# Odd sizes that exercise block and chunk boundaries of the CPU driver.
ODD_SHAPES: list[tuple[int, ...]] = [(1,), (3,), (4097,), (7, 5), (3, 4, 2), (278011,)]
SMALL_SHAPES: list[tuple[int, ...]] = [(1,), (3,), (7, 5), (3, 4, 2), (33, 17)]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


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


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def run_steps(opt: torch.optim.Optimizer, params, steps: int, seed: int = 1, scale: float = 1.0, on_step: Callable | None = None) -> None:
    """Run ``steps`` optimizer steps on fresh random gradients."""
    for t in range(steps):
        set_grads(params, random_grads(params, t, seed, scale))
        opt.step()
        if on_step is not None:
            on_step(t)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def state_snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())
