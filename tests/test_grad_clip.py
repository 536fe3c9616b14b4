"""``grad_clip=`` on every optimizer: ZClip, AdaGC (a factor per tensor) or a max global norm applied
inside the native step. Equal to the stand-alone clipper followed by the same optimizer, bit for bit
in fp32 and fp64; ``p.grad`` is never written; the clipper's statistics are in the optimizer's
state dict and resume exactly; AMP clips the unscaled norms and a skipped step changes no
statistics; bad input is refused."""

from __future__ import annotations

import copy

import emafuse
import pytest
import torch
from helpers import ODD_SHAPES, make_params, set_grads, spiky_grads
from registry import ENTRIES

ZCLIP = dict(warmup_steps=3, z_thresh=1.5, max_grad_norm=40.0, alpha=0.9)
# A warm-up whose global cap clips, then per-tensor clipping on the spikes of steps 5 and 8.
ADAGC = dict(warmup_steps=4, lambda_abs=30.0, beta=0.9)

#: Each clipper as ``grad_clip=`` takes it (a fresh one per call).
CLIPPERS = {"ZClip": lambda: emafuse.ZClip(**ZCLIP), "AdaGC": lambda: emafuse.AdaGC(**ADAGC)}


def grads_for(params, t):
    """Spiky gradients whose global norm jumps at steps 5 and 8 (ZClip's spikes)."""
    grads = spiky_grads(params, t, seed=3)
    return [g * (8.0 if t in (5, 8) else 1.0) for g in grads]


def step(opt, t):
    if isinstance(opt, (emafuse.Momo, emafuse.MomoAdam)):
        return opt.step(loss=1.0 / (1 + t))
    return opt.step()


# Every registry optimizer in its main configuration, and the two that take the loss.
OPTIMIZERS = [pytest.param(e.cls, e.main, id=e.name) for e in ENTRIES] + [
    pytest.param(emafuse.Momo, {}, id="Momo"),
    pytest.param(emafuse.MomoAdam, {}, id="MomoAdam"),
]


@pytest.mark.parametrize("clipper", CLIPPERS)
@pytest.mark.parametrize("cls, main", OPTIMIZERS)
def test_clipping_inside_the_step_equals_clipping_before_it(cls, main, clipper):
    """10 fp32 steps with spikes, ``grad_clip=ZClip`` (``AdaGC``) against ``ZClip.step(params)``
    then the optimizer without it: the same parameters, bit for bit, and the same statistics; the
    gradients are not written."""
    params = make_params(ODD_SHAPES, seed=1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    inside = CLIPPERS[clipper]()
    ours = cls(params, **main, grad_clip=inside)
    theirs, before = cls(twins, **main), CLIPPERS[clipper]()
    for t in range(10):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(twins, grads)
        step(ours, t)
        before.step(twins)
        step(theirs, t)
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "p.grad was written"
    # Adan's own max_grad_norm reads the global norm of the clipped gradients: the product of
    # two norms here, of the rounded clipped gradients there (to round-off).
    exact = not (cls is emafuse.Adan and main.get("max_grad_norm", 0.0) > 0.0)
    for p, q in zip(params, twins):
        if exact:
            assert torch.equal(p, q), (p - q).abs().max()
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ours.param_groups[0]["grad_clip"] is inside
    assert inside.state_dict() == before.state_dict()
    if clipper == "ZClip":
        assert inside.initialized
    else:
        # the warm-up clipped every tensor, and some after it
        assert inside.num_steps == 10 and len(inside.gamma) == len(params)


def test_max_norm_equals_clip_grad_norm():
    """``grad_clip=max_norm``: ``torch.nn.utils.clip_grad_norm_`` inside the step (its norm is
    summed in float64 here: the coefficient agrees to round-off)."""
    params = make_params(ODD_SHAPES, seed=4)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = emafuse.AdamW(params, lr=1e-2, grad_clip=2.0), torch.optim.AdamW(twins, lr=1e-2)
    for t in range(6):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(twins, grads)
        ours.step()
        torch.nn.utils.clip_grad_norm_(twins, 2.0)
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clipper", CLIPPERS)
def test_statistics_resume_exactly(clipper):
    """The clipper's statistics travel in the state dict (every param group holds it) and a
    resumed run continues bit for bit; the resumed optimizer clips with the loaded statistics."""
    params = make_params(ODD_SHAPES, seed=5)
    opt = emafuse.Lion(params, lr=1e-3, grad_clip=CLIPPERS[clipper]())
    for t in range(5):
        set_grads(params, grads_for(params, t))
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = emafuse.Lion(copies, lr=1e-3, grad_clip=CLIPPERS[clipper]())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["grad_clip"].state_dict() == opt.param_groups[0]["grad_clip"].state_dict()
    for t in range(5, 10):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(copies, grads)
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    assert resumed.param_groups[0]["grad_clip"].state_dict() == opt.param_groups[0]["grad_clip"].state_dict()


@pytest.mark.parametrize("clipper", CLIPPERS)
def test_amp_clips_the_unscaled_norm_and_skips_without_a_trace(clipper):
    """With GradScaler's ``grad_scale`` the norms are of the unscaled gradients (the same decisions
    and parameters as without scaling, to the scale's exact powers of two); ``.grad`` is stored
    back unscaled, not clipped. A found-inf step changes neither the parameters nor the statistics."""
    params = make_params(ODD_SHAPES[:4], seed=6)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = emafuse.AdamW(params, grad_clip=CLIPPERS[clipper]()), emafuse.AdamW(twins, grad_clip=CLIPPERS[clipper]())
    for t in range(8):
        grads = grads_for(params, t)
        set_grads(params, [g * 1024 for g in grads])
        set_grads(twins, grads)
        ours.grad_scale, ours.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        ours.step()
        theirs.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "the stored-back gradient is the unscaled one, not the clipped one"
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    clip = ours.param_groups[0]["grad_clip"]
    stats, values = clip.state_dict(), [p.detach().clone() for p in params]
    set_grads(params, [torch.full_like(p, float("inf")) for p in params])
    ours.found_inf = torch.tensor(1.0)
    ours.step()
    assert clip.state_dict() == stats
    assert all(torch.equal(p, v) for p, v in zip(params, values))


@pytest.mark.parametrize("clipper", CLIPPERS)
def test_a_refused_step_keeps_the_statistics(clipper):
    params = make_params(ODD_SHAPES[:3], seed=7)
    opt = emafuse.AdamW(params, grad_clip=CLIPPERS[clipper](), check_finite=True)
    set_grads(params, grads_for(params, 0))
    opt.step()
    stats = opt.param_groups[0]["grad_clip"].state_dict()
    grads = grads_for(params, 1)
    grads[1][0] = float("nan")
    set_grads(params, grads)
    with pytest.raises(emafuse.NonFiniteError):
        opt.step()
    assert opt.param_groups[0]["grad_clip"].state_dict() == stats


def test_bad_grad_clip_is_refused():
    params = make_params([(3,)])
    for bad in (-1.0, 0.0, float("inf"), "1.0", True):
        with pytest.raises(ValueError, match=r"grad_clip must be None, a max norm > 0, emafuse\.ZClip\(\.\.\.\) or emafuse\.AdaGC"):
            emafuse.AdamW(params, grad_clip=bad)
    opt = emafuse.AdamW(params, grad_clip=emafuse.ZClip())
    with pytest.raises(ValueError, match="grad_clip is optimizer-wide"):
        opt.add_param_group({"params": make_params([(2,)]), "grad_clip": 1.0})
    assert len(opt.param_groups) == 1
    sgd = emafuse.SGD([torch.nn.Parameter(torch.randn(4, 3))], lr=0.1, grad_clip=1.0)
    sgd.param_groups[0]["params"][0].grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(emafuse.SparseGradError, match="grad_clip needs dense gradients"):
        sgd.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adagc_keys_its_statistics_by_state_dict_index(dtype):
    """``grad_clip=AdaGC`` over two param groups, with parameters that have no gradient at some
    steps: :math:`\\gamma_i` is keyed by the parameter's index in the state dict (its position over
    all groups), those without a gradient keep theirs, and the result equals ``AdaGC.step`` over
    the same flat list followed by the optimizer: bit for bit in fp32 and fp64; in bf16 the fused
    step multiplies the bf16 gradient by its factor in fp32 where the stand-alone clip rounds the
    product to bf16 first (to bf16 round-off)."""
    shapes = [(3,), (4097,), (7, 5), (1,), (3, 4, 2)]
    params = make_params(shapes, dtype=dtype, seed=8)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]
    inside = emafuse.AdaGC(**ADAGC)
    ours = emafuse.AdamW(groups(params), lr=1e-2, weight_decay=0.1, grad_clip=inside)
    theirs, before = emafuse.AdamW(groups(twins), lr=1e-2, weight_decay=0.1), emafuse.AdaGC(**ADAGC)
    for t in range(9):
        grads = [None if (i + t) % 4 == 0 else g.to(dtype) for i, g in enumerate(grads_for(params, t))]
        set_grads(params, grads)
        set_grads(twins, grads)
        ours.step()
        before.step(twins)
        theirs.step()
        for p, g in zip(params, grads):
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    for p, q in zip(params, twins):
        if dtype == torch.bfloat16:
            torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(p, q), (p - q).abs().max()
    assert sorted(inside.gamma) == list(range(len(params))) == sorted(ours.state_dict()["state"])
    assert inside.state_dict() == before.state_dict()  # (the same native norms in every dtype)


def test_adagc_nonfinite_reference_factor_is_refused():
    """``AdaGC(nonfinite="reference")`` on a NaN gradient norm makes a NaN factor: the step
    refuses it (nothing updated, statistics kept) instead of writing NaN into every parameter;
    the default ``"skip"`` steps the gradients unclipped and keeps the statistics."""
    params = make_params(ODD_SHAPES[:3], seed=9)
    opt = emafuse.AdamW(params, grad_clip=emafuse.AdaGC(warmup_steps=2, nonfinite="reference"))
    set_grads(params, grads_for(params, 0))
    opt.step()
    stats, values = opt.param_groups[0]["grad_clip"].state_dict(), [p.detach().clone() for p in params]
    grads = grads_for(params, 1)
    grads[1][0] = float("nan")
    set_grads(params, grads)
    with pytest.raises(emafuse.NonFiniteError, match="nonfinite='skip'"):
        opt.step()
    assert opt.param_groups[0]["grad_clip"].state_dict() == stats
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    skip = emafuse.AdamW(params, grad_clip=emafuse.AdaGC(warmup_steps=2))
    skip.step()
    assert skip.param_groups[0]["grad_clip"].num_steps == 0
