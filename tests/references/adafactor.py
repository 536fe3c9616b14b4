"""Adafactor in float64: spec §18.A (torch.optim.Adafactor's semantics), factored over the last
two dimensions for tensors of 2+ dims."""

from __future__ import annotations

import math

import torch

from .base import Reference


class RefAdafactor(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *, foreach=None, maximize=False,
                 **options):
        self.dtypes = [p.dtype for p in params]
        super().__init__(params, maximize=maximize, **options, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay)

    def load_from(self, opt, params):
        super().load_from(opt, params)
        self.dtypes = [p.dtype for p in params]

    def begin(self, grads):
        # ε1 = None: the machine epsilon of the dtype of the first parameter stepped (spec step 0)
        eps1 = self.h["eps"][0]
        if eps1 is None:
            first = next((i for i, g in enumerate(grads) if g is not None), None)
            eps1 = torch.finfo(self.dtypes[first]).eps if first is not None else 0.0
        self.eps1 = eps1

    def update(self, p, g, st):
        h, eps1 = self.h, self.eps1
        if not st:
            st["step"] = 0.0
            if p.dim() >= 2:
                st["row_var"] = torch.zeros(*p.shape[:-1], 1, dtype=p.dtype)
                st["col_var"] = torch.zeros(*p.shape[:-2], 1, p.shape[-1], dtype=p.dtype)
            else:
                st["variance"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        w = t ** h["beta2_decay"]
        n = p.numel()
        alpha = max(h["eps"][1], math.sqrt((p * p).sum().item() / n)) * min(h["lr"], 1 / math.sqrt(t))
        p.mul_(1 - h["lr"] * h["weight_decay"])
        sq = g * g
        if p.dim() >= 2:
            st["row_var"] += w * (sq.mean(dim=-1, keepdim=True) - st["row_var"])
            st["col_var"] += w * (sq.mean(dim=-2, keepdim=True) - st["col_var"])
            rows = st["row_var"].mean(dim=-2, keepdim=True).clamp(min=eps1)
            vhat = st["row_var"] * st["col_var"] / rows
        else:
            st["variance"] += w * (sq - st["variance"])
            vhat = st["variance"]
        u = g / vhat.clamp(min=eps1 * eps1).sqrt()
        p.sub_(alpha / max(1.0, math.sqrt((u * u).sum().item() / n) / h["d"]) * u)
