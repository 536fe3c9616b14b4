"""Host cost of a step's validation (tensor reads, layout and dtype checks, the overlap check of
written operands) at 4000 small tensors, where it is not hidden behind memory traffic.

Prints one line: the median and best ms of a cached-plan ``AdamW.step()`` over ``--tensors``
one-element parameters (each step gives every parameter a new gradient tensor, as
``zero_grad(set_to_none=True)`` + backward does, so the gradients are re-read and re-checked),
and of a plan build (the first step after the state dict changed). Run it against two builds of
emafuse (``PYTHONPATH``) in alternation on the same machine to compare them; the difference
divided by the tensor count is the per-tensor cost."""

from __future__ import annotations

import argparse
import statistics
import time

import emafuse
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tensors", type=int, default=4000)
    ap.add_argument("--numel", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    grads = [[torch.randn(args.numel) for _ in params] for _ in range(2)]
    opt = emafuse.AdamW(params, lr=1e-3)

    def step(k: int) -> None:
        for p, g in zip(params, grads[k % 2]):
            p.grad = g
        opt.step()

    for k in range(5):
        step(k)
    times = []
    for k in range(args.steps):
        for p, g in zip(params, grads[k % 2]):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    builds = []
    for k in range(max(args.steps // 10, 5)):
        opt.state[params[0]] = dict(opt.state[params[0]])  # a changed state dict: the next step builds a new plan
        t0 = time.perf_counter()
        step(k)
        builds.append(time.perf_counter() - t0)
    ms = lambda xs: (1e3 * statistics.median(xs), 1e3 * min(xs))
    print(f"tensors={args.tensors} step_ms_median={ms(times)[0]:.3f} step_ms_best={ms(times)[1]:.3f} "
          f"build_ms_median={ms(builds)[0]:.3f} build_ms_best={ms(builds)[1]:.3f}")


if __name__ == "__main__":
    main()
