"""Bad input gets a clear emafuse error for every optimizer, and a refused call changes nothing:
constructor arguments, hyper-parameters set later, corrupted state, gradients and parameters the
engine cannot take, non-finite gradients under check_finite."""

from __future__ import annotations

import itertools
import re

import emafuse
import pytest
import torch
from emafuse import errors
from helpers import SMALL_SHAPES, assert_unchanged, make_params, random_grads, run_steps, set_grads, snapshot, state_tensors
from registry import BY_NAME, ENTRIES, entries

# -- constructor arguments -------------------------------------------------------------------------

BAD_ARGS = [
    pytest.param(e, bad, id=f"{e.name}-" + "-".join(f"{k}={v}" for k, v in bad.kw.items())) for e in ENTRIES for bad in e.bad_args
]


@pytest.mark.parametrize("entry, bad", BAD_ARGS)
def test_bad_constructor_arguments_are_refused_with_a_clear_message(entry, bad):
    with pytest.raises(bad.exc) as info:
        entry.cls(make_params([(3,)]), **bad.kw)
    assert re.search(bad.match, str(info.value)), str(info.value)


@pytest.mark.parametrize("entry", entries(lambda e: any("differentiable" in b.kw for b in e.bad_args)))
def test_differentiable_param_group_is_refused(entry):
    opt = entry.cls(make_params([(3,)]))
    with pytest.raises(emafuse.UnsupportedOptionError, match="differentiable"):
        opt.add_param_group({"params": make_params([(4,)]), "differentiable": True})


LATER = [("lr", float("nan"), "lr"), ("lr", -1.0, "lr"), ("weight_decay", -1.0, "weight_decay"), ("betas", 1.5, "beta1"),
         ("beta3", 1.5, "beta3"), ("momentum", 1.5, "momentum")]


@pytest.mark.parametrize("entry", entries())
def test_bad_hyper_parameters_set_later_are_refused_before_any_write(entry):
    """A value the constructor would refuse, written into a param group later (where torch's
    schedulers and users write), is refused by the step, which then changes nothing."""
    cases = 0
    for key, value, named in LATER:
        params = make_params(SMALL_SHAPES, seed=3)
        opt = entry.cls(params, **entry.main)
        run_steps(opt, params, 1)
        group = opt.param_groups[0]
        if key not in group or (key == "momentum" and entry.caps.torch_base is torch.optim.SGD):  # torch allows momentum >= 1
            continue
        group[key] = (value, *group["betas"][1:]) if key == "betas" else value
        set_grads(params, random_grads(params, 3))
        snap = snapshot(params, opt)
        with pytest.raises(errors.InvalidArgumentError, match=named):
            opt.step()
        assert_unchanged(params, opt, snap)
        cases += 1
    assert cases >= 3


# -- refused steps ---------------------------------------------------------------------------------


def trained(entry, shapes=SMALL_SHAPES, **kw):
    params = make_params(shapes, seed=31)
    opt = entry.cls(params, **{**entry.main, **kw})
    run_steps(opt, params, 3)
    set_grads(params, random_grads(params, 99))
    return params, opt


def slot(opt, p, k=0):
    return state_tensors(opt, p)[k]


def first_scalar(entry):
    return next(iter(entry.caps.scalar_state))


def slot_count(entry):
    """How many state tensors the entry keeps per parameter (its main configuration)."""
    params = make_params([(3,)])
    opt = entry.cls(params, **entry.main)
    run_steps(opt, params, 1)
    return len(state_tensors(opt, params[0]))


def _alias(ps, opt):
    """One tensor for two state slots of one shape (Adafactor's factors are shaped otherwise)."""
    for p in ps[2:] + ps[:2]:
        names = state_tensors(opt, p)
        for a, b in itertools.combinations(names, 2):
            if opt.state[p][a].shape == opt.state[p][b].shape:
                opt.state[p][b] = opt.state[p][a]
                return
    raise AssertionError("no parameter has two state tensors of one shape")


def _complex(ps, opt):
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    opt.add_param_group({"params": [z]})


def _other_dtype_grad(ps, opt):
    ps[1].grad_dtype = None  # torch >= 2.10 allows a gradient of another dtype
    ps[1].grad = ps[1].grad.double()


# name: (applies to entry, mutation (params, opt, entry), exception, what the message names)
FAULTS = {
    "sparse grad": (lambda e: not e.caps.sparse_grads, lambda ps, opt, e: setattr(ps[2], "grad", ps[2].grad.to_sparse()), errors.SparseGradError, "sparse"),
    "state of wrong shape": (lambda e: True, lambda ps, opt, e: opt.state[ps[3]].update({slot(opt, ps[3]): torch.rand(3, 5)}),
                             errors.ShapeError, ("[3, 5]", "parameter 3")),
    "state of same numel, other shape": (lambda e: True, lambda ps, opt, e: opt.state[ps[4]].update(
        {slot(opt, ps[4]): opt.state[ps[4]][slot(opt, ps[4])].reshape(-1).clone()}), errors.ShapeError, "parameter 4"),
    "state of wrong dtype": (lambda e: True, lambda ps, opt, e: opt.state[ps[0]].update(
        {slot(opt, ps[0]): opt.state[ps[0]][slot(opt, ps[0])].double()}), errors.DTypeError, "parameter 0"),
    "integer state": (lambda e: True, lambda ps, opt, e: opt.state[ps[0]].update(
        {slot(opt, ps[0]): torch.ones(ps[0].shape, dtype=torch.int64)}), errors.DTypeError, "parameter 0"),
    "meta device state": (lambda e: True, lambda ps, opt, e: opt.state[ps[0]].update(
        {slot(opt, ps[0]): torch.empty(ps[0].shape, device="meta")}), errors.DeviceError, "floating point Tensors of supported devices"),
    "missing scalar state": (lambda e: bool(e.caps.scalar_state), lambda ps, opt, e: opt.state[ps[1]].pop(first_scalar(e)),
                             errors.InvalidArgumentError, "lacks"),
    "scalar state of wrong shape": (lambda e: bool(e.caps.scalar_state),
                                    lambda ps, opt, e: opt.state[ps[1]].update({first_scalar(e): torch.ones(2)}),
                                    errors.InvalidArgumentError, ""),
    "the same tensor twice": (lambda e: slot_count(e) >= 2, lambda ps, opt, e: _alias(ps, opt),
                              errors.InvalidArgumentError, ""),
    "grad of other dtype": (lambda e: True, lambda ps, opt, e: _other_dtype_grad(ps, opt), errors.DTypeError, ""),
    "complex parameter": (lambda e: not e.caps.complex, lambda ps, opt, e: _complex(ps, opt), errors.DTypeError, "complex"),
}

REFUSED = [pytest.param(e, name, id=f"{e.name}-{name}") for e in ENTRIES for name, (applies, *_) in FAULTS.items() if applies(e)]


@pytest.mark.parametrize("entry, fault", REFUSED)
def test_refused_steps_change_nothing(entry, fault):
    _, mutate, exc, names = FAULTS[fault]
    params, opt = trained(entry)
    mutate(params, opt, entry)
    snap = snapshot(params, opt)
    with pytest.raises(exc) as info:
        opt.step()
    assert_unchanged(params, opt, snap)
    for name in (names,) if isinstance(names, str) else names:
        assert name in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("entry", entries())
def test_check_finite_refuses_non_finite_gradients(entry, bad):
    params, opt = trained(entry, check_finite=True)
    params[3].grad[1, 1] = bad
    snap = snapshot(params, opt)
    with pytest.raises(errors.NonFiniteError):
        opt.step()
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("entry", entries())
def test_nan_propagates_by_default_like_torch(entry):
    """Without check_finite a NaN gradient element flows into its parameter (as in torch) and
    nowhere else (defaults: no global clipping)."""
    params = make_params(SMALL_SHAPES, seed=31)
    opt = entry.cls(params, **entry.configs[0])
    run_steps(opt, params, 3)
    set_grads(params, random_grads(params, 99))
    params[4].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[4]).any() and not any(torch.isnan(p).any() for p in params[:4])


def _refusal(entry):
    """(constructor options, how to spoil parameter i's gradient, the error): a sparse gradient,
    or a NaN under ``check_finite`` for optimizers that step sparse gradients."""
    if entry.caps.sparse_grads:
        return {"check_finite": True}, lambda p: p.grad.view(-1)[0].fill_(float("nan")), errors.NonFiniteError
    return {}, lambda p: setattr(p, "grad", p.grad.to_sparse()), errors.SparseGradError


@pytest.mark.parametrize("entry", entries())
def test_a_bad_group_leaves_the_good_groups_untouched(entry):
    extra, spoil, error = _refusal(entry)
    params = make_params(SMALL_SHAPES, seed=5)
    opt = entry.cls([{"params": params[:3]}, {"params": params[3:]}], **entry.main, **extra)
    run_steps(opt, params, 2)
    set_grads(params, random_grads(params, 50))
    spoil(params[4])
    snap = snapshot(params, opt)
    with pytest.raises(error):
        opt.step()
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("entry", entries())
def test_fresh_state_is_not_created_by_a_refused_step(entry):
    extra, spoil, error = _refusal(entry)
    params = make_params(SMALL_SHAPES, seed=6)
    opt = entry.cls(params, **entry.main, **extra)
    snap = snapshot(params, opt)
    set_grads(params, random_grads(params, 0))
    spoil(params[2])
    with pytest.raises(error):
        opt.step()
    assert not any(p in opt.state for p in params)
    assert_unchanged(params, opt, snap)


# -- the engine's parallel reads -------------------------------------------------------------------

# 150 parameters: with their gradients, two state slots and step counters, 750 tensors, which the
# engine reads on its thread pool (it does so from 512 tensors on). Errors must be the same there.
MANY_SHAPES = [(3,), (5, 7), (1,), (17,), (2, 3, 4)] * 30

LONG_LIST_FAULTS = {
    # kind: (mutation of parameter i, exception, what the message names)
    "sparse grad": (lambda ps, opt, i: setattr(ps[i], "grad", ps[i].grad.to_sparse()), errors.SparseGradError, "grad {i}"),
    "state dtype": (lambda ps, opt, i: opt.state[ps[i]].update(exp_avg=opt.state[ps[i]]["exp_avg"].double()), errors.DTypeError, "parameter {i}"),
    "not a tensor": (lambda ps, opt, i: opt.state[ps[i]].update(exp_avg_sq=[1.0]), errors.InvalidArgumentError, "parameter {i}: state 'exp_avg_sq'"),
    "meta device": (
        lambda ps, opt, i: opt.state[ps[i]].update(exp_avg=torch.empty(ps[i].shape, device="meta")),
        errors.DeviceError,
        "parameter {i}: state 'exp_avg'",
    ),
}


@pytest.mark.parametrize("where", [0, 101, 148])
@pytest.mark.parametrize("kind", sorted(LONG_LIST_FAULTS))
def test_long_lists_report_the_first_bad_tensor(kind, where):
    mutate, exc, names = LONG_LIST_FAULTS[kind]
    params, opt = trained(BY_NAME["AdamW"], shapes=MANY_SHAPES)
    mutate(params, opt, where)
    LONG_LIST_FAULTS["state dtype"][0](params, opt, 149)  # a later one, not reported
    snap = snapshot(params, opt)
    with pytest.raises(exc) as info:
        opt.step()
    assert_unchanged(params, opt, snap)
    assert names.format(i=where) in str(info.value)


def test_errors_form_one_hierarchy():
    for cls in [errors.DTypeError, errors.DeviceError, errors.ShapeError, errors.SparseGradError, errors.NonFiniteError,
                errors.InvalidArgumentError, errors.UnsupportedOptionError, errors.CudaError, errors.InternalError]:
        assert issubclass(cls, emafuse.EmafuseError)
    assert issubclass(errors.DTypeError, TypeError) and issubclass(errors.ShapeError, ValueError)
    assert issubclass(errors.SparseGradError, RuntimeError)
