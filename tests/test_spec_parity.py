"""Every optimizer and option against its float64 reference written from the spec
(tests/references): fp64 trajectories, fp32 trajectories over odd sizes, and one step from
identical state in every dtype."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    LOW_PRECISION,
    ODD_SHAPES,
    SMALL_SHAPES,
    ULP_RTOL,
    assert_close,
    grads_with_gaps,
    make_params,
    random_grads,
    scale_of,
    set_grads,
    spiky_grads,
)
from registry import configs


def assert_state_matches(opt, ref, i, p, rtol, atol, what, scalar_rtol=lambda name: 1e-12):
    """Parameter ``i``'s state equals the reference's: the same entries, tensors within
    (rtol, atol(value)), scalar state to ``scalar_rtol(name)`` relative."""
    want = ref.state_of(i)
    assert set(opt.state[p]) == set(want), (what, set(opt.state[p]), set(want))
    for name, value in want.items():
        got = opt.state[p][name]
        if isinstance(value, float):
            assert math.isclose(float(got), value, rel_tol=scalar_rtol(name), abs_tol=1e-300), (what, name, float(got), value)
        else:
            assert_close(got, value, rtol=rtol, atol=atol(value), what=f"{what} {name}")


def assert_state_dtypes(entry, kw, opt, p):
    """State tensors have the entry's state dtype, scalar state its own dtype."""
    for name, value in opt.state[p].items():
        if name in entry.caps.scalar_state:
            assert value.dtype == entry.caps.scalar_state[name] and value.dim() == 0, (name, value.dtype)
        else:
            assert value.dtype == entry.caps.state_dtype(p.dtype, kw), (name, value.dtype, p.dtype)


@pytest.mark.parametrize("entry, kw", configs())
def test_fp64_trajectory_matches_the_reference(entry, kw):
    """float64 parameters, 25 steps with spikes, a parameter first seen late and one skipping a
    step (enough for SPAM's resets, Adan's difference term and AdaBelief's rectification):
    parameters and every state entry as the spec's rule computes them."""
    params = make_params(SMALL_SHAPES + [(4097,)], dtype=torch.float64, seed=11)
    opt = entry.cls(params, **kw)
    ref = entry.reference(params, **kw)
    for t in range(25):
        grads = grads_with_gaps(params, t)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    # ⊥Grad's u − c·w cancels where u ≈ c·w (c from sums added in another order than the
    # reference's): an element's relative error grows there, and AdaMod's exp_avg_lr ∝ 1/sqrt(v)
    # carries it into the state (measured: 1.6e-11 relative after 25 steps).
    state_rtol = 1e-10 if kw.get("orthograd") else 1e-11
    for i, (p, q) in enumerate(zip(params, ref.params)):
        assert p.dtype == torch.float64
        assert_close(p, q, rtol=1e-11, atol=1e-12, what=f"param {i}")
        assert_state_matches(opt, ref, i, p, state_rtol, lambda v: 1e-13, f"param {i}")
        assert_state_dtypes(entry, kw, opt, p)


@pytest.mark.parametrize("entry, kw", configs())
def test_fp32_odd_sizes_match_the_reference(entry, kw):
    """float32 parameters of odd sizes (block and chunk edges of the CPU driver, 278011 elements
    in parallel chunks whose per-tensor sums are combined), three steps with spikes against the
    float64 reference run from the same start, each to fp32 round-off (longer trajectories:
    the fp64 test above, and test_official_parity / the long fp32 test below)."""
    params = make_params(ODD_SHAPES, seed=12)
    opt = entry.cls(params, **kw)
    ref = entry.reference(params, **kw)
    for t in range(3):
        grads = spiky_grads(params, t, seed=2)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        for i, (p, q) in enumerate(zip(params, ref.params)):
            assert_close(p, q, rtol=1e-6, atol=1e-6 * scale_of(q), what=f"step {t} param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entry, kw", configs())
def test_each_dtype_one_step_from_identical_state(entry, kw, dtype):
    """Math in fp32 (fp64 for fp64), rounded once to the storage dtype: from identical state (the
    optimizer's own, loaded into the reference), every one of seven steps equals the float64
    reference to within one unit of the dtype's precision; states have the entry's dtype. Scalar
    state is exact (1e-12), except that taken from sums over values computed in fp32 (the entry's
    ``rounded_scalars``): to fp32 round-off."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype in LOW_PRECISION:
        kw = {**kw, **entry.low_precision}
    params = make_params(SMALL_SHAPES + [(4097,)], dtype=dtype, seed=13)
    opt = entry.cls(params, **kw)
    ref = entry.reference(params, **kw)
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # spacing below the normal range
    extra = entry.low_precision_atol(kw) if dtype in LOW_PRECISION else 0.0
    for t in range(7):
        grads = grads_with_gaps(params, t, seed=3)
        ref.load_from(opt, params)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        for i, p in enumerate(params):
            q = ref.params[i]
            assert p.dtype == dtype
            atol = 1e-6 * scale_of(q) + subnormal + extra
            assert_close(p, q, rtol=ULP_RTOL[dtype], atol=atol, what=f"step {t} param {i}")
            if p in opt.state:
                assert_state_dtypes(entry, kw, opt, p)
                assert_state_matches(opt, ref, i, p, ULP_RTOL[dtype],
                                     lambda v: 1e-6 * max(1e-3, float(v.abs().max())) + subnormal, f"step {t} param {i}",
                                     lambda name: ULP_RTOL[compute] if name in entry.caps.rounded_scalars else 1e-12)


@pytest.mark.parametrize("entry, kw", configs(lambda e, kw: not e.officials_for(kw)))
def test_fp32_long_trajectory_stays_near_the_reference(entry, kw):
    """Configurations no official implementation ships (see the registry): their 60-step fp32
    trajectory against the float64 reference (the others are compared with the official's in
    test_official_parity.py)."""
    params = make_params(SMALL_SHAPES + [(4097,)], seed=3)
    opt = entry.cls(params, **kw)
    ref = entry.reference(params, **kw)
    for t in range(60):
        grads = random_grads(params, t, seed=5)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-4, atol=1e-5 * scale_of(q), what="param")
