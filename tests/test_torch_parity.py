"""emafuse.AdamW / Adam / SGD against torch.optim on the same trajectories."""

from __future__ import annotations

import itertools

import pytest
import torch

import emafuse
from helpers import ODD_SHAPES, SMALL_SHAPES, assert_close, clone_params, make_params, run_steps

ADAMW_FLAGS = [
    dict(),
    dict(weight_decay=0.1),
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=0.05, maximize=True),
    dict(maximize=True, betas=(0.8, 0.95), eps=1e-6),
    dict(betas=(0.6, 0.9), lr=3e-2),  # 1 - beta1 >= 0.5: the other torch.lerp form
]
ADAM_FLAGS = ADAMW_FLAGS + [dict(weight_decay=0.1, decoupled_weight_decay=True)]
SGD_FLAGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, weight_decay=0.02),
    dict(momentum=0.5, maximize=True),
    dict(weight_decay=0.1, maximize=True),
]
PAIRS = [(emafuse.AdamW, torch.optim.AdamW, f) for f in ADAMW_FLAGS] + \
        [(emafuse.Adam, torch.optim.Adam, f) for f in ADAM_FLAGS] + \
        [(emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, **f)) for f in SGD_FLAGS]


def ids(pair):
    ours, _, flags = pair
    return f"{ours.__name__}-" + "-".join(f"{k}={v}" for k, v in flags.items())


@pytest.mark.parametrize("pair", PAIRS, ids=[ids(p) for p in PAIRS])
@pytest.mark.parametrize("impl", ["foreach_false", "fused"])
def test_fp32_trajectory_matches_torch(pair, impl):
    ours_cls, torch_cls, flags = pair
    params = make_params(SMALL_SHAPES + [(4097,)], seed=3)
    ref = clone_params(params)
    ours = ours_cls(params, **flags)
    theirs = torch_cls(ref, **flags, **({"foreach": False} if impl == "foreach_false" else {"fused": True}))
    steps = 120
    run_steps(ours, params, steps, seed=5)
    run_steps(theirs, ref, steps, seed=5)
    for p, q in zip(params, ref):
        assert_close(p, q, rtol=1e-5, atol=1e-5, what="param")
        for name, value in theirs.state[q].items():
            assert_close(ours.state[p][name], value, rtol=1e-5, atol=1e-6, what=name)


@pytest.mark.parametrize("cls, torch_cls, flags", [
    (emafuse.AdamW, torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True)),
    (emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
])
def test_odd_sizes_and_single_step_tolerance(cls, torch_cls, flags):
    params = make_params(ODD_SHAPES, seed=7)
    ref = clone_params(params)
    ours, theirs = cls(params, **flags), torch_cls(ref, **flags, foreach=False)
    for _ in range(3):
        run_steps(ours, params, 1, seed=11)
        run_steps(theirs, ref, 1, seed=11)
        for p, q in zip(params, ref):
            assert_close(p, q, rtol=1e-6, atol=1e-7 * max(1.0, q.abs().max().item()), what=str(tuple(p.shape)))


def test_fp64_matches_torch_tightly():
    params = make_params(SMALL_SHAPES, dtype=torch.float64, seed=2)
    ref = clone_params(params)
    ours = emafuse.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    run_steps(ours, params, 50, seed=4)
    run_steps(theirs, ref, 50, seed=4)
    for p, q in zip(params, ref):
        assert p.dtype == torch.float64 and ours.state[p]["exp_avg"].dtype == torch.float64
        assert_close(p, q, rtol=1e-12, atol=1e-13, what="fp64 param")


def adam_reference_f64(p, g, m, v, vmax, t, lr, b1, b2, eps, wd, amsgrad, decoupled):
    """One Adam/AdamW step in float64, transcribed from the spec (section 3)."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vhat = v
    if amsgrad:
        vmax = torch.maximum(vmax.double(), v)
        vhat = vmax
    d = vhat.sqrt() / (1 - b2**t) ** 0.5 + eps
    return p - lr / (1 - b1**t) * m / d, m, v, vmax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_single_step_against_f64_reference(dtype, amsgrad):
    """From identical low-precision state, one step equals the f64 reference rounded to the dtype,
    up to one unit in the last place (the kernel computes in fp32)."""
    shapes = [(4097,), (33, 17), (1,)]
    params = make_params(shapes, dtype=dtype, seed=8)
    opt = emafuse.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    run_steps(opt, params, 5, seed=9)  # non-trivial state
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    grads = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g, (p0, st) in zip(params, grads, before):
        t = st["step"].item() + 1
        vmax0 = st.get("max_exp_avg_sq", st["exp_avg_sq"])
        ref_p, ref_m, ref_v, _ = adam_reference_f64(p0, g, st["exp_avg"], st["exp_avg_sq"], vmax0, t, 1e-2, 0.9, 0.999, 1e-8, 0.1, amsgrad, True)
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        for got, want, what in [(p, ref_p, "param"), (opt.state[p]["exp_avg"], ref_m, "exp_avg"), (opt.state[p]["exp_avg_sq"], ref_v, "exp_avg_sq")]:
            want_rounded = want.to(dtype).double()
            # One unit in the last place, plus fp32 round-off where the value cancels to near zero.
            spacing = torch.finfo(dtype).eps * want.abs() + 1e-6
            assert ((got.double() - want_rounded).abs() <= spacing).all(), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_trajectory_close_to_torch_fused(dtype):
    params = make_params([(4097,), (33, 17)], dtype=dtype, seed=12)
    ref = clone_params(params)
    ours = emafuse.AdamW(params, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    run_steps(ours, params, 20, seed=13)
    run_steps(theirs, ref, 20, seed=13)
    for p, q in zip(params, ref):
        # spec 2.4: about 2 ULP of |p| (torch's own bf16 paths differ by 1 ULP per step).
        tol = 4 * torch.finfo(dtype).eps * q.double().abs().clamp_min(1e-3)
        assert ((p.double() - q.double()).abs() <= tol).float().mean() > 0.99


def test_mixed_dtypes_in_one_group_are_grouped():
    f32 = make_params([(17,), (5, 3)], seed=1)
    f64 = make_params([(9,)], dtype=torch.float64, seed=2)
    bf = make_params([(11,)], dtype=torch.bfloat16, seed=3)
    params = [f32[0], f64[0], bf[0], f32[1]]
    ref = clone_params(params)
    ours, theirs = emafuse.Adam(params, lr=1e-2), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    run_steps(ours, params, 10, seed=4)
    run_steps(theirs, ref, 10, seed=4)
    for p, q in zip(params, ref):
        tol = 1e-5 if p.dtype != torch.bfloat16 else 2e-2
        assert_close(p, q, rtol=tol, atol=tol, what=str(p.dtype))


def test_complex_params_match_torch():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3, dtype=torch.complex64, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    ref = clone_params(params)
    for ours_cls, torch_cls, kw in [(emafuse.AdamW, torch.optim.AdamW, dict(amsgrad=True)), (emafuse.SGD, torch.optim.SGD, dict(momentum=0.9))]:
        a, b = ours_cls(params, lr=1e-2, **kw), torch_cls(ref, lr=1e-2, foreach=False, **kw)
        for step in range(10):
            for p, q in zip(params, ref):
                gr = torch.randn(p.shape, dtype=p.dtype, generator=g)
                p.grad, q.grad = gr.clone(), gr.clone()
            a.step()
            b.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_channels_last_params():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    transposed = torch.nn.Parameter(torch.randn(6, 4).t())  # dense, non-contiguous
    strided = torch.nn.Parameter(torch.randn(10, 10)[:, ::2])  # not dense
    params = [conv.weight, conv.bias, transposed, strided]
    ref = clone_params(params)
    ours = emafuse.AdamW(params, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(15):
        for i, (p, q) in enumerate(zip(params, ref)):
            gr = torch.randn(p.shape)
            if i == 0:
                gr = gr.contiguous(memory_format=torch.channels_last) if step % 2 else gr  # both layouts
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert strided.stride() == (10, 2)  # updated in place, not replaced
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_results_do_not_depend_on_thread_count(threads, tmp_path):
    """Every element is independent and chunking is deterministic: bit-identical results."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, emafuse\n"
        "sys.path.insert(0, %r)\n"
        "from helpers import make_params, run_steps\n"
        "ps = make_params([(300001,), (1000, 77), (5,)], seed=1)\n"
        "o = emafuse.AdamW(ps, lr=1e-2, weight_decay=0.1)\n"
        "run_steps(o, ps, 5, seed=2)\n"
        "torch.save([p.detach() for p in ps], sys.argv[1])\n" % str(__import__("pathlib").Path(__file__).parent)
    )
    outs = []
    for env_threads in ["2", threads]:
        out = tmp_path / f"out{env_threads}.pt"
        env = dict(__import__("os").environ, EMAFUSE_NUM_THREADS=env_threads)
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, timeout=300)
        outs.append(torch.load(out))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
