"""Research averaging methods against float64 references and the spec's vectors (averaging.md
B.1–B.8, T.1, T.3, T.4): BEMA, Switch EMA, EDM2 power EMA and post-hoc reconstruction, LAWA,
teacher EMA, SLERP/LITI and model soups."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from emafuse.averaging import (
    BEMA,
    LAWA,
    PostHocEMA,
    PowerEMA,
    SwitchEMA,
    TeacherEMA,
    gamma_to_sigma_rel,
    greedy_soup,
    liti,
    sigma_rel_to_gamma,
    slerp,
    solve_posthoc_coefficients,
    uniform_soup,
    weighted_sum,
)
from emafuse.errors import InvalidArgumentError, ShapeError
from torch import nn


def scalar_model(v: float = 0.0, dtype=torch.float64) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([v], dtype=dtype))
    return m


def set_(m: nn.Module, v: float) -> None:
    with torch.no_grad():
        m.w.fill_(v)


def rand_model(seed: int, shapes=((7, 5), (3,), (4097,)), dtype=torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    for i, s in enumerate(shapes):
        setattr(m, f"p{i}", nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) + 0.1).to(dtype)))
    return m


# -- BEMA ---------------------------------------------------------------------------------------


def test_bema_spec_vectors():
    m = scalar_model(0.0)
    b = BEMA(m, update_every=1)
    expect = [(0.3015113446, 0.9205552653), (0.7918227858, 2.0085514696), (1.4042609528, 3.2003695194),
              (2.0980013942, 4.4575796437), (2.8472942123, 5.7563480081)]
    for t in range(1, 6):
        set_(m, t)
        b.update(m)
        assert b._ema[0].item() == pytest.approx(expect[t - 1][0], abs=1e-9)
        assert b.module.w.item() == pytest.approx(expect[t - 1][1], abs=1e-9)
    m = scalar_model(0.0)
    b = BEMA(m, update_after_step=2, update_every=3)
    for t in range(1, 9):
        set_(m, t)
        b.update(m)
        if t in (2, 3, 4):
            assert b._ema[0].item() == 2 and b.module.w.item() == 2
        if t == 5:
            assert (b._ema[0].item(), b.module.w.item()) == pytest.approx((2.8320502943, 4.6281588610), abs=1e-9)
    assert (b._ema[0].item(), b.module.w.item()) == pytest.approx((4.1240377208, 7.5701327857), abs=1e-9)


def test_bema_against_f64_reference_and_resume():
    def run(model, bema, ts):
        g = torch.Generator().manual_seed(3)
        for t in range(1, 31):
            steps = [torch.randn(p.shape, generator=g) * 0.2 for p in model.parameters()]
            if t not in ts:
                continue
            with torch.no_grad():
                for p, d in zip(model.parameters(), steps):
                    p.add_(d)
            bema.update(model)

    kw = dict(update_after_step=3, update_every=2, lag=5.0, multiplier=1.5, min_ema_multiplier=0.05)
    m = rand_model(0)
    b = BEMA(m, **kw)
    ref_theta0 = [p.detach().double().clone() for p in m.parameters()]
    ref_e = [x.clone() for x in ref_theta0]
    ref_o = [x.clone() for x in ref_theta0]
    g = torch.Generator().manual_seed(3)
    for t in range(1, 31):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        b.update(m)
        th = [p.detach().double() for p in m.parameters()]
        if t <= 3:
            ref_theta0, ref_e, ref_o = [x.clone() for x in th], [x.clone() for x in th], [x.clone() for x in th]
        elif (t - 3) % 2 == 0:
            bb = 5.0 + 1.5 * (t - 3)
            beta, alpha = max(bb**-0.5, 0.05), bb**-0.2
            ref_e = [e + beta * (x - e) for e, x in zip(ref_e, th)]
            ref_o = [alpha * (x - a) + e for x, a, e in zip(th, ref_theta0, ref_e)]
    for o, r in zip(b.module.parameters(), ref_o):
        torch.testing.assert_close(o.double(), r, rtol=2e-6, atol=2e-6)
    # Resume: 30 steps == 14 steps + state_dict round trip + 16 steps.
    m1, m2 = rand_model(0), rand_model(0)
    b1, b2 = BEMA(m1, **kw), BEMA(m2, **kw)
    run(m1, b1, range(1, 31))
    run(m2, b2, range(1, 15))
    saved = copy.deepcopy(b2.state_dict())
    b3 = BEMA(rand_model(9), **kw)
    b3.load_state_dict(saved)
    run(m2, b3, range(15, 31))
    assert all(torch.equal(a, c) for a, c in zip(b1.module.parameters(), b3.module.parameters()))


def test_bema_switches_and_trl_compat():
    m = scalar_model(1.0)
    b = BEMA(m, bias_power=None, update_every=1)
    set_(m, 3.0)
    b.update(m)
    assert b.module.w.item() == b._ema[0].item()  # no correction: O = E
    b = BEMA(m, ema_power=None, update_every=1)
    set_(m, 5.0)
    b.update(m)
    assert b._ema[0].item() == 5.0  # beta = 1: E follows theta
    assert BEMA(m, update_after_step=4, compat="trl").coefficients(8) == pytest.approx((18.0**-0.2, 18.0**-0.5))
    assert BEMA(m, update_after_step=4).coefficients(8) == pytest.approx((14.0**-0.2, 14.0**-0.5))


# -- Switch EMA ------------------------------------------------------------------------------


def test_switch_ema_spec_vector():
    m = scalar_model(0.0)
    sw = SwitchEMA(m, 0.5)
    trace = []
    for _epoch in range(2):
        for _ in range(2):
            set_(m, m.w.item() + 1)
            sw.update(m)
            trace.append((m.w.item(), sw.module.w.item()))
        sw.end_of_epoch(m)
        trace.append(("switch", m.w.item()))
    assert trace == [(1, 0.5), (2, 1.25), ("switch", 1.25), (2.25, 1.75), (3.25, 2.5), ("switch", 2.5)]
    sw2 = SwitchEMA(scalar_model(), 0.5, switch_every=2, switch_start=1)
    assert [sw2._due(e) for e in range(6)] == [False, True, False, True, False, True]


# -- EDM2 power EMA and post-hoc reconstruction -------------------------------------------------


def test_sigma_rel_gamma_table():
    table = {0.05: 16.9721986023, 0.10: 6.9372039376, 0.15: 3.5578687749, 0.20: 1.8262137799, 0.25: 0.7198239580, 0.28: 0.1693439938}
    for s, g in table.items():
        assert sigma_rel_to_gamma(s) == pytest.approx(g, abs=1e-9)
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, abs=1e-12)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.29)


def test_power_ema_betas_and_long_run():
    m = scalar_model(0.0)
    pe = PowerEMA(m, sigma_rels=(0.10,))
    betas = [pe.betas(t, 1.0)[0] for t in range(1, 6)]
    assert betas == pytest.approx([0, 0.0040800317, 0.0400246705, 0.1019379200, 0.1701396218], abs=1e-10)
    for t in range(1, 10001):
        set_(m, t)
        pe.update(m)
    assert pe.modules[0].w.item() == pytest.approx(8881.5817498, abs=1e-6)


def test_power_ema_tracks_in_one_pass_match_separate_f64():
    m = rand_model(1)
    sig = (0.05, 0.08, 0.10, 0.15, 0.2, 0.25)  # six tracks: two native calls (5 + 1)
    pe = PowerEMA(m, sig, update_every=2)
    refs = [[p.detach().double().clone() for p in m.parameters()] for _ in sig]
    g = torch.Generator().manual_seed(0)
    t_last = 0
    for t in range(1, 12):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        pe.update(m)
        if (t - 1) % 2 == 0:
            for j, s in enumerate(sig):
                beta = (1 - (t - t_last) / t) ** (sigma_rel_to_gamma(s) + 1)
                refs[j] = [r + (1 - beta) * (p.detach().double() - r) for r, p in zip(refs[j], m.parameters())]
            t_last = t
    for j in range(len(sig)):
        for a, r in zip(pe.modules[j].parameters(), refs[j]):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_posthoc_vectors():
    from emafuse.averaging.power_ema import _p_dot

    assert _p_dot(1000, sigma_rel_to_gamma(0.05), 3000, sigma_rel_to_gamma(0.10)) == pytest.approx(9.3518328455e-07, rel=1e-9)
    # Numerical quadrature of the same inner product.
    ga, gb = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    tau = np.linspace(0, 1000, 400001)
    pa = (ga + 1) * tau**ga / 1000 ** (ga + 1)
    pb = (gb + 1) * tau**gb / 3000 ** (gb + 1)
    assert np.trapezoid(pa * pb, tau) == pytest.approx(9.3518328455e-07, rel=1e-5)
    ts = [1000, 1000, 2000, 2000, 3000, 3000, 4000, 4000]
    gs = [sigma_rel_to_gamma(s) for s in (0.05, 0.10) * 4]
    x, raw = solve_posthoc_coefficients(ts, gs, 4000, sigma_rel_to_gamma(0.08), return_raw_sum=True)
    expect = [1.3352644898e-07, -1.8250443000e-06, 1.7924190866e-04, -9.7138765964e-04, 1.1441412068e-02,
              -4.1754590382e-02, 2.5053922382e-01, 7.8056779176e-01]
    np.testing.assert_allclose(x, expect, atol=1e-9)
    assert raw == pytest.approx(1.0095582326, abs=1e-9)
    onehot = solve_posthoc_coefficients(ts, gs, 4000, sigma_rel_to_gamma(0.10))
    assert abs(onehot[7] - 1) < 1e-9 and np.abs(onehot[:7]).max() < 1e-9


def test_posthoc_reconstruction_of_a_stored_profile_and_disk_snapshots(tmp_path):
    m = rand_model(2)
    ph = PostHocEMA(m, (0.05, 0.10), snapshot_every=5, snapshot_dir=str(tmp_path))
    g = torch.Generator().manual_seed(1)
    for _t in range(1, 21):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ph.update(m)
    assert len(ph.snapshots) == 8 and all("path" in r for r in ph.snapshots)
    rec = ph.reconstruct(0.10)
    last = torch.load(ph.snapshots[-1]["path"])["state"]
    for n, p in rec.named_parameters():
        torch.testing.assert_close(p, last[n].float(), rtol=0, atol=1e-6)
    mid = ph.reconstruct(0.08)
    assert all(p.dtype == torch.float32 for p in mid.parameters())


def test_power_ema_resume():
    def steps(m, pe, rng):
        g = torch.Generator().manual_seed(4)
        for t in range(1, 21):
            d = [torch.randn(p.shape, generator=g) * 0.1 for p in m.parameters()]
            if t in rng:
                with torch.no_grad():
                    for p, x in zip(m.parameters(), d):
                        p.add_(x)
                pe.update(m)

    m1, m2 = rand_model(3), rand_model(3)
    p1, p2 = PowerEMA(m1), PowerEMA(m2)
    steps(m1, p1, range(1, 21))
    steps(m2, p2, range(1, 9))
    p3 = PowerEMA(rand_model(8))
    p3.load_state_dict(copy.deepcopy(p2.state_dict()))
    steps(m2, p3, range(9, 21))
    for a, b in zip(p1.modules, p3.modules):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# -- LAWA, teacher ------------------------------------------------------------------------------


def test_lawa_spec_vector_and_resume():
    m = scalar_model(0.0, dtype=torch.float32)
    lawa = LAWA(m, k=3, update_every=1)
    outs = []
    for t in range(1, 6):
        set_(m, t * t)
        lawa.update(m)
        outs.append(lawa.average().w.item())
    assert outs == pytest.approx([1, 2.5, 4.6666667, 9.6666667, 16.6666667], abs=1e-5)
    saved = copy.deepcopy(lawa.state_dict())
    other = LAWA(scalar_model(0.0, dtype=torch.float32), k=3, update_every=1)
    other.load_state_dict(saved)
    set_(m, 36)
    lawa.update(m)
    other.update(m)
    assert lawa.average().w.item() == other.average().w.item() == pytest.approx((16 + 25 + 36) / 3)
    with pytest.raises(InvalidArgumentError):
        LAWA(m, k=2, update_every=1).load_state_dict(saved)


def test_teacher_cosine():
    m = scalar_model(0.0)
    te = TeacherEMA(m, base=0.9, total_steps=4)
    ref = 0.0
    for k in range(6):
        set_(m, k + 1.0)
        te.update(m)
        mom = 1 - (1 - 0.9) * (np.cos(np.pi * min(k, 4) / 4) + 1) / 2
        ref = mom * ref + (1 - mom) * (k + 1.0)
        assert te.module.w.item() == pytest.approx(ref, abs=1e-12)


# -- merges -------------------------------------------------------------------------------------


def vec_model(values) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return m


def test_slerp_spec_vectors():
    out = slerp(vec_model([1.0, 1.0]), [vec_model([2.0, 1.0]), vec_model([1.0, 3.0])], dtype=torch.float64)
    torch.testing.assert_close(out["w"], torch.tensor([1.7071067812, 2.4142135624], dtype=torch.float64), atol=1e-9, rtol=0)
    out = slerp(vec_model([0.0, 0, 0]), [vec_model([1.0, 2, 2]), vec_model([2.0, 0, 1])], t=0.3, dtype=torch.float64)
    torch.testing.assert_close(out["w"], torch.tensor([1.4436954710, 1.5124001519, 1.8561478494], dtype=torch.float64), atol=1e-9, rtol=0)
    out = slerp(vec_model([0.0, 0]), [vec_model([1.0, 0]), vec_model([2.0, 1e-4])], dtype=torch.float64)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 5e-5], dtype=torch.float64), atol=1e-12, rtol=0)


def test_slerp_preserves_norm_and_folds_many():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    d1 = torch.randn(1000, generator=g)
    d2 = torch.randn(1000, generator=g)
    d2 = d2 / d2.norm() * d1.norm()
    out = slerp({"w": base}, [{"w": base + d1}, {"w": base + d2}], t=0.37)
    assert (out["w"] - base).norm().item() == pytest.approx(d1.norm().item(), rel=1e-5)
    three = slerp({"w": base}, [{"w": base + d1}, {"w": base + d2}, {"w": base + d1 + d2}])
    assert three["w"].shape == base.shape
    with pytest.raises(InvalidArgumentError):
        slerp({"w": base}, [{"w": base}, {"w": base}, {"w": base}], t=0.5)


def test_liti_and_soups():
    assert liti(vec_model([0.0]), vec_model([10.0]), 0.3)["w"].item() == pytest.approx(3.0)
    models = [rand_model(i, dtype=torch.bfloat16) for i in range(4)]
    soup = uniform_soup(models)
    ref = sum(dict(m.named_parameters())["p2"].double() for m in models) / 4
    torch.testing.assert_close(soup["p2"].double(), ref, rtol=1e-6, atol=1e-6)
    ws = weighted_sum(models[:2], [0.25, 0.75])
    torch.testing.assert_close(ws["p0"].double(), 0.25 * models[0].p0.double() + 0.75 * models[1].p0.double(), rtol=1e-6, atol=1e-6)

    target = torch.tensor(0.5)

    def evaluate(st):  # higher is better: closeness of p1's mean to 0.5
        return -abs(st["p1"].float().mean() - target).item()

    soup, chosen = greedy_soup(models, evaluate)
    assert chosen[0] == max(range(4), key=lambda i: evaluate({"p1": models[i].p1.detach()}))
    picked = [models[i] for i in chosen]
    ref = sum(m.p1.double() for m in picked) / len(picked)
    torch.testing.assert_close(soup["p1"].double(), ref, rtol=1e-6, atol=1e-6)


def test_merge_input_errors():
    with pytest.raises(ShapeError, match="p0"):
        uniform_soup([rand_model(0), rand_model(1, shapes=((2, 2), (3,), (4097,)))])
    with pytest.raises(InvalidArgumentError, match="entries"):
        uniform_soup([rand_model(0), rand_model(1, shapes=((7, 5),))])
