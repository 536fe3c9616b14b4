"""Train a small LightningModule with emafuse's EMA callback (and, optionally, post-hoc EMA).

    python examples/lightning_ema.py [--epochs 5] [--device cpu] [--posthoc]

A noisy regression task where the averaged weights generalise better than the last iterate: the
script prints the validation loss of the live weights and of the average after training, and
shows a checkpoint saved with the Lightning layout (``state_dict`` = average,
``current_model_state`` = live weights). Needs ``pip install lightning``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import emafuse
import lightning.pytorch as pl
import torch
from emafuse.lightning import EMACallback, PostHocEMACallback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        # emafuse's fused AdamW; the EMA callback works with any optimizer.
        return emafuse.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


def data(n_train: int = 2048, n_val: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=g)
    x = torch.randn(n_train + n_val, 16, generator=g)
    y = torch.sin(x @ w) + 0.5 * torch.randn(n_train + n_val, 1, generator=g)  # heavy label noise
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n_train)), batch_size=32, shuffle=True, generator=g)
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n_train, n_train + n_val)), batch_size=256)
    return train, val


def val_loss(model: nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        tot = sum(nn.functional.mse_loss(model(x), y, reduction="sum").item() for x, y in loader)
    return tot / len(loader.dataset)


def main(epochs: int = 5, device: str = "cpu", posthoc: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    train, val = data()
    model = Regressor()
    ema_cb = EMACallback(decay=0.99, schedule="warmup", power=3 / 4, copy_at_train_end=False)
    callbacks = [ema_cb]
    ph_cb = None
    if posthoc:
        ph_cb = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=50)
        callbacks.append(ph_cb)
    ckdir = tempfile.mkdtemp(prefix="emafuse-example-")
    callbacks.append(ModelCheckpoint(dirpath=ckdir, filename="last"))
    trainer = pl.Trainer(max_epochs=epochs, accelerator=device, devices=1, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train, val)

    ema = ema_cb.ema
    print(f"EMA: {ema.num_updates} updates over {ema.num_steps_seen} optimizer steps")
    results = {"live weights": val_loss(model, val), "EMA (decay 0.99, warm-up)": val_loss(ema.module, val)}
    if ph_cb is not None:
        ph = ph_cb.posthoc
        for j, s in enumerate(ph.sigma_rels):  # the tracks themselves
            results[f"power EMA track sigma_rel={s}"] = val_loss(ph.module_for(j), val)
        for s in (0.05, 0.08, 0.12):
            rec = ph.reconstruct(s, model=model)
            results[f"post-hoc EMA sigma_rel={s}"] = val_loss(rec, val)
    ckpt = torch.load(os.path.join(ckdir, "last.ckpt"), weights_only=False)
    print(f"checkpoint keys: {sorted(k for k in ckpt if k in ('state_dict', 'current_model_state', 'averaging_state'))}; "
          f"updates averaged: {int(ckpt['averaging_state']['n_averaged'])}")
    for k, v in results.items():
        print(f"validation MSE, {k:32s}: {v:.4f}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--posthoc", action="store_true")
    a = ap.parse_args()
    main(a.epochs, a.device, a.posthoc)
