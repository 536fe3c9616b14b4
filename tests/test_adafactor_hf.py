"""AdafactorHF beyond the registry's generic comparisons: every shape class (matrices with batch
and unit dimensions, conv kernels, vectors, a scalar; matrices cut across work items) against
transformers' Adafactor and the float64 reference, with and without the first moment; the state
laid out as transformers' (rows and columns without the factored dimension); AdafactorSchedule
reading the step sizes; and factors that do not fit their parameter."""

from __future__ import annotations

import emafuse
import pytest
import torch
from helpers import clone_params, make_params, run_steps
from references.adafactor_hf import RefAdafactorHF
from transformers.optimization import Adafactor as HFAdafactor
from transformers.optimization import AdafactorSchedule

SHAPES = [(9, 13), (1, 17), (11, 1), (3, 4, 5), (2, 1, 6), (4, 3, 3, 3), (7,), (1,), (), (300, 517), (5, 129, 65), (40000, 3)]


@pytest.mark.official
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(beta1=0.9, weight_decay=0.1, clip_threshold=1.5), dict(lr=0.05, relative_step=False, scale_parameter=False, eps=(1e-3, 1e-3))],
    ids=["relative", "first_moment", "fixed"],
)
def test_every_shape_matches_transformers_and_the_reference(dtype, kw):
    ours = make_params(SHAPES, dtype, seed=3)
    theirs = clone_params(ours)
    opt, hf = emafuse.AdafactorHF(ours, **kw), HFAdafactor(theirs, **kw)
    ref = RefAdafactorHF(ours, **kw)
    # fp32: transformers' means and norms are float32 reductions in another order
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-5, 5e-6)
    for t in range(8):
        # gradients of several magnitudes, so that RMS clipping both acts and does not
        for o, ps in ((opt, ours), (hf, theirs)):
            run_steps(o, ps, 1, seed=t, scale=10.0 ** -(t % 4), first=t)
        ref.step([p.grad for p in ours])
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"shape {SHAPES[i]}")
        torch.testing.assert_close(p.double(), ref.params[i], rtol=rtol, atol=atol, msg=f"shape {SHAPES[i]}")
        mine, hf_state = opt.state[p], hf.state[q]
        assert set(mine) == set(hf_state), SHAPES[i]
        for key, v in hf_state.items():
            if key == "step":
                assert float(mine[key]) == v == 8
                continue
            if key == "RMS":  # (a float64 tensor here; transformers' has the parameter's dtype)
                assert abs(float(mine[key]) - float(v)) <= 1e-6 * float(v), SHAPES[i]
                continue
            assert mine[key].shape == v.shape and mine[key].dtype == v.dtype, (SHAPES[i], key)
            # (fp32 exp_avg: steps of ~1e-2 from RMS(p) and RMS(U) that transformers reduces in
            # float32, ~1e-6 relative: they agree to ~3e-9 absolute, its elements near zero too)
            state_atol = 1e-8 if key == "exp_avg" and dtype == torch.float32 else 1e-12
            torch.testing.assert_close(mine[key], v, rtol=rtol, atol=state_atol, msg=f"{SHAPES[i]} {key}")


@pytest.mark.official
def test_adafactor_schedule_reports_the_step_sizes():
    """transformers' AdafactorSchedule asks the optimizer's ``_get_lr`` for each group's step size
    (from the state's step and RMS): the same values with either optimizer."""
    ours = make_params([(6, 7), (5,)], seed=4)
    theirs = clone_params(ours)
    schedules = []
    for opt_cls, ps in ((emafuse.AdafactorHF, ours), (HFAdafactor, theirs)):
        opt = opt_cls(ps, warmup_init=True)
        sched = AdafactorSchedule(opt)
        lrs = []
        for t in range(3):
            run_steps(opt, ps, 1, seed=t, first=t)
            sched.step()
            lrs.append(float(sched.get_last_lr()[0]))
        schedules.append(lrs)
    torch.testing.assert_close(schedules[0], schedules[1], rtol=1e-6, atol=0)
    assert schedules[0][0] > 0 and schedules[0][2] > schedules[0][0]  # the warm-up cap grows with t


def test_bf16_parameters_keep_float32_state_and_step_as_their_float32_copies():
    """transformers computes a 16-bit parameter's step in float32 (float32 state) and rounds the
    result once: so does AdafactorHF, so a bf16 parameter's step is its float32 copy's, rounded."""
    narrow = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params([(12, 9), (9,)], seed=5)]
    wide = [torch.nn.Parameter(p.detach().float()) for p in narrow]
    opts = [emafuse.AdafactorHF(narrow, beta1=0.9), emafuse.AdafactorHF(wide, beta1=0.9)]
    for t in range(3):
        for n, w in zip(narrow, wide):
            n.grad = torch.randn(n.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64).to(torch.bfloat16)
            w.grad = n.grad.float()
        for o in opts:
            o.step()
        for n, w in zip(narrow, wide):
            assert torch.equal(n, w.to(torch.bfloat16))
            with torch.no_grad():
                w.copy_(n.float())  # the same weights for the next step
    assert all(v.dtype == torch.float32 for st in opts[0].state.values() for v in st.values() if v.dim() > 0)


def test_factors_that_do_not_fit_their_parameter_are_refused_and_nothing_changes():
    p = make_params([(6, 4)], seed=6)[0]
    opt = emafuse.AdafactorHF([p])
    run_steps(opt, [p], 1, seed=0)
    opt.state[p]["exp_avg_sq_row"] = torch.rand(5) + 0.1  # 5 rows for a 6-row parameter
    before = p.detach().clone()
    with pytest.raises(emafuse.ShapeError, match=r"state 'exp_avg_sq_row' has shape \[5\] but a parameter of shape \[6, 4\] needs"):
        run_steps(opt, [p], 1, seed=1, first=1)
    assert torch.equal(p, before) and float(opt.state[p]["step"]) == 1
