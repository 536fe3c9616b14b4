"""Adafactor in float64 as Hugging Face transformers implements it: spec §18.B (ε1 added to g²,
relative step sizes, optional first moment), factored over the last two dimensions for tensors of
2+ dims."""

from __future__ import annotations

import math

import torch

from .base import Reference


class RefAdafactorHF(Reference):
    scalars = ("step", "RMS")

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                 scale_parameter=True, relative_step=True, warmup_init=False, *, maximize=False, **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                         beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                         warmup_init=warmup_init)

    def update(self, p, g, st):
        h = self.h
        eps1, eps2 = h["eps"]
        if not st:
            st["step"] = 0.0
            if h["beta1"] is not None:
                st["exp_avg"] = torch.zeros_like(p)
            if p.dim() >= 2:
                st["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=p.dtype)
                st["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype)
            else:
                st["exp_avg_sq"] = torch.zeros_like(p)
        # 1. t ← t + 1 ; RMS of the weights before the step (0 for an empty tensor)
        st["step"] += 1
        t = st["step"]
        n = p.numel()
        st["RMS"] = math.sqrt((p * p).sum().item() / n) if n else 0.0
        # 2. the step size
        if h["relative_step"]:
            rho = min(1e-6 * t if h["warmup_init"] else 1e-2, 1 / math.sqrt(t))
        else:
            rho = h["lr"]
        alpha = max(eps2, st["RMS"]) * rho if h["scale_parameter"] else rho
        # 3.-4. the second moment and U
        b = 1 - t ** h["decay_rate"]
        q = g * g + eps1
        if p.dim() >= 2:
            row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            row.mul_(b).add_((1 - b) * q.mean(dim=-1))
            col.mul_(b).add_((1 - b) * q.mean(dim=-2))
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            u = r * col.unsqueeze(-2).rsqrt() * g
        else:
            st["exp_avg_sq"].mul_(b).add_((1 - b) * q)
            u = st["exp_avg_sq"].rsqrt() * g
        # 5. clip by RMS(U), scale by α
        rms_u = math.sqrt((u * u).sum().item() / n) if n else 0.0
        u = u * (alpha / max(1.0, rms_u / h["clip_threshold"]))
        # 6. the first moment
        if h["beta1"] is not None:
            st["exp_avg"].mul_(h["beta1"]).add_((1 - h["beta1"]) * u)
            u = st["exp_avg"]
        # 7.-8. weight decay scaled by α, then the step
        if h["weight_decay"] != 0:
            p.mul_(1 - h["weight_decay"] * alpha)
        p.sub_(u)
