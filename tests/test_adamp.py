"""AdamP beyond the registry's generic comparisons: each view of the projection chosen on purpose and
compared with the official ``adamp.AdamP`` and the float64 reference, weights whose rows are not
laid out row-major, 8-bit state, and the sums the engine reports."""

from __future__ import annotations

import adamp
import emafuse
import pytest
import torch
from emafuse import _native
from references.adamp import RefAdamP

# (delta, how the weights relate to the gradients, the view that projects at step 1)
# 10: any tensor projects per channel; 1.5 with rows alternately along and against the gradient:
# every row's cosine is about 1 but they cancel over the layer; 0.1 with weights along the
# gradient: neither view.
VIEWS = [(10.0, "unlike", "channel"), (1.5, "alternating", "layer"), (0.1, "along", None)]


def _weights(g: torch.Tensor, how: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if how == "unlike":
        return torch.randn(g.shape, generator=gen, dtype=g.dtype)
    sign = torch.ones(g.shape[0], dtype=g.dtype)
    if how == "alternating":
        sign[1::2] = -1
    return g * sign.view(-1, *([1] * (g.dim() - 1))) + 0.01 * torch.randn(g.shape, generator=gen, dtype=g.dtype)


def _view(p: torch.Tensor, g: torch.Tensor, delta: float, eps: float = 1e-8) -> str | None:
    """The view AdamP projects in at step 1 (spec §9 (d)), from the weights and gradient."""
    for name, rows in (("channel", p.shape[0]), ("layer", 1)):
        pv, gv = p.reshape(rows, -1).double(), g.reshape(rows, -1).double()
        cos = (pv * gv).sum(1).abs() / (pv.norm(dim=1).clamp(min=eps) * gv.norm(dim=1).clamp(min=eps))
        if cos.max().item() < delta / pv.shape[1] ** 0.5:
            return name
    return None


@pytest.mark.official
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("delta, how, view", VIEWS, ids=[str(v) for _, _, v in VIEWS])
def test_each_view_matches_the_official_and_the_reference(delta, how, view, nesterov, dtype):
    gen = torch.Generator().manual_seed(1)
    # pairs of equal gradient rows, so that alternating weights cancel exactly over the layer
    grads = [torch.randn(shape, generator=gen, dtype=dtype).repeat_interleave(2, dim=0) for shape in ((3, 4, 3, 3), (5, 13))]
    grads.append(torch.randn(9, generator=gen, dtype=dtype))
    start = [_weights(grads[0], how), _weights(grads[1], how), torch.randn(9, generator=gen, dtype=dtype)]
    assert _view(start[0], grads[0], delta) == view and _view(start[1], grads[1], delta) == view
    # the same gradients, slightly perturbed at each step
    steps = [[g + 0.01 * k * torch.randn(g.shape, generator=gen, dtype=dtype) for g in grads] for k in range(6)]
    kw = dict(lr=1e-2, weight_decay=0.1, delta=delta, nesterov=nesterov)
    ours, theirs, plain = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(3))
    opts = [emafuse.AdamP(ours, **kw), adamp.AdamP(theirs, **kw), torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)]
    ref = RefAdamP(start, **kw)
    for gs in steps:
        for ps, opt in zip((ours, theirs, plain), opts):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        ref.step(gs)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b, r in zip(ours, theirs, ref.params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol)
        torch.testing.assert_close(a.detach().double(), r, rtol=rtol, atol=rtol)
    # without a projection AdamP's step is AdamW's (not nesterov); a projected one differs
    if view is None and not nesterov:
        torch.testing.assert_close(ours[0].detach(), plain[0].detach(), rtol=rtol, atol=rtol)
    elif view is not None:
        assert not torch.allclose(ours[0].detach(), plain[0].detach(), rtol=1e-3, atol=1e-4)


def test_rows_are_dim0_slices_whatever_the_memory_layout():
    """A channels_last kernel and a transposed matrix (rows interleaved in memory: stepped through a
    contiguous copy) step as their row-major copies, and stay in their layout."""
    gen = torch.Generator().manual_seed(2)
    conv = torch.randn(8, 5, 3, 3, generator=gen)
    mat = torch.randn(11, 7, generator=gen)
    grads = [torch.randn(8, 5, 3, 3, generator=gen), torch.randn(11, 7, generator=gen)]
    laid = [torch.nn.Parameter(conv.clone().to(memory_format=torch.channels_last)), torch.nn.Parameter(mat.t().contiguous().t())]
    plain = [torch.nn.Parameter(conv.clone()), torch.nn.Parameter(mat.clone())]
    assert laid[0].is_contiguous(memory_format=torch.channels_last) and laid[1].stride() == (1, 11)
    kw = dict(lr=1e-2, weight_decay=0.1, delta=10.0)
    opt_laid, opt_plain, ref = emafuse.AdamP(laid, **kw), emafuse.AdamP(plain, **kw), RefAdamP([conv, mat], **kw)
    for _ in range(4):
        for p, q, g in zip(laid, plain, grads):
            p.grad = g.clone().to(memory_format=torch.channels_last) if p.dim() == 4 else g.t().contiguous().t()
            q.grad = g.clone()
        opt_laid.step()
        opt_plain.step()
        ref.step(grads)
    assert laid[0].is_contiguous(memory_format=torch.channels_last) and laid[1].stride() == (1, 11)
    for a, b, r in zip(laid, plain, ref.params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.detach().double(), r, rtol=1e-5, atol=1e-6)


def test_eight_bit_state_only_where_rows_are_whole_blocks():
    gen = torch.Generator().manual_seed(3)
    shapes = ((32, 512), (64, 100), (5000,))
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    lean = [torch.nn.Parameter(p.clone()) for p in start]
    full = [torch.nn.Parameter(p.clone()) for p in start]
    kw = dict(lr=1e-2, weight_decay=0.1, delta=10.0)
    opt_lean, opt_full = emafuse.AdamP(lean, state_dtype="8bit", **kw), emafuse.AdamP(full, **kw)
    for _ in range(3):
        for ps in (lean, full):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt_lean.step()
        opt_full.step()
    dtypes = [opt_lean.state[p]["exp_avg"].dtype for p in lean]
    assert dtypes == [torch.uint8, torch.float32, torch.uint8]
    # the matrix whose rows are not whole blocks keeps float32 state and steps as without 8-bit
    assert torch.equal(lean[1], full[1])
    # 8-bit moments: the same steps up to their quantization (an element whose tiny v rounds to a
    # code of 0 steps up to a few lr further)
    for p, q in zip(lean, full):
        diff = (p - q).detach().abs()
        assert diff.max() <= 3 * kw["lr"] and diff.mean() <= 5e-4, (diff.max(), diff.mean())


def test_sums_are_gathered_per_row_in_one_pass():
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False)
    # pass 0 gathers nothing (skipped); the fifth sum is the largest row cosine
    assert _native.rule_sums("adamp", hyper) == [(1, False)] * 4 + [(1, True), (1, False)]


def test_orthograd_and_caution_are_not_taken():
    p = torch.nn.Parameter(torch.randn(3, 4))
    for kw in (dict(orthograd=True), dict(caution=True)):
        with pytest.raises(TypeError):
            emafuse.AdamP([p], **kw)
