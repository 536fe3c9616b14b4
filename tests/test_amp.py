"""torch.amp.GradScaler with every optimizer: the scale is undone inside the native step, an
overflowing step changes nothing, unscale_ before the step (gradient clipping) works, and the
whole loop matches the official implementation under the same scaler."""

from __future__ import annotations

import copy

import emafuse
import pytest
import torch
from helpers import assert_close, assert_same_state_dict, tiny_model
from registry import entries, official_mains, quiet


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 13, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("entry", entries())
def test_grad_scaler_unscales_exactly_and_skips_inf_steps(entry):
    """A power-of-two loss scale (growing every 3 steps) is undone exactly in the kernel: the run
    equals an unscaled one bit for bit, counters included; an overflowing step changes nothing
    (parameters, state, counters, ``.grad``); after an applied step ``.grad`` holds the unscaled
    gradient, as torch's fused optimizers leave it."""
    a, b = tiny_model(0), tiny_model(0)
    oa, ob = entry.cls(a.parameters(), **entry.main), entry.cls(b.parameters(), **entry.main)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for step, (x, y) in enumerate(batches(10)):
        oa.zero_grad()
        scaler.scale(loss_of(a, x, y)).backward()
        if step == 4:  # an overflow: this step must be skipped entirely
            next(a.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in a.parameters()], copy.deepcopy(oa.state_dict())
        scale = scaler.get_scale()
        grads = [p.grad.clone() for p in a.parameters()]
        scaler.step(oa)
        scaler.update()
        expected = grads if step == 4 else [g / scale for g in grads]
        assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), expected)), ".grad is not what torch's fused step leaves"
        if step == 4:
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before[0]))
            assert_same_state_dict(oa.state_dict(), before[1], "skipped step")
            continue
        ob.zero_grad()
        loss_of(b, x, y).backward()
        ob.step()
    assert 2.0**10 < scaler.get_scale() < 2.0**10 * 2**3  # it grew, and was halved once
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert_same_state_dict(oa.state_dict(), ob.state_dict(), "scaled run")


@pytest.mark.parametrize("entry", entries())
def test_unscale_before_step_for_gradient_clipping(entry):
    """``scaler.unscale_`` then clipping then ``scaler.step``: as an unscaled run with the same
    clipping, bit for bit."""
    a, b = tiny_model(3), tiny_model(3)
    oa, ob = entry.cls(a.parameters(), **entry.main), entry.cls(b.parameters(), **entry.main)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for x, y in batches(3, seed=2):
        oa.zero_grad()
        scaler.scale(loss_of(a, x, y)).backward()
        scaler.unscale_(oa)
        torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        scaler.step(oa)
        scaler.update()
        ob.zero_grad()
        loss_of(b, x, y).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("entry, official", official_mains())
def test_grad_scaler_loop_matches_official(entry, official):
    """The same scaled loop (12 steps, one overflow) with the official implementation: the same
    scale, the skipped step does not count, parameters to round-off."""
    a, b = tiny_model(0), tiny_model(0)
    oa, ob = entry.cls(a.parameters(), **entry.main), official.make(b.parameters(), entry.main)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    with quiet():
        for step, (x, y) in enumerate(batches(12)):
            for model, opt, scaler in [(a, oa, sa), (b, ob, sb)]:
                opt.zero_grad()
                scaler.scale(loss_of(model, x, y)).backward()
                if step == 5:
                    next(model.parameters()).grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
    assert sa.get_scale() == sb.get_scale()
    for name, value in oa.state[next(a.parameters())].items():
        theirs = ob.state[next(b.parameters())].get(name)
        if name == "step" and theirs is not None:
            assert float(value) == float(theirs) == 11  # the skipped step did not count
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, rtol=official.rtol, atol=official.atol, what="param")


@pytest.mark.parametrize("cls, theirs", [(emafuse.AdamW, torch.optim.AdamW), (emafuse.Adam, torch.optim.Adam), (emafuse.SGD, torch.optim.SGD)])
def test_grads_after_a_scaled_step_are_what_torch_fused_leaves(cls, theirs):
    """``.grad`` after ``scaler.step``: unscaled after an applied step, untouched (still scaled)
    after a skipped one, for emafuse as for torch's fused CPU kernels (checked on both)."""
    kw = dict(lr=1e-2, momentum=0.9) if cls is emafuse.SGD else dict(lr=1e-2)
    for make in (lambda ps: cls(ps, **kw), lambda ps: theirs(ps, fused=True, **kw)):
        model = tiny_model(5)
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        for step, (x, y) in enumerate(batches(6, seed=4)):
            opt.zero_grad()
            scaler.scale(loss_of(model, x, y)).backward()
            if step == 3:
                next(model.parameters()).grad[0, 0] = float("inf")
            scale, grads = scaler.get_scale(), [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            expected = grads if step == 3 else [g / scale for g in grads]
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected)), (type(opt), step)
