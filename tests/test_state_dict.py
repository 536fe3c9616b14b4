"""state_dict for every optimizer: round trip and bit-exact resume in every storage dtype, state
dtypes and step counters as the entry keeps them, deepcopy and pickle, and checkpoints moving
to and from the official implementation."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import (
    LOW_PRECISION,
    SMALL_SHAPES,
    assert_close,
    assert_same_state_dict,
    clone_params,
    grads_with_gaps,
    make_params,
    run_steps,
    spiky_grads,
)
from registry import configs, entries, official_configs, quiet


def state_dtypes(opt, params):
    return [{k: v.dtype for k, v in opt.state[p].items()} for p in params]


def through_bytes(obj):
    """``obj`` saved with torch.save and loaded back with torch.load's safe default."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("entry, kw", configs())
def test_round_trip_and_bit_exact_resume(entry, kw, dtype):
    """Save after five steps (a parameter first seen at step 2), run five more; a fresh optimizer
    loading the checkpoint runs the same five steps bit for bit: parameters, every state entry,
    counters and param groups. State dtypes survive loading; the step counter is stored as the
    entry says (a tensor as torch, an int as most official implementations)."""
    if dtype in LOW_PRECISION:
        kw = {**kw, **entry.low_precision}
    params = make_params(SMALL_SHAPES, dtype=dtype, seed=26)
    opt = entry.cls(params, **kw)
    run_steps(opt, params, 5, seed=15, grads=grads_with_gaps)
    ckpt = through_bytes({"model": [p.detach().clone() for p in params], "optim": opt.state_dict()})
    dtypes = state_dtypes(opt, params)
    run_steps(opt, params, 5, seed=15, first=5, grads=spiky_grads)

    if "step" in entry.caps.scalar_state:
        kind = int if entry.caps.int_step_in_state_dict else torch.Tensor
        assert all(isinstance(st["step"], kind) for st in ckpt["optim"]["state"].values() if isinstance(st, dict))
    again = [torch.nn.Parameter(t) for t in ckpt["model"]]
    opt2 = entry.cls(again, **kw)
    opt2.load_state_dict(ckpt["optim"])
    assert state_dtypes(opt2, again) == dtypes
    run_steps(opt2, again, 5, seed=15, first=5, grads=spiky_grads)
    for p, q in zip(params, again):
        assert torch.equal(p, q)
    assert_same_state_dict(opt2.state_dict(), opt.state_dict(), "resumed")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("entry", entries())
def test_loading_keeps_state_dtypes_and_hooks_see_the_checkpoint_unchanged(entry, dtype):
    """Loading does not round states kept in another dtype than the parameter's (e.g. float32
    states of bf16 parameters, SGD-SaI's float64 gsnr), and user hooks see the checkpoint as it
    is and the loaded state as plain tensors."""
    kw = {**entry.main, **entry.low_precision}
    params = make_params(SMALL_SHAPES, dtype=dtype, seed=32)
    opt = entry.cls(params, **kw)
    run_steps(opt, params, 3, seed=19)
    sd = copy.deepcopy(opt.state_dict())
    seen = []
    fresh = entry.cls(params, **kw)
    fresh.register_load_state_dict_pre_hook(lambda o, d: seen.append(assert_same_state_dict(d, sd, "pre-hook")))
    fresh.register_load_state_dict_post_hook(
        lambda o: seen.append([type(v) for p in params for v in o.state[p].values()]))
    fresh.load_state_dict(sd)
    assert seen[0] is None and set(seen[1]) == {torch.Tensor}
    assert_same_state_dict(fresh.state_dict(), sd, "loaded")
    for p in params:
        for name, value in fresh.state[p].items():
            want = entry.caps.scalar_state.get(name) or entry.caps.state_dtype(dtype, kw)
            assert value.dtype == want and value.device.type == "cpu", (name, value.dtype)


@pytest.mark.parametrize("entry", entries(lambda e: "step" in e.caps.scalar_state))
def test_step_counter_loads_as_int_or_tensor(entry):
    """Checkpoints of torch (0-dim tensor) and of most official implementations (int) both load;
    the live counter is a 0-dim tensor of the entry's dtype and continues counting."""
    params = make_params(SMALL_SHAPES, seed=21)
    opt = entry.cls(params, **entry.main)
    run_steps(opt, params, 3)
    results = []
    for as_int in (True, False):
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            if isinstance(st, dict):
                st["step"] = int(st["step"]) if as_int else torch.tensor(float(st["step"]))
        ps = clone_params(params)
        fresh = entry.cls(ps, **entry.main)
        fresh.load_state_dict(sd)
        assert all(isinstance(fresh.state[p]["step"], torch.Tensor) and fresh.state[p]["step"].dtype == entry.caps.scalar_state["step"]
                   for p in ps)
        run_steps(fresh, ps, 1, first=3)
        assert all(fresh.state[p]["step"].item() == 4 for p in ps)
        results.append(ps)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("entry", entries())
def test_deepcopy_and_pickle_continue_the_same_trajectory(entry):
    params = make_params(SMALL_SHAPES, seed=22)
    opt = entry.cls(params, check_finite=True, **entry.main)
    run_steps(opt, params, 2)
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    run_steps(opt, params, 1, seed=9, first=2)
    for clone in clones:
        assert type(clone) is entry.cls
        assert all(g["check_finite"] is True for g in clone.param_groups)
        cparams = [p for g in clone.param_groups for p in g["params"]]
        run_steps(clone, cparams, 1, seed=9, first=2)
        assert all(torch.equal(p, q) for p, q in zip(params, cparams))
        assert_same_state_dict(clone.state_dict(), opt.state_dict(), "copy")


CHECKPOINTS = [
    pytest.param(*p.values, direction, id=f"{p.id}-{direction}", marks=p.marks)
    for p in official_configs(lambda e, kw, o: bool(o.checkpoints))
    for direction in p.values[2].checkpoints
]


@pytest.mark.parametrize("entry, kw, official, direction", CHECKPOINTS)
def test_checkpoints_move_to_and_from_the_official(entry, kw, official, direction):
    """A checkpoint (with its LR scheduler's) of the official loads into emafuse and vice versa,
    with the same state entries, and both continue the same trajectory."""
    params = make_params(SMALL_SHAPES, seed=33)
    sign = -1.0 if official.negates(kw) else 1.0
    ours, theirs = (lambda ps: entry.cls(ps, **kw)), (lambda ps: official.make(ps, kw))
    (src_make, src_sign), (dst_make, dst_sign) = ((theirs, sign), (ours, 1.0)) if direction == "to_emafuse" else ((ours, 1.0), (theirs, sign))
    with quiet():
        src = src_make(params)
        sched1 = torch.optim.lr_scheduler.ExponentialLR(src, gamma=0.9)
        run_steps(src, params, 7, seed=3, scale=src_sign, on_step=lambda t: sched1.step())
        resumed = clone_params(params)
        dst = dst_make(resumed)
        sched2 = torch.optim.lr_scheduler.ExponentialLR(dst, gamma=0.9)
        dst.load_state_dict(through_bytes(src.state_dict()))
        sched2.load_state_dict(sched1.state_dict())
        assert set(dst.state_dict()["state"].get(0, ())) == set(src.state_dict()["state"].get(0, ()))
        assert dst.param_groups[0]["lr"] == src.param_groups[0]["lr"] < sched1.base_lrs[0]
        run_steps(src, params, 20, seed=4, scale=src_sign, first=7, on_step=lambda t: sched1.step())
        run_steps(dst, resumed, 20, seed=4, scale=dst_sign, first=7, on_step=lambda t: sched2.step())
    for p, q in zip(params, resumed):
        assert_close(q, p, rtol=official.rtol, atol=official.atol, what="resumed param")
