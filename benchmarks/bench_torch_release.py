"""AdamW fp32 step time on the running torch release: emafuse beside torch's fused AdamW, on
GPT-2-small and 4000-small, taking turns as in bench_optim.py.

    python benchmarks/bench_torch_release.py [--rounds 3]       # prints one JSON line
    python benchmarks/bench_torch_release.py --table LINES.jsonl  # RESULTS.md section from those

tools/torch_matrix.py runs the first in each release's environment, then the second over all of
their lines, so that the releases' numbers sit in one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch
from bench_optim import ADAMW, EMAFUSE, Plan, measure
from common import copy_bandwidth, machine_info, markdown_table, write_section
from workloads import WORKLOADS, make_params

FUSED = "torch fused"
WORKLOAD_NAMES = ("gpt2-small", "4000-small")
ROUNDS = 3


def measure_release(rounds: int) -> dict[str, object]:
    info = machine_info()
    result: dict[str, object] = {
        "torch": torch.__version__,
        "machine": f"{info['cpu']}, {info['cores available']} cores, {info['date']}, load {info['load average at start (1, 5, 15 min)']}",
        "copy_gbs": round(copy_bandwidth()[1], 1),
    }
    for name in WORKLOAD_NAMES:
        params = make_params(WORKLOADS[name](), torch.float32)
        times = measure(ADAMW, params, Plan(rounds=rounds, warmup=1, steps=4), (EMAFUSE, FUSED))
        result[name] = {impl: [min(t), statistics.median(t), max(t)] for impl, t in times.items()}
        del params
        gc.collect()
    return result


def _cell(t: list[float]) -> str:
    return f"{t[1] * 1e3:.1f} ({t[0] * 1e3:.1f}–{t[2] * 1e3:.1f})"


def write_table(lines: Path) -> None:
    results = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    header = ["torch", "workload", "emafuse ms (min–max)", "torch fused ms (min–max)", "emafuse / fused", "copy GB/s"]
    rows = []
    for r in results:
        for name in WORKLOAD_NAMES:
            ours, fused = r[name][EMAFUSE], r[name][FUSED]
            rows.append([r["torch"], name, _cell(ours), _cell(fused), f"{ours[1] / fused[1]:.2f}", r["copy_gbs"]])
    body = [
        "## AdamW across torch releases (CPU)",
        "",
        "Written by `python tools/torch_matrix.py` (this script in each release's environment). AdamW fp32,",
        f"{ROUNDS} turns of 1 warm-up + 4 timed steps per implementation, in rotation; median ms/step and range.",
        "The releases ran one after another, not interleaved: compare the emafuse / fused ratio, measured",
        "within one run, more than the absolute times.",
        "",
        *(f"- torch {r['torch']}: {r['machine']}" for r in results),
        "",
        markdown_table(header, rows),
    ]
    write_section(Path(__file__).with_name("RESULTS.md"), "TORCH:RELEASES", "\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--table", type=Path, help="write the RESULTS.md section from these JSON lines instead")
    args = ap.parse_args()
    if args.table:
        write_table(args.table)
    else:
        print(json.dumps(measure_release(args.rounds)))


if __name__ == "__main__":
    main()
