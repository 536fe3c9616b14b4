"""Lion (google/automl) and Cautious Lion in float64: spec §8 (d), §20 (d)."""

from __future__ import annotations

import torch

from .base import Reference, cautious


class RefLion(Reference):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, lr_independent_decay=False,
                 decoupled_weight_decay=None, caution=False, caution_norm="mean", maximize=False, **options):
        if decoupled_weight_decay is not None:  # lion-pytorch's spelling of the same option
            lr_independent_decay = decoupled_weight_decay
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, weight_decay=weight_decay,
                         lr_independent_decay=lr_independent_decay, caution=caution, caution_norm=caution_norm)
        self.decay_base_lr = float(lr)  # lr_independent_decay divides the decay by the initial lr

    def load_counters(self, opt, group):
        self.decay_base_lr = group["decay_base_lr"]

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
        if h["lr_independent_decay"]:
            wd = wd / self.decay_base_lr
        if not st:
            st["exp_avg"] = torch.zeros_like(p)
        p.mul_(1 - lr * wd)  # 1.
        u = torch.sign(b1 * st["exp_avg"] + (1 - b1) * g)  # 2.
        if h["caution"]:  # §20 (d), C-Lion
            u = cautious(u, g, h["caution_norm"])
        p.sub_(lr * u)  # 3.
        st["exp_avg"] = b2 * st["exp_avg"] + (1 - b2) * g  # 4.
