"""LR schedulers and tensor learning rates with every optimizer: the step reads the group's
current lr, as the float64 reference and the official implementation do."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_SHAPES, assert_close, clone_params, make_params, random_grads, set_grads
from registry import entries, official_mains, quiet


def lr_of(kw):
    return kw.get("lr", 1e-2)


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR, cycling beta1 or the momentum too where the optimizer has one (Adafactor has
    neither: torch refuses cycle_momentum for it)."""
    cycles = any(k in opt.defaults for k in ("momentum", "betas"))
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, cycle_momentum=cycles)


@pytest.mark.parametrize("entry", entries())
def test_scheduler_and_tensor_lr_follow_the_reference(entry):
    """fp64, lr a 0-dim tensor, OneCycleLR changing it (and beta1 or the momentum) every step:
    the float64 reference fed the same values, to fp64 round-off."""
    kw = {k: v for k, v in entry.main.items() if k != "lr"}
    lr = lr_of(entry.main)
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=27)
    opt = entry.cls(params, lr=torch.tensor(lr, dtype=torch.float64), **kw)
    ref = entry.reference(params, lr=lr, **kw)
    sched = one_cycle(opt, 5 * lr, 30)
    lrs = set()
    for t in range(30):
        grads = random_grads(params, t, seed=16)
        set_grads(params, grads)
        ref.follow(opt.param_groups[0])
        ref.step(grads)
        opt.step()
        lrs.add(float(opt.param_groups[0]["lr"]))
        sched.step()
    assert len(lrs) > 20 and isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-10, atol=1e-12, what="param")


@pytest.mark.parametrize("entry, official", official_mains())
def test_scheduler_matches_official(entry, official):
    """fp32, OneCycleLR on both: the same trajectory (AdaBound's bounds follow the scheduler's
    ratio to the initial lr, Lion's lr-independent decay the initial lr, as in the officials)."""
    params = make_params(SMALL_SHAPES, seed=15)
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    lr = lr_of(entry.main)
    s1, s2 = one_cycle(ours, 5 * lr, 40), one_cycle(theirs, 5 * lr, 40)
    with quiet():
        for t in range(40):
            grads = random_grads(params, t, seed=5)
            set_grads(params, grads)
            set_grads(theirs_p, grads)
            ours.step()
            theirs.step()
            s1.step()
            s2.step()
    for p, q in zip(params, theirs_p):
        assert_close(p, q, rtol=official.rtol, atol=official.atol, what="param")
