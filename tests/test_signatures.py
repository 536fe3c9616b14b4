"""Constructors: the official signature (names, defaults, kinds), defaults, the torch.optim
protocol, and ValueErrors worded as the official's."""

from __future__ import annotations

import inspect

import emafuse
import pytest
import torch
from helpers import make_params
from registry import ENTRIES, entries, quiet

# emafuse's own keyword-only options, on every optimizer.
EMAFUSE_KEYWORDS = {"maximize", "check_finite", "grad_clip", "state_dtype", "rounding", "rounding_seed", "weight_correction"}


def own_parameters(cls):
    return list(inspect.signature(cls.__init__).parameters.values())[2:]  # after self, params


def official_signature(entry):
    """(name, default, kind) of the official's parameters after ``params``, less the documented
    differences."""
    if isinstance(entry.signature, type):
        params = own_parameters(entry.signature)
        return [(p.name, p.default, p.kind) for p in params if p.name not in entry.signature_differences]
    return [(name, default, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name, default in entry.signature.items()]


def signature_params():
    return [pytest.param(e, id=e.name, marks=[pytest.mark.official] if isinstance(e.signature, type) else [])
            for e in ENTRIES]


@pytest.mark.parametrize("entry", signature_params())
def test_signature_and_defaults_are_the_officials(entry):
    """Every parameter of the official constructor, in its order, with its default and kind;
    what ours adds is keyword-only; ``defaults`` holds the same values."""
    ours = own_parameters(entry.cls)
    theirs = official_signature(entry)
    names = {name for name, _, _ in theirs}
    assert [(p.name, p.default, p.kind) for p in ours if p.name in names] == theirs
    assert [p.name for p in ours[:len(theirs)]] == [name for name, _, _ in theirs], "official parameters first"
    extra = [p for p in ours if p.name not in names]
    assert all(p.kind == p.KEYWORD_ONLY for p in extra), [p.name for p in extra]
    assert EMAFUSE_KEYWORDS <= {p.name for p in ours if p.kind == p.KEYWORD_ONLY} | names
    if entry.takes_orthograd:
        by_name = {p.name: p for p in ours}
        assert (by_name["orthograd"].default, by_name["orthograd_rescale"].default) == (False, True)
    for name in entry.signature_differences:
        assert name not in names
    opt = entry.cls(make_params([(3,)]))
    for name, default, _ in theirs:
        if name in opt.defaults:
            assert opt.defaults[name] == default, name
    assert opt.defaults["check_finite"] is False and opt.defaults["maximize"] is False and opt.defaults["grad_clip"] is None


@pytest.mark.parametrize("entry", entries())
def test_is_a_torch_optimizer_with_amp_support_exported_from_emafuse(entry):
    opt = entry.cls(make_params([(3,)]))
    assert isinstance(opt, torch.optim.Optimizer) and opt._step_supports_amp_scaling
    assert getattr(emafuse, entry.name) is entry.cls and entry.name in emafuse.__all__
    base = entry.caps.torch_base
    if base is not None:
        assert isinstance(opt, base)
        theirs = base(make_params([(3,)])).defaults
        assert {k: v for k, v in opt.defaults.items() if k in theirs} == theirs
        extra = {"check_finite", "grad_clip", "orthograd", "orthograd_rescale", "caution", "caution_norm"} | (EMAFUSE_KEYWORDS - {"maximize"})
        assert set(opt.defaults) - set(theirs) <= extra


OFFICIAL_MESSAGES = [
    pytest.param(e, bad, id=f"{e.name}-" + "-".join(f"{k}={v}" for k, v in bad.kw.items()), marks=pytest.mark.official)
    for e in ENTRIES
    if isinstance(e.signature, type)
    for bad in e.bad_args
    if bad.official
]


@pytest.mark.parametrize("entry, bad", OFFICIAL_MESSAGES)
def test_refused_arguments_raise_the_officials_error(entry, bad):
    """The official constructor refuses the same arguments with the same exception type and
    message (the registry marks emafuse's extra checks)."""
    with quiet(), pytest.raises(BaseException) as theirs:
        entry.signature(make_params([(3,)]), **bad.kw)
    with pytest.raises(type(theirs.value)) as ours:
        entry.cls(make_params([(3,)]), **bad.kw)
    assert str(ours.value) == str(theirs.value)
