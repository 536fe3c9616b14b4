"""AdaBelief (adabelief-pytorch 0.2.1) in float64: spec §5 (d); ``caution``: §20 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdaBelief(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                 weight_decouple=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True, *, maximize=False, caution=False,
                 caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
                         degenerated_to_sgd=degenerated_to_sgd, caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_var=torch.zeros_like(p))
            if h["amsgrad"]:
                st["max_exp_avg_var"] = torch.zeros_like(p)
        if h["weight_decouple"]:  # 1. decay with p before the update, even when wd = 0
            p.mul_(1 - wd if h["fixed_decay"] else 1 - lr * wd)
        elif wd != 0:
            g = g + wd * p
        st["step"] += 1  # 2.
        t = st["step"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g  # 3.
        r = g - m  # 4.
        s = b2 * st["exp_avg_var"] + (1 - b2) * r * r  # 5.
        st["exp_avg_var"] = s = s + eps  # 6.
        if h["caution"]:  # §20 (d): the step reads the masked m
            m = cautious(m, g, h["caution_norm"])
        if h["amsgrad"]:  # 7.
            st["max_exp_avg_var"] = smax = torch.maximum(st["max_exp_avg_var"], s)
            d = smax.sqrt() / math.sqrt(bc2) + eps
        else:
            d = s.sqrt() / math.sqrt(bc2) + eps
        if not h["rectify"]:  # 8.
            p.sub_(lr / bc1 * m / d)
            return
        rho_inf = 2 / (1 - b2) - 1  # 9.
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho >= 5:
            rt = math.sqrt((1 - b2**t) * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            p.sub_(lr * (rt / bc1) * m / (s.sqrt() + eps))
        elif h["degenerated_to_sgd"]:
            p.sub_(lr / bc1 * m)
