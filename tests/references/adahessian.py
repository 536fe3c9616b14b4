"""AdaHessian in float64: the Hutchinson estimate of the Hessian diagonal and the update, from the
paper (Yao et al., arXiv:2006.00719, Algorithm 1 with the delayed Hessian update and spatial
averaging) as timm's ``Adahessian`` arguments describe it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import cautious


def rademacher(params: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One Rademacher vector per parameter (±1 in float64), drawn as the optimizer draws them: one
    ``randint(0, 2)`` per parameter, in order, from ``generator``."""
    return [torch.randint(0, 2, p.shape, generator=generator, device=p.device).double() * 2 - 1 for p in params]


def hutchinson(grads: Sequence[Tensor], params: Sequence[Tensor], zs: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """The estimate ``h = mean_s z_s ⊙ H z_s`` for gradients ``grads`` (with their graph) of
    ``params``, one list of vectors per sample."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i, z in enumerate(zs):
        hz = torch.autograd.grad(grads, params, grad_outputs=[v.to(g.dtype) for v, g in zip(z, grads)], retain_graph=i < len(zs) - 1)
        total = [t + h.double() * v for t, h, v in zip(total, hz, z)]
    return [t / len(zs) for t in total]


def average_kernels(estimates: Sequence[Tensor]) -> list[Tensor]:
    """Spatial averaging: the estimate of a kernel with 3+ dimensions becomes ``|h|`` averaged over
    its spatial positions (dimensions 2 and on)."""
    return [h.abs().mean(dim=tuple(range(2, h.dim())), keepdim=True).expand_as(h).clone() if h.dim() >= 3 else h for h in estimates]


class RefAdaHessian:
    """The update of one param group in float64 from given gradients and estimates; ``caution``:
    the Cautious mask on the new first moment (spec §20 (d))."""

    def __init__(self, params: Sequence[Tensor], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hessian_power=1.0,
                 caution=False, caution_norm="mean") -> None:
        self.params = [p.detach().double().clone() for p in params]
        self.h = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power, caution=caution,
                      caution_norm=caution_norm)
        self.state: list[dict] = [{} for _ in params]

    def step(self, grads: Sequence[Tensor], hessians: Sequence[Tensor]) -> None:
        lr, (b1, b2), eps, wd, k = (self.h[n] for n in ("lr", "betas", "eps", "weight_decay", "hessian_power"))
        for p, g, h, st in zip(self.params, grads, hessians, self.state):
            g, h = g.double(), h.double()
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(p), exp_hessian_diag_sq=torch.zeros_like(p))
            st["step"] += 1
            t = st["step"]
            p.mul_(1 - lr * wd)
            st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
            st["exp_hessian_diag_sq"] = b2 * st["exp_hessian_diag_sq"] + (1 - b2) * h * h
            st["hessian"] = h
            denom = (st["exp_hessian_diag_sq"] / (1 - b2**t)) ** (k / 2) + eps
            m = cautious(st["exp_avg"], g, self.h["caution_norm"]) if self.h["caution"] else st["exp_avg"]
            p.sub_(lr / (1 - b1**t) * m / denom)
            assert math.isfinite(float(p.abs().max()))
