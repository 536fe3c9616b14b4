"""Adafactor beyond the registry's generic comparisons: matrices with batch and unit dimensions,
the state laid out as torch's, ε1's default taken from the group's first parameter, weights not laid
out row-major, empty parameters, and factored state that does not fit its parameter."""

from __future__ import annotations

import emafuse
import pytest
import torch
from helpers import make_params, run_steps, set_grads
from references.adafactor import RefAdafactor

# Matrices with batch dimensions, single rows and columns, a conv kernel, vectors and a scalar;
# and matrices the engine's work items cut (it adds their rows' and columns' sums across items):
# long rows, many matrices of 129 × 65, short rows.
SHAPES = [(9, 13), (1, 17), (11, 1), (3, 4, 5), (2, 1, 6), (4, 3, 3, 3), (7,), (1,), (), (300, 517), (5, 129, 65), (40000, 3)]


def _pair(shapes, dtype, **kw):
    ours, theirs = make_params(shapes, dtype, seed=3), make_params(shapes, dtype, seed=3)
    return ours, theirs, emafuse.Adafactor(ours, **kw), torch.optim.Adafactor(theirs, foreach=False, **kw)


@pytest.mark.official
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(lr=0.3, eps=(1e-30, 1e-3), d=1.5, weight_decay=0.1)], ids=["defaults", "clipped"])
def test_every_shape_matches_torch_and_the_reference(dtype, kw):
    ours, theirs, opt, ref_opt = _pair(SHAPES, dtype, **kw)
    ref = RefAdafactor(ours, **kw)
    # fp32: torch's norms are float32 reductions in another order (the factors differ by ~1e-6)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-5, 5e-6)
    for t in range(8):
        # gradients of several magnitudes, so that both floors (ε1², RMS clipping) are reached
        run_steps(opt, ours, 1, seed=t, scale=10.0 ** -(t % 4), first=t)
        run_steps(ref_opt, theirs, 1, seed=t, scale=10.0 ** -(t % 4), first=t)
        ref.step([p.grad for p in ours])
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"shape {SHAPES[i]}")
        torch.testing.assert_close(p.double(), ref.params[i], rtol=rtol, atol=atol, msg=f"shape {SHAPES[i]}")
        mine, torch_state = opt.state[p], ref_opt.state[q]
        assert set(mine) == set(torch_state), SHAPES[i]
        for key, v in torch_state.items():
            assert mine[key].shape == v.shape and mine[key].dtype == v.dtype, (SHAPES[i], key)
            torch.testing.assert_close(mine[key], v, rtol=rtol, atol=1e-12, msg=f"{SHAPES[i]} {key}")


@pytest.mark.official
def test_eps1_default_is_the_first_parameters_machine_epsilon():
    """torch takes ε1 = finfo(dtype).eps of the group's first parameter stepped, for the whole group:
    a bf16 parameter first floors V̂ of a float32 one at (7.8e-3)², which gradients of 1e-3 reach."""
    first = make_params([(5,)], torch.bfloat16, seed=1)
    mats = make_params([(6, 7), (8,)], torch.float32, seed=2)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in first + mats]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in first + mats]
    opt, ref = emafuse.Adafactor(ours), torch.optim.Adafactor(theirs, foreach=False)
    for t in range(4):
        for o in (opt, ref):
            ps = ours if o is opt else theirs
            run_steps(o, ps, 1, seed=t, scale=1e-3, first=t)
    for p, q in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7)
    # and the floor made a difference: float32's own epsilon gives another trajectory
    alone = [torch.nn.Parameter(p.detach().clone()) for p in mats]
    run_steps(torch.optim.Adafactor(alone, foreach=False), alone, 4, seed=0, scale=1e-3)
    assert not torch.allclose(alone[0], theirs[1], rtol=1e-4)


def test_weights_in_another_memory_format_step_as_contiguous_ones():
    conv = make_params([(8, 3, 5, 5)], seed=4)[0]
    last = torch.nn.Parameter(conv.detach().clone().to(memory_format=torch.channels_last))
    plain = torch.nn.Parameter(conv.detach().clone())
    opts = [emafuse.Adafactor([last], weight_decay=0.1), emafuse.Adafactor([plain], weight_decay=0.1)]
    for t in range(3):
        g = torch.randn(conv.shape, generator=torch.Generator().manual_seed(t))
        last.grad, plain.grad = g.to(memory_format=torch.channels_last), g.clone()
        for o in opts:
            o.step()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last, plain)
    for key in ("row_var", "col_var"):
        assert torch.equal(opts[0].state[last][key], opts[1].state[plain][key])


def test_empty_parameters_step_beside_others():
    """torch divides by numel (ZeroDivisionError on an empty parameter); emafuse leaves empty ones
    as they are (their step counts) and steps the others as torch does."""
    shapes = [(0, 5), (3, 0, 4), (0,), (6, 4)]
    ps = make_params(shapes, seed=5)
    theirs = make_params(shapes[-1:], seed=5)
    theirs[0].data.copy_(ps[-1])
    opt, ref = emafuse.Adafactor(ps), torch.optim.Adafactor(theirs, foreach=False)
    for t in range(3):
        set_grads(ps, [torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) for p in ps])
        theirs[0].grad = ps[-1].grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ps[-1], theirs[0], rtol=2e-5, atol=1e-7)
    assert opt.state[ps[0]]["col_var"].shape == (1, 5) and torch.equal(opt.state[ps[0]]["col_var"], torch.zeros(1, 5))
    assert all(opt.state[p]["step"].item() == 3 for p in ps)


def test_factored_state_that_does_not_fit_its_parameter_is_refused():
    ps = make_params([(6, 4), (5,)], seed=6)
    opt = emafuse.Adafactor(ps)
    run_steps(opt, ps, 1)
    before = [p.detach().clone() for p in ps]
    variance = opt.state[ps[1]]["variance"].clone()
    opt.state[ps[0]]["col_var"] = torch.ones(1, 5)
    steps = [opt.state[p]["step"].item() for p in ps]
    set_grads(ps, [torch.randn(p.shape) for p in ps])
    with pytest.raises(emafuse.ShapeError, match=r"state 'col_var' has shape \[1, 5\] but a parameter of shape \[6, 4\] needs \[1, 4\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)), "nothing is updated"
    assert [opt.state[p]["step"].item() for p in ps] == steps
    assert torch.equal(opt.state[ps[1]]["variance"], variance)


def test_the_step_is_reproducible_and_leaves_grad_alone():
    """Two optimizers on the same data agree bit for bit (the row and column sums are folded in a
    fixed order), and ``.grad`` is not written."""
    shapes = [(300, 517), (4, 129, 65), (33,)]
    a, b = make_params(shapes, seed=7), make_params(shapes, seed=7)
    opts = [emafuse.Adafactor(a, weight_decay=0.05), emafuse.Adafactor(b, weight_decay=0.05)]
    for t in range(3):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) for p in a]
        set_grads(a, [g.clone() for g in grads])
        set_grads(b, [g.clone() for g in grads])
        for o in opts:
            o.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(a, grads))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
