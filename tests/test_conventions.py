"""torch.optim conventions: constructors, validation, state_dict interchange, hooks, schedulers."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import emafuse
from helpers import SMALL_SHAPES, assert_close, clone_params, make_params, random_grads, run_steps, set_grads

CLASSES = [(emafuse.AdamW, torch.optim.AdamW), (emafuse.Adam, torch.optim.Adam), (emafuse.SGD, torch.optim.SGD)]


def model_params():
    return make_params(SMALL_SHAPES, seed=21)


@pytest.mark.parametrize("ours, theirs", CLASSES)
def test_defaults_and_signature_match_torch(ours, theirs):
    import inspect

    a, b = ours(model_params()), theirs(model_params())
    extra = {"check_finite": False}
    assert a.defaults == {**b.defaults, **extra}
    ours_sig = inspect.signature(ours.__init__).parameters
    for name, param in inspect.signature(theirs.__init__).parameters.items():
        assert name in ours_sig and ours_sig[name].default == param.default and ours_sig[name].kind == param.kind, name
    assert isinstance(a, torch.optim.Optimizer) and isinstance(a, theirs)
    assert a._step_supports_amp_scaling


BAD_ARGS = {
    torch.optim.AdamW: [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                        dict(weight_decay=-0.1), dict(betas=(0.9, torch.tensor(0.9))),
                        dict(lr=torch.tensor([1.0, 2.0])), dict(lr=float("nan")), dict(fused=True, foreach=True)],
    torch.optim.SGD: [dict(lr=-1.0), dict(momentum=-0.5), dict(weight_decay=-1.0), dict(nesterov=True),
                      dict(nesterov=True, momentum=0.9, dampening=0.1), dict(lr=torch.tensor([1.0, 2.0])),
                      dict(fused=True, foreach=True)],
}
BAD_ARGS[torch.optim.Adam] = BAD_ARGS[torch.optim.AdamW]


@pytest.mark.parametrize("ours, theirs", CLASSES)
def test_validation_errors_match_torch(ours, theirs):
    for kwargs in BAD_ARGS[theirs]:
        with pytest.raises(Exception) as expected:
            theirs(model_params(), **kwargs)
        with pytest.raises(type(expected.value)) as got:
            ours(model_params(), **kwargs)
        assert str(got.value) == str(expected.value), kwargs


@pytest.mark.parametrize("ours", [emafuse.AdamW, emafuse.Adam, emafuse.SGD])
def test_differentiable_is_rejected_clearly(ours):
    with pytest.raises(emafuse.UnsupportedOptionError, match="differentiable"):
        ours(model_params(), differentiable=True)
    opt = ours(model_params()[:1])
    with pytest.raises(emafuse.UnsupportedOptionError):
        opt.add_param_group({"params": model_params()[1:2], "differentiable": True})


def test_capturable_is_accepted_and_harmless_on_cpu():
    params = model_params()
    ref = clone_params(params)
    ours, theirs = emafuse.AdamW(params, capturable=True), torch.optim.AdamW(ref, foreach=False)
    run_steps(ours, params, 5)
    run_steps(theirs, ref, 5)
    for p, q in zip(params, ref):
        assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_foreach_and_fused_keywords_are_accepted():
    for kw in [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)]:
        ps = model_params()
        opt = emafuse.AdamW(ps, **kw)
        run_steps(opt, ps, 2)


@pytest.mark.parametrize("ours, theirs, kw", [
    (emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (emafuse.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
])
@pytest.mark.parametrize("direction", ["torch_to_emafuse", "emafuse_to_torch"])
def test_checkpoints_move_both_ways_and_continue_the_same_trajectory(ours, theirs, kw, direction):
    src_cls, dst_cls = (theirs, ours) if direction == "torch_to_emafuse" else (ours, theirs)
    params = model_params()
    src = src_cls(params, **kw)
    run_steps(src, params, 7, seed=3)
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optim": src.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = [torch.nn.Parameter(t) for t in ckpt["model"]]
    dst = dst_cls(resumed, **kw)
    dst.load_state_dict(ckpt["optim"])
    assert set(dst.state_dict()["state"][0]) == set(src.state_dict()["state"][0])
    # continue both for 30 steps on the same gradients
    run_steps(src, params, 30, seed=4)
    run_steps(dst, resumed, 30, seed=4)
    for p, q in zip(params, resumed):
        assert_close(q, p, rtol=1e-5, atol=1e-6, what="resumed param")


@pytest.mark.parametrize("cls, kw", [(emafuse.AdamW, dict(amsgrad=True)), (emafuse.SGD, dict(momentum=0.9))])
def test_resume_is_bit_exact(cls, kw):
    params = model_params()
    opt = cls(params, lr=1e-2, **kw)
    run_steps(opt, params, 5, seed=1)
    sd = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    run_steps(opt, params, 5, seed=2)

    again = [torch.nn.Parameter(t.clone()) for t in snapshot]
    opt2 = cls(again, lr=1e-2, **kw)
    opt2.load_state_dict(sd)
    run_steps(opt2, again, 5, seed=2)
    for p, q in zip(params, again):
        assert torch.equal(p, q)


def test_old_checkpoint_with_int_step_loads():
    params = model_params()
    ref = torch.optim.AdamW(clone_params(params))
    opt = emafuse.AdamW(params)
    run_steps(opt, params, 3)
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    fresh = emafuse.AdamW(params)
    fresh.load_state_dict(sd)
    assert all(isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.float32 for st in fresh.state.values())
    run_steps(fresh, params, 1)
    assert all(st["step"].item() == 4 for st in fresh.state.values())
    del ref


def test_params_without_grad_are_skipped():
    params = model_params()
    opt = emafuse.AdamW(params, lr=1e-2)
    frozen = params[1].detach().clone()
    for t in range(3):
        set_grads(params, random_grads(params, t))
        params[1].grad = None
        opt.step()
    assert torch.equal(params[1], frozen)
    assert params[1] not in opt.state
    params[1].grad = torch.randn_like(params[1])
    params[0].grad = None
    opt.step()
    assert opt.state[params[1]]["step"].item() == 1 and opt.state[params[0]]["step"].item() == 3


def test_param_groups_and_add_param_group():
    params = model_params()
    ref = clone_params(params)
    ours = emafuse.AdamW([{"params": params[:2]}, {"params": params[2:3], "lr": 1e-1, "weight_decay": 0.0}], lr=1e-2)
    theirs = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:3], "lr": 1e-1, "weight_decay": 0.0}], lr=1e-2)
    run_steps(ours, params[:3], 3)
    run_steps(theirs, ref[:3], 3)
    ours.add_param_group({"params": params[3:], "amsgrad": True})
    theirs.add_param_group({"params": ref[3:], "amsgrad": True})
    assert ours.param_groups[-1]["check_finite"] is False
    run_steps(ours, params, 5, seed=7)
    run_steps(theirs, ref, 5, seed=7)
    for p, q in zip(params, ref):
        assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lr_schedulers_and_tensor_lr():
    params = model_params()
    ref = clone_params(params)
    ours = emafuse.AdamW(params, lr=torch.tensor(1e-2))
    theirs = torch.optim.AdamW(ref, lr=torch.tensor(1e-2), foreach=False)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=5e-2, total_steps=40)
    s2 = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=5e-2, total_steps=40)
    run_steps(ours, params, 40, on_step=lambda t: s1.step())
    run_steps(theirs, ref, 40, on_step=lambda t: s2.step())
    for p, q in zip(params, ref):
        assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_closure_is_called_once_and_its_loss_returned():
    w = torch.nn.Parameter(torch.randn(5))
    opt = emafuse.SGD([w], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.item() > 0


def test_hooks_run():
    params = model_params()
    opt = emafuse.AdamW(params)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load") or sd)
    run_steps(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "sd", "load"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    params = model_params()
    opt = emafuse.AdamW(params)
    run_steps(opt, params, 1)
    opt.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) if set_to_none else (p.grad.abs().sum() == 0) for p in params)


def test_deepcopy_and_pickle():
    params = model_params()
    opt = emafuse.AdamW(params, lr=1e-2, check_finite=True)
    run_steps(opt, params, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is emafuse.AdamW
        assert clone.param_groups[0]["check_finite"] is True
        cparams = clone.param_groups[0]["params"]
        run_steps(clone, cparams, 1, seed=9)
        assert all(clone.state[p]["step"].item() == 3 for p in cparams)


def test_empty_tensors_step_like_torch():
    params = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.randn(3, 0, 2)), torch.nn.Parameter(torch.randn(4))]
    ref = clone_params(params)
    ours, theirs = emafuse.AdamW(params), torch.optim.AdamW(ref, foreach=False)
    run_steps(ours, params, 3)
    run_steps(theirs, ref, 3)
    assert [ours.state[p]["step"].item() for p in params] == [3.0, 3.0, 3.0]
    torch.testing.assert_close(params[2], ref[2])


def test_autograd_sees_the_in_place_update():
    w = torch.nn.Parameter(torch.randn(4))
    opt = emafuse.SGD([w], lr=0.1)
    loss = (w**3).sum()  # saves w for backward
    loss.backward(retain_graph=True)
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
