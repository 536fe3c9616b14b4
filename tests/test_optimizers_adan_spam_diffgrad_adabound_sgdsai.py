"""emafuse.Adan, SPAM, DiffGrad, AdaBound and SGDSaI against float64 spec references, the official
implementations where one installs, and torch.optim conventions."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import emafuse
from helpers import ODD_SHAPES, SMALL_SHAPES, assert_close, clone_params, make_params, random_grads, set_grads
from reference_adan_spam_diffgrad_adabound_sgdsai import RefAdaBound, RefAdan, RefDiffGrad, RefSGDSaI, RefSPAM

REF = {emafuse.Adan: RefAdan, emafuse.SPAM: RefSPAM, emafuse.DiffGrad: RefDiffGrad,
       emafuse.AdaBound: RefAdaBound, emafuse.SGDSaI: RefSGDSaI}

# Small SPAM periods so that resets, warm-up and spike clipping all happen within a few steps.
SPAM_FAST = dict(warmup_steps=3, DeltaT=5, grad_accu_steps=2, threshold=50)

CONFIGS = [
    (emafuse.Adan, dict()),
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.05)),
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.05, no_prox=True, betas=(0.9, 0.8, 0.95))),
    (emafuse.Adan, dict(lr=1e-2, max_grad_norm=0.5, weight_decay=0.02)),
    (emafuse.Adan, dict(lr=1e-2, maximize=True, eps=1e-3)),
    (emafuse.SPAM, dict()),
    (emafuse.SPAM, dict(lr=1e-2, weight_decay=0.1, **SPAM_FAST)),
    (emafuse.SPAM, dict(lr=1e-2, correct_bias=False, maximize=True, **SPAM_FAST)),
    (emafuse.SPAM, dict(lr=1e-2, **{**SPAM_FAST, "threshold": 0, "warmup_steps": 8})),
    (emafuse.DiffGrad, dict()),
    (emafuse.DiffGrad, dict(lr=1e-2, weight_decay=0.01, betas=(0.8, 0.99))),
    (emafuse.DiffGrad, dict(lr=1e-2, maximize=True)),
    (emafuse.AdaBound, dict()),
    (emafuse.AdaBound, dict(lr=1e-2, amsbound=True, weight_decay=0.01)),
    (emafuse.AdaBound, dict(lr=1e-2, gamma=0.1, final_lr=0.05, maximize=True)),
    (emafuse.SGDSaI, dict()),
    (emafuse.SGDSaI, dict(lr=1e-3, momentum=0.0, weight_decay=0.0)),
    (emafuse.SGDSaI, dict(lr=1e-3, momentum=0.5, weight_decay=0.1, eps=1e-3, maximize=True)),
]


def cid(c):
    cls, kw = c
    return cls.__name__ + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


def spiky_grads(params, step, seed=1):
    """Random gradients with a few large spikes (exercises SPAM's clipping, Adan's clipping)."""
    grads = random_grads(params, step, seed)
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    out = []
    for g in grads:
        mask = torch.rand(g.shape, generator=gen) < 0.02
        out.append(torch.where(mask, g * 30, g))
    return out


def grads_with_gaps(params, step, seed=1):
    """Parameter 1 has no gradient on steps 0 and 1 (it is first seen later); parameter 2 skips
    step 3."""
    grads = spiky_grads(params, step, seed)
    if step < 2:
        grads[1] = None
    if step == 3:
        grads[2] = None
    return grads


def set_maybe(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def ref_state_close(ours, ref, i, p, rtol, atol, what):
    for name, value in ref.state_of(i).items():
        got = ours.state[p][name]
        if isinstance(value, float):
            assert math.isclose(float(got), value, rel_tol=1e-12, abs_tol=1e-300), (what, name, float(got), value)
        else:
            assert_close(got, value, rtol=rtol, atol=atol, what=f"{what} {name}")


@pytest.mark.parametrize("config", CONFIGS, ids=[cid(c) for c in CONFIGS])
def test_fp64_matches_spec_reference(config):
    """float64 parameters: every option against the spec's rule, with parameters skipped and
    first seen late, over enough steps for SPAM's resets and Adan's difference term."""
    cls, kw = config
    params = make_params(SMALL_SHAPES + [(4097,)], dtype=torch.float64, seed=11)
    ref = REF[cls](params, **kw)
    opt = cls(params, **kw)
    for t in range(14):
        grads = grads_with_gaps(params, t)
        set_maybe(params, grads)
        opt.step()
        ref.step(grads)
    for i, (p, q) in enumerate(zip(params, ref.params)):
        assert_close(p, q, rtol=1e-10, atol=1e-12, what=f"param {i}")
        ref_state_close(opt, ref, i, p, 1e-10, 1e-12, f"param {i}")


@pytest.mark.parametrize("config", CONFIGS, ids=[cid(c) for c in CONFIGS])
def test_fp32_trajectory_matches_spec_reference(config):
    """float32 parameters of odd sizes (block and chunk edges of the CPU driver), ten steps,
    against the float64 reference run from the same start."""
    cls, kw = config
    params = make_params(ODD_SHAPES, seed=12)
    ref = REF[cls](params, **kw)
    opt = cls(params, **kw)
    for t in range(10):
        grads = spiky_grads(params, t, seed=2)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for i, (p, q) in enumerate(zip(params, ref.params)):
        scale = max(1.0, float(q.abs().max()))
        assert_close(p, q, rtol=2e-5, atol=2e-5 * scale, what=f"param {i}")


ULP_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-7 + 1e-6, torch.float16: 2**-10 + 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=[cid(c) for c in CONFIGS])
def test_each_step_from_identical_state_rounds_like_the_reference(config, dtype):
    """Math in fp32 (fp64 for fp64), rounded once to the storage dtype: from identical state, one
    step equals the float64 reference to within one unit of the dtype's precision."""
    cls, kw = config
    if cls is emafuse.SGDSaI:
        kw = {**kw, "eps": 1e-2}  # keeps gsnr (and fp16 parameters) of one-element tensors finite
    params = make_params(SMALL_SHAPES + [(4097,)], dtype=dtype, seed=13)
    opt = cls(params, **kw)
    ref = REF[cls](params, **kw)
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # spacing below the normal range
    for t in range(7):
        grads = grads_with_gaps(params, t, seed=3)
        ref.load_from(opt, params)
        set_maybe(params, grads)
        opt.step()
        ref.step([None if g is None else g.double() for g in grads])
        for i, p in enumerate(params):
            q = ref.params[i]
            atol = 1e-6 * max(1.0, float(q.abs().max())) + subnormal
            assert_close(p, q, rtol=ULP_RTOL[dtype], atol=atol, what=f"step {t} param {i}")
            for name, value in ref.state_of(i).items():
                got = opt.state[p][name]
                if isinstance(value, float):
                    assert math.isclose(float(got), value, rel_tol=1e-9), (name, float(got), value)
                else:
                    atol = 1e-6 * max(1e-3, float(value.abs().max())) + subnormal
                    assert_close(got, value, rtol=ULP_RTOL[dtype], atol=atol, what=f"step {t} {name} {i}")


# -- official implementations ------------------------------------------------------------------

def _official(cls, kw):
    """(official optimizer factory, its keyword arguments) for the same configuration."""
    if cls is emafuse.AdaBound:
        adabound = pytest.importorskip("adabound")
        return adabound.AdaBound, {k: v for k, v in kw.items()}
    if cls is emafuse.SGDSaI:
        sgd_sai = pytest.importorskip("sgd_sai")
        return sgd_sai.SGD_sai, kw
    po = pytest.importorskip("pytorch_optimizer")
    if cls is emafuse.Adan:
        # kozistr 4.1.0 equals the official sail-sg/Adan (spec §7 (g)), which has no PyPI package.
        kw = dict(kw)
        kw["weight_decouple"] = kw.pop("no_prox", False)
        return po.Adan, {**kw, "foreach": False}
    if cls is emafuse.DiffGrad:
        # kozistr 4.1.0 matches diffGrad_v2 (spec §13 (g)) with L2 decay, except that it adds
        # 1e-15 to v under the square root: ~2e-6 absolute for gradients of ~1e-5 at step 1.
        return po.DiffGrad, {**kw, "weight_decouple": False, "foreach": False}
    raise AssertionError(cls)


OFFICIAL = [
    (emafuse.Adan, dict()),
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.05)),
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.05, no_prox=True)),
    (emafuse.Adan, dict(lr=1e-2, max_grad_norm=0.5)),
    (emafuse.DiffGrad, dict()),
    (emafuse.DiffGrad, dict(lr=1e-2, weight_decay=0.01)),
    (emafuse.AdaBound, dict()),
    (emafuse.AdaBound, dict(lr=1e-2, amsbound=True, weight_decay=0.01)),
    (emafuse.AdaBound, dict(lr=1e-2, gamma=0.1, final_lr=0.05)),
    (emafuse.SGDSaI, dict()),
    (emafuse.SGDSaI, dict(lr=1e-3, momentum=0.5, weight_decay=0.1)),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", OFFICIAL, ids=[cid(c) for c in OFFICIAL])
def test_fp32_trajectory_matches_official_implementation(config, capsys):
    cls, kw = config
    factory, their_kw = _official(cls, kw)
    params = make_params(SMALL_SHAPES + [(4097,)], seed=14)
    theirs_p = clone_params(params)
    ours = cls(params, **kw)
    theirs = factory(theirs_p, **their_kw)
    for t in range(20):
        grads = spiky_grads(params, t, seed=4)
        set_grads(params, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    for p, q in zip(params, theirs_p):
        scale = max(1.0, float(q.abs().max()))
        assert_close(p, q, rtol=1e-5, atol=1e-5 * scale, what="param")
    capsys.readouterr()  # sgd_sai prints a banner on its first step


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adabound_follows_scheduler_like_official():
    adabound = pytest.importorskip("adabound")
    params = make_params(SMALL_SHAPES, seed=15)
    theirs_p = clone_params(params)
    ours = emafuse.AdaBound(params, lr=1e-2, final_lr=0.05, gamma=0.05)
    theirs = adabound.AdaBound(theirs_p, lr=1e-2, final_lr=0.05, gamma=0.05)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    for t in range(12):
        grads = random_grads(params, t, seed=5)
        set_grads(params, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
        s1.step()
        s2.step()
    assert ours.param_groups[0]["base_lr"] == 1e-2 and ours.param_groups[0]["lr"] < 1e-2
    for p, q in zip(params, theirs_p):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="param")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sgd_sai_first_step_statistics_match_official(capsys):
    sgd_sai = pytest.importorskip("sgd_sai")
    params = make_params(ODD_SHAPES, seed=16)
    theirs_p = clone_params(params)
    ours = emafuse.SGDSaI(params)
    theirs = sgd_sai.SGD_sai(theirs_p)
    grads = random_grads(params, 0, seed=6)
    set_grads(params, grads)
    set_grads(theirs_p, grads)
    ours.step()
    theirs.step()
    capsys.readouterr()
    for p, q, g in zip(params, theirs_p, grads):
        # The official computes norm and std in float32 (relative error up to ~1e-5 on 278011
        # elements); emafuse's float64 sums match the float64 truth.
        g = g.double()
        truth = float(g.norm() / ((g.std() if g.numel() > 1 else 0.0) + 1e-8))
        assert math.isclose(float(ours.state[p]["gsnr"]), truth, rel_tol=1e-12)
        assert math.isclose(float(ours.state[p]["gsnr"]), float(theirs.state[q]["gsnr"]), rel_tol=1e-5)
        assert_close(p, q, rtol=1e-5, atol=1e-6 * max(1.0, float(q.abs().max())), what="param")


# -- documented edge cases -----------------------------------------------------------------------

def test_adan_global_clipping_spans_groups():
    """The clipping factor uses the norm over every group; splitting the parameters into groups
    changes nothing (bit for bit)."""
    params = make_params(ODD_SHAPES, seed=17)
    split = clone_params(params)
    one = emafuse.Adan(params, lr=1e-2, max_grad_norm=1.0)
    two = emafuse.Adan([{"params": split[:3]}, {"params": split[3:]}], lr=1e-2, max_grad_norm=1.0)
    for t in range(4):
        grads = random_grads(params, t, seed=7)
        set_grads(params, grads)
        set_grads(split, grads)
        one.step()
        two.step()
    for p, q in zip(params, split):
        assert torch.equal(p, q)
    assert [g["step"] for g in two.param_groups] == [4, 4]


def test_adan_group_step_advances_without_gradients_and_late_parameters_are_damped():
    params = make_params([(5,), (7,)], dtype=torch.float64, seed=18)
    opt = emafuse.Adan([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2)
    ref = RefAdan(params[1:], lr=1e-2)
    for t in range(5):
        grads = random_grads(params, t, seed=8)
        params[0].grad = grads[0]
        params[1].grad = grads[1] if t >= 3 else None  # group 2 has no gradient for 3 steps
        ref_grads = [grads[1] if t >= 3 else None]
        opt.step()
        ref.step(ref_grads)
    assert [g["step"] for g in opt.param_groups] == [5, 5]
    assert_close(params[1], ref.params[0], rtol=1e-12, atol=1e-14, what="late parameter")


def test_adan_restart_zeroes_moments_and_group_steps():
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=19)
    opt = emafuse.Adan(params, lr=1e-2, weight_decay=0.01)
    ref = RefAdan(params, lr=1e-2, weight_decay=0.01)
    for t in range(8):
        if t == 4:
            opt.restart_opt()
            ref.restart()
            assert opt.param_groups[0]["step"] == 0
            assert all(float(opt.state[p]["exp_avg"].abs().max()) == 0 for p in params)
        grads = random_grads(params, t, seed=9)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-12, atol=1e-14, what="param")


def test_spam_elements_without_gradient_since_reset_stay_frozen_until_next_reset():
    kw = dict(lr=1e-2, warmup_steps=2, DeltaT=6, grad_accu_steps=2, threshold=5000)
    (p,) = make_params([(64,)], seed=20)
    opt = emafuse.SPAM([p], **kw)
    frozen = torch.arange(64) % 4 == 0
    history = []
    v_frozen = None
    for t in range(1, 14):  # t is SPAM's step number
        g = random_grads([p], t, seed=10)[0]
        if t in (6, 7):  # reset at t = 6; these elements get no gradient until clipping starts
            g = torch.where(frozen, torch.zeros_like(g), g)
        p.grad = g
        opt.step()
        history.append(p.detach().clone())
        if t == 11:
            v_frozen = opt.state[p]["exp_avg_sq"][frozen].clone()
    # Steps t = 7..11: clipping is active (t mod 6 >= 2 from t = 8) and v == 0 there.
    for t in range(7, 12):
        assert torch.equal(history[t - 1][frozen], history[6 - 1][frozen]), t
        assert not torch.equal(history[t - 1][~frozen], history[t - 2][~frozen])
    st = opt.state[p]
    assert torch.count_nonzero(v_frozen) == 0
    # t = 12 resets the moments; clipping is off right after the reset, so they move again.
    assert not torch.equal(history[12 - 1][frozen], history[11 - 1][frozen])
    assert opt.state["total_step"] == 13 and opt.state["current_step"] == 2
    assert float(st["step"]) == 13, "the per-parameter step is never reset"


def test_spam_reset_spares_parameters_without_gradient():
    params = make_params([(6,), (6,)], seed=21)
    opt = emafuse.SPAM(params, DeltaT=3, warmup_steps=1, grad_accu_steps=3)
    for t in range(1, 4):
        grads = random_grads(params, t, seed=11)
        params[0].grad = grads[0]
        params[1].grad = grads[1] if t < 3 else None  # absent at the reset step t = 3
        before = opt.state[params[1]]["exp_avg"].clone() if t == 3 else None
        opt.step()
    assert torch.equal(opt.state[params[1]]["exp_avg"], before) and torch.count_nonzero(before) > 0
    assert float(opt.state[params[1]]["step"]) == 2


def test_spam_global_hyper_parameters_cannot_differ_per_group():
    params = make_params([(3,), (4,)], seed=22)
    with pytest.raises(ValueError, match="DeltaT"):
        emafuse.SPAM([{"params": params[:1]}, {"params": params[1:], "DeltaT": 7}])
    opt = emafuse.SPAM(params[:1])
    opt.add_param_group({"params": params[1:], "lr": 0.1})  # ordinary hyper-parameters may differ


def test_sgd_sai_scalar_parameter_and_zero_first_gradient():
    params = make_params([(1,), (5,), (8,)], dtype=torch.float64, seed=23)
    opt = emafuse.SGDSaI(params, lr=1e-3, weight_decay=0.0)
    grads = random_grads(params, 0, seed=12)
    grads[1] = torch.zeros_like(grads[1])
    set_grads(params, grads)
    opt.step()
    assert math.isclose(float(opt.state[params[0]]["gsnr"]), abs(float(grads[0])) / 1e-8, rel_tol=1e-12)
    assert float(opt.state[params[1]]["gsnr"]) == 0.0
    frozen = params[1].detach().clone()
    for t in range(1, 4):
        set_grads(params, random_grads(params, t, seed=12))
        opt.step()
    assert torch.equal(params[1], frozen), "gsnr 0 freezes the parameter (no weight decay here)"


def test_sgd_sai_gsnr_is_lazy_per_parameter_and_never_recomputed_on_resume():
    params = make_params([(9,), (4, 3)], seed=24)
    opt = emafuse.SGDSaI(params)
    params[0].grad = random_grads(params, 0, seed=13)[0]
    opt.step()
    assert params[1] not in opt.state
    set_grads(params, random_grads(params, 1, seed=13))
    opt.step()
    g1 = random_grads(params, 1, seed=13)[1].double()
    assert math.isclose(float(opt.state[params[1]]["gsnr"]), float(g1.norm() / (g1.std() + 1e-8)), rel_tol=1e-6)
    gsnr = [float(opt.state[p]["gsnr"]) for p in params]
    saved = copy.deepcopy(opt.state_dict())
    again = emafuse.SGDSaI(params)
    again.load_state_dict(saved)
    set_grads(params, random_grads(params, 2, seed=99))
    again.step()
    assert [float(again.state[p]["gsnr"]) for p in params] == gsnr


def test_sgd_sai_gsnr_keeps_full_precision_through_state_dict_of_bf16_parameters():
    params = make_params([(300,), (4, 5)], dtype=torch.bfloat16, seed=32)
    opt = emafuse.SGDSaI(params)
    set_grads(params, random_grads(params, 0, seed=19))
    opt.step()
    gsnr = [opt.state[p]["gsnr"].clone() for p in params]
    assert all(g.dtype == torch.float64 for g in gsnr)
    again = emafuse.SGDSaI(params)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, g in zip(params, gsnr):
        st = again.state[p]
        assert st["gsnr"].dtype == torch.float64 and st["gsnr"].device.type == "cpu" and torch.equal(st["gsnr"], g)
        assert st["momentum_buffer"].dtype == torch.bfloat16


def test_diffgrad_previous_grad_is_a_copy_under_in_place_accumulation():
    params = make_params(SMALL_SHAPES, seed=25)
    other = clone_params(params)
    a = emafuse.DiffGrad(params, lr=1e-2)
    b = emafuse.DiffGrad(other, lr=1e-2)
    for t in range(4):
        grads = random_grads(params, t, seed=14)
        set_grads(params, grads)  # fresh tensors
        for q, g in zip(other, grads):  # the same grad tensor, overwritten in place
            if q.grad is None:
                q.grad = g.clone()
            else:
                q.grad.copy_(g)
        a.step()
        b.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


# -- torch.optim conventions ---------------------------------------------------------------------

ALL = [emafuse.Adan, emafuse.SPAM, emafuse.DiffGrad, emafuse.AdaBound, emafuse.SGDSaI]
RICH = {emafuse.Adan: dict(lr=1e-2, max_grad_norm=1.0, weight_decay=0.01),
        emafuse.SPAM: dict(lr=1e-2, weight_decay=0.01, **SPAM_FAST),
        emafuse.DiffGrad: dict(lr=1e-2, weight_decay=0.01),
        emafuse.AdaBound: dict(lr=1e-2, amsbound=True),
        emafuse.SGDSaI: dict(lr=1e-3)}


@pytest.mark.parametrize("cls", ALL)
def test_state_dict_round_trip_and_bit_exact_resume(cls):
    params = make_params(SMALL_SHAPES + [(4097,)], seed=26)
    opt = cls(params, **RICH[cls])
    for t in range(4):
        set_grads(params, spiky_grads(params, t, seed=15))
        opt.step()
    saved_params = clone_params(params)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for t in range(4, 9):
        set_grads(params, spiky_grads(params, t, seed=15))
        opt.step()
    buf.seek(0)
    resumed = cls(saved_params, **RICH[cls])
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    for t in range(4, 9):
        set_grads(saved_params, spiky_grads(saved_params, t, seed=15))
        resumed.step()
    for p, q in zip(params, saved_params):
        assert torch.equal(p, q)
        for name, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][name], value), name
    assert resumed.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for copy_of in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copy_of.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


@pytest.mark.parametrize("cls", ALL)
def test_lr_scheduler_and_tensor_lr(cls):
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=27)
    kw = {k: v for k, v in RICH[cls].items() if k != "lr"}
    opt = cls(params, lr=torch.tensor(1e-2, dtype=torch.float64), **kw)
    ref = REF[cls](params, lr=1e-2, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.7**e)
    for t in range(6):
        grads = random_grads(params, t, seed=16)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        sched.step()
        ref.h["lr"] = 1e-2 * 0.7 ** (t + 1)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-7, atol=1e-10, what="param")


@pytest.mark.parametrize("cls", ALL)
def test_grad_scaler_unscales_in_the_kernel_and_skips_inf_steps(cls):
    params = make_params(SMALL_SHAPES, seed=28)
    plain = clone_params(params)
    opt = cls(params, **RICH[cls])
    ref = cls(plain, **RICH[cls])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaler.scale(torch.ones(()))
    for t in range(6):
        grads = spiky_grads(params, t, seed=17)
        if t == 3:  # an overflowing step: skipped, no counter advances
            grads[0] = grads[0].clone()
            grads[0].view(-1)[0] = float("inf")
            snapshot = copy.deepcopy(opt.state_dict())
            before = [p.detach().clone() for p in params]
        set_grads(params, [g * scaler.get_scale() for g in grads])
        grads_before = [p.grad.clone() for p in params]
        scaler.step(opt)
        scaler.update()
        for p, g in zip(params, grads_before):
            assert torch.equal(p.grad, g), "the kernels never write .grad"
        if t == 3:
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert str(opt.state_dict()) == str(snapshot)
            continue
        set_grads(plain, grads)
        ref.step()
    for p, q in zip(params, plain):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", ALL)
def test_maximize_equals_negated_gradients_and_grads_are_untouched(cls):
    params = make_params(SMALL_SHAPES, seed=29)
    neg = clone_params(params)
    a = cls(params, maximize=True, **RICH[cls])
    b = cls(neg, **RICH[cls])
    for t in range(5):
        grads = spiky_grads(params, t, seed=18)
        set_grads(params, grads)
        set_grads(neg, [-g for g in grads])
        a.step()
        b.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)
    for p, q in zip(params, neg):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", ALL)
def test_closure_hooks_and_params_without_grad(cls):
    params = make_params([(3,), (4,)], seed=30)
    opt = cls(params, **RICH[cls])
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))

    def closure():
        params[0].grad = torch.ones_like(params[0])
        return 1.5

    assert opt.step(closure) == 1.5
    assert calls == ["pre", "post"]
    assert params[1] not in opt.state
    opt.zero_grad()
    assert params[0].grad is None
    opt.step()  # nothing has a gradient


BAD = {
    emafuse.Adan: [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9, 0.9)), dict(betas=(0.9, 0.9, -0.1)),
                   dict(max_grad_norm=-1.0), dict(weight_decay=-0.1), dict(lr=float("nan"))],
    emafuse.SPAM: [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1.0), dict(weight_decay=-1.0),
                   dict(DeltaT=0), dict(warmup_steps=-1), dict(threshold=-1), dict(grad_accu_steps=-1)],
    emafuse.DiffGrad: [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(-0.1, 0.9)), dict(weight_decay=-1.0)],
    emafuse.AdaBound: [dict(lr=-1.0), dict(lr=0.0), dict(gamma=0.0), dict(gamma=1.0), dict(final_lr=-1.0),
                       dict(betas=(0.9, 1.5)), dict(eps=-1.0), dict(weight_decay=-1.0)],
    emafuse.SGDSaI: [dict(lr=-1.0), dict(eps=-1.0), dict(momentum=1.0), dict(momentum=-0.1), dict(weight_decay=-1.0)],
}


@pytest.mark.parametrize("cls", ALL)
def test_bad_hyper_parameters_raise_value_error(cls):
    for kw in BAD[cls]:
        with pytest.raises(ValueError):
            cls(make_params([(3,)]), **kw)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_validation_messages_match_official(capsys):
    adabound = pytest.importorskip("adabound")
    sgd_sai = pytest.importorskip("sgd_sai")
    pairs = [(emafuse.AdaBound, adabound.AdaBound, [dict(lr=-1.0), dict(gamma=1.0), dict(final_lr=-1.0), dict(betas=(0.9, 1.5))]),
             (emafuse.SGDSaI, sgd_sai.SGD_sai, [dict(lr=-1.0), dict(momentum=1.0), dict(eps=-1.0), dict(weight_decay=-1.0)])]
    for ours, theirs, cases in pairs:
        for kw in cases:
            with pytest.raises(ValueError) as expected:
                theirs(make_params([(3,)]), **kw)
            with pytest.raises(ValueError) as got:
                ours(make_params([(3,)]), **kw)
            assert str(got.value) == str(expected.value)


def _nan_grad(params, opt):
    params[0].grad = torch.full_like(params[0], float("nan"))


def _double_state(params, opt):
    name = opt._slots(opt.param_groups[0])[0]
    opt.state[params[1]][name] = opt.state[params[1]][name].double()


def _sparse_grad(params, opt):
    params[1].grad = params[1].grad.to_sparse()


def _complex_param(params, opt):
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    opt.add_param_group({"params": [z]})


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("mutate, err", [(_nan_grad, emafuse.NonFiniteError), (_double_state, emafuse.DTypeError),
                                         (_sparse_grad, emafuse.SparseGradError), (_complex_param, emafuse.DTypeError)])
def test_refused_steps_change_nothing(cls, mutate, err):
    params = make_params([(5,), (6,)], seed=31)
    opt = cls(params, check_finite=True, **RICH[cls])
    for t in range(2):
        set_grads(params, random_grads(params, t))
        opt.step()
    set_grads(params, random_grads(params, 2))
    mutate(params, opt)
    snapshot = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in params]
    with pytest.raises(err):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert str(opt.state_dict()) == str(snapshot), "state or counters changed during a refused step"


@pytest.mark.parametrize("cls", ALL)
def test_is_a_torch_optimizer_with_official_defaults(cls):
    opt = cls(make_params([(3,)]))
    assert isinstance(opt, torch.optim.Optimizer) and opt._step_supports_amp_scaling
    assert opt.defaults["check_finite"] is False and opt.defaults["maximize"] is False
    assert getattr(emafuse, cls.__name__) is cls


# -- checkpoints from and to the official implementations ----------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("direction", ["official_to_emafuse", "emafuse_to_official"])
def test_adabound_checkpoints_move_both_ways(direction):
    adabound = pytest.importorskip("adabound")
    kw = dict(lr=1e-2, amsbound=True, weight_decay=0.01)
    params = make_params(SMALL_SHAPES, seed=33)
    first = adabound.AdaBound(params, **kw) if direction == "official_to_emafuse" else emafuse.AdaBound(params, **kw)
    sched1 = torch.optim.lr_scheduler.ExponentialLR(first, gamma=0.8)
    for t in range(4):
        set_grads(params, random_grads(params, t, seed=20))
        first.step()
        sched1.step()
    resumed_p = clone_params(params)
    second = emafuse.AdaBound(resumed_p, **kw) if direction == "official_to_emafuse" else adabound.AdaBound(resumed_p, **kw)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(second, gamma=0.8)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    sched2.load_state_dict(sched1.state_dict())
    assert second.param_groups[0]["lr"] < kw["lr"]
    if direction == "official_to_emafuse":
        assert second.param_groups[0]["base_lr"] == kw["lr"]
    for t in range(4, 9):
        grads = random_grads(params, t, seed=20)
        set_grads(params, grads)
        set_grads(resumed_p, grads)
        first.step()
        second.step()
        sched1.step()
        sched2.step()
    for p, q in zip(params, resumed_p):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="param")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sgd_sai_checkpoint_from_official_keeps_its_gsnr(capsys):
    sgd_sai = pytest.importorskip("sgd_sai")
    params = make_params(SMALL_SHAPES, seed=34)
    theirs = sgd_sai.SGD_sai(params, lr=1e-3)
    for t in range(3):
        set_grads(params, random_grads(params, t, seed=21))
        theirs.step()
    resumed_p = clone_params(params)
    ours = emafuse.SGDSaI(resumed_p, lr=1e-3)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for t in range(3, 7):
        grads = random_grads(params, t, seed=21)
        set_grads(params, grads)
        set_grads(resumed_p, grads)
        theirs.step()  # not reloaded: keeps its gsnr, as emafuse does after a reload
        ours.step()
    capsys.readouterr()
    for p, q in zip(params, resumed_p):
        assert_close(q, p, rtol=1e-5, atol=1e-6 * max(1.0, float(p.abs().max())), what="param")


def test_spam_counters_are_in_the_state_dict_under_official_keys():
    params = make_params([(4,)], seed=35)
    opt = emafuse.SPAM(params, **SPAM_FAST)
    for t in range(7):
        set_grads(params, random_grads(params, t))
        opt.step()
    sd = opt.state_dict()
    assert sd["state"]["total_step"] == 7 and sd["state"]["current_step"] == 3
    again = emafuse.SPAM(params, **SPAM_FAST)
    again.load_state_dict(copy.deepcopy(sd))
    assert again.state["total_step"] == 7 and again.state["current_step"] == 3


# -- the generic reduction ------------------------------------------------------------------------

def test_native_sum_squares_any_dtype_and_layout():
    from emafuse.optim._base import sum_squares

    gen = torch.Generator().manual_seed(36)
    ts = [
        torch.randn(278011, generator=gen),
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),  # dense, permuted
        torch.randn(9, 8, generator=gen)[:, ::2],  # gaps: copied first
        torch.randn(7, generator=gen).to(torch.bfloat16),
        torch.randn(6, generator=gen).to(torch.float16),
        torch.randn(4, generator=gen, dtype=torch.complex64),
        torch.empty(0),
    ]
    expect = sum(float(torch.view_as_real(t).double().pow(2).sum()) if t.is_complex() else float(t.double().pow(2).sum()) for t in ts)
    got = sum_squares(ts)
    assert math.isclose(got, expect, rel_tol=1e-13)
    assert sum_squares(ts) == got, "reproducible"
    assert sum_squares([]) == 0.0


def test_reductions_do_not_depend_on_thread_count(tmp_path):
    """SGD-SaI's per-tensor sums and Adan's global norm are folded in a fixed order: the same
    bits with any number of threads."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, emafuse\n"
        f"sys.path.insert(0, {str(os.path.dirname(__file__))!r})\n"
        "from helpers import make_params, run_steps\n"
        "out = []\n"
        "for cls, kw in [(emafuse.SGDSaI, {}), (emafuse.Adan, dict(max_grad_norm=1.0))]:\n"
        "    ps = make_params([(300001,), (1000, 77), (5,)], seed=1)\n"
        "    o = cls(ps, **kw)\n"
        "    run_steps(o, ps, 3, seed=2)\n"
        "    out += [p.detach() for p in ps]\n"
        "torch.save(out, sys.argv[1])\n"
    )
    outs = []
    for threads in ["1", "2", "3"]:
        path = tmp_path / f"out{threads}.pt"
        env = dict(os.environ, EMAFUSE_NUM_THREADS=threads)
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
