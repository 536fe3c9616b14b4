"""Lean optimizer state on the CPU: AdamW's bytes per parameter (measured from the tensors the
optimizer allocated) and step time for each state precision of emafuse, against torch's fused
AdamW on the same parameter dtypes, on the parameter shapes of real models, next to the machine's
memory bandwidth, and bitsandbytes' 8-bit AdamW (blockwise quantized moments; its CPU path is
unfused torch code) where it is installed (``pip install bitsandbytes==0.50.2``).

    python benchmarks/bench_lean_state.py                  # writes RESULTS.md
    python benchmarks/bench_lean_state.py --quick          # short, prints only
    python benchmarks/bench_lean_state.py --device cuda    # the GPU check (benchmarks/gpu_check.sh)

Configurations take turns step by step, round by round. Bytes per parameter count the weights and
the state (not the gradients, the same for all); GB/s counts the bytes a step must move (weights,
state and gradient read, weights and state written) over the step time. bitsandbytes takes
about 0.15 s per million parameters here, so it runs on the workloads of up to 30M parameters
only. torchao's low-bit AdamW compiles a CUDA-only kernel per parameter and is not in the table.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import emafuse
import torch
from common import device_bandwidth, device_timer, machine_info, markdown_table, workload_settings, write_section
from workloads import WORKLOADS, make_params, numel

try:
    import bitsandbytes
except ImportError:  # pragma: no cover - optional peer
    bitsandbytes = None

BF16 = torch.bfloat16


@dataclass(frozen=True)
class Config:
    """One way to run AdamW: the parameters' dtype and a factory of the optimizer."""

    name: str
    dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    max_params: int = 1 << 62


ADAMW = dict(lr=1e-3, weight_decay=0.01)
CONFIGS = [
    Config("torch AdamW fused, fp32 weights", torch.float32, lambda ps: torch.optim.AdamW(ps, **ADAMW, fused=True)),
    Config("emafuse fp32 weights, fp32 state", torch.float32, lambda ps: emafuse.AdamW(ps, **ADAMW)),
    Config("emafuse fp32 weights, bf16 state (stochastic)", torch.float32, lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype=BF16)),
    Config("torch AdamW fused, bf16 weights and state", BF16, lambda ps: torch.optim.AdamW(ps, **ADAMW, fused=True)),
    Config("emafuse bf16 weights and state, nearest", BF16, lambda ps: emafuse.AdamW(ps, **ADAMW)),
    Config("emafuse bf16 weights and state, stochastic", BF16, lambda ps: emafuse.AdamW(ps, **ADAMW, rounding="stochastic")),
    Config("emafuse bf16 weights, fp32 state, stochastic", BF16, lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype=torch.float32, rounding="stochastic")),
    Config("emafuse bf16 weights + int8 correction, bf16 state", BF16, lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype=BF16, weight_correction=True)),
    Config("emafuse fp32 weights, 8-bit state", torch.float32, lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype="8bit")),
    Config("emafuse bf16 weights, 8-bit state", BF16, lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype="8bit")),
    Config(
        "emafuse bf16 weights + int8 correction, 8-bit state",
        BF16,
        lambda ps: emafuse.AdamW(ps, **ADAMW, state_dtype="8bit", weight_correction=True),
    ),
]
if bitsandbytes is not None:
    CONFIGS.append(
        Config("bitsandbytes AdamW8bit, fp32 weights", torch.float32, lambda ps: bitsandbytes.optim.AdamW8bit(ps, **ADAMW), max_params=30_000_000)
    )


def bytes_per_param(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(weights + state, state) bytes per parameter, from the tensors that exist after a step."""
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return (weights + state) / n, state / n


def on(device: torch.device, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` (with their gradients) moved to ``device``."""
    if device.type == "cpu":
        return params
    moved = [torch.nn.Parameter(p.detach().to(device)) for p in params]
    for m, p in zip(moved, params):
        m.grad = p.grad.to(device)
    return moved


def measure(shapes, rounds: int, steps: int, device: torch.device) -> dict[str, tuple[list[float], float, float]]:
    """Per configuration: step times, bytes per parameter (weights + state) and state bytes. On
    CUDA the device is drained before and after each timed step."""
    timer = device_timer(device)
    # bitsandbytes' CPU path is unfused (slow); on CUDA it runs everywhere
    limit = (lambda c: True) if device.type == "cuda" else (lambda c: numel(shapes) <= c.max_params)
    runs = {}
    for c in filter(limit, CONFIGS):
        params = on(device, make_params(shapes, c.dtype))
        opt = c.make(params)
        opt.step()  # lazy state, warm-up
        runs[c.name] = (params, opt, [])
    for _ in range(rounds):
        for _, opt, times in runs.values():
            times += timer(opt.step, 0, steps)
    out = {name: (times, *bytes_per_param(params, opt)) for name, (params, opt, times) in runs.items()}
    del runs
    gc.collect()
    return out


def main() -> None:
    run = workload_settings(__doc__, rounds=3, repeats="steps", repeats_default=5, device=True)
    device, workloads, rounds, steps, output = run.device, run.workloads, run.rounds, run.repeats, run.output

    copy_gbs, inplace_gbs = device_bandwidth(device)
    rows = []
    for wl in workloads:
        shapes = WORKLOADS[wl]()
        n = numel(shapes)
        results = measure(shapes, rounds, steps, device)
        base = statistics.median(results["emafuse fp32 weights, fp32 state"][0])
        for name, (ts, total, state) in results.items():
            t = statistics.median(ts)
            moved = (2 * total + total - state) * n  # weights and state read and written, gradient (weights' dtype) read
            spread = f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}"
            rows.append([wl, name, f"{total:.1f}", f"{state:.1f}", f"{t * 1e3:.1f}", spread, f"{moved / t / 1e9:.1f}", f"{base / t:.2f}"])
            print(" | ".join(rows[-1]), flush=True)

    info = machine_info()
    table = markdown_table(
        ["workload", "AdamW", "B/param (weights + state)", "state B/param", "ms/step", "min-max ms", "GB/s", "speed vs emafuse fp32"], rows
    )
    section = (
        f"## Lean optimizer state: AdamW bytes per parameter and step time ({device.type.upper()})\n\n"
        f"`python benchmarks/bench_lean_state.py --device {device.type}` — {info['date']}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else info.get('cpu', '')}, torch {torch.__version__}, "
        f"emafuse threads {emafuse.num_threads()}. Median of {rounds} rounds x {steps} steps after a warm-up step, "
        "configurations taking turns round by round. Bytes per parameter are measured from the tensors each optimizer "
        "holds after a step (weights + state; gradients, the same everywhere, not counted). "
        f"Memory bandwidth in the same run (median, read + written): copy {copy_gbs:.1f} GB/s, in-place {inplace_gbs:.1f} GB/s. "
        "GB/s = bytes a step moves (weights and state read and written, gradient read) / time. bitsandbytes 8-bit "
        "(where installed) runs on workloads of up to 30M parameters; its state B/param includes its per-block scales.\n\n" + table
    )
    print(section)
    if output:
        write_section(output, f"LEAN_STATE:{device.type.upper()}", section)


if __name__ == "__main__":
    main()
