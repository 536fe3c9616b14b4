"""Bad input gets a clear error, and a refused step changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import emafuse
from emafuse import errors
from helpers import SMALL_SHAPES, make_params, random_grads, run_steps, set_grads


def trained(cls=emafuse.AdamW, shapes=SMALL_SHAPES, **kw):
    params = make_params(shapes, seed=31)
    opt = cls(params, lr=1e-2, **kw)
    run_steps(opt, params, 3)
    set_grads(params, random_grads(params, 99))
    return params, opt


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, snap):
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p, q), "a parameter changed during a refused step"
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys(), "state was created during a refused step"
    for k, st in sd["state"].items():
        for name, value in st.items():
            if not isinstance(value, torch.Tensor) or value.is_meta:  # planted by the test
                assert type(now["state"][k][name]) is type(value)
                continue
            assert torch.equal(now["state"][k][name], value), f"state {name} changed during a refused step"


def corrupt(mutate, exc, shapes=SMALL_SHAPES):
    params, opt = trained(shapes=shapes)
    mutate(params, opt)
    snap = snapshot(params, opt)
    with pytest.raises(exc) as info:
        opt.step()
    assert_unchanged(params, opt, snap)
    return str(info.value)


def test_sparse_grad():
    def mutate(params, opt):
        params[2].grad = params[2].grad.to_sparse()
    msg = corrupt(mutate, errors.SparseGradError)
    assert "sparse" in msg
    assert issubclass(errors.SparseGradError, RuntimeError)


def test_state_of_wrong_shape_from_a_foreign_checkpoint():
    def mutate(params, opt):
        opt.state[params[3]]["exp_avg_sq"] = torch.rand(3, 5)
    msg = corrupt(mutate, errors.ShapeError)
    assert "[3, 5]" in msg and "parameter 3" in msg


def test_state_of_same_numel_but_other_shape():
    def mutate(params, opt):
        opt.state[params[4]]["exp_avg"] = opt.state[params[4]]["exp_avg"].reshape(-1).clone()
    corrupt(mutate, errors.ShapeError)


def test_state_of_wrong_dtype():
    def mutate(params, opt):
        opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].double()
    corrupt(mutate, errors.DTypeError)


def test_integer_state():
    def mutate(params, opt):
        opt.state[params[0]]["exp_avg"] = torch.ones(params[0].shape, dtype=torch.int64)
    corrupt(mutate, errors.DTypeError)


def test_missing_state_entry():
    def mutate(params, opt):
        del opt.state[params[1]]["step"]
    corrupt(mutate, KeyError)


def test_bad_step_counter():
    def mutate(params, opt):
        opt.state[params[1]]["step"] = torch.ones(2)
    corrupt(mutate, errors.InvalidArgumentError)


def test_the_same_tensor_twice_in_the_state():
    def mutate(params, opt):
        opt.state[params[2]]["exp_avg_sq"] = opt.state[params[2]]["exp_avg"]
    corrupt(mutate, errors.InvalidArgumentError)


def test_grad_of_other_dtype():
    def mutate(params, opt):
        params[1].grad_dtype = None  # torch >= 2.10 allows a gradient of another dtype
        params[1].grad = params[1].grad.double()
    corrupt(mutate, errors.DTypeError)


def test_meta_device_tensor():
    params, opt = trained()
    opt.state[params[0]]["exp_avg"] = torch.empty(params[0].shape, device="meta")
    before = [p.detach().clone() for p in params]
    with pytest.raises(errors.DeviceError, match="unsupported device"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


# 150 parameters: with their gradients, two state slots and step counters, 750 tensors, which the
# engine reads on its thread pool (it does so from 512 tensors on). Errors must be the same there.
MANY_SHAPES = [(3,), (5, 7), (1,), (17,), (2, 3, 4)] * 30

LONG_LIST_FAULTS = {
    # kind: (mutation of parameter i, exception, what the message names)
    "sparse grad": (lambda ps, opt, i: setattr(ps[i], "grad", ps[i].grad.to_sparse()), errors.SparseGradError, "grad {i}"),
    "state dtype": (lambda ps, opt, i: opt.state[ps[i]].update(exp_avg=opt.state[ps[i]]["exp_avg"].double()), errors.DTypeError, "parameter {i}"),
    "not a tensor": (lambda ps, opt, i: opt.state[ps[i]].update(exp_avg_sq=[1.0]), errors.InvalidArgumentError, "parameter {i}: state 'exp_avg_sq'"),
    "meta device": (lambda ps, opt, i: opt.state[ps[i]].update(exp_avg=torch.empty(ps[i].shape, device="meta")), errors.DeviceError, "parameter {i}: state 'exp_avg'"),
}


@pytest.mark.parametrize("where", [0, 101, 148])
@pytest.mark.parametrize("kind", sorted(LONG_LIST_FAULTS))
def test_long_lists_report_the_first_bad_tensor(kind, where):
    mutate, exc, names = LONG_LIST_FAULTS[kind]

    def two_faults(params, opt):
        mutate(params, opt, where)
        LONG_LIST_FAULTS["state dtype"][0](params, opt, 149)  # a later one, not reported

    msg = corrupt(two_faults, exc, shapes=MANY_SHAPES)
    assert names.format(i=where) in msg


def test_check_finite_refuses_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        params, opt = trained(check_finite=True)
        params[3].grad[1, 1] = bad
        snap = snapshot(params, opt)
        with pytest.raises(errors.NonFiniteError):
            opt.step()
        assert_unchanged(params, opt, snap)


def test_nan_propagates_by_default_like_torch():
    params, opt = trained()
    params[0].grad[0] = float("nan")
    opt.step()
    assert torch.isnan(params[0]).any() and not torch.isnan(params[1]).any()


def test_a_bad_group_leaves_the_good_groups_untouched():
    params = make_params(SMALL_SHAPES, seed=5)
    opt = emafuse.AdamW([{"params": params[:3]}, {"params": params[3:]}], lr=1e-2)
    run_steps(opt, params, 2)
    set_grads(params, random_grads(params, 50))
    params[4].grad = params[4].grad.to_sparse()
    snap = snapshot(params, opt)
    with pytest.raises(errors.SparseGradError):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_fresh_state_is_not_created_by_a_refused_step():
    params = make_params(SMALL_SHAPES, seed=6)
    opt = emafuse.AdamW(params)
    set_grads(params, random_grads(params, 0))
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(errors.SparseGradError):
        opt.step()
    assert len(opt.state) == 0


def test_errors_form_one_hierarchy():
    for cls in [errors.DTypeError, errors.DeviceError, errors.ShapeError, errors.SparseGradError, errors.NonFiniteError,
                errors.InvalidArgumentError, errors.UnsupportedOptionError, errors.CudaError, errors.InternalError]:
        assert issubclass(cls, emafuse.EmafuseError)
    assert issubclass(errors.DTypeError, TypeError) and issubclass(errors.ShapeError, ValueError)


def test_native_call_rejects_malformed_arguments():
    from emafuse import _native

    p = torch.nn.Parameter(torch.randn(3))
    g = torch.randn(3)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=True)
    st = {"exp_avg": torch.rand(3), "exp_avg_sq": torch.rand(3), "step": torch.tensor(0.0)}
    slots, scalars = ("exp_avg", "exp_avg_sq"), ("step",)
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "no_such_rule", [_native.Group(hyper=hyper, params=[p], inputs=[g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=[g, g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=["not a tensor"], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper={**hyper, "beta1": 1.5}, params=[p], inputs=[g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=[g], states=[st], slots=("exp_avg",), scalars=scalars)])
    assert st["step"].item() == 0.0
