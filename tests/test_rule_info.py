"""Each rule's description (`_native.rule_info`, `_native.rule_slots`) and the checks the engine
derives from it: hyper-parameter names and kinds, and state names (not just their number)."""

from __future__ import annotations

import pytest
import torch
from emafuse import _native
from emafuse.errors import InvalidArgumentError

ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, decoupled=True)


def test_every_rule_describes_itself():
    names = _native.rule_names()
    assert len(set(names)) == len(names) and {"adam", "sgd", "ema", "ema_multi", "swap"} <= set(names)
    for name in names:
        info = _native.rule_info(name)
        assert info["name"] == name and info["summary"] and "\n" not in info["summary"]
        for key in ("numbers", "flags", "optional_flags", "scalars"):
            assert isinstance(info[key], tuple) and all(isinstance(k, str) for k in info[key]), (name, key)
        assert set(info["optional_flags"]) <= set(info["flags"])
        assert not set(info["numbers"]) & set(info["flags"])
        assert isinstance(info["reads_input"], bool) and info["reads_input"] == (info["input"] != "none")
    with pytest.raises(InvalidArgumentError, match="unknown update rule 'adamw'"):
        _native.rule_info("adamw")


def test_descriptions_of_the_torch_rules():
    adam = _native.rule_info("adam")
    assert adam["numbers"] == ("lr", "beta1", "beta2", "eps", "weight_decay", "ema_weight")
    assert adam["flags"] == ("amsgrad", "decoupled", "ema", "caution", "caution_count")
    assert adam["optional_flags"] == ("ema", "caution", "caution_count")
    assert adam["scalars"] == ("step",) and adam["reads_input"] is True
    sgd = _native.rule_info("sgd")
    assert sgd["scalars"] == () and sgd["optional_flags"] == ("first", "caution", "caution_count")
    assert _native.rule_info("sgd_sai")["scalars"] == ("gsnr",)
    assert _native.rule_info("swap")["reads_input"] is False
    # optimizers read gradients; averages read the model's weights
    assert {n: _native.rule_info(n)["input"] for n in ("adam", "lion", "ema", "slerp", "swap")} == dict(
        adam="gradient", lion="gradient", ema="weights", slerp="weights", swap="none"
    )


def test_slot_names_follow_the_flags_and_the_numbers():
    assert _native.rule_slots("adam", ADAMW) == ("exp_avg", "exp_avg_sq")
    assert _native.rule_slots("adam", {**ADAMW, "amsgrad": True}) == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    fused = {**ADAMW, "amsgrad": True, "ema": True, "ema_weight": 0.1}
    assert _native.rule_slots("adam", fused) == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema")
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
    assert _native.rule_slots("sgd", sgd) == ("momentum_buffer",)
    assert _native.rule_slots("sgd", {**sgd, "momentum": 0.0}) == ()
    ademamix = dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, alpha_warmup=0.0, beta3_warmup=0.0, eps=1e-8, weight_decay=0.0)
    assert _native.rule_slots("ademamix", ademamix) == ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    assert _native.rule_slots("ademamix", {**ademamix, "beta1": 0.0}) == ("exp_avg_slow", "exp_avg_sq")
    # the names the averaging methods pass
    multi = dict(tracks=3.0, w0=0.1, w1=0.2, w2=0.3)
    assert _native.rule_slots("ema_multi", multi) == ("t1", "t2")
    assert _native.rule_slots("ema_multi", dict(tracks=1.0, w0=0.1)) == ()
    assert _native.rule_slots("bema", dict(alpha=0.1, beta=0.2, reset=False)) == ("out", "anchor")
    assert _native.rule_slots("swap", {}) == ("b",)
    assert _native.rule_slots("slerp", dict(t=0.5)) == ("base",)


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({**ADAMW, "betas": 0.9}, r"rule 'adam' has no hyper-parameter 'betas' \(numbers: lr, beta1"),
        ({**{k: v for k, v in ADAMW.items() if k != "amsgrad"}, "amsgard": False}, "no hyper-parameter 'amsgard'"),
        ({k: v for k, v in ADAMW.items() if k != "amsgrad"}, "missing flag 'amsgrad'"),
        ({k: v for k, v in ADAMW.items() if k != "lr"}, "missing hyper-parameter 'lr'"),
        ({**ADAMW, "amsgrad": 0}, "'amsgrad' must be a bool, got a number"),
        ({**ADAMW, "lr": True}, "'lr' must be a number, got a bool"),
        ({**ADAMW, "maximize": 1.0}, "'maximize' must be a bool"),
        ({**ADAMW, "ema": True}, "missing hyper-parameter 'ema_weight'"),
    ],
)
def test_hyper_parameters_are_checked_by_name_and_kind(hyper, message):
    with pytest.raises(InvalidArgumentError, match=message):
        _native.rule_slots("adam", hyper)


def adam_call(slots):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(7, generator=gen)
    g = torch.randn(7, generator=gen)
    st = {"exp_avg": torch.rand(7, generator=gen), "exp_avg_sq": torch.rand(7, generator=gen), "step": torch.tensor(4.0)}
    return p, g, st, [_group(dict(ADAMW, maximize=False, check_finite=False), [p], [g], [st], slots, ("step",))]


def _group(hyper, params, inputs, states, slots, scalars):
    return _native.Group(hyper=hyper, params=params, inputs=inputs, states=states, slots=slots, scalars=scalars)


def test_swapped_slot_names_are_refused_and_change_nothing():
    p, _, st, call = adam_call(("exp_avg_sq", "exp_avg"))
    before = (p.clone(), {k: v.clone() for k, v in st.items()})
    expect = (
        r"param group 0: rule 'adam' \(amsgrad=False, decoupled=True\) keeps state \['exp_avg', 'exp_avg_sq'\], "
        r"got \['exp_avg_sq', 'exp_avg'\]"
    )
    with pytest.raises(InvalidArgumentError, match=expect):
        _native.step("t", "adam", call)
    assert torch.equal(p, before[0])
    assert all(torch.equal(st[k], v) for k, v in before[1].items())
    # the same call with the rule's order runs
    _native.step("t", "adam", adam_call(("exp_avg", "exp_avg_sq"))[3])


def test_wrong_scalar_names_are_refused():
    _p, _, st, call = adam_call(("exp_avg", "exp_avg_sq"))
    g = call[0]
    st["t"] = st.pop("step")
    with pytest.raises(InvalidArgumentError, match=r"keeps scalar state \['step'\], got \['t'\]"):
        _native.step("t", "adam", [_group(g.hyper, g.params, g.inputs, g.states, g.slots, ("t",))])
    assert st["t"].item() == 4.0


def test_a_misspelled_flag_in_a_step_changes_nothing():
    p, _, st, call = adam_call(("exp_avg", "exp_avg_sq"))
    g = call[0]
    hyper = {("decouple" if k == "decoupled" else k): v for k, v in g.hyper.items()}
    before = p.clone()
    with pytest.raises(InvalidArgumentError, match="no hyper-parameter 'decouple'"):
        _native.step("t", "adam", [_group(hyper, g.params, g.inputs, g.states, g.slots, g.scalars)])
    assert torch.equal(p, before) and st["step"].item() == 4.0

