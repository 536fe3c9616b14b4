"""Gradient clippers on the CPU: emafuse.ZClip against the reference zclip 1.0.0, emafuse.AdaGC
(no stand-alone peer exists), and torch.nn.utils.clip_grad_norm_ (foreach) as the floor of a
norm-based clip (one read pass for the norm, one read-write pass to scale), on the parameter shapes
of real models, next to the machine's memory bandwidth; and what each option of the fused step
(``grad_clip=`` max norm, ZClip or AdaGC, ``caution``, ``orthograd``) adds to an AdamW step.

    PYTHONPATH=python python benchmarks/bench_clipping.py            # writes RESULTS.md
    PYTHONPATH=python python benchmarks/bench_clipping.py --quick    # short, prints only

Every timed call clips: the gradients are restored (untimed) before each call, and the fixed cap
(``max_grad_norm`` / ``max_norm``) is below their norm. GB/s counts 12 bytes per fp32 parameter
(4 read for the norm, 4 read + 4 written to scale). Implementations take turns call by call,
round by round.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import emafuse
import torch
from common import machine_info, markdown_table, median_bandwidth, workload_settings, write_section
from workloads import WORKLOADS, make_params, numel

try:
    import zclip
except ImportError:  # pragma: no cover - optional peer
    zclip = None

BYTES_PER_PARAM = 12
CAP = 1e-3  # below every workload's gradient norm: each call scales


def clippers() -> dict[str, Callable[[], Callable[[torch.nn.Module], object]]]:
    """Name -> a factory of ``clip(model)`` callables (a fresh clipper, warmed up by the caller)."""
    out: dict[str, Callable[[], Callable[[torch.nn.Module], object]]] = {
        "torch clip_grad_norm_": lambda: lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), CAP, foreach=True),
        "emafuse.ZClip": lambda: emafuse.ZClip(warmup_steps=1, max_grad_norm=CAP).step,
        "emafuse.AdaGC": lambda: emafuse.AdaGC(warmup_steps=1, lambda_abs=CAP).step,
    }
    if zclip is not None:
        out["zclip.ZClip (reference)"] = lambda: zclip.ZClip(warmup_steps=1, max_grad_norm=CAP).step
    return out


def measure(model: torch.nn.Module, grads: list[torch.Tensor], rounds: int, calls: int) -> dict[str, list[float]]:
    params = list(model.parameters())
    impls = clippers()
    times: dict[str, list[float]] = {name: [] for name in impls}

    def restore() -> None:
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    for _ in range(rounds):
        for name, make in impls.items():
            clip = make()
            restore()
            clip(model)  # warm-up (ZClip / AdaGC leave their warm-up here)
            for _ in range(calls):
                restore()
                t0 = time.perf_counter()
                clip(model)
                times[name].append(time.perf_counter() - t0)
            del clip
            gc.collect()
    return times


#: AdamW's options, each as the keywords that turn it on (every one active at every step).
OPTIONS: dict[str, Callable[[], dict]] = {
    "AdamW": dict,
    "AdamW(grad_clip=max norm)": lambda: dict(grad_clip=CAP),
    "AdamW(grad_clip=ZClip)": lambda: dict(grad_clip=emafuse.ZClip(warmup_steps=1, max_grad_norm=CAP)),
    "AdamW(grad_clip=AdaGC)": lambda: dict(grad_clip=emafuse.AdaGC(warmup_steps=1, lambda_abs=CAP)),
    "AdamW(caution=True)": lambda: dict(caution=True),
    "AdamW(orthograd=True)": lambda: dict(orthograd=True),
}


def option_steps(shapes, rounds: int, calls: int) -> dict[str, list[float]]:
    """Step times of AdamW with each of ``OPTIONS`` (and AdaGC.step before a plain AdamW step),
    taking turns step by step over the same gradients."""
    grads = [torch.randn(s) for s in shapes]
    runs: dict[str, Callable[[], object]] = {}
    for name, kw in OPTIONS.items():
        params = [torch.nn.Parameter(p.detach()) for p in make_params(shapes)]
        for p, g in zip(params, grads):
            p.grad = g
        runs[name] = emafuse.AdamW(params, lr=1e-4, **kw()).step
    params = [torch.nn.Parameter(p.detach()) for p in make_params(shapes)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before, opt = emafuse.AdaGC(warmup_steps=1, lambda_abs=CAP), emafuse.AdamW(params, lr=1e-4)

    def clip_then_step() -> None:
        for p, g in zip(params, grads):
            p.grad.copy_(g)  # (restored inside the timed call: a clip that scales .grad writes it)
        before.step(params)
        opt.step()

    runs["AdaGC.step, then AdamW"] = clip_then_step
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: state created, the clippers past their warm-up
    for _ in range(rounds):
        for _ in range(calls):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    del runs
    gc.collect()
    return times


def option_section(workloads: list[str], rounds: int, calls: int, info: dict) -> str:
    rows = []
    for wl in workloads:
        times = option_steps(WORKLOADS[wl](), rounds, calls)
        plain = statistics.median(times["AdamW"])
        for name, ts in times.items():
            t = statistics.median(ts)
            rows.append([wl, name, f"{t * 1e3:.1f}", f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}", f"{t / plain:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["workload", "step", "ms/step", "min-max ms", "time / AdamW"], rows)
    return (
        "## Options inside the fused AdamW step (CPU)\n\n"
        f"`python benchmarks/bench_clipping.py` — {info['date']}, {info.get('cpu', '')}, torch {torch.__version__}, "
        f"emafuse threads {emafuse.num_threads()}. Median of {rounds} rounds x {calls} steps after a warm-up step, the "
        "configurations taking turns step by step; every option acts at every step (the clip caps are below the gradients' "
        "norms). Each option adds one read-only pass over the gradients (⊥Grad: and the parameters) to the step's one "
        "read-write pass. The last row clips with the stand-alone `AdaGC.step` (a norm pass and a scale pass that writes "
        "`.grad`; its time includes restoring the gradients) before a plain step.\n\n" + table
    )


def main() -> None:
    run = workload_settings(__doc__, rounds=3, repeats="calls", repeats_default=3)
    workloads, rounds, calls, output = run.workloads, run.rounds, run.repeats, run.output

    copy_gbs, inplace_gbs = median_bandwidth()
    rows = []
    for wl in workloads:
        shapes = WORKLOADS[wl]()
        n = numel(shapes)
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList(torch.nn.Parameter(p.detach()) for p in make_params(shapes))
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        times = measure(model, grads, rounds, calls)
        floor = statistics.median(times["torch clip_grad_norm_"])
        for impl, ts in times.items():
            t = statistics.median(ts)
            gbs = BYTES_PER_PARAM * n / t / 1e9
            spread = f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}"
            rows.append([wl, impl, f"{t * 1e3:.1f}", spread, f"{gbs:.1f}", f"{100 * gbs / inplace_gbs:.0f}%", f"{t / floor:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
        del model, grads
        gc.collect()

    info = machine_info()
    table = markdown_table(["workload", "clipper", "ms/call", "min-max ms", "GB/s", "% of in-place", "time / clip_grad_norm_"], rows)
    section = (
        "## Gradient clippers (CPU)\n\n"
        f"`python benchmarks/bench_clipping.py` — {info['date']}, {info.get('cpu', '')}, torch {torch.__version__}, "
        f"emafuse threads {emafuse.num_threads()}. Median of {rounds} rounds x {calls} calls after a warm-up call; every "
        "call clips (gradients restored untimed before each; cap below their norm). "
        f"Memory bandwidth in the same run (median, read + written): copy {copy_gbs:.1f} GB/s, in-place {inplace_gbs:.1f} GB/s. "
        f"GB/s = {BYTES_PER_PARAM} bytes per fp32 parameter (norm pass + scale pass) x parameters / time. "
        "AdaGC has no stand-alone peer (pytorch_optimizer fuses it into an Adam); torch's `clip_grad_norm_` (foreach) is "
        "the floor of a norm-based clip.\n\n" + table
    )
    print(section)
    options = option_section(workloads, rounds, calls, info)
    print(options)
    if output:
        write_section(output, "CLIPPING:CPU", section)
        write_section(output, "OPTIONS:CPU", options)


if __name__ == "__main__":
    main()
