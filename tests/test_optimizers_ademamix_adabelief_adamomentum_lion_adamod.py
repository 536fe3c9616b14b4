"""AdEMAMix, AdaBelief, AdaMomentum, Lion and AdaMod: against float64 references written from the
spec (tests/reference_ademamix_adabelief_adamomentum_lion_adamod.py) and against the official implementations where they install
(adabelief-pytorch, adamod, lion-pytorch; pytorch_optimizer's AdEMAMix for the no-warm-up case)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import pytest
import torch

import emafuse
from helpers import ODD_SHAPES, SMALL_SHAPES, assert_close, clone_params, make_params, random_grads, run_steps, set_grads
from reference_ademamix_adabelief_adamomentum_lion_adamod import Reference, slot_names

CLASSES = {
    "AdaBelief": emafuse.AdaBelief,
    "AdEMAMix": emafuse.AdEMAMix,
    "AdaMomentum": emafuse.AdaMomentum,
    "Lion": emafuse.Lion,
    "AdaMod": emafuse.AdaMod,
}

# Every option of every class; lr large enough that the trajectories move.
CONFIGS = [
    ("AdaBelief", dict(lr=1e-2)),  # rectified, SGD fallback for 5 steps (official defaults)
    ("AdaBelief", dict(lr=1e-2, degenerated_to_sgd=False, weight_decay=0.1)),
    ("AdaBelief", dict(lr=1e-2, amsgrad=True, fixed_decay=True, weight_decay=0.01)),
    ("AdaBelief", dict(lr=1e-2, rectify=False, eps=1e-12)),
    ("AdaBelief", dict(lr=1e-2, rectify=False, amsgrad=True, weight_decouple=False, weight_decay=0.1, maximize=True)),
    ("AdaBelief", dict(lr=1e-2, weight_decouple=False, weight_decay=0.05, betas=(0.8, 0.99))),
    ("AdEMAMix", dict(lr=1e-2)),
    ("AdEMAMix", dict(lr=1e-2, alpha=5.0, weight_decay=0.1, betas=(0.9, 0.99, 0.999))),
    ("AdEMAMix", dict(lr=1e-2, alpha=8.0, alpha_warmup=10, beta3_warmup=15, weight_decay=0.1, maximize=True)),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), t_alpha_beta3=12)),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.99, 0.999))),
    ("AdaMomentum", dict(lr=1e-2)),
    ("AdaMomentum", dict(lr=1e-2, weight_decay=0.1)),
    ("AdaMomentum", dict(lr=1e-2, weight_decay=0.05, fixed_decay=True, maximize=True)),
    ("AdaMomentum", dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, betas=(0.8, 0.99), eps=1e-6)),
    ("Lion", dict(lr=1e-3)),
    ("Lion", dict(lr=1e-3, weight_decay=1.0, betas=(0.95, 0.98))),
    ("Lion", dict(lr=1e-3, weight_decay=0.5, lr_independent_decay=True, maximize=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1, caution=True)),
    ("Lion", dict(lr=1e-3, caution=True, caution_norm="count", maximize=True)),
    ("AdaMod", dict(lr=1e-2)),
    ("AdaMod", dict(lr=1e-2, weight_decay=0.1, beta3=0.9999)),
    ("AdaMod", dict(lr=1e-2, betas=(0.8, 0.99), beta3=0.99, eps=1e-6, maximize=True)),
]


def cid(cfg):
    name, kw = cfg
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@contextlib.contextmanager
def quiet():
    """Silence the references' prints (adabelief-pytorch) and deprecation warnings (adamod)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def slots_of(opt, p):
    name = type(opt).__name__
    return slot_names(name, opt.param_groups[0])


# -- float64 trajectories against the spec ------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=[cid(c) for c in CONFIGS])
def test_fp64_trajectory_matches_spec_reference(cfg):
    name, kw = cfg
    params = make_params(SMALL_SHAPES + [(4097,)], dtype=torch.float64, seed=3)
    opt = CLASSES[name](params, **kw)
    ref = Reference(name, params, opt.param_groups[0])
    for t in range(25):
        grads = random_grads(params, t, seed=5)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for i, p in enumerate(params):
        assert p.dtype == torch.float64
        assert_close(p, ref.params[i], rtol=1e-11, atol=1e-12, what=f"{name} param {i}")
        st = opt.state[p]
        for slot in slots_of(opt, p):
            assert st[slot].dtype == torch.float64
            assert_close(st[slot], ref.state[i][slot], rtol=1e-11, atol=1e-13, what=f"{name} {slot}")
        if name != "Lion":
            assert st["step"].item() == ref.state[i]["step"] == 25
        assert set(st) == set(slots_of(opt, p)) | ({"step"} if name != "Lion" else set())


# -- every dtype: one step at a time from identical state ---------------------------------------

DTYPE_TOL = {  # (rtol, atol) for a value computed in f32 (f64) and rounded once to the dtype
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-6),
    torch.bfloat16: (2**-7, 1e-5),
    torch.float16: (2**-10, 1e-5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[cid(c) for c in CONFIGS])
def test_each_step_matches_spec_in_every_dtype(cfg, dtype):
    """From our own state at step t (upcast to f64), the spec's step rounded once to the
    storage dtype must equal ours to within one rounding: the kernel computes in f32 (f64 for
    f64 parameters) and rounds once."""
    name, kw = cfg
    params = make_params([(1,), (3,), (7, 5), (33, 17), (4097,)], dtype=dtype, seed=11)
    opt = CLASSES[name](params, **kw)
    for t in range(8):  # AdaBelief's rectification starts at step 6
        grads = random_grads(params, t, seed=13)
        ref = Reference(name, params, opt.param_groups[0])
        for i, p in enumerate(params):
            if p in opt.state:
                st = opt.state[p]
                ref.state[i] = {k: (v.item() if k == "step" else v.double().clone()) for k, v in st.items()}
        set_grads(params, grads)
        opt.step()
        ref.step([g.double() for g in grads])
        for i, p in enumerate(params):
            rtol, atol = DTYPE_TOL[dtype]
            if name == "Lion":  # every element moves by exactly ±lr: compare the moves
                atol = max(atol, rtol * 2)
            assert_close(p, ref.params[i].to(dtype), rtol=rtol, atol=atol, what=f"{name} step {t} param {i}")
            for slot in slots_of(opt, p):
                s = opt.state[p][slot]
                expected_dtype = torch.float32 if _fp32_state(name, opt, dtype) else dtype
                assert s.dtype == expected_dtype, (slot, s.dtype)
                rtol, atol = DTYPE_TOL[s.dtype]
                assert_close(s, ref.state[i][slot].to(s.dtype), rtol=rtol, atol=atol, what=f"{name} step {t} {slot}")


def _fp32_state(name, opt, dtype):
    if name == "AdEMAMix":
        return dtype in (torch.bfloat16, torch.float16) and opt.param_groups[0]["fp32_states"]
    if name == "AdaBelief":
        return dtype == torch.float16
    return False


# -- against the official implementations ------------------------------------------------------


def official(name, params, kw):
    """The reference implementation of ``name`` with emafuse's arguments ``kw``, or skip."""
    kw = dict(kw)
    kw.pop("maximize", None)  # the references have none: callers negate the gradients instead
    if name == "AdaBelief":
        mod = pytest.importorskip("adabelief_pytorch")
        with quiet():
            return mod.AdaBelief(params, print_change_log=False, **kw)
    if name == "AdaMod":
        return pytest.importorskip("adamod").AdaMod(params, **kw)
    if name == "Lion" and kw.pop("caution", False):
        if kw.pop("caution_norm", "mean") != "mean":
            pytest.skip("no package ships the 'count' normalisation (C-Optim c_lion.py)")
        return pytest.importorskip("timm.optim").Lion(params, caution=True, foreach=False, **kw)
    if name == "Lion":
        lion = pytest.importorskip("lion_pytorch")
        if kw.pop("lr_independent_decay", False):
            kw["decoupled_weight_decay"] = True
        return lion.Lion(params, **kw)
    if name == "AdEMAMix":  # no release of apple/ml-ademamix; pytorch_optimizer agrees without warm-up
        po = pytest.importorskip("pytorch_optimizer")
        if kw.get("alpha_warmup") or kw.get("beta3_warmup") or kw.get("t_alpha_beta3") or kw.get("betas", (1,))[0] == 0:
            pytest.skip("pytorch_optimizer's warm-up and beta1 = 0 differ from the official code")
        return po.AdEMAMix(params, weight_decouple=True, alpha=kw.pop("alpha", 2.0), **kw)
    pytest.skip(f"{name} has no official implementation")


OFFICIAL_STATE_NAMES = {"AdEMAMix": {"exp_avg_fast": "exp_avg"}}


WITH_OFFICIAL = [c for c in CONFIGS if c[0] != "AdaMomentum"]


@pytest.mark.parametrize("cfg", WITH_OFFICIAL, ids=[cid(c) for c in WITH_OFFICIAL])
def test_fp32_trajectory_matches_official(cfg):
    name, kw = cfg
    params = make_params(SMALL_SHAPES + [(4097,)], seed=3)
    ref = clone_params(params)
    theirs = official(name, ref, kw)
    ours = CLASSES[name](params, **kw)
    sign = -1.0 if kw.get("maximize") else 1.0
    with quiet():
        for t in range(60):
            grads = random_grads(params, t, seed=5)
            set_grads(params, grads)
            set_grads(ref, [sign * g for g in grads])
            ours.step()
            theirs.step()
    for p, q in zip(params, ref):
        assert_close(p, q, rtol=1e-5, atol=1e-5, what=f"{name} param")
        for slot in slots_of(ours, p):
            theirs_slot = OFFICIAL_STATE_NAMES.get(name, {}).get(slot, slot)
            assert_close(ours.state[p][slot], theirs.state[q][theirs_slot], rtol=1e-5, atol=1e-6, what=slot)


def test_fp32_adamomentum_trajectory_stays_near_float64():
    """AdaMomentum has no official code: its fp32 trajectory against the f64 spec reference."""
    params = make_params(SMALL_SHAPES + [(4097,)], seed=3)
    opt = emafuse.AdaMomentum(params, lr=1e-2, weight_decay=0.1)
    ref = Reference("AdaMomentum", params, opt.param_groups[0])
    for t in range(60):
        grads = random_grads(params, t, seed=5)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-4, atol=1e-5, what="param")


@pytest.mark.parametrize("name, extra", [("AdaBelief", {}), ("AdEMAMix", {}), ("AdaMomentum", {}), ("Lion", {}),
                                         ("Lion", dict(caution=True)), ("AdaMod", {})])
def test_odd_sizes_single_steps(name, extra):
    """Sizes at and across block and chunk boundaries (incl. 278011 elements, parallel; the
    cautious mask's per-tensor sums then combine partial sums of several chunks)."""
    kw = dict(lr=1e-3 if name == "Lion" else 1e-2, weight_decay=0.1, **extra)
    params = make_params(ODD_SHAPES, seed=7)
    opt = CLASSES[name](params, **kw)
    ref = Reference(name, params, opt.param_groups[0])
    for t in range(3):
        grads = random_grads(params, t, seed=11)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        for p, q in zip(params, ref.params):
            assert_close(p, q, rtol=1e-6, atol=1e-6 * max(1.0, q.abs().max().item()), what=str(tuple(p.shape)))


# -- options -------------------------------------------------------------------------------------


def test_ademamix_t_alpha_beta3_is_shorthand_for_both_warmups():
    a, b, c = (make_params(SMALL_SHAPES, seed=1) for _ in range(3))
    oa = emafuse.AdEMAMix(a, lr=1e-2, t_alpha_beta3=7)
    ob = emafuse.AdEMAMix(b, lr=1e-2, alpha_warmup=7, beta3_warmup=7)
    oc = emafuse.AdEMAMix([{"params": c, "t_alpha_beta3": 7}], lr=1e-2)
    assert oa.param_groups[0]["alpha_warmup"] == oa.param_groups[0]["beta3_warmup"] == 7
    assert "t_alpha_beta3" not in oc.param_groups[0]
    for o, ps in ((oa, a), (ob, b), (oc, c)):
        run_steps(o, ps, 10)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(ValueError, match="conflicts"):
        emafuse.AdEMAMix(make_params(SMALL_SHAPES), t_alpha_beta3=5, alpha_warmup=6)


def test_ademamix_beta1_zero_keeps_no_fast_ema():
    params = make_params(SMALL_SHAPES)
    opt = emafuse.AdEMAMix(params, betas=(0.0, 0.999, 0.9999))
    run_steps(opt, params, 2)
    assert set(opt.state[params[0]]) == {"step", "exp_avg_slow", "exp_avg_sq"}


@pytest.mark.parametrize("name", ["AdaBelief", "AdaMomentum"])
def test_l2_decay_leaves_grad_untouched(name):
    params = make_params(SMALL_SHAPES)
    opt = CLASSES[name](params, lr=1e-2, weight_decay=0.1, weight_decouple=False)
    grads = random_grads(params, 0)
    set_grads(params, grads)
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("name", list(CLASSES))
def test_maximize_equals_minimizing_the_negated_gradient(name):
    a, b = make_params(SMALL_SHAPES, seed=2), make_params(SMALL_SHAPES, seed=2)
    oa = CLASSES[name](a, lr=1e-2, maximize=True)
    ob = CLASSES[name](b, lr=1e-2)
    for t in range(6):
        grads = random_grads(a, t)
        set_grads(a, grads)
        set_grads(b, [-g for g in grads])
        oa.step()
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(CLASSES))
def test_lr_scheduler_and_tensor_lr(name):
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=4)
    opt = CLASSES[name](params, lr=torch.tensor(1e-2), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=30)
    ref = Reference(name, params, opt.param_groups[0])
    lrs = set()
    for t in range(30):
        grads = random_grads(params, t)
        set_grads(params, grads)
        ref.step(grads)  # reads the group's current lr, as ours does
        opt.step()
        lrs.add(float(opt.param_groups[0]["lr"]))
        sched.step()
    assert len(lrs) > 20
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-11, atol=1e-12)


def tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


@pytest.mark.parametrize("name", list(CLASSES))
def test_grad_scaler_unscales_exactly_and_skips_inf_steps(name):
    """A power-of-two loss scale is undone exactly in the kernel: the run equals an unscaled
    one bit for bit; an overflowing step changes nothing (not even the step counter)."""
    a, b = tiny_model(0), tiny_model(0)
    kw = dict(lr=1e-3 if name == "Lion" else 1e-2, weight_decay=0.1)
    oa, ob = CLASSES[name](a.parameters(), **kw), CLASSES[name](b.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        x, y = torch.randn(16, 13, generator=g), torch.randint(0, 3, (16,), generator=g)
        oa.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(a(x), y)).backward()
        if step == 4:
            next(a.parameters()).grad[0, 0] = float("inf")
            before = copy.deepcopy(oa.state_dict()), [p.detach().clone() for p in a.parameters()]
        scaler.step(oa)
        scaler.update()
        if step == 4:
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before[1]))
            _assert_same_state(oa.state_dict(), before[0])
            continue
        ob.zero_grad()
        torch.nn.functional.cross_entropy(b(x), y).backward()
        ob.step()
    assert scaler.get_scale() < 2.0**10 * 2**3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    if name != "Lion":
        assert oa.state[next(a.parameters())]["step"].item() == 9


def _assert_same_state(sd1, sd2):
    for k, st in sd1["state"].items():
        for key, v in st.items():
            w = sd2["state"][k][key]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), key


@pytest.mark.parametrize("name", list(CLASSES))
def test_check_finite_refuses_nan_and_changes_nothing(name):
    params = make_params(SMALL_SHAPES)
    opt = CLASSES[name](params, lr=1e-2, check_finite=True)
    run_steps(opt, params, 2)
    snap = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    set_grads(params, random_grads(params, 5))
    params[2].grad[0, 0] = float("nan")
    with pytest.raises(emafuse.NonFiniteError):
        opt.step()
    _assert_same_state(opt.state_dict(), snap[0])
    assert all(torch.equal(p, q) for p, q in zip(params, snap[1]))


def test_params_without_grad_are_skipped_and_counters_are_per_parameter():
    params = make_params(SMALL_SHAPES)
    opt = emafuse.AdaBelief(params, lr=1e-2)
    frozen = params[1].detach().clone()
    for t in range(7):
        set_grads(params, random_grads(params, t))
        if t < 6:
            params[1].grad = None
        opt.step()
    assert opt.state[params[0]]["step"].item() == 7 and opt.state[params[1]]["step"].item() == 1
    # step 1 of params[1] is in the SGD regime while params[0] is rectified: both as the spec
    assert not torch.equal(params[1], frozen)


# -- checkpoints ---------------------------------------------------------------------------------

RESUME = [
    ("AdaBelief", torch.float32, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdaBelief", torch.float16, dict(lr=1e-2)),
    ("AdEMAMix", torch.float32, dict(lr=1e-2, alpha_warmup=6, beta3_warmup=8)),
    ("AdEMAMix", torch.bfloat16, dict(lr=1e-2, weight_decay=0.1)),
    ("AdEMAMix", torch.float16, dict(lr=1e-2, betas=(0.0, 0.999, 0.9999))),
    ("AdaMomentum", torch.float32, dict(lr=1e-2, weight_decay=0.1)),
    ("Lion", torch.bfloat16, dict(lr=1e-2, weight_decay=0.1)),
    ("AdaMod", torch.float32, dict(lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("name, dtype, kw", RESUME, ids=[f"{n}-{d}" for n, d, _ in RESUME])
def test_resume_from_checkpoint_is_bit_exact(name, dtype, kw):
    params = make_params(SMALL_SHAPES, dtype=dtype, seed=1)
    opt = CLASSES[name](params, **kw)
    run_steps(opt, params, 5, seed=1)
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buf)
    dtypes = {k: v.dtype for k, v in opt.state[params[0]].items()}
    run_steps(opt, params, 5, seed=2)

    buf.seek(0)
    ckpt = torch.load(buf)
    if name != "Lion":
        assert isinstance(ckpt["optim"]["state"][0]["step"], int)  # as the references keep it
    again = [torch.nn.Parameter(t) for t in ckpt["model"]]
    opt2 = CLASSES[name](again, **kw)
    opt2.load_state_dict(ckpt["optim"])
    assert {k: v.dtype for k, v in opt2.state[again[0]].items()} == dtypes
    run_steps(opt2, again, 5, seed=2)
    for p, q in zip(params, again):
        assert torch.equal(p, q)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, opt2.state[again[0]][k]), k


def test_ademamix_fp32_states_survive_loading_and_hooks_see_the_checkpoint_unchanged():
    params = make_params(SMALL_SHAPES, dtype=torch.bfloat16)
    opt = emafuse.AdEMAMix(params, lr=1e-2)
    run_steps(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["exp_avg_slow"].dtype == torch.float32
    seen = []
    fresh = emafuse.AdEMAMix(params, lr=1e-2)
    fresh.register_load_state_dict_pre_hook(lambda o, d: seen.append(type(d["state"][0]["exp_avg_slow"])))
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(type(o.state[params[0]]["exp_avg_slow"])))
    fresh.load_state_dict(sd)
    assert seen == [torch.Tensor, torch.Tensor]
    assert torch.equal(fresh.state[params[0]]["exp_avg_slow"], sd["state"][0]["exp_avg_slow"])
    # bf16 states (e.g. from the official code) are made float32; fp32_states=False keeps bf16
    for st in sd["state"].values():
        for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
            st[k] = st[k].bfloat16()
    fresh.load_state_dict(sd)
    assert fresh.state[params[0]]["exp_avg_slow"].dtype == torch.float32
    low = emafuse.AdEMAMix(params, lr=1e-2, fp32_states=False)
    low.load_state_dict(sd)  # group options come from the checkpoint, as in torch
    assert low.param_groups[0]["fp32_states"] is True
    sd["param_groups"][0]["fp32_states"] = False
    low.load_state_dict(sd)
    assert low.state[params[0]]["exp_avg_slow"].dtype == torch.bfloat16
    run_steps(low, params, 1)
    assert low.state[params[0]]["exp_avg_sq"].dtype == torch.bfloat16
    low2 = emafuse.AdEMAMix(make_params(SMALL_SHAPES, dtype=torch.bfloat16), fp32_states=False)
    run_steps(low2, low2.param_groups[0]["params"], 1)
    assert low2.state[low2.param_groups[0]["params"][0]]["exp_avg_fast"].dtype == torch.bfloat16


@pytest.mark.parametrize("name, kw", [
    ("AdaBelief", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("AdaBelief", dict(lr=1e-2, rectify=False, weight_decouple=False, weight_decay=0.1)),
    ("AdaMod", dict(lr=1e-2, weight_decay=0.1)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
])
@pytest.mark.parametrize("direction", ["official_to_emafuse", "emafuse_to_official"])
def test_checkpoints_move_to_and_from_the_official_implementation(name, kw, direction):
    params = make_params(SMALL_SHAPES, seed=8)
    make_ours = lambda ps: CLASSES[name](ps, **kw)  # noqa: E731
    make_theirs = lambda ps: official(name, ps, kw)  # noqa: E731
    src_make, dst_make = (make_theirs, make_ours) if direction == "official_to_emafuse" else (make_ours, make_theirs)
    with quiet():
        src = src_make(params)
        run_steps(src, params, 7, seed=3)
        sd = copy.deepcopy(src.state_dict())
        resumed = clone_params(params)
        dst = dst_make(resumed)
        if direction == "official_to_emafuse" and name == "AdaBelief":
            # the official keeps these flags on the optimizer, not in the groups: the
            # constructor's values fill them in
            assert "rectify" not in sd["param_groups"][0]
        dst.load_state_dict(sd)
        run_steps(src, params, 20, seed=4)
        run_steps(dst, resumed, 20, seed=4)
    for p, q in zip(params, resumed):
        assert_close(q, p, rtol=1e-5, atol=1e-6, what="resumed param")


def test_deepcopy_pickle_and_add_param_group():
    import pickle

    params = make_params(SMALL_SHAPES)
    opt = emafuse.AdEMAMix(params[:3], lr=1e-2, alpha_warmup=5)
    run_steps(opt, params[:3], 2)
    opt.add_param_group({"params": params[3:], "t_alpha_beta3": 4, "betas": (0.0, 0.99, 0.999)})
    assert opt.param_groups[1]["alpha_warmup"] == 4 and opt.param_groups[1]["fp32_states"] is True
    run_steps(opt, params, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is emafuse.AdEMAMix
        cparams = [p for g in clone.param_groups for p in g["params"]]
        run_steps(clone, cparams, 1, seed=9)
        assert clone.state[cparams[0]]["step"].item() == 5 and clone.state[cparams[-1]]["step"].item() == 3


# -- constructor ---------------------------------------------------------------------------------

SIGNATURES = {
    "AdaBelief": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0, amsgrad=False, weight_decouple=True,
                      fixed_decay=False, rectify=True, degenerated_to_sgd=True, print_change_log=True),
    "AdEMAMix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None, eps=1e-8,
                     weight_decay=0),
    "AdaMomentum": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, weight_decouple=True, fixed_decay=False),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
    "AdaMod": dict(lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_signature_and_defaults_are_the_references(name):
    import inspect

    sig = list(inspect.signature(CLASSES[name].__init__).parameters.values())[2:]
    positional = [(p.name, p.default) for p in sig if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == list(SIGNATURES[name].items())
    keyword_only = {p.name for p in sig if p.kind == p.KEYWORD_ONLY}
    assert {"maximize", "check_finite"} <= keyword_only
    opt = CLASSES[name](make_params(SMALL_SHAPES))
    assert isinstance(opt, torch.optim.Optimizer) and opt._step_supports_amp_scaling
    for k, v in SIGNATURES[name].items():
        if k != "print_change_log":
            assert opt.defaults[k] == v, k


BAD = {
    "AdaBelief": [(dict(lr=-1.0), "Invalid learning rate: -1.0"), (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
                  (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
                  (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
                  (dict(lr=float("nan")), "Invalid learning rate: nan"),
                  (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1")],
    "AdEMAMix": [(dict(lr=-1.0), "Invalid learning rate: -1.0"), (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
                 (dict(betas=(1.0, 0.9, 0.9)), "Invalid beta parameter at index 0: 1.0"),
                 (dict(betas=(0.9, 1.5, 0.9)), "Invalid beta parameter at index 1: 1.5"),
                 (dict(betas=(0.9, 0.9, 1.0)), "Invalid beta parameter at index 2: 1.0"),
                 (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
                 (dict(alpha=-1.0), "Invalid alpha value: -1.0"), (dict(alpha=float("nan")), "Invalid alpha value: nan"),
                 (dict(alpha_warmup=-1), "Invalid alpha_warmup value: -1"),
                 (dict(beta3_warmup=-2), "Invalid beta3_warmup value: -2"),
                 (dict(t_alpha_beta3=-3), "Invalid alpha_warmup value: -3"),
                 (dict(betas=(0.9, 0.999)), "Invalid betas")],
    "AdaMomentum": [(dict(lr=-1.0), "Invalid learning rate: -1.0"), (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
                    (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
                    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
                    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1")],
    "Lion": [(dict(lr=-1.0), "Invalid learning rate: -1.0"),
             (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
             (dict(betas=(0.9, -1.0)), "Invalid beta parameter at index 1: -1.0"),
             (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
             (dict(lr=0.0, lr_independent_decay=True), "lr_independent_decay needs lr > 0"),
             (dict(caution=True, caution_norm="sum"), "Invalid caution_norm")],
    "AdaMod": [(dict(lr=-1.0), "Invalid learning rate: -1.0"), (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
               (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
               (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
               (dict(beta3=1.0), "Invalid beta3 parameter: 1.0"),
               (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1")],
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_hyper_parameters_raise_value_error_with_the_references_message(name):
    for kw, msg in BAD[name]:
        with pytest.raises(ValueError) as got:
            CLASSES[name](make_params(SMALL_SHAPES), **kw)
        assert str(got.value).startswith(msg), (kw, str(got.value))
        if name in ("AdaBelief", "AdaMod") and "weight_decay" not in kw and "lr_independent_decay" not in kw:
            with quiet(), pytest.raises(ValueError) as theirs:
                official(name, make_params(SMALL_SHAPES), kw)
            assert str(theirs.value) == str(got.value)


def test_bad_hyper_parameters_set_later_are_refused_before_any_write():
    params = make_params(SMALL_SHAPES)
    opt = emafuse.AdaMod(params)
    run_steps(opt, params, 1)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["beta3"] = 1.5
    set_grads(params, random_grads(params, 3))
    with pytest.raises(Exception, match="beta3"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert opt.state[params[0]]["step"].item() == 1
    assert not math.isnan(params[0].sum().item())
