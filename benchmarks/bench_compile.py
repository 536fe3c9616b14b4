"""torch.compile benchmark: what the custom-op plumbing costs an eager step, and a compiled
training step against the eager one (CPU).

    PYTHONPATH=python python benchmarks/bench_compile.py            # writes its RESULTS.md section
    PYTHONPATH=python python benchmarks/bench_compile.py --quick    # prints only

1. Eager ``opt.step()`` against ``opt._update(None, None)``, the native step that ``step()`` wraps
   (what ``step()`` adds: the closure check, the AMP attributes, the ``is_compiling`` branch that
   routes compiled steps through ``emafuse::optimizer_step``), AdamW fp32 over 1, 150 and 4000
   one-element tensors.
2. A training step of a small MLP (forward, backward, ``opt.step()``): eager; with the model
   compiled and ``torch.compile(opt.step, fullgraph=True)``; and the whole step compiled (the
   backward is a graph break, as with torch's own optimizers).

The variants take turns within each round; each figure is the median over rounds of the median
step time in a round, with the range of the round medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import emafuse
import torch
from common import machine_info, markdown_table, write_section

RESULTS = Path(__file__).with_name("RESULTS.md")


def _median_us(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _rotate(variants: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: state, plans, compilation
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            out[name].append(_median_us(fn, steps))
    return out


def _cell(samples: list[float]) -> tuple[str, str]:
    return f"{statistics.median(samples):.1f}", f"{min(samples):.1f}-{max(samples):.1f}"


def step_overhead(rounds: int, steps: int) -> str:
    rows = []
    for n in (1, 150, 4000):
        params = [torch.nn.Parameter(torch.randn(1)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(1)
        opt = emafuse.AdamW(params, lr=1e-3, weight_decay=1e-2)
        res = _rotate({"opt.step()": opt.step, "native step only": lambda opt=opt: opt._update(None, None)}, rounds, steps)
        full, bare = statistics.median(res["opt.step()"]), statistics.median(res["native step only"])
        rows.append([n, *_cell(res["opt.step()"]), *_cell(res["native step only"]), f"{full - bare:.2f}"])
    branch = min(timeit.repeat(torch.compiler.is_compiling, number=100_000, repeat=5)) / 100_000 * 1e6
    table = markdown_table(["tensors", "opt.step() us", "range", "native step only us", "range", "difference us"], rows)
    return (
        f"{table}\n\nOf the difference, the branch the custom op added (`torch.compiler.is_compiling()`) costs {branch:.3f} us "
        "per step; the rest is torch's `Optimizer.step` wrapper (profiler record, step hooks) and `torch.no_grad`, which "
        "torch's own optimizers pay too."
    )


def _mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 10))
    return model, emafuse.AdamW(model.parameters(), lr=1e-3)


def training_step(rounds: int, steps: int) -> str:
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def make(kind: str) -> Callable[[], object]:
        model, opt = _mlp()
        forward = torch.compile(model) if kind == "model + step compiled" else model
        step = torch.compile(opt.step, fullgraph=True) if kind == "model + step compiled" else opt.step

        def train() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            step()
            return loss

        return torch.compile(train) if kind == "whole step compiled" else train

    kinds = ["eager", "model + step compiled", "whole step compiled"]
    res = _rotate({k: make(k) for k in kinds}, rounds, steps)
    eager = statistics.median(res["eager"])
    rows = [[k, *_cell(res[k]), f"{eager / statistics.median(res[k]):.2f}x"] for k in kinds]
    return markdown_table(["training step (MLP 256-512-512-10, batch 64)", "us", "range", "speed-up over eager"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds; prints only")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    info = machine_info()
    overhead = step_overhead(rounds, 200)
    training = training_step(rounds, 50)
    body = "\n".join(
        [
            "## torch.compile: eager cost of the custom-op plumbing, compiled training step (CPU)",
            "",
            f"Written by `python benchmarks/bench_compile.py` ({info['date']}; {info['cpu']}, {info['cores available']} cores, "
            f"torch {info['torch']}, emafuse {info['emafuse']}; load average at start {info['load average at start (1, 5, 15 min)']}). "
            f"{rounds} rounds, the variants in turn; median of round medians and the range of round medians.",
            "",
            "AdamW fp32 over one-element tensors: `opt.step()` against the native step it wraps "
            "(`_update`); the difference is what `step()` adds in eager mode, where the custom op is not used.",
            "",
            overhead,
            "",
            training,
        ]
    )
    print(body)
    if not args.quick:
        write_section(RESULTS, "COMPILE", body)


if __name__ == "__main__":
    main()
