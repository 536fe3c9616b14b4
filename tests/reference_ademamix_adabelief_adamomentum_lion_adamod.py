"""Float64 references for AdaBelief, AdEMAMix, AdaMomentum, Lion and AdaMod, transcribed from the
numbered update rules of spec/optimizers.md (§5, §6, §4, §8, §12), independently of emafuse's
code. Each ``*_step`` updates one parameter ``p`` and its state dict ``st`` (float64 tensors,
``st["step"]`` a Python number) in place, given its gradient ``g`` and the group's options ``h``
(an emafuse param-group dict works as is).
"""

from __future__ import annotations

import math

import torch


def _grad(g, h):
    return -g if h.get("maximize", False) else g


def adabelief_step(p, g, st, h):
    lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    g = _grad(g, h)
    if h["weight_decouple"]:  # 1. decay with p before the update, even when wd = 0
        p.mul_(1 - wd if h["fixed_decay"] else 1 - lr * wd)
    elif wd != 0:
        g = g + wd * p
    st["step"] += 1  # 2.
    t = st["step"]
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g  # 3.
    r = g - m  # 4.
    s = b2 * st["exp_avg_var"] + (1 - b2) * r * r  # 5.
    st["exp_avg_var"] = s = s + eps  # 6.
    if h["amsgrad"]:  # 7.
        st["max_exp_avg_var"] = smax = torch.maximum(st["max_exp_avg_var"], s)
        d = smax.sqrt() / math.sqrt(bc2) + eps
    else:
        d = s.sqrt() / math.sqrt(bc2) + eps
    if not h["rectify"]:  # 8.
        p.sub_(lr / bc1 * m / d)
        return
    rho_inf = 2 / (1 - b2) - 1  # 9.
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho >= 5:
        rt = math.sqrt((1 - b2**t) * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        p.sub_(lr * (rt / bc1) * m / (s.sqrt() + eps))
    elif h["degenerated_to_sgd"]:
        p.sub_(lr / bc1 * m)


def ademamix_step(p, g, st, h):
    lr, (b1, b2, b3), alpha, eps, wd = h["lr"], h["betas"], h["alpha"], h["eps"], h["weight_decay"]
    ta, tb = h.get("alpha_warmup"), h.get("beta3_warmup")
    g = _grad(g, h)
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
    u = (m1 / bc1 + alpha_t * m2) / d + wd * p  # 8.
    p.sub_(lr * u)  # 9.


def adamomentum_step(p, g, st, h):
    lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    g = _grad(g, h)
    st["step"] += 1  # 1.
    t = st["step"]
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    if h["weight_decouple"]:  # 2.
        p.mul_(1 - wd if h["fixed_decay"] else 1 - lr * wd)
    elif wd != 0:
        g = g + wd * p
    st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g  # 3.
    st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * m * m + eps  # 4.
    d = v.sqrt() / math.sqrt(bc2)  # 5.
    p.sub_(lr / bc1 * m / d)  # 6.


def lion_step(p, g, st, h):
    lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
    if h.get("lr_independent_decay", False):
        wd = wd / h["decay_base_lr"]
    g = _grad(g, h)
    p.mul_(1 - lr * wd)  # 1.
    c = b1 * st["exp_avg"] + (1 - b1) * g  # 2.
    u = torch.sign(c)
    if h.get("caution", False):  # §20 (d), C-Lion
        phi = (u * g > 0).double()
        if h.get("caution_norm", "mean") == "mean":
            u = u * phi / max(phi.mean().item(), 1e-3)
        else:
            u = u * phi * (phi.numel() / (phi.sum().item() + 1))
    p.sub_(lr * u)  # 3.
    st["exp_avg"] = b2 * st["exp_avg"] + (1 - b2) * g  # 4.


def adamod_step(p, g, st, h):
    lr, (b1, b2), b3, eps, wd = h["lr"], h["betas"], h["beta3"], h["eps"], h["weight_decay"]
    g = _grad(g, h)
    st["step"] += 1  # 1.
    t = st["step"]
    st["exp_avg"] = m = b1 * st["exp_avg"] + (1 - b1) * g
    st["exp_avg_sq"] = v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    d = v.sqrt() + eps  # 2.
    eta0 = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    if wd != 0:  # 3.
        p.mul_(1 - lr * wd)
    eta = eta0 / d  # 4.
    st["exp_avg_lr"] = s = b3 * st["exp_avg_lr"] + (1 - b3) * eta  # 5.
    p.sub_(torch.minimum(eta, s) * m)  # 6.


STEPS = {
    "AdaBelief": adabelief_step,
    "AdEMAMix": ademamix_step,
    "AdaMomentum": adamomentum_step,
    "Lion": lion_step,
    "AdaMod": adamod_step,
}


def slot_names(name: str, h: dict) -> tuple[str, ...]:
    """State tensors of one parameter, as spec section (c) names them."""
    if name == "AdaBelief":
        return ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if h["amsgrad"] else ())
    if name == "AdEMAMix":
        return (("exp_avg_fast",) if h["betas"][0] != 0 else ()) + ("exp_avg_slow", "exp_avg_sq")
    if name == "AdaMomentum":
        return ("exp_avg", "exp_avg_sq")
    if name == "Lion":
        return ("exp_avg",)
    return ("exp_avg", "exp_avg_sq", "exp_avg_lr")


class Reference:
    """A float64 run of the spec rule ``name`` over copies of ``params`` with the options of
    ``group`` (read again at every step, so lr schedules can be followed)."""

    def __init__(self, name: str, params, group: dict):
        self.name, self.group = name, group
        self.params = [p.detach().double().clone() for p in params]
        self.state = [None] * len(self.params)

    def step(self, grads) -> None:
        h = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in self.group.items() if k != "params"}
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if self.state[i] is None:
                self.state[i] = {"step": 0, **{n: torch.zeros_like(p) for n in slot_names(self.name, h)}}
            STEPS[self.name](p, g.double(), self.state[i], h)
