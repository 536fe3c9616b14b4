"""SGD with momentum, dampening and Nesterov momentum in float64: spec §15 (d); ``caution``: §20 (d)
on the step's direction."""

from __future__ import annotations

from .base import Reference, cautious


class RefSGD(Reference):
    """torch.optim.SGD's rule; no step counter."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, caution=False, caution_norm="mean", **options):
        super().__init__(params, maximize=maximize, **options, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, caution=caution, caution_norm=caution_norm)

    def update(self, p, g, st):
        h = self.h
        mu = h["momentum"]
        if h["weight_decay"] != 0:  # 2.
            g = g + h["weight_decay"] * p
        d = g
        if mu != 0:  # 3.
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.clone()
            else:
                st["momentum_buffer"] = mu * st["momentum_buffer"] + (1 - h["dampening"]) * g
            b = st["momentum_buffer"]
            d = g + mu * b if h["nesterov"] else b
        if h["caution"]:
            d = cautious(d, g, h["caution_norm"])
        p.sub_(h["lr"] * d)  # 4.
