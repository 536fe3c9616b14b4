"""Adam, AdamW and AMSGrad in float64: spec §3 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdam(Reference):
    """torch.optim.Adam's rule; ``decoupled_weight_decay=True`` is AdamW's; ``caution``: §20 (d),
    C-AdamW (the mask from the new m and the gradient the moments see)."""

    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, decoupled=decoupled_weight_decay, caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if h["amsgrad"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1  # 1.
        t = st["step"]
        if wd != 0:  # 2.
            if h["decoupled"]:
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
        st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g  # 3.
        st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g  # 4.
        if h["amsgrad"]:  # 5.
            st["max_exp_avg_sq"] = v = torch.maximum(st["max_exp_avg_sq"], v)
        d = v.sqrt() / math.sqrt(1 - b2**t) + eps  # 6., 7.
        if h["caution"]:
            m = cautious(m, g, h["caution_norm"])
        p.sub_(lr / (1 - b1**t) * m / d)  # 8.


class RefAdamW(RefAdam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, **options, decoupled_weight_decay=True)
