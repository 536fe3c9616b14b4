"""⊥Grad (``orthograd=True``) on every optimizer that takes it. The float64 references cover it
through the registry (each entry's main configuration with orthograd is one of its
configurations: spec parity in every dtype, state dicts, FSDP2); here: pytorch_optimizer's
``OrthoGrad`` wrapper as the official, the geometry of the projected step, the one-element
decision, the untouched ``.grad``, GradScaler, and the refused combinations."""

from __future__ import annotations

import dataclasses

import emafuse
import lion_pytorch
import pytest
import pytorch_optimizer
import test_amp
import torch
from helpers import assert_close, make_params, random_grads, set_grads
from registry import entries, orthograd_config

# No one-element tensor: pytorch_optimizer zeroes the gradient of those, emafuse keeps it (below).
SHAPES = [(3,), (7, 5), (3, 4, 2), (33, 17), (4097,)]

OFFICIALS = [
    pytest.param(emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0), dict(foreach=False), id="AdamW"),
    pytest.param(emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(foreach=False), id="AdamW-amsgrad"),
    pytest.param(emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True), dict(foreach=False), id="SGD"),
    pytest.param(emafuse.Lion, lion_pytorch.Lion, dict(lr=1e-3, weight_decay=0.1), {}, id="Lion"),
]


@pytest.mark.official
@pytest.mark.parametrize("ours, base, kw, extra", OFFICIALS)
def test_matches_pytorch_optimizers_orthograd_wrapper(ours, base, kw, extra):
    """60 fp32 steps against ``pytorch_optimizer.OrthoGrad`` around the torch / official class
    (the spec names kozistr's wrapper as matching the official ⊥Grad code)."""
    params = make_params(SHAPES, seed=4)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ours(params, orthograd=True, **kw)
    ref = pytorch_optimizer.OrthoGrad(base(theirs, **kw, **extra))
    for t in range(60):
        grads = random_grads(params, t, seed=6)
        set_grads(params, grads)
        set_grads(theirs, [g.clone() for g in grads])
        opt.step()
        ref.step()
    for p, q in zip(params, theirs):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what=str(tuple(p.shape)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_step_is_orthogonal_to_the_parameter_and_keeps_the_gradient_norm(dtype):
    """Plain SGD with lr = 1 moves each parameter by exactly its transformed gradient: orthogonal
    to the parameter, with the gradient's norm (rescaled) or the projection's (paper form)."""
    for rescale in (True, False):
        params = make_params(SHAPES, dtype=dtype, seed=8)
        before = [p.detach().clone().double() for p in params]
        grads = random_grads(params, 0, seed=9)
        set_grads(params, grads)
        emafuse.SGD(params, lr=1.0, orthograd=True, orthograd_rescale=rescale).step()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for p, w, g in zip(params, before, grads):
            step, w, u = (w - p.detach().double()).reshape(-1), w.reshape(-1), g.double().reshape(-1)
            assert abs(float(step @ w)) <= tol * float(step.norm() * w.norm())
            perp = u - (u @ w) / (w @ w) * w
            norm = u.norm() if rescale else perp.norm()
            assert float(step.norm()) == pytest.approx(float(norm), rel=tol)


def test_one_element_tensors_keep_their_gradient():
    """Decision (spec §19 (h)): a one-element parameter steps with its own gradient, so its
    trajectory is the one without orthograd, while the others in its group are projected."""
    shapes = [(1,), (5, 3), (1, 1)]
    a, b = make_params(shapes, seed=2), make_params(shapes, seed=2)
    oa, ob = emafuse.AdamW(a, lr=1e-2, orthograd=True), emafuse.AdamW(b, lr=1e-2)
    for t in range(5):
        grads = random_grads(a, t)
        set_grads(a, grads)
        set_grads(b, [g.clone() for g in grads])
        oa.step()
        ob.step()
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("entry", entries(lambda e: e.takes_orthograd))
def test_grad_is_left_as_it_was(entry):
    params = make_params(SHAPES, seed=3)
    opt = entry.cls(params, **orthograd_config(entry))
    for t in range(3):
        grads = random_grads(params, t)
        set_grads(params, [g.clone() for g in grads])
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("entry", entries(lambda e: e.takes_orthograd))
def test_grad_scaler_with_orthograd(entry):
    """The projection is linear in the gradient and the rescale does not depend on its scale: a
    power-of-two loss scale is still undone exactly (the GradScaler test, with orthograd)."""
    test_amp.test_grad_scaler_unscales_exactly_and_skips_inf_steps(dataclasses.replace(entry, main=orthograd_config(entry)))


def test_refused_combinations_say_what_to_do():
    params = make_params([(3, 2)])
    with pytest.raises(emafuse.UnsupportedOptionError, match="orthograd=True cannot be combined with caution=True"):
        emafuse.Lion(params, caution=True, orthograd=True)
    opt = emafuse.Lion(params, orthograd=True)
    with pytest.raises(emafuse.UnsupportedOptionError, match="caution=True"):
        opt.add_param_group(dict(params=make_params([(4,)]), caution=True))
    with pytest.raises(emafuse.UnsupportedOptionError, match="SGDSaI does not take orthograd=True"):
        emafuse.SGDSaI([dict(params=params, orthograd=True)])
    with pytest.raises(TypeError, match="orthograd must be a bool"):
        emafuse.AdamW(params, orthograd="yes")
    with pytest.raises(TypeError):
        emafuse.SGDSaI(params, orthograd=True)


def test_a_group_can_turn_it_on_alone():
    """``orthograd`` is a param-group option: a group with it projects, the other does not."""
    a, b = make_params([(6, 4), (9,)], seed=5), make_params([(6, 4), (9,)], seed=5)
    oa = emafuse.AdamW([dict(params=a[:1], orthograd=True), dict(params=a[1:])], lr=1e-2)
    ob = emafuse.AdamW([dict(params=b[:1]), dict(params=b[1:])], lr=1e-2)
    for t in range(5):  # (Adam's first step is lr·sign(g): mostly the same for g and u⊥)
        grads = random_grads(a, t)
        set_grads(a, grads)
        set_grads(b, [g.clone() for g in grads])
        oa.step()
        ob.step()
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])
    assert oa.state_dict()["param_groups"][0]["orthograd"] is True
