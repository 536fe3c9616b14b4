"""Float64 references for Adan, SPAM, diffGrad, AdaBound and SGD-SaI, written from the spec
(shared/spec/optimizers.md §7, §10, §13, §14, §17), not from emafuse's code.

Each reference holds one parameter group of float64 tensors and its state under emafuse's (the
official) state names, so a test can load an emafuse optimizer's state into it and compare one
step from identical state (``load_from``), or run whole trajectories. ``step(grads)`` takes one
gradient per parameter (None: skipped) and never modifies the gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64).clone()


class _Ref:
    slots: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()

    def __init__(self, params: list[Tensor], maximize: bool = False, **hyper) -> None:
        self.params = [_f64(p) for p in params]
        self.state: list[dict] = [{} for _ in params]
        self.maximize = maximize
        self.h = hyper

    def _grads(self, grads):
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            else:
                g = _f64(g)
                out.append(-g if self.maximize else g)
        return out

    def load_from(self, opt, params) -> None:
        """Copy parameter values and per-parameter state of ``params`` from emafuse ``opt``."""
        self.params = [_f64(p) for p in params]
        self.state = []
        for p in params:
            st = opt.state.get(p, {})
            self.state.append({k: (float(v) if k in self.scalars else _f64(v)) for k, v in st.items()})
        self.h["lr"] = float(opt.param_groups[0]["lr"])


class RefAdan(_Ref):
    """Spec §7 (d); per-group step k, optional global clipping."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 max_grad_norm=0.0, no_prox=False, maximize=False):
        super().__init__(params, maximize, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, no_prox=no_prox)
        self.k = 0

    def load_from(self, opt, params):
        super().load_from(opt, params)
        self.k = opt.param_groups[0].get("step", 0)
        for st in self.state:
            if st:
                st["prev"] = -st.pop("neg_pre_grad")

    def restart(self):
        self.k = 0
        for st in self.state:
            for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                if name in st:
                    st[name].zero_()

    def step(self, grads):
        h = self.h
        b1, b2, b3 = h["betas"]
        lr, eps, wd = h["lr"], h["eps"], h["weight_decay"]
        grads = self._grads(grads)
        c = 1.0
        if h["max_grad_norm"] > 0:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))
            c = min(h["max_grad_norm"] / (norm + eps), 1.0)
        self.k += 1
        k = self.k
        bc1, bc2, bc3 = 1 - b1**k, 1 - b2**k, 1 - b3**k
        for p, g, st in zip(self.params, grads, self.state):
            if g is None:
                continue
            if not st:
                st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), exp_avg_diff=torch.zeros_like(p))
            g = c * g
            prev = g if (k == 1 or "prev" not in st) else st["prev"]
            d = g - prev
            st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
            st["exp_avg_diff"] = b2 * st["exp_avg_diff"] + (1 - b2) * d
            u = g + b2 * d
            st["exp_avg_sq"] = b3 * st["exp_avg_sq"] + (1 - b3) * u * u
            den = st["exp_avg_sq"].sqrt() / math.sqrt(bc3) + eps
            upd = lr / bc1 * st["exp_avg"] / den + lr * b2 / bc2 * st["exp_avg_diff"] / den
            if h["no_prox"]:
                p.copy_(p * (1 - lr * wd) - upd)
            else:
                p.copy_((p - upd) / (1 + lr * wd))
            st["prev"] = g.clone()

    def state_of(self, i):
        st = dict(self.state[i])
        if "prev" in st:
            st["neg_pre_grad"] = -st.pop("prev")
        return st


class RefSPAM(_Ref):
    """Spec §10 (d); optimizer-level total_step / current_step, per-parameter step."""

    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20, maximize=False):
        super().__init__(params, maximize, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, N=warmup_steps, theta=threshold, dT=DeltaT, accu=grad_accu_steps)
        self.total_step = 0
        self.current_step = warmup_steps + 1

    def load_from(self, opt, params):
        super().load_from(opt, params)
        self.total_step = opt.state["total_step"]
        self.current_step = opt.state["current_step"]

    def step(self, grads):
        h = self.h
        b1, b2 = h["betas"]
        N, theta, dT, accu = h["N"], h["theta"], h["dT"], h["accu"]
        t = self.total_step + 1
        j = self.current_step
        s = 1 - 0.99 * (1 + math.cos(math.pi * j / (N + 1))) / 2 if j < N else 1.0
        for p, g, st in zip(self.params, self._grads(grads), self.state):
            if g is None:
                continue
            if not st:
                st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            if t % dT == 0:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            k = st["step"]
            v = st["exp_avg_sq"]
            if theta != 0 and t >= accu and t % dT >= accu:
                spike = g * g > theta * v
                g = torch.where(spike, torch.sign(g) * torch.sqrt(theta * v), g)
            st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
            st["exp_avg_sq"] = b2 * v + (1 - b2) * g * g
            den = st["exp_avg_sq"].sqrt() + h["eps"]
            eta = h["lr"] * math.sqrt(1 - b2**k) / (1 - b1**k) if h["correct_bias"] else h["lr"]
            p.sub_(eta * s * st["exp_avg"] / den)
            if h["weight_decay"] > 0:
                p.mul_(1 - h["lr"] * h["weight_decay"])
        self.total_step += 1
        self.current_step += 1
        if (self.total_step + 1) % dT == 0:
            self.current_step = 0

    def state_of(self, i):
        return self.state[i]


class RefDiffGrad(_Ref):
    """Spec §13 (d)."""

    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False):
        super().__init__(params, maximize, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def step(self, grads):
        h = self.h
        b1, b2 = h["betas"]
        for p, g, st in zip(self.params, self._grads(grads), self.state):
            if g is None:
                continue
            if not st:
                st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), previous_grad=torch.zeros_like(p))
            st["step"] += 1
            t = st["step"]
            if h["weight_decay"] != 0:
                g = g + h["weight_decay"] * p
            st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
            st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
            den = st["exp_avg_sq"].sqrt() + h["eps"]
            xi = 1 / (1 + torch.exp(-(st["previous_grad"] - g).abs()))
            st["previous_grad"] = g.clone()
            p.sub_(h["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t) * (st["exp_avg"] * xi) / den)

    def state_of(self, i):
        return self.state[i]


class RefAdaBound(_Ref):
    """Spec §14 (d); base_lr = the lr given at construction."""

    scalars = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                 weight_decay=0.0, amsbound=False, maximize=False):
        super().__init__(params, maximize, lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                         weight_decay=weight_decay, amsbound=amsbound)
        self.base_lr = lr

    def load_from(self, opt, params):
        super().load_from(opt, params)
        self.base_lr = opt.param_groups[0]["base_lr"]

    def step(self, grads):
        h = self.h
        b1, b2 = h["betas"]
        for p, g, st in zip(self.params, self._grads(grads), self.state):
            if g is None:
                continue
            if not st:
                st.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                if h["amsbound"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = st["step"]
            if h["weight_decay"] != 0:
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
            p.sub_((eta0 / den).clamp(lo, hi) * st["exp_avg"])

    def state_of(self, i):
        return self.state[i]


class RefSGDSaI(_Ref):
    """Spec §17 (d); gsnr measured on each parameter's first step."""

    scalars = ("gsnr",)

    def __init__(self, params, lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2, maximize=False):
        super().__init__(params, maximize, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay)

    def step(self, grads):
        h = self.h
        mu, lr, wd = h["momentum"], h["lr"], h["weight_decay"]
        for p, g, st in zip(self.params, self._grads(grads), self.state):
            if g is None:
                continue
            if "gsnr" not in st:
                sigma = float(g.std()) if g.numel() > 1 else 0.0
                sigma = 0.0 if math.isnan(sigma) else sigma
                st["gsnr"] = float(g.norm()) / (sigma + h["eps"])
            if mu != 0:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"] = mu * st["momentum_buffer"] + (1 - mu) * g
                b = st["momentum_buffer"]
            else:
                b = g
            p.copy_(p * (1 - wd * lr) - lr * st["gsnr"] * b)

    def state_of(self, i):
        return self.state[i]
