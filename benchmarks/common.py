"""Shared tools of emafuse's benchmarks: step timing, the machine's memory bandwidth (the
physical limit a memory-bound update is compared with), a description of the machine, markdown
tables, and the sections of RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "copy_bandwidth", "device_bandwidth", "device_timer", "inplace_bandwidth", "machine_info", "markdown_table", "median_bandwidth",
    "time_calls", "workload_settings", "write_section",
]


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; the timed durations in
    seconds. CPU work is synchronous, so wall-clock time around the call is the cost."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _bandwidth(fn: Callable[[], object], moved_bytes: int, repeats: int) -> tuple[float, float]:
    times = time_calls(fn, warmup=1, repeats=repeats)
    return moved_bytes / min(times) / 1e9, moved_bytes / statistics.median(times) / 1e9


def copy_bandwidth(mbytes: int = 1024, repeats: int = 7) -> tuple[float, float]:
    """The machine's memory bandwidth seen by a large ``dst.copy_(src)`` (torch's threads):
    bytes read plus bytes written per second, in GB/s. Returns (best, median) of ``repeats``.

    The CPU also reads ``dst`` before writing it (write-allocate), traffic this count leaves
    out, so an in-place update (which reads what it writes) can beat this figure."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    return _bandwidth(lambda: dst.copy_(src), 2 * n * 4, repeats)


def inplace_bandwidth(mbytes: int = 1024, repeats: int = 7) -> tuple[float, float]:
    """Bytes read plus bytes written per second of a large in-place ``x.mul_(1.0)``, which moves
    memory the way an optimizer step does (read each element, write it back where it was), in
    GB/s. Returns (best, median) of ``repeats``."""
    n = mbytes * 2**20 // 4
    x = torch.rand(n)
    return _bandwidth(lambda: x.mul_(1.0), 2 * n * 4, repeats)


def median_bandwidth() -> tuple[float, float]:
    """The medians of :func:`copy_bandwidth` and :func:`inplace_bandwidth` (GB/s), printed."""
    copy_gbs, inplace_gbs = copy_bandwidth()[1], inplace_bandwidth()[1]
    print(f"bandwidth GB/s (median): copy {copy_gbs:.1f}, in-place {inplace_gbs:.1f}", flush=True)
    return copy_gbs, inplace_gbs


def device_timer(device: torch.device) -> Callable[[Callable[[], object], int, int], list[float]]:
    """:func:`time_calls` on the CPU; on CUDA the same, with the device drained before and after
    each timed call (the work a call queues is asynchronous)."""
    if device.type != "cuda":
        return time_calls

    def synced(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
        def call() -> None:
            fn()
            torch.cuda.synchronize()

        torch.cuda.synchronize()
        return time_calls(call, warmup, repeats)

    return synced


def device_bandwidth(device: torch.device) -> tuple[float, float]:
    """(copy, in-place) memory bandwidth in GB/s, read + written: :func:`median_bandwidth` on the
    CPU; on CUDA both are a 1 GiB device copy's (no write-allocate there), printed."""
    if device.type != "cuda":
        return median_bandwidth()
    n = 2**28
    src, dst = torch.rand(n, device=device), torch.empty(n, device=device)
    gbs = 2 * 4 * n / statistics.median(device_timer(device)(lambda: dst.copy_(src), 2, 10)) / 1e9
    print(f"device copy bandwidth GB/s (median): {gbs:.1f}", flush=True)
    return gbs, gbs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What a result depends on: CPU, cores, memory, versions, thread counts, load, date."""
    import emafuse

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        mem = "?"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{_cpu_model()} ({platform.machine()})",
        "cores available": str(cores),
        "memory": mem,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "emafuse": f"{emafuse.__version__} ({emafuse.num_threads()} threads)",
        "load average at start (1, 5, 15 min)": load,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; numeric columns right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.rjust(w) if num else s.ljust(w) for s, w, num in zip(items, widths, numeric)) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if num else "-") for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return s in ("", "-")


def write_section(path: str | Path, tag: str, body: str) -> None:
    """Put ``body`` into the results file between ``<!-- TAG:BEGIN -->`` and ``<!-- TAG:END -->``,
    replacing that section if present, else appending it; the other scripts' sections stay."""
    path = Path(path)
    begin, end = f"<!-- {tag}:BEGIN -->", f"<!-- {tag}:END -->"
    section = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# emafuse benchmark results\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


@dataclass(frozen=True)
class WorkloadSettings:
    """What a timing script was asked for (see :func:`workload_settings`)."""

    device: torch.device
    workloads: list[str]
    rounds: int
    repeats: int
    output: str | None


def workload_settings(doc: str | None, rounds: int, repeats: str, repeats_default: int, device: bool = False) -> WorkloadSettings:
    """The command line of a script that times implementations on the workloads: ``--quick``
    (ResNet-50, one round of 2 calls, printed only), ``--workloads``, ``--rounds``,
    ``--<repeats>`` (timed calls per round), ``--output`` (the results file, default
    ``RESULTS.md`` here unless ``--quick``) and, with ``device``, ``--device``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ResNet-50 only, one short round; prints only")
    ap.add_argument("--workloads", default="resnet50,gpt2-small,vit-b16,4000-small")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument(f"--{repeats}", type=int, default=repeats_default)
    ap.add_argument("--output", default=None, help="RESULTS.md to update (default: benchmarks/RESULTS.md unless --quick)")
    if device:
        ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    quick = args.quick
    return WorkloadSettings(
        device=torch.device(getattr(args, "device", "cpu")),
        workloads=["resnet50"] if quick else args.workloads.split(","),
        rounds=1 if quick else args.rounds,
        repeats=2 if quick else getattr(args, repeats),
        output=args.output or (None if quick else str(Path(__file__).with_name("RESULTS.md"))),
    )
