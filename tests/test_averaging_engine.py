"""The averaging rules of the native engine, called directly (spec averaging.md §1.2, D.1): each
rounding form against torch's own formula, mixed input dtypes, the fused swap, weighted sums, odd
sizes, validation before any write, and the background-thread variant."""

from __future__ import annotations

import pytest
import torch
from emafuse import _native
from emafuse.errors import DTypeError, InvalidArgumentError, ShapeError
from helpers import ODD_SHAPES


def rand(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) + 0.1).to(dtype) for s in shapes]


def ema_call(targets, inputs, **hyper):
    return _native.Group(hyper=hyper, params=targets, inputs=inputs)


@pytest.mark.parametrize("w", [1e-3, 0.3, 0.7, 1.0])
def test_forms_against_torch(w):
    e = rand(ODD_SHAPES, 0)
    th = rand(ODD_SHAPES, 1)
    # muladd: torch's d*E + (1-d)*theta (two products, one add) -> bitwise.
    a = [x.clone() for x in e]
    _native.step("t", "ema", [ema_call(a, th, weight=w, muladd=True)])
    for x, y, z in zip(a, e, th):
        assert torch.equal(x, y * (1 - w) + z * w)
    # sub: torch-ema's E - (1-d)(E - theta) -> bitwise.
    a = [x.clone() for x in e]
    _native.step("t", "ema", [ema_call(a, th, weight=w, sub=True)])
    for x, y, z in zip(a, e, th):
        assert torch.equal(x, y - (y - z) * w)
    # lerp: torch.lerp's two forms (torch may contract to FMA: within an ulp).
    a = [x.clone() for x in e]
    _native.step("t", "ema", [ema_call(a, th, weight=w)])
    for x, y, z in zip(a, e, th):
        torch.testing.assert_close(x, torch.lerp(y, z, w), rtol=2.4e-7, atol=2.4e-7)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_fp32_average_reads_low_precision_input(low):
    e = rand(ODD_SHAPES, 2)
    th = rand(ODD_SHAPES, 3, dtype=low)
    a = [x.clone() for x in e]
    _native.step("t", "ema", [ema_call(a, th, weight=0.25)])
    for x, y, z in zip(a, e, th):
        torch.testing.assert_close(x, torch.lerp(y, z.float(), 0.25), rtol=2.4e-7, atol=2.4e-7)


def test_dtype_and_shape_errors_change_nothing():
    e = rand([(5,), (3,)], 4)
    before = [x.clone() for x in e]
    with pytest.raises(DTypeError, match="float32"):
        _native.step("t", "ema", [ema_call(e, rand([(5,), (3,)], 5, torch.float64), weight=0.5)])
    with pytest.raises(DTypeError):  # a bf16 average may not read an fp32 input
        _native.step("t", "ema", [ema_call(rand([(5,)], 6, torch.bfloat16), rand([(5,)], 7), weight=0.5)])
    with pytest.raises(ShapeError):
        _native.step("t", "ema", [ema_call(e, rand([(5,), (4,)], 5), weight=0.5)])
    with pytest.raises(InvalidArgumentError, match="weight"):
        _native.step("t", "ema", [ema_call(e, rand([(5,), (3,)], 5), weight=1.5)])
    assert all(torch.equal(a, b) for a, b in zip(e, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swap_is_exact(dtype):
    a = rand(ODD_SHAPES, 8, dtype)
    b = rand(ODD_SHAPES, 9, dtype)
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    _native.step("t", "swap", [_native.Group(hyper={}, params=a, states=[{"b": y} for y in b], slots=("b",))])
    assert all(torch.equal(x, y) for x, y in zip(a, b0)) and all(torch.equal(x, y) for x, y in zip(b, a0))


def test_multi_track_and_axpby():
    th = rand(ODD_SHAPES, 10)
    tracks = [rand(ODD_SHAPES, 11 + j) for j in range(3)]
    ref = [[torch.lerp(e, t, w) for e, t in zip(tr, th)] for tr, w in zip(tracks, (0.1, 0.6, 0.01))]
    states = [{"t1": tracks[1][i], "t2": tracks[2][i]} for i in range(len(th))]
    hyper = {"tracks": 3.0, "w0": 0.1, "w1": 0.6, "w2": 0.01}
    _native.step("t", "ema_multi", [_native.Group(hyper=hyper, params=tracks[0], inputs=th, states=states, slots=("t1", "t2"))])
    for tr, rf in zip(tracks, ref):
        for x, y in zip(tr, rf):
            torch.testing.assert_close(x, y, rtol=2.4e-7, atol=2.4e-7)
    s = rand(ODD_SHAPES, 20)
    x = rand(ODD_SHAPES, 21, torch.float16)
    expect = [0.5 * a + 3.0 * b.float() for a, b in zip(s, x)]
    _native.step("t", "axpby", [_native.Group(hyper={"a": 0.5, "b": 3.0}, params=s, inputs=x)])
    assert all(torch.equal(a, b) for a, b in zip(s, expect))


def test_step_async_validates_now_and_runs_later():
    e = rand(ODD_SHAPES, 30)
    th = rand(ODD_SHAPES, 31)
    ref = [torch.lerp(a, b, 0.2) for a, b in zip(e, th)]
    called = []
    pending = _native.step_async("t", "ema", [ema_call(e, th, weight=0.2)], lambda: called.append(1))
    pending.wait()
    pending.wait()  # a second wait returns at once
    assert pending.done() and called == [1]
    for a, b in zip(e, ref):
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=2.4e-7)
    with pytest.raises(ShapeError):
        _native.step_async("t", "ema", [ema_call(e, rand([(2,)] * len(e), 1), weight=0.2)])

    def boom():
        raise RuntimeError("no event")

    pending = _native.step_async("t", "ema", [ema_call(e, th, weight=0.2)], boom)
    with pytest.raises(InvalidArgumentError, match="no event"):
        pending.wait()
