"""Every optimizer against its official implementation (torch.optim for AdamW, Adam and SGD; the
pinned packages of requirements/test.txt for the others) on the same trajectories. The registry
says which configurations each official implements; the rest are compared with the float64
reference only (test_spec_parity.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    LOW_PRECISION,
    ODD_SHAPES,
    SMALL_SHAPES,
    assert_close,
    clone_params,
    make_params,
    random_grads,
    scale_of,
    set_grads,
    spiky_grads,
    state_tensors,
)
from registry import ENTRIES, official_configs, official_mains, quiet

pytestmark = pytest.mark.official


def run_both(ours, params, theirs, their_params, negate, steps, seed, grads=spiky_grads):
    """``steps`` steps of both optimizers on the same gradients (negated for theirs: ``negate``)."""
    sign = -1.0 if negate else 1.0
    with quiet():
        for t in range(steps):
            g = grads(params, t, seed)
            set_grads(params, g)
            set_grads(their_params, [sign * x for x in g])
            ours.step()
            theirs.step()


@pytest.mark.parametrize("entry, kw, official", official_configs())
def test_fp32_trajectory_matches_official(entry, kw, official):
    """fp32, the official's number of steps (20 to 120) with gradient spikes: parameters and the
    state entries both keep."""
    params = make_params(SMALL_SHAPES + [(4097,)], seed=14)
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **kw), official.make(theirs_p, kw)
    run_both(ours, params, theirs, theirs_p, official.negates(kw), official.steps, seed=4)
    for p, q in zip(params, theirs_p):
        assert_close(p, q, rtol=official.rtol, atol=official.atol, what="param")
        names = official.state_names if official.state_names is not None else {n: n for n in state_tensors(ours, p)}
        for name, their_name in names.items():
            assert_close(ours.state[p][name], theirs.state[q][their_name], rtol=official.rtol, atol=official.state_atol, what=name)


@pytest.mark.parametrize("entry, official", official_mains())
def test_odd_sizes_match_official_step_by_step(entry, official):
    """Sizes at and across block and chunk boundaries (1 to 278011 elements), three steps, each
    to single-step round-off."""
    params = make_params(ODD_SHAPES, seed=7)
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    for t in range(3):
        run_both(ours, params, theirs, theirs_p, False, 1, seed=11 + t, grads=random_grads)
        for p, q in zip(params, theirs_p):
            scale = scale_of(q)
            assert_close(p, q, rtol=official.step_rtol, atol=official.step_rtol / 10 * scale, what=f"step {t} {tuple(p.shape)}")


@pytest.mark.parametrize("entry, official", official_mains())
def test_fp64_trajectory_matches_official(entry, official):
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=2)
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    run_both(ours, params, theirs, theirs_p, False, 50, seed=4)
    for p, q in zip(params, theirs_p):
        assert p.dtype == torch.float64
        assert_close(p, q, rtol=official.fp64_rtol, atol=official.fp64_rtol / 10, what="fp64 param")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("entry, official", official_mains(lambda e, o: o.low_precision))
def test_low_precision_trajectory_stays_within_two_ulp_of_official(entry, official, dtype):
    """Spec 2.4: about 2 ULP of |p| after 20 steps (torch's own bf16 paths differ by 1 ULP per
    step): 99% of the elements within 4 ULP."""
    params = make_params([(4097,), (33, 17)], dtype=dtype, seed=12)
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    run_both(ours, params, theirs, theirs_p, False, 20, seed=13)
    for p, q in zip(params, theirs_p):
        assert p.dtype == dtype
        tol = 4 * torch.finfo(dtype).eps * q.double().abs().clamp_min(1e-3)
        assert ((p.double() - q.double()).abs() <= tol).float().mean() > 0.99


@pytest.mark.parametrize("entry, official", official_mains(lambda e, o: o.low_precision))
def test_mixed_dtypes_in_one_group_match_official(entry, official):
    """fp32, fp64 and bf16 parameters in one group: each is stepped in its own dtype."""
    f32 = make_params([(17,), (5, 3)], seed=1)
    f64 = make_params([(9,)], dtype=torch.float64, seed=2)
    bf = make_params([(11,)], dtype=torch.bfloat16, seed=3)
    params = [f32[0], f64[0], bf[0], f32[1]]
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    run_both(ours, params, theirs, theirs_p, False, 10, seed=4)
    for p, q in zip(params, theirs_p):
        assert p.dtype == q.dtype
        tol = 1e-5 if p.dtype != torch.bfloat16 else 2e-2
        assert_close(p, q, rtol=tol, atol=tol, what=str(p.dtype))


def complex_grads(params, t, seed):
    g = torch.Generator().manual_seed(seed * 1000 + t)
    return [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]


@pytest.mark.parametrize("entry, official", official_mains(lambda e, o: e.caps.complex and o.complex))
def test_complex_params_match_official(entry, official):
    """Complex parameters are updated as real views, as torch does."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3, dtype=torch.complex64, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    theirs_p = clone_params(params)
    ours, theirs = entry.cls(params, **entry.main), official.make(theirs_p, entry.main)
    run_both(ours, params, theirs, theirs_p, False, 10, seed=0, grads=complex_grads)
    for p, q in zip(params, theirs_p):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for name in state_tensors(ours, p):
            torch.testing.assert_close(ours.state[p][name], theirs.state[q][name], rtol=1e-5, atol=1e-6)


def test_every_entry_with_an_official_is_compared():
    """The parametrisations above are not empty for any entry that names an official."""
    compared = {p.values[0].name for p in official_configs()}
    assert compared == {e.name for e in ENTRIES if e.officials}
