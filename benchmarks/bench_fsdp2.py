"""Sharded (FSDP2 / DTensor) optimizer steps and shard-local EMA on 2 CPU processes (gloo).

    python benchmarks/bench_fsdp2.py [--workloads gpt2-small 4000-small] [--repeats 7] [--write]

Each rank holds its ``Shard(0)`` part of every tensor of the workload (as ``fully_shard`` leaves
parameters and gradients between backward and step) as DTensors, and times, one thread per rank:

* ``emafuse.AdamW`` stepping the DTensor parameters (its native step on the local shards);
* ``torch.optim.AdamW(fused=True)`` stepping the same DTensor parameters (DTensor dispatch), and
  the same on the plain local shards (what a step on the shards costs without DTensor);
* ``emafuse.ModelEMA`` of the sharded parameters: memory per rank against the whole average, and
  the collectives one update issues (counted with ``CommDebugMode``; expected 0).

Times are the median over ``--repeats`` steps on rank 0 (both ranks step at the same time);
``--write`` puts the table into benchmarks/RESULTS.md (section FSDP2:CPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_section
from workloads import WORKLOADS


def _local_shards(shapes, mesh, seed: int):
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    params = []
    for s in shapes:
        local_shape, _ = compute_local_shape_and_global_offset(torch.Size(s), mesh, [Shard(0)])
        data = torch.randn(local_shape, generator=gen)
        grad = torch.randn(local_shape, generator=gen)
        shape = torch.Size(s)
        stride = torch.empty(0).new_empty(shape, device="meta").stride()
        p = nn.Parameter(DTensor.from_local(data, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride))
        p.grad = DTensor.from_local(grad, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
        params.append(p)
    return params


def _time(step, repeats: int) -> float:
    step()  # lazy state
    step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _worker(rank: int, port: int, names: list[str], repeats: int, out: str) -> None:
    os.environ["EMAFUSE_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    import emafuse
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (2,))
    rows = []
    for name in names:
        shapes = WORKLOADS[name]()
        whole = sum(torch.Size(s).numel() for s in shapes)
        params = _local_shards(shapes, mesh, 0)
        local = sum(p.to_local().numel() for p in params)
        res = {}
        opt = emafuse.AdamW(params, lr=1e-4, weight_decay=0.01)
        res["emafuse.AdamW, DTensor params"] = _time(opt.step, repeats)
        del opt
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
        res["torch AdamW(fused=True), DTensor params"] = _time(opt.step, repeats)
        del opt
        shards = [p.to_local().detach().requires_grad_() for p in params]
        for s, p in zip(shards, params):
            s.grad = p.grad.to_local()
        opt = torch.optim.AdamW(shards, lr=1e-4, weight_decay=0.01, fused=True)
        res["torch AdamW(fused=True), local shards"] = _time(opt.step, repeats)
        del opt, shards
        model = nn.ParameterList(params)
        ema = emafuse.ModelEMA(model, decay=0.999)
        with CommDebugMode() as comm:
            ema.update()
        ema_ms = _time(ema.update, repeats)
        ema_local = sum(t.to_local().numel() * t.element_size() for t in ema.module.parameters())
        if rank == 0:
            ref = res["torch AdamW(fused=True), DTensor params"]
            for label, ms in res.items():
                rows.append([name, label, f"{ms:.1f}", f"{ref / ms:.2f}x"])
            rows.append([name, "emafuse.ModelEMA update (shard-local)", f"{ema_ms:.1f}",
                         f"{ema_local / 2**20:.0f} MiB/rank of {whole * 4 / 2**20:.0f} MiB; "
                         f"{comm.get_total_counts()} collectives/update; {local}/{whole} elements"])
        del ema, model, params
    if rank == 0:
        body = (
            "## FSDP2 / DTensor on 2 CPU processes (gloo, 1 thread per rank)\n\n"
            f"{machine_info().get('cpu', '')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
            "Median ms per step on rank 0, each rank stepping its Shard(0) shards of every tensor; "
            "the last column is the speed-up over torch's fused AdamW on the DTensor parameters.\n\n"
            + markdown_table(["workload", "what", "ms", "vs torch fused (DTensor)"], rows)
        )
        Path(out).write_text(body)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["gpt2-small", "4000-small"], choices=sorted(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(__file__).resolve().parent / ".fsdp2_table.md"
    mp.spawn(_worker, args=(port, args.workloads, args.repeats, str(out)), nprocs=2)
    body = out.read_text()
    out.unlink()
    print(body)
    if args.write:
        write_section(Path(__file__).resolve().parent / "RESULTS.md", "FSDP2:CPU", body)


if __name__ == "__main__":
    main()
