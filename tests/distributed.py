"""Two-process tests on the CPU: spawn ``world_size`` processes that join a gloo process group on
127.0.0.1 (a free port), run one function on every rank, and report what each check gave.

A worker runs many named checks in one spawned run (starting processes is the slow part) and
records each check's outcome; rank 0's record comes back to the test, which asserts each check by
name. An exception outside a check, a child that dies or a run past ``timeout`` fails the test."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["Checks", "free_port", "spawn"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checks:
    """The outcomes of a worker's named checks: ``None`` for a pass, else the failure's text."""

    def __init__(self) -> None:
        self.results: dict[str, str | None] = {}

    @contextmanager
    def check(self, name: str):
        if os.environ.get("EMAFUSE_TEST_TRACE"):
            print(f"rank {dist.get_rank()}: {name}", file=sys.stderr, flush=True)
        try:
            yield
        except Exception:
            self.results[name] = traceback.format_exc()
            # Also now: a failure on one rank can leave the other waiting in a collective.
            print(f"rank {dist.get_rank()}: check '{name}' failed:\n{self.results[name]}", file=sys.stderr, flush=True)
        else:
            self.results.setdefault(name, None)


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., None], out_dir: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        checks = Checks()
        fn(rank, world_size, checks, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(checks.results, f)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], *args: Any, world_size: int = 2, timeout: float = 300.0) -> dict[str, str | None]:
    """Run ``fn(rank, world_size, checks, *args)`` on ``world_size`` spawned processes; returns the
    checks' outcomes, merged over the ranks (a check fails if it failed on any rank)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), fn, out_dir, args), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {world_size} spawned processes did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        merged: dict[str, str | None] = {}
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                for name, outcome in json.load(f).items():
                    if merged.get(name) is None:
                        merged[name] = None if outcome is None else f"rank {rank}: {outcome}"
        return merged
