"""AdamP in float64: spec §9 (d), the channel view then the layer view for tensors of 2+ dims."""

from __future__ import annotations

import math

import torch

from .base import Reference


class RefAdamP(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False, *,
                 maximize=False, **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                         wd_ratio=wd_ratio, nesterov=nesterov)

    def _projected(self, p, g, u):
        """``u`` with its radial component removed in the first view whose largest cosine is under
        the threshold, and the decay ratio; ``(u, 1)`` when neither view qualifies."""
        h, eps = self.h, self.h["eps"]
        for rows in (p.shape[0], 1):
            pv, gv, uv = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
            pn, gn = pv.norm(dim=1), gv.norm(dim=1)
            cos = (gv * pv).sum(dim=1).abs() / (gn.clamp(min=eps) * pn.clamp(min=eps))
            if cos.max().item() < h["delta"] / math.sqrt(pv.shape[1]):
                k = (pv * uv).sum(dim=1) / (pn + eps) ** 2
                return (uv - pv * k[:, None]).reshape(u.shape), h["wd_ratio"]
        return u, 1.0

    def update(self, p, g, st):
        h = self.h
        b1, b2 = h["betas"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        st["step"] += 1
        t = st["step"]
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
        den = st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t) + h["eps"]
        m = b1 * st["exp_avg"] + (1 - b1) * g if h["nesterov"] else st["exp_avg"]
        u, ratio = m / den, 1.0
        if p.dim() > 1:
            u, ratio = self._projected(p, g, u)
        if h["weight_decay"] > 0:
            p.mul_(1 - h["lr"] * h["weight_decay"] * ratio)
        p.sub_(h["lr"] / (1 - b1**t) * u)
