"""AdaMomentum in float64: spec §4 (d) (the paper's algorithm; no official code); ``caution``: §20 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdaMomentum(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, *, maximize=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         weight_decouple=weight_decouple, fixed_decay=fixed_decay, caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        st["step"] += 1  # 1.
        t = st["step"]
        if h["weight_decouple"]:  # 2.
            p.mul_(1 - wd if h["fixed_decay"] else 1 - lr * wd)
        elif wd != 0:
            g = g + wd * p
        st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g  # 3.
        st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * m * m + eps  # 4.
        d = v.sqrt() / math.sqrt(1 - b2**t)  # 5.
        if h["caution"]:
            m = cautious(m, g, h["caution_norm"])
        p.sub_(lr / (1 - b1**t) * m / d)  # 6.
