"""Train the same small network twice, side by side: once with ``emafuse.AdamW``, once with
``torch.optim.AdamW``. Same initial weights, same mini-batches, same hyper-parameters.

The data is scikit-learn's bundled ``load_digits`` (1797 8x8 images of hand-written digits; no
download). Prints both loss curves, the final test accuracy of each, how far apart the two sets
of weights ended up, and the mean and median time of one ``optimizer.step()`` for each (torch
runs its default implementation, which for CPU tensors is the for-loop one).

    python examples/demo.py
"""

from __future__ import annotations

import copy
import statistics
import time

import emafuse
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

EPOCHS = 30
BATCH = 64
REPORT_EVERY = 60  # steps
HYPER = {"lr": 2e-3, "weight_decay": 1e-2}


def load_data() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # pixels are 0..16
    as_y = lambda a: torch.tensor(a, dtype=torch.long)
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(256, 10),
    )


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, seed: int) -> tuple[float, float]:
    """One step; returns (loss, seconds spent in ``opt.step()``). ``seed`` fixes the dropout mask,
    so both runs see the same one."""
    torch.manual_seed(seed)
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    t0 = time.perf_counter()
    opt.step()
    return loss.item(), time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_data()
    models = {"emafuse.AdamW": make_model()}
    models["torch.optim.AdamW"] = copy.deepcopy(models["emafuse.AdamW"])
    opts = {
        "emafuse.AdamW": emafuse.AdamW(models["emafuse.AdamW"].parameters(), **HYPER),
        "torch.optim.AdamW": torch.optim.AdamW(models["torch.optim.AdamW"].parameters(), **HYPER),
    }
    n_params = sum(p.numel() for p in models["emafuse.AdamW"].parameters())
    print(f"load_digits: {len(x_train)} train / {len(x_test)} test images; MLP with {n_params} parameters")
    print(f"AdamW {HYPER}, batch {BATCH}, {EPOCHS} epochs; emafuse uses {emafuse.num_threads()} threads\n")

    names = list(models)
    print(f"{'step':>5}  {'loss ' + names[0]:>24}  {'loss ' + names[1]:>24}")
    losses = {n: [] for n in names}
    step_times = {n: [] for n in names}
    order = torch.Generator().manual_seed(1)
    step = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            step += 1
            for n in names:
                loss, secs = train_step(models[n], opts[n], x_train[idx], y_train[idx], seed=step)
                losses[n].append(loss)
                step_times[n].append(secs)
            if step % REPORT_EVERY == 0:
                means = [sum(losses[n][-REPORT_EVERY:]) / REPORT_EVERY for n in names]
                print(f"{step:>5}  {means[0]:>24.4f}  {means[1]:>24.4f}")

    print()
    for n in names:
        acc = accuracy(models[n], x_test, y_test)
        mean_us = statistics.mean(step_times[n]) * 1e6
        median_us = statistics.median(step_times[n]) * 1e6
        print(f"{n:>17}: test accuracy {acc:.2%}, optimizer step mean {mean_us:.0f} us, median {median_us:.0f} us")
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(models[names[0]].parameters(), models[names[1]].parameters())
    )
    print(f"largest difference between the two models' weights after {step} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
