"""Adan in float64: spec §7 (d); per-group step k, optional global clipping, restart; ``caution``: §20 (d)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdan(Reference):
    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, max_grad_norm=0.0,
                 no_prox=False, *, maximize=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, no_prox=no_prox, caution=caution, caution_norm=caution_norm)
        self.k = 0  # the group's step
        self.c = 1.0  # this step's clipping factor

    def load_counters(self, opt, group):
        self.k = group.get("step", 0)

    def to_emafuse(self, st):
        st = dict(st)
        if "prev" in st:
            st["neg_pre_grad"] = -st.pop("prev")
        return st

    def from_emafuse(self, st):
        st = dict(st)
        st["prev"] = -st.pop("neg_pre_grad")
        return st

    def restart(self):
        """The official ``restart_opt``: group step 0, moments zeroed."""
        self.k = 0
        for st in self.state:
            for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                if name in st:
                    st[name].zero_()

    def begin(self, grads):
        h = self.h
        self.c = 1.0
        if h["max_grad_norm"] > 0:  # 0.
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))
            self.c = min(h["max_grad_norm"] / (norm + h["eps"]), 1.0)
        self.k += 1  # 1., also without any gradient

    def update(self, p, g, st):
        h = self.h
        b1, b2, b3 = h["betas"]
        lr, eps, wd, k = h["lr"], h["eps"], h["weight_decay"], self.k
        if not st:
            st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), exp_avg_diff=torch.zeros_like(p))
        g = self.c * g  # 3.
        prev = g if (k == 1 or "prev" not in st) else st["prev"]  # 4.
        d = g - prev  # 5.
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g  # 6.
        st["exp_avg_diff"] = b2 * st["exp_avg_diff"] + (1 - b2) * d  # 7.
        u = g + b2 * d  # 8.
        st["exp_avg_sq"] = b3 * st["exp_avg_sq"] + (1 - b3) * u * u  # 9.
        den = st["exp_avg_sq"].sqrt() / math.sqrt(1 - b3**k) + eps  # 10.
        upd = lr / (1 - b1**k) * st["exp_avg"] / den + lr * b2 / (1 - b2**k) * st["exp_avg_diff"] / den
        if h["caution"]:  # §20 (d): the mask on the direction d, of the sign of the update's
            direction = st["exp_avg"] / (1 - b1**k) + b2 / (1 - b2**k) * st["exp_avg_diff"]
            upd = lr * cautious(direction, g, h["caution_norm"]) / den
        if h["no_prox"]:  # 11.
            p.copy_(p * (1 - lr * wd) - upd)
        else:
            p.copy_((p - upd) / (1 + lr * wd))
        st["prev"] = g.clone()  # 12.
