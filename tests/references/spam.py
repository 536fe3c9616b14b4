"""SPAM in float64: spec §10 (d); optimizer-level total_step / current_step, per-parameter step."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefSPAM(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20, *, maximize=False, caution=False, caution_norm="mean",
                 **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, N=warmup_steps, theta=threshold, dT=DeltaT, accu=grad_accu_steps, caution=caution,
                         caution_norm=caution_norm)
        self.total_step = 0  # completed steps
        self.current_step = warmup_steps + 1  # steps since the last reset (warm-up position)

    def load_counters(self, opt, group):
        self.total_step = opt.param_groups[0]["total_step"]
        self.current_step = opt.param_groups[0]["current_step"]

    def begin(self, grads):
        N, j = self.h["N"], self.current_step
        self.t = self.total_step + 1
        self.s = 1 - 0.99 * (1 + math.cos(math.pi * j / (N + 1))) / 2 if j < N else 1.0

    def update(self, p, g, st):
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        theta, dT, accu = h["theta"], h["dT"], h["accu"]
        if not st:
            st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        if t % dT == 0:  # momentum reset
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        k = st["step"]
        v = st["exp_avg_sq"]
        if theta != 0 and t >= accu and t % dT >= accu:  # spike clipping
            spike = g * g > theta * v
            g = torch.where(spike, torch.sign(g) * torch.sqrt(theta * v), g)
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
        st["exp_avg_sq"] = b2 * v + (1 - b2) * g * g
        den = st["exp_avg_sq"].sqrt() + h["eps"]
        eta = h["lr"] * math.sqrt(1 - b2**k) / (1 - b1**k) if h["correct_bias"] else h["lr"]
        m = cautious(st["exp_avg"], g, h["caution_norm"]) if h["caution"] else st["exp_avg"]  # §20 (d), g as clipped
        p.sub_(eta * self.s * m / den)
        if h["weight_decay"] > 0:  # after the update, not warmed up
            p.mul_(1 - h["lr"] * h["weight_decay"])

    def end(self):
        self.total_step += 1
        self.current_step += 1
        if (self.total_step + 1) % self.h["dT"] == 0:
            self.current_step = 0
