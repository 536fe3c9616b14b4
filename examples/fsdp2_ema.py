"""Train a small model with FSDP2 (``fully_shard``) on 2 CPU processes with an emafuse optimizer
and a shard-local EMA, save a distributed checkpoint, and resume from it.

    python examples/fsdp2_ema.py [--steps 60] [--dir CHECKPOINT_DIR]

The first half of the steps runs and saves a checkpoint (model, optimizer and EMA, each rank
writing its own shards with ``torch.distributed.checkpoint``); a fresh model, optimizer and EMA
then load it and run the second half. The run is checked against one without the interruption.
Each rank keeps only its shards of the EMA (no full copy) and updates it with no communication;
the EMA is evaluated by swapping it into the sharded model, and exported whole at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import emafuse
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard


def build() -> tuple[nn.Module, torch.optim.Optimizer, emafuse.ModelEMA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = emafuse.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ema = emafuse.ModelEMA(model, decay=0.95)  # this rank's shards only
    return model, opt, ema


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4].sum(1, keepdim=True)).sin()


def train(model, opt, ema, steps: range, rank: int) -> float:
    loss = torch.tensor(0.0)
    for s in steps:
        x, y = batch(s, rank)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    return float(loss.detach())


def save(path: str, model, opt, ema) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}, checkpoint_id=path)


def load(path: str, model, opt, ema) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])


def worker(rank: int, port: int, steps: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = steps // 2
    path = os.path.join(root, "checkpoint")

    model, opt, ema = build()
    train(model, opt, ema, range(half), rank)
    save(path, model, opt, ema)
    loss = train(model, opt, ema, range(half, steps), rank)  # the uninterrupted run, for comparison
    straight = ema.full_state_dict()

    model, opt, ema = build()  # "a new job": fresh objects, state from the checkpoint
    load(path, model, opt, ema)
    resumed_loss = train(model, opt, ema, range(half, steps), rank)
    x, y = batch(10_000, 0)
    with ema.average_parameters():  # the EMA swapped into the sharded model, in place
        ema_loss = float(nn.functional.mse_loss(model(x), y))
    raw_loss = float(nn.functional.mse_loss(model(x), y))
    consolidated = ema.full_state_dict()  # collective: every rank calls it
    if rank == 0:
        same = all(torch.equal(consolidated[k], straight[k]) for k in straight)
        print(f"loss: {loss:.4f} (uninterrupted), {resumed_loss:.4f} (resumed); resumed EMA equals uninterrupted: {same}")
        print(f"held-out loss: raw weights {raw_loss:.4f}, EMA {ema_loss:.4f}")
        local = sum(t.to_local().numel() for t in ema.module.parameters())
        print(f"EMA elements on this rank: {local} of {sum(v.numel() for v in consolidated.values())}")
        assert same and resumed_loss == loss
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temporary directory)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(port, args.steps, args.dir or tmp), nprocs=2)


if __name__ == "__main__":
    main()
