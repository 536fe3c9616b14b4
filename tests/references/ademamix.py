"""AdEMAMix (apple/ml-ademamix) in float64: spec §6 (d); ``caution``: §20 (d) on the fast term."""

from __future__ import annotations

import math

import torch

from .base import Reference, cautious


class RefAdEMAMix(Reference):
    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                 eps=1e-8, weight_decay=0.0, *, t_alpha_beta3=None, fp32_states=True, maximize=False, caution=False,
                 caution_norm="mean", **options):
        # t_alpha_beta3: both warm-ups (spec §6 (b)); fp32_states is a storage option (no effect in float64).
        if t_alpha_beta3 is not None:
            alpha_warmup = beta3_warmup = t_alpha_beta3
        super().__init__(params, maximize=maximize, **options, lr=lr, betas=betas, alpha=alpha, ta=alpha_warmup,
                         tb=beta3_warmup, eps=eps, weight_decay=weight_decay, caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        lr, (b1, b2, b3), alpha, eps, wd, ta, tb = (h[k] for k in ("lr", "betas", "alpha", "eps", "weight_decay", "ta", "tb"))
        if not st:
            st.update(step=0.0, exp_avg_slow=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if b1 != 0:
                st["exp_avg_fast"] = torch.zeros_like(p)
        st["step"] += 1  # 1.
        t = st["step"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        alpha_t = alpha * t / ta if ta is not None and t < ta else alpha  # 2.
        if tb is not None and t < tb:  # 3.
            a = t / tb

            def half_life(b):
                return math.log(0.5) / math.log(b + 1e-8) - 1

            beta3_t = 0.5 ** (1 / ((1 - a) * half_life(b1) + a * half_life(b3) + 1))
        else:
            beta3_t = b3
        if b1 == 0:  # 4.
            m1, bc1 = g, 1.0
        else:
            st["exp_avg_fast"] = m1 = b1 * st["exp_avg_fast"] + (1 - b1) * g
        st["exp_avg_slow"] = m2 = beta3_t * st["exp_avg_slow"] + (1 - beta3_t) * g  # 5.
        st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g  # 6.
        d = v.sqrt() / math.sqrt(bc2) + eps  # 7.
        if h["caution"]:
            m1 = cautious(m1, g, h["caution_norm"])
        u = (m1 / bc1 + alpha_t * m2) / d + wd * p  # 8.
        p.sub_(lr * u)  # 9.
