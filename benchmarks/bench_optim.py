"""Optimizer-step benchmark: emafuse's AdamW, Adam and SGD against torch.optim's for-loop,
foreach and fused implementations of the same optimizer, on the CPU, on the parameter shapes of
real models (DESIGN.md §5), next to the machine's measured memory bandwidth.

    PYTHONPATH=python python benchmarks/bench_optim.py            # full run, writes RESULTS.md
    PYTHONPATH=python python benchmarks/bench_optim.py --quick    # a short run, prints only

All implementations of a case step the same parameters and gradients. They take turns: each
round builds every implementation's optimizer in turn, runs its warm-up steps (which create the
state), times its steps and frees it, so only one optimizer state exists at a time and load from
other processes falls on all implementations alike. ms/step is the median over all rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import emafuse
import torch
from common import copy_bandwidth, inplace_bandwidth, machine_info, markdown_table, time_calls, write_section
from workloads import WORKLOADS, make_params, numel

EMAFUSE = "emafuse"
# torch's three implementations, by the constructor flag that selects each.
PEERS: dict[str, dict[str, bool]] = {
    "torch for-loop": {"foreach": False},
    "torch foreach": {"foreach": True},
    "torch fused": {"fused": True},
}
IMPLS = [EMAFUSE, *PEERS]


@dataclass(frozen=True)
class Case:
    """One optimizer configuration, run by emafuse and by each of torch's implementations."""

    name: str
    ours: type[torch.optim.Optimizer]
    theirs: type[torch.optim.Optimizer]
    slots: int  # full-size state tensors per parameter
    dtype: torch.dtype = torch.float32
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {str(self.dtype).removeprefix('torch.')}"

    @property
    def bytes_per_param(self) -> int:
        """optimizers.md §1: read p, g and every state, write p and every state; the state has
        the parameter's dtype (torch's default). AdamW fp32: 28 B, SGD momentum fp32: 20 B,
        AdamW bf16: 14 B."""
        return (3 + 2 * self.slots) * self.dtype.itemsize

    def optimizer(self, impl: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if impl == EMAFUSE:
            return self.ours(params, **self.kwargs)
        return self.theirs(params, **self.kwargs, **PEERS[impl])


ADAMW = Case("AdamW", emafuse.AdamW, torch.optim.AdamW, 2, kwargs={"lr": 1e-3, "weight_decay": 1e-2})
CASES = [
    ADAMW,
    Case("Adam", emafuse.Adam, torch.optim.Adam, 2, kwargs={"lr": 1e-3}),
    Case("SGD momentum", emafuse.SGD, torch.optim.SGD, 1, kwargs={"lr": 1e-3, "momentum": 0.9}),
    Case("AdamW", emafuse.AdamW, torch.optim.AdamW, 2, torch.bfloat16, {"lr": 1e-3, "weight_decay": 1e-2}),
]


@dataclass(frozen=True)
class Plan:
    rounds: int
    warmup: int  # per round
    steps: int  # timed, per round


def measure(case: Case, params: list[torch.Tensor], plan: Plan, impls: tuple[str, ...] = IMPLS) -> dict[str, list[float]]:
    """Seconds per ``step()`` of each of ``impls`` (default: every implementation), taking turns
    round by round."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(plan.rounds):
        for impl in impls:
            opt = case.optimizer(impl, params)
            times[impl] += time_calls(opt.step, plan.warmup, plan.steps)
            del opt
            gc.collect()
    return times


@dataclass(frozen=True)
class Result:
    workload: str
    params: int
    tensors: int
    case: Case
    impl: str
    median: float  # seconds per step
    best: float

    def gbs(self) -> float:
        """Effective bandwidth of the median step, GB/s."""
        return self.case.bytes_per_param * self.params / self.median / 1e9


def bandwidths() -> tuple[float, float]:
    """(copy, in-place) median bandwidths in GB/s, printed with their best."""
    (cb, cm), (ib, im) = copy_bandwidth(), inplace_bandwidth()
    print(f"bandwidth, GB/s read + written: copy_ best {cb:.1f} median {cm:.1f}; in-place mul_ best {ib:.1f} median {im:.1f}", flush=True)
    return cm, im


def bench_workloads(names: list[str], plan: Plan, bw: list[tuple[float, float]]) -> list[Result]:
    """Every case on every workload; measures the bandwidths (into ``bw``) before each workload."""
    results = []
    for wl in names:
        bw.append(bandwidths())
        shapes = WORKLOADS[wl]()
        for dtype in dict.fromkeys(c.dtype for c in CASES):
            params = make_params(shapes, dtype)
            for case in (c for c in CASES if c.dtype == dtype):
                for impl, ts in measure(case, params, plan).items():
                    r = Result(wl, numel(shapes), len(shapes), case, impl, statistics.median(ts), min(ts))
                    results.append(r)
                    print(f"{wl:12} {case.label:22} {impl:15} {r.median * 1e3:9.1f} ms {r.gbs():6.1f} GB/s", flush=True)
            del params
            gc.collect()
    return results


def speedup(results: list[Result], r: Result) -> str:
    """``r``'s time over emafuse's time on the same workload and case."""
    if r.impl == EMAFUSE:
        return "-"
    ours = next(x for x in results if (x.workload, x.case, x.impl) == (r.workload, r.case, EMAFUSE))
    return f"{r.median / ours.median:.2f}x"


STEP_HEADERS = ["workload", "params / tensors", "optimizer", "implementation", "ms/step", "best ms", "GB/s",
                "% of copy", "% of in-place", "emafuse speed-up"]


def step_rows(results: list[Result], copy_gbs: float, inplace_gbs: float) -> list[list[str]]:
    return [
        [
            r.workload, f"{r.params / 1e6:.1f}M / {r.tensors}", r.case.label, r.impl,
            f"{r.median * 1e3:.1f}", f"{r.best * 1e3:.1f}", f"{r.gbs():.1f}",
            f"{100 * r.gbs() / copy_gbs:.0f}%", f"{100 * r.gbs() / inplace_gbs:.0f}%", speedup(results, r),
        ]
        for r in results
    ]


OVERHEAD_HEADERS = ["tensors", "implementation", "ms/step", "us per tensor", "emafuse speed-up"]


def bench_overhead(counts: list[int], plan: Plan) -> tuple[list[list[str]], dict[int, float]]:
    """AdamW steps over many one-element tensors: the cost per tensor outside the arithmetic.
    Returns the table rows and emafuse's microseconds per tensor for each count."""
    rows, ours = [], {}
    for count in counts:
        params = make_params([(1,)] * count)
        med = {impl: statistics.median(ts) for impl, ts in measure(ADAMW, params, plan).items()}
        ours[count] = med[EMAFUSE] / count * 1e6
        rows += [
            [str(count), impl, f"{s * 1e3:.2f}", f"{s / count * 1e6:.2f}", "-" if impl == EMAFUSE else f"{s / med[EMAFUSE]:.2f}x"]
            for impl, s in med.items()
        ]
    return rows, ours


def target_rows(results: list[Result], copy_gbs: float, inplace_gbs: float, overhead_us: dict[int, float]) -> list[list[str]]:
    """The foundation issue's targets for emafuse.AdamW fp32, each with its measurement."""
    def time_of(wl: str, impl: str) -> Result | None:
        return next((r for r in results if (r.workload, r.case, r.impl) == (wl, ADAMW, impl)), None)

    def status(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rows = []
    for wl, goal in (("gpt2-small", 1.0), ("vit-b16", 1.0), ("resnet50", 3.0), ("4000-small", 3.0)):
        ours, fused = time_of(wl, EMAFUSE), time_of(wl, "torch fused")
        if ours and fused:
            x = fused.median / ours.median
            rows.append([f"AdamW >= {goal:g}x as fast as torch fused on {wl}", f"{x:.2f}x", status(x >= goal)])
    ours = time_of("gpt2-small", EMAFUSE)
    if ours:
        for name, limit in (("copy", copy_gbs), ("in-place", inplace_gbs)):
            pct = 100 * ours.gbs() / limit
            rows.append([f"AdamW >= 85% of {name} bandwidth on gpt2-small", f"{pct:.0f}%", status(pct >= 85)])
    for count, us in overhead_us.items():
        rows.append([f"per-step overhead <= ~1 us per tensor ({count} tensors)", f"{us:.2f} us", status(us < 1.05)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round; prints only (unless --output is given)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--rounds", type=int, help="turns each implementation takes (default 3, quick 1)")
    ap.add_argument("--steps", type=int, help="timed steps per round (default 4, quick 3)")
    ap.add_argument("--threads", type=int, help="threads for torch and emafuse (default: their own defaults)")
    ap.add_argument("--output", type=Path, help="markdown file to write (default benchmarks/RESULTS.md; none with --quick)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    args = ap.parse_args()
    plan = Plan(rounds=args.rounds or (1 if args.quick else 3), warmup=1, steps=args.steps or (3 if args.quick else 4))
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)}")
    output = args.output or (None if args.quick else Path(__file__).with_name("RESULTS.md"))
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["EMAFUSE_NUM_THREADS"] = str(args.threads)  # read when emafuse's pool starts

    info = machine_info()
    for k, v in info.items():
        print(f"{k}: {v}")
    print()
    bw: list[tuple[float, float]] = []
    results = bench_workloads(names, plan, bw)
    counts = [1000] if args.quick else [1000, 10000]
    overhead, overhead_us = bench_overhead(counts, plan)
    bw.append(bandwidths())
    # Other processes may share the machine: the best of the measurements is the limit.
    copy_gbs, inplace_gbs = max(c for c, _ in bw), max(i for _, i in bw)
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    steps = markdown_table(STEP_HEADERS, step_rows(results, copy_gbs, inplace_gbs))
    over = markdown_table(OVERHEAD_HEADERS, overhead)
    targets = markdown_table(["target", "measured", "status"], target_rows(results, copy_gbs, inplace_gbs, overhead_us))
    print(f"\n{steps}\n\nAdamW fp32 step over one-element tensors:\n{over}\n\nTargets:\n{targets}")
    if output is None:
        return

    flags = " --quick" * args.quick + (f" --threads {args.threads}" if args.threads else "")
    flags += f" --workloads {args.workloads}" if args.workloads != ",".join(WORKLOADS) else ""
    text = [
        "## CPU optimizer step: emafuse.AdamW, Adam, SGD",
        "",
        f"Written by `python benchmarks/bench_optim.py{flags}`. Each implementation took {plan.rounds} "
        f"turns of {plan.warmup} warm-up + {plan.steps} timed steps, in rotation with the others; "
        "ms/step is the median of its timed steps, best ms the fastest.",
        "",
        "### Machine",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- load average at end: {load_end}",
        f"- memory bandwidth, GB/s read + written, 1 GiB fp32, median of 7, measured before each workload "
        f"and at the end; the best of these is the limit the tables use: `dst.copy_(src)` {copy_gbs:.1f} "
        f"(range {min(c for c, _ in bw):.1f} to {copy_gbs:.1f}), in-place `x.mul_(1.0)` {inplace_gbs:.1f} "
        f"(range {min(i for _, i in bw):.1f} to {inplace_gbs:.1f})",
        "",
        "### Optimizer step (CPU)",
        "",
        "GB/s = bytes per parameter (optimizers.md §1: 28 for AdamW/Adam fp32, 20 for SGD with "
        "momentum fp32, 14 for AdamW bf16 with bf16 state) x parameters / ms/step. % of copy, % of "
        "in-place: that over the two bandwidths above. A copy into another buffer also reads the "
        "destination (write-allocate), traffic it is not credited with, so in-place updates can pass "
        "100% of copy; in-place bandwidth is the tighter limit for an optimizer step. "
        "emafuse speed-up: that row's ms/step / emafuse's.",
        "",
        steps,
        "",
        "### Per-step overhead",
        "",
        "AdamW fp32 step over one-element tensors: the cost per tensor outside the arithmetic.",
        "",
        over,
        "",
        "### Targets (emafuse.AdamW fp32)",
        "",
        targets,
        "",
    ]
    if args.note:
        text += ["### Notes", "", *(f"- {n}" for n in args.note), ""]
    write_section(output, "OPTIM:CPU", "\n".join(text))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
