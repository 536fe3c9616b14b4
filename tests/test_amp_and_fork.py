"""torch.amp.GradScaler inside the native step, and fork safety of the worker pool."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

import emafuse
from helpers import assert_close


def tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


@pytest.mark.parametrize("ours_cls, torch_cls, kw", [
    (emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
])
def test_grad_scaler_matches_torch_fused_and_skips_inf_steps(ours_cls, torch_cls, kw):
    a, b = tiny_model(0), tiny_model(0)
    oa, ob = ours_cls(a.parameters(), **kw), torch_cls(b.parameters(), fused=True, **kw)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        x, y = torch.randn(16, 13, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, opt, scaler in [(a, oa, sa), (b, ob, sb)]:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step == 5:  # an overflow: this step must be skipped entirely
                next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            grads_before = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            if opt is oa:
                assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), grads_before)), ".grad was written"
                if step == 5:
                    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            scaler.update()
    assert sa.get_scale() == sb.get_scale()
    if "step" in oa.state[next(a.parameters())]:
        assert oa.state[next(a.parameters())]["step"].item() == 11  # the skipped step did not count
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_unscale_before_step_for_gradient_clipping():
    a, b = tiny_model(3), tiny_model(3)
    oa, ob = emafuse.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(8, 13), torch.randint(0, 3, (8,))
    for model, opt, scaler in [(a, oa, sa), (b, ob, sb)]:
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6)


def _child_step(conn):
    try:
        # As DataLoader workers do: torch's own OpenMP team does not survive fork (GNU OpenMP
        # hangs in the child otherwise, with or without emafuse).
        torch.set_num_threads(1)
        ps = [torch.nn.Parameter(torch.randn(200_000)) for _ in range(4)]
        opt = emafuse.AdamW(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        conn.send(("ok", emafuse.num_threads()))
    except Exception as e:  # pragma: no cover - reported to the parent
        conn.send(("error", repr(e)))


def test_pool_survives_fork():
    """DataLoader workers fork; a step in the child must not hang on the parent's pool."""
    ps = [torch.nn.Parameter(torch.randn(300_000)) for _ in range(4)]
    opt = emafuse.AdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # the parent's pool is running now
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_step, args=(child,))
    proc.start()
    assert parent.poll(120), "the forked child hung"
    status, detail = parent.recv()
    proc.join(30)
    assert status == "ok", detail
    opt.step()  # and the parent's pool still works


def test_dataloader_workers_with_emafuse_in_the_parent():
    ps = [torch.nn.Parameter(torch.randn(100_000))]
    opt = emafuse.AdamW(ps)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2, multiprocessing_context="fork")
    for (batch,) in loader:
        ps[0].grad = torch.randn_like(ps[0])
        opt.step()
    assert opt.state[ps[0]]["step"].item() == 8
