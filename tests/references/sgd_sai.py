"""SGD-SaI in float64: spec §17 (d); gsnr measured on each parameter's first step; ``caution``: §20 (d)."""

from __future__ import annotations

import math

from .base import Reference, cautious


class RefSGDSaI(Reference):
    scalars = ("gsnr",)

    def __init__(self, params, lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2, *, maximize=False, caution=False, caution_norm="mean",
                 **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, caution=caution,
                         caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        mu, lr, wd = h["momentum"], h["lr"], h["weight_decay"]
        if "gsnr" not in st:
            sigma = float(g.std()) if g.numel() > 1 else 0.0  # unbiased
            sigma = 0.0 if math.isnan(sigma) else sigma
            st["gsnr"] = float(g.norm()) / (sigma + h["eps"])
        if mu != 0:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.clone()
            else:
                st["momentum_buffer"] = mu * st["momentum_buffer"] + (1 - mu) * g
            b = st["momentum_buffer"]
        else:
            b = g
        if h["caution"]:
            b = cautious(b, g, h["caution_norm"])
        p.copy_(p * (1 - wd * lr) - lr * st["gsnr"] * b)
