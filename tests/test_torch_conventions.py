"""torch.optim conventions with every optimizer: lazy state, parameters without gradient,
closures, hooks, zero_grad, maximize, read-only gradients, tensor lr, param groups and
add_param_group, empty / non-contiguous / channels-last parameters, autograd's version counter,
and the torch keywords emafuse accepts and ignores."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import (
    SMALL_SHAPES,
    assert_close,
    assert_same_state_dict,
    clone_params,
    make_params,
    random_grads,
    run_steps,
    scale_of,
    set_grads,
    spiky_grads,
)
from registry import configs, entries


def model_params(seed=21):
    return make_params(SMALL_SHAPES, seed=seed)


def counters(entry, opt, p):
    """The step counters that concern parameter ``p``: its own, its group's, the optimizer's."""
    out = {}
    if "step" in entry.caps.scalar_state:
        out["step"] = float(opt.state[p]["step"])
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    out.update({f"group {k}": group[k] for k in entry.caps.group_counters})
    out.update({k: opt.param_groups[0][k] for k in entry.caps.optimizer_counters})
    return out


@pytest.mark.parametrize("entry", entries())
def test_state_is_lazy_and_params_without_grad_are_skipped(entry):
    """No state before the first step that sees a gradient; a parameter whose .grad is None is
    not moved, gets no state, and its own step counter does not advance (group and optimizer
    counters do, as the officials count them)."""
    params = model_params()
    opt = entry.cls(params, **entry.main)
    assert not any(p in opt.state for p in params)
    frozen = params[1].detach().clone()
    for t in range(3):
        set_grads(params, random_grads(params, t))
        params[1].grad = None
        opt.step()
    assert torch.equal(params[1], frozen) and params[1] not in opt.state
    assert all(p in opt.state for i, p in enumerate(params) if i != 1)
    before = params[0].detach().clone()
    set_grads(params, random_grads(params, 3))
    params[0].grad = None
    opt.step()
    assert torch.equal(params[0], before) and not torch.equal(params[1], frozen)
    own = {"step": 1.0} if "step" in entry.caps.scalar_state else {}
    expected = {**own, **{f"group {k}": 4 for k in entry.caps.group_counters},
                **{k: v for k, v in counters(entry, opt, params[1]).items() if k in entry.caps.optimizer_counters}}
    assert counters(entry, opt, params[1]) == expected
    if "step" in entry.caps.scalar_state:
        assert float(opt.state[params[0]]["step"]) == 3
    if "total_step" in entry.caps.optimizer_counters:
        assert all(g["total_step"] == 4 for g in opt.param_groups)


@pytest.mark.parametrize("entry", entries())
def test_a_step_without_any_gradient_moves_nothing(entry):
    params = model_params()
    opt = entry.cls(params, **entry.main)
    run_steps(opt, params, 2)
    opt.zero_grad()
    before = [p.detach().clone() for p in params]
    assert opt.step() is None
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("entry", entries())
def test_closure_is_called_once_and_its_loss_returned(entry):
    w = torch.nn.Parameter(torch.randn(5))
    opt = entry.cls([w], **entry.main)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(w, before)


@pytest.mark.parametrize("entry", entries())
def test_step_and_state_dict_hooks_run(entry):
    params = model_params()
    opt = entry.cls(params, **entry.main)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load") or sd)
    run_steps(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "sd", "load"]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("entry", entries())
def test_zero_grad(entry, set_to_none):
    params = model_params()
    opt = entry.cls(params, **entry.main)
    run_steps(opt, params, 1)
    opt.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) if set_to_none else (p.grad.abs().sum() == 0) for p in params)


@pytest.mark.parametrize("entry", entries())
def test_maximize_equals_minimizing_the_negated_gradient(entry):
    a, b = model_params(29), model_params(29)
    oa, ob = entry.cls(a, **{**entry.main, "maximize": True}), entry.cls(b, **entry.main)
    for t in range(6):
        grads = spiky_grads(a, t, seed=18)
        set_grads(a, grads)
        set_grads(b, [-g for g in grads])
        oa.step()
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("entry, kw", configs())
def test_gradients_are_never_written(entry, kw):
    """Spec 2.3: clipping, L2 decay, maximize... act on a local value; .grad keeps its bits."""
    params = model_params()
    opt = entry.cls(params, **kw)
    for t in range(2):
        grads = spiky_grads(params, t)
        set_grads(params, grads)
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("entry", entries())
def test_gradients_accumulated_in_place_equal_fresh_ones(entry):
    """``zero_grad(set_to_none=False)`` reuses the .grad tensors: state that remembers a gradient
    (diffGrad's previous_grad, Adan's neg_pre_grad) holds a copy, not the tensor itself."""
    a, b = model_params(25), model_params(25)
    oa, ob = entry.cls(a, **entry.main), entry.cls(b, **entry.main)
    for t in range(4):
        grads = spiky_grads(a, t, seed=14)
        set_grads(a, grads)  # fresh tensors
        for q, g in zip(b, grads):  # the same tensor, overwritten in place
            if q.grad is None:
                q.grad = g.clone()
            else:
                q.grad.copy_(g)
        oa.step()
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("entry", entries())
def test_tensor_lr_equals_float_lr(entry):
    kw = {k: v for k, v in entry.main.items() if k != "lr"}
    lr = entry.main.get("lr", 1e-2)
    a, b = model_params(), model_params()
    oa, ob = entry.cls(a, lr=torch.tensor(lr, dtype=torch.float64), **kw), entry.cls(b, lr=lr, **kw)
    run_steps(oa, a, 4)
    run_steps(ob, b, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("entry", entries())
def test_param_groups_with_their_own_options_and_add_param_group(entry):
    """Groups with their own options (and one added after three steps, which gets the defaults
    it does not set) each follow their float64 reference."""
    kw, own = entry.configs[0], dict(entry.group_options)
    params = make_params(SMALL_SHAPES, seed=21)
    opt = entry.cls([{"params": params[:2]}, {"params": params[2:3], **own}], **kw)
    refs = [(params[:2], entry.reference(params[:2], **kw)), (params[2:3], entry.reference(params[2:3], **{**kw, **own}))]
    for t in range(8):
        if t == 3:
            opt.add_param_group({"params": params[3:], "lr": own["lr"] / 3})
            assert opt.param_groups[-1]["check_finite"] is False
            ref = entry.reference(params[3:], **{**kw, "lr": own["lr"] / 3})
            ref.load_from(opt, params[3:])  # counters kept outside the parameters' state
            refs.append((params[3:], ref))
        ps = [p for g in opt.param_groups for p in g["params"]]
        grads = random_grads(ps, t, seed=7)
        set_grads(ps, grads)
        opt.step()
        by_param = {id(p): g for p, g in zip(ps, grads)}
        for group_params, ref in refs:
            ref.step([by_param[id(p)] for p in group_params])
    for group_params, ref in refs:
        for p, q in zip(group_params, ref.params):
            assert_close(p, q, rtol=1e-5, atol=1e-6 * scale_of(q), what=f"param {tuple(p.shape)}")


@pytest.mark.parametrize("entry", entries())
def test_empty_tensors_are_stepped_like_any_other(entry):
    empty = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.randn(3, 0, 2))]
    params = empty + [torch.nn.Parameter(torch.randn(4))]
    alone = clone_params(params[2:])
    opt, ref = entry.cls(params, **entry.main), entry.cls(alone, **entry.main)
    for t in range(3):
        for p in params[:2]:
            p.grad = torch.zeros_like(p)
        set_grads(params[2:], random_grads(params[2:], t))
        set_grads(alone, random_grads(alone, t))
        opt.step()
        ref.step()
    if "step" in entry.caps.scalar_state:
        assert [opt.state[p]["step"].item() for p in params] == [3.0, 3.0, 3.0]
    assert torch.equal(params[2], alone[0])


@pytest.mark.parametrize("entry", entries())
def test_autograd_sees_the_in_place_update(entry):
    w = torch.nn.Parameter(torch.randn(4))
    opt = entry.cls([w], **entry.main)
    loss = (w**3).sum()  # saves w for backward
    loss.backward(retain_graph=True)
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("entry", entries())
def test_non_contiguous_and_channels_last_params(entry):
    """A channels-last conv weight (gradients in both layouts), a dense transposed and a strided
    parameter are updated in place, keeping their layout, as contiguous copies are."""
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    transposed = torch.nn.Parameter(torch.randn(6, 4).t())  # dense, non-contiguous
    strided = torch.nn.Parameter(torch.randn(10, 10)[:, ::2])  # not dense
    params = [conv.weight, conv.bias, transposed, strided]
    plain = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in params]
    ours, theirs = entry.cls(params, **entry.main), entry.cls(plain, **entry.main)
    g = torch.Generator().manual_seed(3)
    for step in range(15):
        for i, (p, q) in enumerate(zip(params, plain)):
            gr = torch.randn(p.shape, generator=g)
            if i == 0 and step % 2:
                gr = gr.contiguous(memory_format=torch.channels_last)
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert strided.stride() == (10, 2)  # updated in place, not replaced
    for p, q in zip(params, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7 * scale_of(q))


TORCH_KEYWORDS = [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False), dict(capturable=True)]


@pytest.mark.parametrize("entry", entries(lambda e: any(k in inspect.signature(e.cls).parameters for kw in TORCH_KEYWORDS for k in kw)))
def test_torch_keywords_are_accepted_and_change_nothing(entry):
    """foreach / fused / capturable (for signature compatibility): the same step, bit for bit."""
    accepted = inspect.signature(entry.cls).parameters
    base = model_params()
    ref = entry.cls(base, **entry.main)
    run_steps(ref, base, 3)
    for extra in TORCH_KEYWORDS:
        if not set(extra) <= set(accepted):
            continue
        ps = model_params()
        opt = entry.cls(ps, **entry.main, **extra)
        run_steps(opt, ps, 3)
        assert all(torch.equal(p, q) for p, q in zip(ps, base)), extra
        assert_same_state_dict(
            {**opt.state_dict(), "param_groups": []}, {**ref.state_dict(), "param_groups": []}, str(extra))
