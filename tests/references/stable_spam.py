"""Stable-SPAM in float64: spec §11 (d), both resets; optimizer-level total_steps, per-parameter
step (reset to 1), m_max_t / m_norm_t / v_norm_t (never reset)."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefStableSPAM(Reference):
    scalars = ("step", "m_max_t", "m_norm_t", "v_norm_t")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, gamma1=0.7, gamma2=0.9,
                 gamma3=0.999, total_T=None, eta_min=0.5, update_proj_gap=1000, *, reset_mode="faithful", maximize=False, caution=False,
                 caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         gamma1=betas[0] if gamma1 == -1 else gamma1, gamma2=gamma2, theta=gamma3, total_T=total_T, eta_min=eta_min,
                         gap=update_proj_gap, clean=reset_mode == "clean", caution=caution, caution_norm=caution_norm)
        self.total_steps = 0

    def load_counters(self, opt, group):
        self.total_steps = opt.param_groups[0]["total_steps"]

    def begin(self, grads):
        h = self.h
        self.t = self.total_steps + 1
        total = h["total_T"]
        self.sigma = 1.0 if total is None else h["eta_min"] + (1 - h["eta_min"]) * (1 + math.cos(math.pi * self.t / (total + 1))) / 2
        self.reset = h["gap"] != 0 and self.t % h["gap"] == 0

    def update(self, p, g, st):
        h, sigma = self.h, self.sigma
        b1, b2 = h["betas"]
        b1, g1, g2, th, eps = b1 * sigma, h["gamma1"] * sigma, h["gamma2"], h["theta"], h["eps"]
        if not st:
            st.update(step=0.0, m_max_t=0.0, m_norm_t=0.0, v_norm_t=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if h["amsgrad"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p)
        p.mul_(1 - h["lr"] * h["weight_decay"])  # 1
        k = st["step"] + 1  # 2
        big = g.abs().max().item()  # 3
        st["m_max_t"] = th * st["m_max_t"] + (1 - th) * big  # 4
        tau = st["m_max_t"] / (1 - th**k)
        g = torch.where(g.abs() > tau, g / big * tau, g)  # 5 (AdaClip)
        n = g.norm().item()  # 6
        st["m_norm_t"] = g1 * st["m_norm_t"] + (1 - g1) * n  # 7
        st["v_norm_t"] = g2 * st["v_norm_t"] + (1 - g2) * n * n
        c = (st["m_norm_t"] / (1 - g1**k)) / (math.sqrt(st["v_norm_t"] / (1 - g2**k)) + eps)  # 8
        if n > 0:  # 9 (AdaNorm)
            g = g / n * c
        k = 1.0 if self.reset else k  # 10
        st["step"] = k
        bc1, bc2 = 1 - b1**k, 1 - b2**k  # 11
        m, v = (torch.zeros_like(p), torch.zeros_like(p)) if self.reset and h["clean"] else (st["exp_avg"], st["exp_avg_sq"])
        m = b1 * m + (1 - b1) * g  # 12
        v = b2 * v + (1 - b2) * g * g
        if h["amsgrad"]:  # 13
            st["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], v)
        den = (st["max_exp_avg_sq"] if h["amsgrad"] else v).sqrt() / math.sqrt(bc2) + eps
        u = cautious(m, g, h["caution_norm"]) if h["caution"] else m  # §20 (d), g as the moments see it
        p.sub_(h["lr"] / bc1 * u / den)  # 14
        if self.reset and not h["clean"]:  # 15: the faithful reset
            m, v = torch.zeros_like(p), torch.zeros_like(p)
        st["exp_avg"], st["exp_avg_sq"] = m, v

    def end(self):
        self.total_steps += 1
