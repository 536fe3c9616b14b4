"""AdaBound / AMSBound and AdaBoundW in float64: spec §14 (d); base_lr = the group's lr when it was
created."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdaBound(Reference):
    scalars = ("step",)
    decoupled = False  # AdaBoundW: no L2 term, then p -= wd·p_old (no lr factor)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0.0,
                 amsbound=False, *, maximize=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                         weight_decay=weight_decay, amsbound=amsbound, caution=caution, caution_norm=caution_norm)
        self.base_lr = float(lr)

    def load_counters(self, opt, group):
        self.base_lr = group["base_lr"]

    def update(self, p, g, st):
        h = self.h
        b1, b2 = h["betas"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if h["amsbound"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        p_old = p.clone()
        if h["weight_decay"] != 0 and not self.decoupled:
            g = g + h["weight_decay"] * p
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        if h["amsbound"]:
            st["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], st["exp_avg_sq"])
            den = st["max_exp_avg_sq"].sqrt() + h["eps"]
        else:
            den = st["exp_avg_sq"].sqrt() + h["eps"]
        eta0 = h["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        f = h["final_lr"] * h["lr"] / self.base_lr
        lo = f * (1 - 1 / (h["gamma"] * t + 1))
        hi = f * (1 + 1 / (h["gamma"] * t))
        m = cautious(st["exp_avg"], g, h["caution_norm"]) if h["caution"] else st["exp_avg"]  # §20 (d)
        p.sub_((eta0 / den).clamp(lo, hi) * m)
        if self.decoupled:
            p.sub_(h["weight_decay"] * p_old)


class RefAdaBoundW(RefAdaBound):
    decoupled = True
