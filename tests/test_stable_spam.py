"""Stable-SPAM beyond the registry's concerns: AdaClip and AdaNorm where they act, both momentum
resets, the official checkpoint format, and the engine's dependent sums passes it runs on
(tests/registry.py compares every configuration with the float64 reference and
pytorch_optimizer)."""

from __future__ import annotations

import math

import emafuse
import pytest
import torch
from emafuse import _native
from helpers import assert_close, make_params, random_grads, set_grads
from references.stable_spam import RefStableSPAM

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9, theta=0.5, amsgrad=False, reset=False,
             clean_reset=False)


def test_adaclip_scales_a_spike_down_to_the_threshold():
    """Small gradients, then one element 1000 times larger: its step is clipped to the threshold
    (and the tensor's norm rescaled), as the reference computes; without AdaClip the step would
    be another."""
    params = make_params([(64,), (9, 7)], dtype=torch.float64, seed=3)
    opt = emafuse.StableSPAM(params, lr=1e-2, gamma3=0.9)
    ref = RefStableSPAM(params, lr=1e-2, gamma3=0.9)
    for t in range(6):
        grads = random_grads(params, t, seed=4, scale=1e-2)
        if t == 5:
            grads[0][17] = 10.0
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    st = opt.state[params[0]]
    threshold = float(st["m_max_t"]) / (1 - 0.9**6)
    assert threshold < 10.0 / 2, "the spike lies above the clip threshold"
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-12, atol=1e-14, what="after the spike")


def test_a_zero_gradient_moves_the_parameter_by_its_decay_only():
    """After a step with a real gradient (state and norms not zero), a zero gradient is neither
    clipped nor rescaled (no division by its zero norm): the parameter moves by its decay and the
    Adam step of the decayed moments, as the reference computes, and nothing turns NaN."""
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = emafuse.StableSPAM([p], lr=1e-2, weight_decay=0.1)
    ref = RefStableSPAM([p], lr=1e-2, weight_decay=0.1)
    for g in (torch.randn(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)):
        set_grads([p], [g])
        opt.step()
        ref.step([g])
    assert_close(p, ref.params[0], rtol=1e-12, atol=1e-14, what="after the zero gradient")
    st = opt.state[p]
    assert all(torch.isfinite(v).all() for v in st.values())
    assert float(st["m_max_t"]) > 0 and st["exp_avg"].abs().min() > 0, "the first step's state, decayed, not cleared"


@pytest.mark.parametrize("reset_mode", ["faithful", "clean"])
def test_momentum_reset_modes(reset_mode):
    """Both runs agree bit for bit before the reset step; on it the counter restarts at 1, the
    faithful reset (the official code's) stores zero moments after a step from the old ones, the
    clean reset steps from zero moments (m = (1 − β1)·g, the step is lr·g/(|g| + eps·…) per element)."""
    params = make_params([(40,)], dtype=torch.float64, seed=5)
    runs = {}
    for mode in ("faithful", reset_mode):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = emafuse.StableSPAM(ps, lr=1e-2, update_proj_gap=3, reset_mode=mode)
        ref = RefStableSPAM(ps, lr=1e-2, update_proj_gap=3, reset_mode=mode)
        trail = []
        for t in range(4):
            grads = random_grads(ps, t, seed=6)
            set_grads(ps, grads)
            opt.step()
            ref.step(grads)
            assert_close(ps[0], ref.params[0], rtol=1e-12, atol=1e-14, what=f"{mode} step {t}")
            trail.append((ps[0].detach().clone(), {k: v.clone() for k, v in opt.state[ps[0]].items()}))
        runs[mode] = trail
    after_reset = runs[reset_mode][2][1]
    assert int(after_reset["step"]) == 1 and int(runs[reset_mode][3][1]["step"]) == 2
    if reset_mode == "faithful":
        assert not after_reset["exp_avg"].any() and not after_reset["exp_avg_sq"].any()
    else:
        assert after_reset["exp_avg"].abs().min() > 0
        assert torch.equal(runs["faithful"][1][0], runs["clean"][1][0]), "the same before the reset"
        assert not torch.equal(runs["faithful"][2][0], runs["clean"][2][0]), "the reset step differs"


def test_an_official_checkpoint_loads_and_continues():
    """The official's state: ``step`` an int, ``m_max_t`` / ``m_norm_t`` / ``v_norm_t`` 0-dim tensors
    of the gradient's dtype, param groups without emafuse's options and no ``total_steps``
    (the official keeps it in an attribute): it loads (counter at 0) and continues as the
    reference does from the same state; our checkpoint keeps the int step and the counter."""
    params = make_params([(33,), (4, 5)], dtype=torch.float64, seed=7)
    g = torch.Generator().manual_seed(8)
    official = {
        "state": {
            i: {
                "step": 7,
                "exp_avg": torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1,
                "exp_avg_sq": torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.01,
                "m_max_t": torch.tensor(0.8, dtype=torch.float64),
                "m_norm_t": torch.tensor(1.5, dtype=torch.float64),
                "v_norm_t": torch.tensor(2.5, dtype=torch.float64),
            }
            for i, p in enumerate(params)
        },
        "param_groups": [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=False, params=[0, 1])],
    }
    opt = emafuse.StableSPAM(params, lr=1e-2, weight_decay=0.05, update_proj_gap=4)
    opt.load_state_dict(official)
    assert opt.param_groups[0]["total_steps"] == 0
    ref = RefStableSPAM(params, lr=1e-2, weight_decay=0.05, update_proj_gap=4)
    ref.load_from(opt, params)
    for t in range(5):  # the reset at total step 4 included
        grads = random_grads(params, t, seed=9)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert_close(p, q, rtol=1e-12, atol=1e-14, what="continued")
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 2 and isinstance(sd["state"][0]["step"], int)  # 7 + 3 steps, reset to 1 at T = 4, then 2
    assert sd["param_groups"][0]["total_steps"] == 5


def test_the_sums_run_as_dependent_passes():
    """The engine's protocol for sharded tensors: the rule lists its sums (pass, is_max); pass 0
    writes max|g|, pass 1 reads it (with the scalar state) and writes the clipped ‖g‖²; a step
    given those sums equals the step that runs its own passes."""
    assert _native.rule_sums("stable_spam", HYPER) == [(0, True), (1, False)]
    assert _native.rule_sums("stable_spam", {**HYPER, "caution": True}) == [(0, True), (1, False), (2, False), (2, False)]
    gen = torch.Generator().manual_seed(10)
    p = torch.randn(1000, generator=gen, dtype=torch.float64)
    g = torch.randn(1000, generator=gen, dtype=torch.float64)
    g[3] = 25.0
    moments = (torch.randn(1000, generator=gen, dtype=torch.float64) * 0.1, torch.rand(1000, generator=gen, dtype=torch.float64) * 0.01 + 1e-4)
    scalars = dict(step=torch.tensor(4.0), m_max_t=torch.tensor(3.0, dtype=torch.float64), m_norm_t=torch.tensor(20.0, dtype=torch.float64),
                   v_norm_t=torch.tensor(500.0, dtype=torch.float64))

    def plan(q):
        st = dict(exp_avg=moments[0].clone(), exp_avg_sq=moments[1].clone(), **{k: v.clone() for k, v in scalars.items()})
        group = _native.Group(hyper=HYPER, params=[q], inputs=[g], states=[st], slots=("exp_avg", "exp_avg_sq"), scalars=tuple(scalars))
        return _native.StepPlan("t", "stable_spam", [group]), st

    given, st_given = plan(p.clone())
    sums = [torch.zeros((1, _native.MAX_SUMS), dtype=torch.float64)]
    assert given.sums(sums, sum_pass=0)
    assert sums[0][0].tolist() == [25.0] + [0.0] * (_native.MAX_SUMS - 1)
    assert given.sums(sums, sum_pass=1)
    tau = (0.5 * 3.0 + 0.5 * 25.0) / (1 - 0.5**5)
    clipped = torch.where(g.abs() > tau, g / 25.0 * tau, g)
    assert sums[0][0, 0] == 25.0 and math.isclose(sums[0][0, 1].item(), float((clipped * clipped).sum()), rel_tol=1e-13)
    assert given.run(sums=sums)
    own, st_own = plan(p.clone())
    assert own.run()
    assert torch.equal(given.params()[0], own.params()[0])
    for k in st_own:
        assert torch.equal(st_given[k], st_own[k]), k
