"""The CUDA backend on a real GPU (skipped on machines without one; run by benchmarks/gpu_check.sh
on the lent GPU machine)."""

from __future__ import annotations

import emafuse
import pytest
import torch
from helpers import clone_params, make_params, random_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ODD = [(1,), (3,), (4097,), (7, 5), (3, 4, 2), (278011,), (65536,), (65537,), (2, 70000)]
CASES = [
    (emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (emafuse.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (emafuse.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    (emafuse.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (emafuse.SGD, torch.optim.SGD, dict(lr=1e-2)),
]


def cuda_params(shapes, dtype=torch.float32, seed=0):
    return [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes, dtype=dtype, seed=seed)]


def steps(opt, params, n, seed=1):
    for t in range(n):
        for p, g in zip(params, random_grads(params, t, seed)):
            p.grad = g.to(p.device)
        opt.step()


@pytest.mark.parametrize("ours, theirs, kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_torch_fused_on_cuda(ours, theirs, kw, dtype):
    params = cuda_params(ODD, dtype)
    ref = clone_params(params)
    a, b = ours(params, **kw), theirs(ref, **kw, **({"fused": True} if dtype != torch.float64 or theirs is not torch.optim.SGD else {}))
    steps(a, params, 20)
    steps(b, ref, 20)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.double(), q.double(), rtol=tol, atol=tol)
    if "step" in a.state[params[0]]:
        assert a.state[params[0]]["step"].is_cuda and a.state[params[0]]["step"].item() == 20


@pytest.mark.parametrize("ours, _, kw", CASES)
def test_cuda_equals_cpu_engine(ours, _, kw):
    """Same rule, same inputs: the CUDA kernel and the CPU kernel agree to round-off (both round
    every operation the same way; only pow() in the coefficients may differ by an ulp). Every
    element and state entry is compared, so an element the kernel failed to write is caught."""
    cpu = make_params(ODD, seed=4)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    a, b = ours(cpu, **kw), ours(gpu, **kw)
    steps(a, cpu, 7)
    steps(b, gpu, 7)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-6, atol=1e-7)
        for name, value in a.state[p].items():
            torch.testing.assert_close(b.state[q][name].cpu(), value, rtol=1e-6, atol=1e-7)


# The EMA optimizer family's CUDA twins (bit-identical to the Rust rules on the CPU, see
# test_cuda_sources.py), with options that reach every kernel flag.
FAMILY = [
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.02)),
    (emafuse.Adan, dict(lr=1e-2, weight_decay=0.02, no_prox=True)),
    (emafuse.SPAM, dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, threshold=50, DeltaT=3, grad_accu_steps=1)),
    (emafuse.SPAM, dict(lr=1e-2, correct_bias=False, warmup_steps=0, threshold=0, DeltaT=100, grad_accu_steps=1)),
    # Stable-SPAM: the three sums passes (max, clipped norm, cautious count) and both resets
    (emafuse.StableSPAM, dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3, total_T=10, caution=True)),
    (emafuse.StableSPAM, dict(lr=1e-2, amsgrad=True, update_proj_gap=4, reset_mode="clean", gamma3=0.9)),
    (emafuse.DiffGrad, dict(lr=1e-2, weight_decay=0.05)),
    (emafuse.AdaBound, dict(lr=1e-2, final_lr=0.05, gamma=0.1, weight_decay=0.01, amsbound=True)),
    (emafuse.AdaBoundW, dict(lr=1e-2, final_lr=0.05, gamma=0.1, weight_decay=0.01)),
    (emafuse.SGDSaI, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
    (emafuse.SGDSaI, dict(lr=1e-2, momentum=0.0)),
    (emafuse.AdEMAMix, dict(lr=1e-2, alpha=5.0, alpha_warmup=10, beta3_warmup=10, weight_decay=0.1)),
    (emafuse.AdEMAMix, dict(lr=1e-2, betas=(0.0, 0.999, 0.9999))),
    (emafuse.AdaBelief, dict(lr=1e-2, weight_decay=0.1, eps=1e-12, amsgrad=True, rectify=False, weight_decouple=False)),
    (emafuse.AdaBelief, dict(lr=1e-2, weight_decay=0.1, eps=1e-12, amsgrad=True, rectify=True, degenerated_to_sgd=True)),
    (emafuse.AdaMomentum, dict(lr=1e-2, weight_decay=0.1)),
    (emafuse.Lion, dict(lr=1e-3, weight_decay=0.1)),
    (emafuse.Lion, dict(lr=1e-3, weight_decay=0.1, caution=True)),
    (emafuse.Lion, dict(lr=1e-3, caution=True, caution_norm="count")),
    (emafuse.AdaMod, dict(lr=1e-2, weight_decay=0.1)),
    (emafuse.AdamW, dict(lr=1e-2, weight_decay=0.1, orthograd=True)),
    (emafuse.Lion, dict(lr=1e-3, weight_decay=0.1, orthograd=True, orthograd_rescale=False)),
]


@pytest.mark.parametrize("ours, kw", FAMILY, ids=lambda x: getattr(x, "__name__", None))
@pytest.mark.parametrize("maximize", [False, True])
def test_family_cuda_equals_cpu_engine(ours, kw, maximize):
    """As test_cuda_equals_cpu_engine, for the family. The device may differ from the CPU in the
    last bit where pow/exp (coefficients, diffGrad's friction) or the order of a sum (SGD-SaI's
    Σg, Σg²) differ, and device scalar state is float32 (SGD-SaI keeps gsnr in float64 on the
    CPU), hence round-off tolerances and no dtype check on scalar state."""
    cpu = make_params(ODD, seed=4)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    a, b = ours(cpu, maximize=maximize, **kw), ours(gpu, maximize=maximize, **kw)
    steps(a, cpu, 7)
    steps(b, gpu, 7)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-6, atol=1e-7)
        for name, value in a.state[p].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b.state[q][name].cpu(), value, rtol=1e-6, atol=1e-7, check_dtype=value.dim() > 0)


@pytest.mark.parametrize("ours, kw", [(emafuse.AdamW, dict(lr=1e-2, weight_decay=0.1)), (emafuse.StableSPAM, dict(lr=1e-2, caution=True))],
                         ids=["AdamW", "StableSPAM"])
def test_adagc_inside_the_step_on_cuda_follows_the_cpu(ours, kw):
    """``grad_clip=AdaGC``: each tensor's factor reaches its blocks (copied into the launch's
    table before the sums passes and the update) and ``p.grad`` is not written. The device's
    norms are torch's fp32 norms, the CPU's float64 sums: the factors agree to round-off."""
    cpu = make_params(ODD, seed=5)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    a, b = (ours(ps, grad_clip=emafuse.AdaGC(warmup_steps=2, lambda_abs=3.0), **kw) for ps in (cpu, gpu))
    for t in range(6):
        grads = [g * (20.0 if t == 4 and i % 2 else 1.0) for i, g in enumerate(random_grads(cpu, t, 2))]
        for p, q, g in zip(cpu, gpu, grads):
            p.grad, q.grad = g.clone(), g.cuda()
        a.step()
        b.step()
        assert all(torch.equal(q.grad.cpu(), g) for q, g in zip(gpu, grads))
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
    ga, gb = a.param_groups[0]["grad_clip"].gamma, b.param_groups[0]["grad_clip"].gamma
    assert ga.keys() == gb.keys() and all(abs(ga[k] - gb[k]) <= 1e-5 * ga[k] for k in ga)


def test_no_host_synchronisation_in_a_step():
    params = cuda_params(ODD)
    opt = emafuse.AdamW(params, lr=1e-2)
    steps(opt, params, 2)
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_one_launch_per_group_and_dtype():
    params = cuda_params(ODD) + cuda_params([(33,), (5, 5)], torch.bfloat16)
    opt = emafuse.AdamW(params, lr=1e-2)
    steps(opt, params, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.name.startswith("ef_step")]
    assert len(launches) == 2, [e.name for e in launches]


def test_grad_scaler_skips_overflow_on_the_device():
    model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).cuda()
    ref.load_state_dict(model.state_dict())
    oa, ob = emafuse.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    sa, sb = torch.amp.GradScaler("cuda", init_scale=2.0**12), torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for step in range(10):
        x, y = torch.randn(32, 13, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
        for m, o, s in [(model, oa, sa), (ref, ob, sb)]:
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            s.scale(loss).backward()
            if step == 4:
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert oa.state[next(model.parameters())]["step"].item() == 9
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_cuda_graph_capture_and_replay():
    params = cuda_params([(4097,), (65537,), (7, 5)])
    ref = clone_params(params)
    opt, ref_opt = emafuse.AdamW(params, lr=1e-2, capturable=True), emafuse.AdamW(ref, lr=1e-2)
    static_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: compile, upload the table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for q, g in zip(ref, static_grads):
        q.grad = g.clone()
    ref_opt.step()  # the warm-up step
    for _ in range(5):
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    assert opt.state[params[0]]["step"].item() == 6
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_side_stream_and_multi_device():
    devices = list(range(torch.cuda.device_count()))
    params = [torch.nn.Parameter(torch.randn(1000, device=f"cuda:{d}")) for d in devices]
    ref = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    a, b = emafuse.AdamW(params, lr=1e-2), emafuse.AdamW(ref, lr=1e-2)
    s = torch.cuda.Stream()
    for _t in range(5):
        grads = [torch.randn(1000) for _ in devices]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.to(p.device), g.clone()
        with torch.cuda.stream(s):
            a.step()
        b.step()
    torch.cuda.synchronize()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-7)


def test_checkpoint_from_cpu_torch_optimizer_moves_step_to_the_device():
    cpu_params = make_params([(17,), (4, 4)], seed=3)
    torch_opt = torch.optim.AdamW(cpu_params, lr=1e-2)
    for t in range(3):
        for p, g in zip(cpu_params, random_grads(cpu_params, t)):
            p.grad = g
        torch_opt.step()
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    opt = emafuse.AdamW(gpu, lr=1e-2)
    opt.load_state_dict(torch_opt.state_dict())
    steps(opt, gpu, 1, seed=9)
    assert all(opt.state[p]["step"].is_cuda and opt.state[p]["step"].item() == 4 for p in gpu)


# -- weight averaging (the CUDA twins of src/rules/{ema,bema,swap,axpby,slerp}.rs) -------------

AVERAGING = [
    ("ema", dict(weight=0.3), 0),
    ("ema", dict(weight=0.75), 0),
    ("ema", dict(weight=0.25, muladd=True), 0),
    ("ema", dict(weight=0.1, sub=True), 0),
    ("ema_multi", dict(tracks=3.0, w0=0.1, w1=0.6, w2=0.01), 2),
    ("bema", dict(alpha=0.4, beta=0.2), 2),
    ("bema", dict(alpha=0.0, beta=1.0, reset=True), 2),
    ("swap", {}, 1),
    ("axpby", dict(a=0.5, b=3.0), 0),
    ("axpby", dict(b=0.25, assign=True), 0),
    ("slerp", dict(t=0.3), 1),
]


@pytest.mark.parametrize("rule, hyper, n_slots", AVERAGING)
@pytest.mark.parametrize(
    "dtype, in_dtype",
    [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16), (torch.float32, torch.float16)],
)
def test_averaging_rules_cuda_equal_cpu(rule, hyper, n_slots, dtype, in_dtype):
    """Bit for bit, except slerp, whose per-tensor sums the GPU adds in another order (per thread,
    per block, then atomically across blocks): its coefficients may differ in the last bits."""
    from emafuse.averaging._engine import native_step

    if rule == "swap" and in_dtype != dtype:
        pytest.skip("swap reads no input")
    gen = torch.Generator().manual_seed(5)

    def rand(dt):
        return [(torch.randn(s, generator=gen, dtype=torch.float64) + 0.1).to(dt) for s in ODD]

    targets, inputs = rand(dtype), rand(in_dtype)
    states = [rand(dtype) for _ in range(n_slots)]
    slots = tuple(f"s{k}" for k in range(n_slots))

    def run(dev):
        ts = [t.clone().to(dev) for t in targets]
        ins = None if rule == "swap" else [x.clone().to(dev) for x in inputs]
        st = [{slots[k]: states[k][i].clone().to(dev) for k in range(n_slots)} for i in range(len(ODD))] if n_slots else None
        native_step("t", rule, [(hyper, ts, ins, st, slots)])
        return [t.cpu() for t in ts] + ([s[k].cpu() for s in st for k in slots] if st else [])

    cpu, gpu = run("cpu"), run("cuda")
    for a, b in zip(cpu, gpu):
        if rule == "slerp":
            tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        else:
            assert torch.equal(a, b), (rule, hyper, (a.double() - b.double()).abs().max())


def test_model_ema_on_cuda_equals_cpu():
    """ModelEMA of a CUDA model, averaged on the GPU (the native kernels, no torch fallback), and
    the same on the CPU; `average_parameters` swaps in place on the device."""
    from emafuse.averaging import ModelEMA

    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    gpu_model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    a, b = ModelEMA(cpu_model, 0.9), ModelEMA(gpu_model, 0.9)
    for _ in range(5):
        noise = [torch.randn_like(p) * 0.1 for p in cpu_model.parameters()]
        with torch.no_grad():
            for p, q, n in zip(cpu_model.parameters(), gpu_model.parameters(), noise):
                p.add_(n)
                q.add_(n.cuda())
        a.update(cpu_model)
        b.update(gpu_model)
    for k, v in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[k].cpu(), v), k
    before = [p.detach().clone() for p in gpu_model.parameters()]
    with b.average_parameters(gpu_model):
        for p, q in zip(gpu_model.parameters(), b.module.parameters()):
            assert not torch.equal(p, q)  # the model holds the average now, the average the model
    for p, q in zip(gpu_model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "dtype, kw",
    [
        (torch.float32, dict(state_dtype=torch.bfloat16)),
        (torch.bfloat16, dict(rounding="stochastic")),
        (torch.bfloat16, dict(state_dtype=torch.float32, rounding="stochastic")),
    ],
    ids=["fp32-bf16-state", "bf16-stochastic", "bf16-fp32-state-stochastic"],
)
def test_lean_state_cuda_rounds_as_the_cpu(dtype, kw):
    """Lean state on CUDA: the kernel's stochastic rounding draws the same bits as the CPU engine
    (src/rounding.rs, common.cuh), so the bf16 stores agree; the fp32 math may differ by an ulp
    (pow in the coefficients), which can move a rounding by one bf16 ulp, hence a one-ulp check."""
    cpu = make_params(ODD, dtype=dtype, seed=4)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    a, b = emafuse.AdamW(cpu, lr=1e-2, weight_decay=0.1, **kw), emafuse.AdamW(gpu, lr=1e-2, weight_decay=0.1, **kw)
    steps(a, cpu, 5)
    steps(b, gpu, 5)
    for p, q in zip(cpu, gpu):
        pairs = [(q, p)] + [(b.state[q][k], v) for k, v in a.state[p].items() if v.dim() > 0]
        for got, want in pairs:
            assert got.dtype == want.dtype
            got = got.cpu()
            if got.dtype == torch.bfloat16:
                ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
                assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99
            else:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_weight_corrections_on_cuda_follow_the_cpu():
    """bf16 weights with corrections and bf16 state, 5 AdamW steps on both engines: the corrected
    weights agree to a few correction units (the fp32 math may differ by an ulp, see above) and
    the kernel splits every weight as the reference does."""
    from references import rounding as ref

    cpu = make_params(ODD, dtype=torch.bfloat16, seed=6)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, weight_correction=True)
    a, b = emafuse.AdamW(cpu, **kw), emafuse.AdamW(gpu, **kw)
    steps(a, cpu, 5)
    steps(b, gpu, 5)
    for p, q in zip(cpu, gpu):
        c = b.state[q]["weight_correction"]
        assert c.dtype == torch.int8 and c.is_cuda
        mine = ref.corrected(q.detach().cpu(), c.cpu())
        hi, lo = ref.split_corrected(mine)
        assert torch.equal(hi.view(torch.int16), q.detach().cpu().view(torch.int16)) and torch.equal(lo, c.cpu())
        theirs = ref.corrected(p.detach(), a.state[p]["weight_correction"])
        torch.testing.assert_close(mine, theirs, rtol=2.0**-13, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_bit_state_on_cuda_follows_the_cpu(dtype):
    """8-bit state on CUDA (one element per thread, the block's absmax found together): 5 AdamW
    steps on both engines; the scales agree to float rounding, the codes to one step of the map
    where the fp32 math differs by an ulp (pow in the coefficients), and every decoded moment is
    the nearest map entry of the kernel's own scaled value (checked through the reference
    quantizer: re-encoding the decoded state gives the kernel's codes)."""
    from emafuse.optim import _precision

    shapes = [(4099,), (300, 70), (5000, 3)]
    cpu = make_params(shapes, dtype=dtype, seed=7)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype="8bit")
    a, b = emafuse.AdamW(cpu, **kw), emafuse.AdamW(gpu, **kw)
    steps(a, cpu, 5)
    steps(b, gpu, 5)
    for p, q in zip(cpu, gpu):
        for name in ("exp_avg", "exp_avg_sq"):
            codes, scales = b.state[q][name].cpu(), b.state[q][name + "_absmax"].cpu()
            assert codes.dtype == torch.uint8 and b.state[q][name].is_cuda
            torch.testing.assert_close(scales, a.state[p][name + "_absmax"], rtol=1e-5, atol=0)
            assert (codes.int() - a.state[p][name].int()).abs().max() <= 1
            decoded = _precision.dequantize(codes, scales, name == "exp_avg_sq")
            again, _ = _precision.quantize(decoded, name == "exp_avg_sq")
            assert torch.equal(again, codes)
        torch.testing.assert_close(q.detach().cpu().float(), p.detach().float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.bfloat16, lambda: dict(rounding="stochastic")),  # new random bits every step
        (torch.float32, lambda: dict(grad_clip=1.0)),  # clip decisions read the norms on the host
        (torch.float32, lambda: dict(grad_clip=emafuse.ZClip())),
        (torch.float32, lambda: dict(grad_clip=emafuse.AdaGC())),
    ],
    ids=["stochastic-rounding", "max-norm", "ZClip", "AdaGC"],
)
def test_host_decided_steps_are_refused_in_a_captured_graph(dtype, options):
    params = cuda_params([(4097,)], dtype=dtype)
    opt = emafuse.AdamW(params, lr=1e-2, **options())
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(emafuse.errors.UnsupportedOptionError, match="captured CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()


def test_adahessian_on_cuda_follows_the_cpu():
    """AdaHessian's estimate on the device (its generator on the device) and the CUDA twin of its
    update: on a separable loss (the estimate is the exact Hessian diagonal for every draw) the
    device run follows the CPU one."""
    cpu = make_params(ODD, seed=6)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    coeffs = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) + 0.5 for i, p in enumerate(cpu)]
    runs = []
    for params in (cpu, gpu):
        opt = emafuse.AdaHessian(params, lr=0.05, weight_decay=0.1, update_each=2)
        for t in range(5):
            opt.zero_grad()
            sum((c.to(p.device) * (p - 0.1 * t) ** 2 / 2 + (p - 0.1 * t) ** 3 / 30).sum() for p, c in zip(params, coeffs)).backward(create_graph=True)
            opt.step()
        runs.append(opt)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
        assert runs[1].state[q]["hessian"].is_cuda
