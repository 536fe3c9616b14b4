"""AdaMod in float64: spec §12 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdaMod(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.0, *,
                 maximize=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                         caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2), b3, eps, wd = h["lr"], h["betas"], h["beta3"], h["eps"], h["weight_decay"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), exp_avg_lr=torch.zeros_like(p))
        st["step"] += 1  # 1.
        t = st["step"]
        st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        d = v.sqrt() + eps  # 2.
        eta0 = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        if wd != 0:  # 3.
            p.mul_(1 - lr * wd)
        eta = eta0 / d  # 4.
        st["exp_avg_lr"] = s = b3 * st["exp_avg_lr"] + (1 - b3) * eta  # 5.
        if h["caution"]:  # §20 (d)
            m = cautious(m, g, h["caution_norm"])
        p.sub_(torch.minimum(eta, s) * m)  # 6.
