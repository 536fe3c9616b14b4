"""Behaviour particular to one rule, documented in its class and the spec: Adan's global clipping
and group counters, SPAM's resets and counters, SGD-SaI's gsnr, AdaBound's base_lr, AdEMAMix's
warm-up shorthand and state dtypes, AdaBelief's official checkpoints, Cautious Lion's mask."""

from __future__ import annotations

import copy
import math

import emafuse
import pytest
import torch
from helpers import (
    ODD_SHAPES,
    SMALL_SHAPES,
    assert_close,
    clone_params,
    make_params,
    random_grads,
    run_steps,
    set_grads,
)
from references.adan import RefAdan
from references.lion import RefLion
from registry import BY_NAME, quiet

# -- Adan ------------------------------------------------------------------------------------------


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
        opt.step()
        ref.step([grads[1] if t >= 3 else None])
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


# -- SPAM ------------------------------------------------------------------------------------------


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
    assert opt.param_groups[0]["total_step"] == 13 and opt.param_groups[0]["current_step"] == 2
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


def test_spam_counters_are_in_every_param_group_and_official_checkpoints_load():
    params = make_params([(4,), (3,)], seed=35)
    kw = dict(warmup_steps=3, DeltaT=5, grad_accu_steps=2, threshold=50)
    opt = emafuse.SPAM([{"params": params[:1]}, {"params": params[1:]}], **kw)
    run_steps(opt, params, 7)
    sd = opt.state_dict()
    assert all(g["total_step"] == 7 and g["current_step"] == 3 for g in sd["param_groups"])
    assert all(isinstance(k, int) for k in sd["state"]), "only per-parameter entries in state"
    again = emafuse.SPAM([{"params": params[:1]}, {"params": params[1:]}], **kw)
    again.load_state_dict(copy.deepcopy(sd))
    assert all(g["total_step"] == 7 and g["current_step"] == 3 for g in again.param_groups)
    # the official layout: counters in optimizer.state under string keys, none in the groups
    official = copy.deepcopy(sd)
    for g in official["param_groups"]:
        del g["total_step"], g["current_step"]
    official["state"].update(total_step=7, current_step=3)
    old = emafuse.SPAM([{"params": params[:1]}, {"params": params[1:]}], **kw)
    old.load_state_dict(official)
    assert all(g["total_step"] == 7 and g["current_step"] == 3 for g in old.param_groups)
    assert "total_step" not in old.state
    run_steps(old, params, 1, seed=9)
    assert all(g["total_step"] == 8 and g["current_step"] == 4 for g in old.param_groups)


# -- SGD-SaI ---------------------------------------------------------------------------------------


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
    run_steps(opt, params, 3, seed=12, first=1)
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
    again = emafuse.SGDSaI(params)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads(params, random_grads(params, 2, seed=99))
    again.step()
    assert [float(again.state[p]["gsnr"]) for p in params] == gsnr


@pytest.mark.official
def test_sgd_sai_first_step_statistics_match_the_truth_and_the_official():
    """The official computes norm and std in float32 (relative error up to ~1e-5 on 278011
    elements); emafuse's float64 sums match the float64 truth."""
    params = make_params(ODD_SHAPES, seed=16)
    theirs_p = clone_params(params)
    entry = BY_NAME["SGDSaI"]
    ours, theirs = emafuse.SGDSaI(params), entry.officials[0].make(theirs_p, {})
    grads = random_grads(params, 0, seed=6)
    set_grads(params, grads)
    set_grads(theirs_p, grads)
    with quiet():
        ours.step()
        theirs.step()
    for p, q, g in zip(params, theirs_p, grads):
        g = g.double()
        truth = float(g.norm() / ((g.std() if g.numel() > 1 else 0.0) + 1e-8))
        assert math.isclose(float(ours.state[p]["gsnr"]), truth, rel_tol=1e-12)
        assert math.isclose(float(ours.state[p]["gsnr"]), float(theirs.state[q]["gsnr"]), rel_tol=1e-5)
        assert_close(p, q, rtol=1e-5, atol=1e-6 * max(1.0, float(q.detach().abs().max())), what="param")


# -- AdaBound --------------------------------------------------------------------------------------


def test_adabound_base_lr_is_each_groups_initial_lr_and_is_saved():
    """The bounds follow the ratio of the current to the initial lr: ``base_lr`` keeps the initial
    lr under a scheduler, is saved in the state dict, is kept from the optimizer when an official
    checkpoint (which has none) is loaded, and a group added later gets its own."""
    params = make_params(SMALL_SHAPES, seed=15)
    opt = emafuse.AdaBound(params[:3], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for t in range(7):
        set_grads(params[:3], random_grads(params[:3], t))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["base_lr"] == 1e-2 and opt.param_groups[0]["lr"] < 1e-2
    opt.add_param_group({"params": params[3:], "lr": 3e-3})
    assert opt.param_groups[1]["base_lr"] == 3e-3
    sd = copy.deepcopy(opt.state_dict())
    assert [g["base_lr"] for g in sd["param_groups"]] == [1e-2, 3e-3]
    for g in sd["param_groups"]:
        del g["base_lr"]  # as the official saves it
    fresh = emafuse.AdaBound([{"params": params[:3]}, {"params": params[3:], "lr": 5e-3}], lr=2e-2)
    fresh.load_state_dict(sd)
    assert [g["base_lr"] for g in fresh.param_groups] == [2e-2, 5e-3]


# -- AdEMAMix --------------------------------------------------------------------------------------


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
    oa.add_param_group({"params": make_params([(3,)]), "t_alpha_beta3": 4, "betas": (0.0, 0.99, 0.999)})
    added = oa.param_groups[1]
    assert added["alpha_warmup"] == added["beta3_warmup"] == 4 and added["fp32_states"] is True
    assert "t_alpha_beta3" not in added


def test_ademamix_beta1_zero_keeps_no_fast_ema():
    params = make_params(SMALL_SHAPES)
    opt = emafuse.AdEMAMix(params, betas=(0.0, 0.999, 0.9999))
    run_steps(opt, params, 2)
    assert set(opt.state[params[0]]) == {"step", "exp_avg_slow", "exp_avg_sq"}


def test_ademamix_fp32_states_option_through_checkpoints():
    """bf16 states (e.g. from the official code) are made float32 on loading; the checkpoint's
    group option decides, as in torch; fp32_states=False keeps states in the parameter's dtype."""
    params = make_params(SMALL_SHAPES, dtype=torch.bfloat16)
    opt = emafuse.AdEMAMix(params, lr=1e-2)
    run_steps(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["exp_avg_slow"].dtype == torch.float32
    for st in sd["state"].values():
        for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
            st[k] = st[k].bfloat16()
    fresh = emafuse.AdEMAMix(params, lr=1e-2)
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


# -- AdaBelief -------------------------------------------------------------------------------------


@pytest.mark.official
def test_adabelief_official_checkpoint_lacks_the_flags_the_constructor_fills():
    """adabelief-pytorch keeps weight_decouple, rectify, ... on the optimizer, not in the groups:
    loading its checkpoint takes them from emafuse's constructor."""
    kw = dict(lr=1e-2, rectify=False, weight_decouple=False, weight_decay=0.1)
    params = make_params(SMALL_SHAPES, seed=8)
    official = BY_NAME["AdaBelief"].officials[0]
    with quiet():
        theirs = official.make(params, kw)
        run_steps(theirs, params, 3)
    sd = copy.deepcopy(theirs.state_dict())
    assert "rectify" not in sd["param_groups"][0] and "weight_decouple" not in sd["param_groups"][0]
    ours = emafuse.AdaBelief(clone_params(params), **kw)
    ours.load_state_dict(sd)
    assert ours.param_groups[0]["rectify"] is False and ours.param_groups[0]["weight_decouple"] is False


# -- Lion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["mean", "count"])
def test_cautious_lion_where_every_element_disagrees(norm):
    """Where the update's sign opposes the gradient everywhere the mask is empty: the parameter
    moves by its decay only (the "mean" normalisation's floor 1e-3 keeps it finite)."""
    (p,) = make_params([(33,)], dtype=torch.float64, seed=9)
    opt = emafuse.Lion([p], lr=1e-2, weight_decay=0.5, caution=True, caution_norm=norm)
    g = random_grads([p], 0)[0]
    opt.state[p] = {"exp_avg": -100 * g}  # the momentum points against every gradient element
    ref = RefLion([p], lr=1e-2, weight_decay=0.5, caution=True, caution_norm=norm)
    ref.state[0] = {"exp_avg": -100 * g.clone()}
    before = p.detach().clone()
    p.grad = g
    opt.step()
    ref.step([g])
    torch.testing.assert_close(p.detach(), before * (1 - 1e-2 * 0.5), rtol=1e-15, atol=0)
    torch.testing.assert_close(p.detach(), ref.params[0], rtol=1e-15, atol=0)


# -- SGD with sparse gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0)])  # torch: no decay with sparse
def test_sgd_steps_sparse_gradients_as_torch(momentum, nesterov, weight_decay):
    """nn.Embedding(sparse=True) beside dense layers: the dense parameters stay fused, the sparse
    one takes torch's path; the run equals torch.optim.SGD's (momentum buffers included)."""

    def build():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 6, sparse=True), "lin": torch.nn.Linear(6, 1)})

    kw = dict(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    a, b = build(), build()
    oa, ob = emafuse.SGD(a.parameters(), **kw), torch.optim.SGD(b.parameters(), foreach=False, **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randint(0, 20, (7,), generator=gen)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m["lin"](m["emb"](idx)).sum().backward()
            assert m["emb"].weight.grad.is_sparse
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if momentum:
        torch.testing.assert_close(oa.state[a["emb"].weight]["momentum_buffer"].to_dense(), ob.state[b["emb"].weight]["momentum_buffer"].to_dense())


def test_cautious_sgd_refuses_sparse_gradients_before_stepping_anything():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 6, sparse=True), "lin": torch.nn.Linear(6, 1)})
    opt = emafuse.SGD(model.parameters(), lr=0.1, momentum=0.9, caution=True)
    model["lin"](model["emb"](torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(emafuse.UnsupportedOptionError, match="caution=True needs dense gradients"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


def test_sparse_gradients_stay_an_error_where_the_rule_cannot_take_them():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = emafuse.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(emafuse.SparseGradError):
        opt.step()
