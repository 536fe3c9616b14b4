"""GPU benchmark: emafuse against torch's fused / foreach optimizers on CUDA, and the device's
copy bandwidth. Prints a table and writes it to --output (markdown). Run by gpu_check.sh."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emafuse
from common import markdown_table
from workloads import gpt2_small, numel, resnet50, small_tensors, vit_b16

BYTES_PER_PARAM = {"AdamW": 28, "SGD": 20}


def cuda_time(fn, warmup=5, repeats=30) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    n = 2**30 // 4
    src, dst = torch.rand(n, device="cuda"), torch.empty(n, device="cuda")
    return 2 * n * 4 / (cuda_time(lambda: dst.copy_(src)) / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    workloads = {"GPT-2 small": gpt2_small(), "ResNet-50": resnet50(), "ViT-B/16": vit_b16(), "4000 small": small_tensors()}
    for wname, shapes in workloads.items():
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            n = numel(shapes)
            for opt_name, ours, theirs, kw in [
                ("AdamW", emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-4, weight_decay=0.01)),
                ("SGD", emafuse.SGD, torch.optim.SGD, dict(lr=1e-4, momentum=0.9)),
            ]:
                results = {}
                for impl, make, extra in [
                    ("emafuse", ours, {}),
                    ("torch fused", theirs, {"fused": True}),
                    ("torch foreach", theirs, {"foreach": True}),
                ]:
                    opt = make(params, **extra, **kw)
                    results[impl] = cuda_time(opt.step)
                    del opt
                    torch.cuda.empty_cache()
                size = 2 if dtype == torch.bfloat16 else 4
                moved = n * BYTES_PER_PARAM[opt_name] * size / 4
                for impl, ms in results.items():
                    gbs = moved / (ms / 1e3) / 1e9
                    rows.append([wname, opt_name, str(dtype).replace("torch.", ""), impl, f"{ms:.3f}", f"{gbs:.0f}",
                                 f"{100 * gbs / bw:.0f}%", f"{results['torch fused'] / ms:.2f}x"])
            del params
            torch.cuda.empty_cache()
    table = markdown_table(["workload", "optimizer", "dtype", "implementation", "ms/step", "GB/s", "% of copy", "vs fused"], rows)
    head = f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; device copy bandwidth {bw:.0f} GB/s\n\n"
    print(head + table)
    if args.output:
        Path(args.output).write_text("## CUDA\n\n" + head + table + "\n")


if __name__ == "__main__":
    main()
