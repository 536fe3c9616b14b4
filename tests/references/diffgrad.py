"""diffGrad (diffGrad_v2) in float64: spec §13 (d); ``caution``: §20 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefDiffGrad(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False, caution=False,
                 caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        b1, b2 = h["betas"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), previous_grad=torch.zeros_like(p))
        st["step"] += 1
        t = st["step"]
        if h["weight_decay"] != 0:
            g = g + h["weight_decay"] * p
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        den = st["exp_avg_sq"].sqrt() + h["eps"]
        xi = 1 / (1 + torch.exp(-(st["previous_grad"] - g).abs()))
        st["previous_grad"] = g.clone()
        m = cautious(st["exp_avg"], g, h["caution_norm"]) if h["caution"] else st["exp_avg"]
        p.sub_(h["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) * (m * xi) / den)
