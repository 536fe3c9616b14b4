"""MoMo and MoMo-Adam in float64: spec §16 (d) and (d'), over several param groups, with the
decisions of emafuse (lazy state: a parameter's first step takes the k = 1 rule; MoMo-Adam's D
uses the optimizer's step). Not a ``Reference`` of ``base.py``: the step needs the loss and sums
over every group."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import cautious, f64


class RefMomo:
    """``groups``: dicts with ``params`` and the group's ``lr``, ``weight_decay`` (MoMo-Adam also
    ``betas``, ``eps``; optionally ``caution``, ``caution_norm``: the Cautious mask on the move, spec
    §20, after the step size of the unmasked model); ``adam`` selects MoMo-Adam; ``options``: the
    optimizer-wide ``beta``, ``lb``, ``bias_correction``, ``use_fstar``, ``divide``."""

    def __init__(self, groups: list[dict[str, Any]], *, adam: bool, **options: Any) -> None:
        self.adam = adam
        self.groups = [{**g, "params": [f64(p) for p in g["params"]]} for g in groups]
        self.o = dict(beta=0.9, lb=0.0, bias_correction=False, use_fstar=False, divide=True) | options
        self.state: dict[int, dict[str, Any]] = {}
        self.k, self.loss_avg, self.lb = 0, 0.0, float(self.o["lb"])

    @staticmethod
    def _masked(group: dict[str, Any], u: Tensor, g: Tensor) -> Tensor:
        return cautious(u, g, group.get("caution_norm", "mean")) if group.get("caution") else u

    def params(self) -> list[Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def step(self, grads: list[list[Tensor | None]], loss: float) -> None:
        o = self.o
        self.k += 1
        k = self.k
        if self.adam:
            self.loss_avg = (1 - self.groups[-1]["betas"][0]) * loss + self.groups[-1]["betas"][0] * self.loss_avg
        else:
            beta = o["beta"]
            if k == 1:
                self.loss_avg = 0.0 if o["bias_correction"] else loss
            self.loss_avg = beta * self.loss_avg + (1 - beta) * loss
        dot = gamma = norm = 0.0
        moved = []
        for group, group_grads in zip(self.groups, grads):
            for p, g in zip(group["params"], group_grads):
                if g is None:
                    continue
                g = f64(g)
                st = self.state.setdefault(id(p), {})
                pg = float((p * g).sum())
                if self.adam:
                    b1, b2 = group["betas"]
                    if not st:
                        st.update(step=0, grad_avg=torch.zeros_like(p), grad_avg_sq=torch.zeros_like(p), grad_dot_w=0.0)
                    st["step"] += 1
                    st["grad_avg"] = b1 * st["grad_avg"] + (1 - b1) * g
                    st["grad_avg_sq"] = b2 * st["grad_avg_sq"] + (1 - b2) * g * g
                    st["grad_dot_w"] = b1 * st["grad_dot_w"] + (1 - b1) * pg
                    big_d = (st["grad_avg_sq"] / (1 - b2**k)).sqrt() + group["eps"]
                    norm += float((st["grad_avg"] * st["grad_avg"] / big_d).sum())
                    moved.append((group, p, self._masked(group, st["grad_avg"] / big_d, g)))
                else:
                    beta = o["beta"]
                    if not st:
                        st.update(grad_avg=torch.zeros_like(p), grad_dot_w=0.0) if o["bias_correction"] else st.update(grad_avg=g.clone(), grad_dot_w=pg)
                    st["grad_avg"] = beta * st["grad_avg"] + (1 - beta) * g
                    st["grad_dot_w"] = beta * st["grad_dot_w"] + (1 - beta) * pg
                    norm += float((st["grad_avg"] ** 2).sum())
                    moved.append((group, p, self._masked(group, st["grad_avg"], g)))
                dot += float((p * st["grad_avg"]).sum())
                gamma += st["grad_dot_w"]
        for group in self.groups:
            lr, wd = group["lr"], group["weight_decay"]
            q = 1 + lr * wd
            if self.adam:
                rho = 1 - group["betas"][0] ** k
            else:
                rho = 1 - o["beta"] ** k if o["bias_correction"] else 1.0
            if o["use_fstar"]:
                cap = q * self.loss_avg + dot - q * gamma
                if cap < q * rho * self.lb:
                    self.lb = max(cap / (2 * q * rho), o["lb"])
            h = q * (self.loss_avg - rho * self.lb) + dot - q * gamma
            tau = lr / rho if norm == 0 else min(lr / rho, max(h, 0.0) / norm)
            if o["use_fstar"]:
                self.lb = max((self.loss_avg + dot - gamma - 0.5 * tau * norm) / rho, o["lb"])
            for owner, p, u in moved:
                if owner is not group:
                    continue
                if self.adam and not o["divide"]:
                    p.mul_(1 - lr * wd)
                p.sub_(tau * u)
                if not self.adam or o["divide"]:
                    p.div_(q)
