"""AdaHessian: emafuse.AdaHessian against timm's Adahessian (the package users install; left out
where timm is not installed, as on the GPU machine) and pytorch_optimizer's AdaHessian, next to
the machine's memory bandwidth.

    python benchmarks/bench_adahessian.py                  # writes RESULTS.md
    python benchmarks/bench_adahessian.py --quick          # short, prints only
    python benchmarks/bench_adahessian.py --device cuda    # the GPU check (benchmarks/gpu_check.sh)

Two measurements:

* the update: steps that reuse the stored Hessian estimate (``update_each`` larger than the run,
  so no Hessian-vector product: the optimizer's own work), on the parameter shapes of real models.
  GB/s counts 32 bytes per fp32 parameter (read p, g, m, v and the estimate; write p, m, v);
* a whole step of a small conv net after ``loss.backward(create_graph=True)``: the Rademacher
  draws, the Hessian-vector product (autograd, the same for every implementation) and the update.

Implementations take turns call by call, round by round.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import emafuse
import pytorch_optimizer
import torch
from common import device_bandwidth, machine_info, markdown_table, workload_settings, write_section
from workloads import WORKLOADS, make_params, numel

try:
    import timm.optim
except ImportError:  # pragma: no cover - optional peer (not on the GPU machine)
    timm = None

BYTES_PER_PARAM = 32
NEVER = 10**9  # update_each: the estimate of the first step is reused for the whole run

# name -> optimizer factory (params, update_each)
IMPLS: dict[str, Callable[[list[torch.Tensor], int], torch.optim.Optimizer]] = {
    "emafuse.AdaHessian": lambda ps, k: emafuse.AdaHessian(ps, lr=1e-3, eps=1e-4, update_each=k),
    "pytorch_optimizer AdaHessian": lambda ps, k: pytorch_optimizer.AdaHessian(ps, lr=1e-3, eps=1e-4, update_period=k),
}
if timm is not None:
    IMPLS["timm Adahessian"] = lambda ps, k: timm.optim.Adahessian(ps, lr=1e-3, eps=1e-4, update_each=k)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds of ``fn()``; on CUDA with the device drained before and after (its work is
    asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def first_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """A step with a (cheap, element-wise) graph behind the gradients, which stores an estimate."""
    opt.zero_grad()
    sum(((p * g) ** 2).sum() for p, g in zip(params, grads)).backward(create_graph=True)
    opt.step()


def measure_update(shapes: list[tuple[int, ...]], rounds: int, calls: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for _ in range(rounds):
        for name, make in IMPLS.items():
            params = [p.detach().to(device).requires_grad_() for p in make_params(shapes)]
            grads = [torch.randn_like(p) for p in params]
            opt = make(params, NEVER)
            first_step(opt, params, grads)
            for p, g in zip(params, grads):
                p.grad = g  # no graph: the following steps reuse the estimate
            opt.step()  # warm-up
            for _ in range(calls):
                times[name].append(timed(device, opt.step))
            del opt, params, grads
            gc.collect()
    return times


def conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16 * 16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10),
    )


def measure_full_step(rounds: int, calls: int, device: torch.device) -> tuple[int, dict[str, list[float]]]:
    x, y = torch.randn(32, 3, 16, 16, device=device), torch.randint(0, 10, (32,), device=device)
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    n = sum(p.numel() for p in conv_net().parameters())
    for _ in range(rounds):
        for name, make in IMPLS.items():
            model = conv_net().to(device)
            opt = make(list(model.parameters()), 1)
            for i in range(calls + 1):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
                t = timed(device, opt.step)
                if i:  # the first is a warm-up
                    times[name].append(t)
            del model, opt
            gc.collect()
    return n, times


def rows_of(label: str, times: dict[str, list[float]], n: int, bandwidth: float | None) -> list[list[str]]:
    floor = statistics.median(times["emafuse.AdaHessian"])
    rows = []
    for impl, ts in times.items():
        t = statistics.median(ts)
        gbs = f"{BYTES_PER_PARAM * n / t / 1e9:.1f}" if bandwidth else "-"
        share = f"{100 * BYTES_PER_PARAM * n / t / 1e9 / bandwidth:.0f}%" if bandwidth else "-"
        rows.append([label, impl, f"{t * 1e3:.1f}", f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}", gbs, share, f"{t / floor:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    run = workload_settings(__doc__, rounds=3, repeats="calls", repeats_default=3, device=True)
    device = run.device
    copy_gbs, inplace_gbs = device_bandwidth(device)
    rows = []
    for wl in run.workloads:
        shapes = WORKLOADS[wl]()
        rows += rows_of(f"{wl}: update (estimate reused)", measure_update(shapes, run.rounds, run.repeats, device), numel(shapes), inplace_gbs)
    n, times = measure_full_step(run.rounds, max(run.repeats, 5), device)
    rows += rows_of(f"conv net ({n / 1e6:.2f}M params, batch 32): whole step with the Hessian-vector product", times, n, None)
    info = machine_info()
    table = markdown_table(["workload", "optimizer", "ms/step", "min-max ms", "GB/s", "% of in-place", "time / emafuse"], rows)
    section = (
        f"## AdaHessian ({device.type.upper()})\n\n"
        f"`python benchmarks/bench_adahessian.py --device {device.type}` — {info['date']}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else info.get('cpu', '')}, torch {torch.__version__}, "
        f"emafuse threads {emafuse.num_threads()}. Median of {run.rounds} rounds x {run.repeats} steps after a warm-up step "
        "(the whole-step rows: at least 5 steps per round). Memory bandwidth in the same run (median, read + written): "
        f"copy {copy_gbs:.1f} GB/s, in-place {inplace_gbs:.1f} GB/s. Update rows: steps that reuse the stored estimate "
        f"(no Hessian-vector product), GB/s = {BYTES_PER_PARAM} bytes per fp32 parameter x parameters / time. Whole-step "
        "rows: the step after `loss.backward(create_graph=True)`, Rademacher draws and Hessian-vector product included "
        "(autograd's work, the same in every implementation).\n\n" + table
    )
    print(section)
    if run.output:
        write_section(run.output, f"ADAHESSIAN:{device.type.upper()}", section)


if __name__ == "__main__":
    main()
