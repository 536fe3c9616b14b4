"""Blockwise 8-bit optimizer state (issue 15): ``state_dtype="8bit"`` stores every state slot as
uint8 codes with one float32 scale per block of 256 elements, decoded, updated in float32 and
re-encoded inside the one native pass.

Checked here: the quantization maps are bitsandbytes' dynamic maps, the blockwise quantizer takes
bitsandbytes' scales and the nearest map entries; a quantized step of every optimizer is the float32 step of
the decoded state, bit for bit, encoded as the reference quantizer encodes it (so the error per
block is bounded as designed: half a gap of the map times the block's absmax); the 8-bit AdamW,
Adam, Lion and SGD trajectories stay as close to fp32 as bitsandbytes' CPU 8-bit ones; 2.03 bytes of state per parameter for AdamW;
exact resume; conversions of checkpoints in both directions; small parameters keep float32 state;
channels_last and transposed parameters, GradScaler and torch.compile give the plain step's bits;
malformed checkpoints and unsupported parameters are refused and change nothing."""

from __future__ import annotations

import copy
import io

import bitsandbytes
import bitsandbytes.functional as bnbf
import emafuse
import pytest
import torch
from emafuse import _native
from emafuse.optim import _precision
from helpers import assert_unchanged, clone_params, make_params, random_grads, run_steps, set_grads, snapshot
from registry import ENTRIES

EIGHT = {"state_dtype": "8bit"}
# Large enough to be quantized (>= 4096 elements), with partial last blocks, and a matrix whose
# rows are whole blocks (the only matrix AdamP, which updates row by row, keeps 8-bit); and one
# small parameter, which keeps float32 state.
SHAPES = [(4099,), (67, 129), (3, 40, 50), (24, 256), (33,)]


def _nonnegative(opt) -> tuple[str, ...]:
    return _native.rule_info(opt._rule)["nonnegative_slots"]


def _slots(opt, p) -> list[str]:
    """The 8-bit slots of ``p``'s state."""
    return [k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8]


# -- the quantizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nonnegative", [False, True])
def test_maps_are_bitsandbytes_dynamic_maps(nonnegative):
    ours = torch.tensor(_native.quantization_map(nonnegative))
    theirs = bnbf.create_dynamic_map(signed=not nonnegative)
    assert torch.equal(ours, theirs)


def _inputs(n: int, nonnegative: bool) -> torch.Tensor:
    """Values spread over 7 decades, as moments are."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)[torch.randperm(n, generator=g)]
    return x.abs() if nonnegative else x


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("n", [256, 1000, 4099, 70001])
def test_codes_are_the_nearest_map_entries(nonnegative, n):
    """``_precision.quantize`` (the engine's rounding, see the lockstep tests) takes each block's
    absmax as bitsandbytes does and rounds every scaled element to its nearest map entry (up to the
    float rounding of a tie). bitsandbytes' CPU kernel takes the same scales but approximates the
    nearest entry (about a third of its codes are not the nearest ones); its error is never
    smaller, and decoding our codes with its dequantizer gives our values."""
    x = _inputs(n, nonnegative)
    values = bnbf.create_dynamic_map(signed=not nonnegative)
    codes, absmax = _precision.quantize(x, nonnegative)
    scaled = x / absmax.repeat_interleave(256)[:n]
    error = (values[codes.long()] - scaled).abs()
    nearest = (values[None, :] - scaled[:, None]).abs().amin(dim=1)
    assert (error <= nearest + 1e-7 * scaled.abs()).all()
    their_codes, state = bnbf.quantize_blockwise(x, code=values, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert (error <= (values[their_codes.long()] - scaled).abs()).all()
    assert torch.equal(_precision.dequantize(codes, absmax, nonnegative), bnbf.dequantize_blockwise(codes, state))


# -- every optimizer, in lockstep with its float32 twin ------------------------------------------------

OPTIMIZERS = [pytest.param(e.cls, e.main, id=e.name) for e in ENTRIES] + [
    pytest.param(emafuse.Momo, {}, id="Momo"),
    pytest.param(emafuse.MomoAdam, {}, id="MomoAdam"),
    # options whose read-only pass decodes the state (the Cautious mask's counts) or reads only
    # parameters and gradients (⊥Grad's projection), and AMSGrad's third slot
    pytest.param(emafuse.AdamW, {"lr": 1e-2, "caution": True}, id="AdamW-caution"),
    pytest.param(emafuse.AdamW, {"lr": 1e-2, "orthograd": True}, id="AdamW-orthograd"),
    pytest.param(emafuse.AdamW, {"lr": 1e-2, "amsgrad": True}, id="AdamW-amsgrad"),
]


def _step(opt, t: int) -> None:
    if isinstance(opt, (emafuse.Momo, emafuse.MomoAdam)):
        opt.step(loss=10.0 / (1 + t))
    else:
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls, main", OPTIMIZERS)
def test_step_is_the_fp32_step_of_the_decoded_state(cls, main, dtype):
    """Before every step a float32-state twin loads the 8-bit optimizer's state dict (so it holds
    the decoded state) and its parameters; after the step both hold the same parameters bit for
    bit, and the 8-bit codes and scales are the reference quantizer's encoding of the twin's new
    state, second moments with the unsigned map."""
    params = make_params(SHAPES, dtype=dtype, seed=21)
    opt = cls(params, **main, **EIGHT)
    for t in range(4):
        twins = clone_params(params)
        twin = cls(twins, **main, state_dtype=torch.float32)
        if t:
            twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (its own step counters)
        grads = random_grads(params, t)
        set_grads(params, grads)
        set_grads(twins, grads)
        _step(opt, t)
        _step(twin, t)
        for p, q in zip(params, twins):
            assert torch.equal(p, q), f"step {t}: the parameters differ"
            # small parameters, AdamP's rows that are not whole blocks and Adafactor's factors
            # keep float32 state
            if opt._state_dtype(p, opt.param_groups[0]) != torch.uint8:
                assert not _slots(opt, p)
                continue
            slots = _slots(opt, p)
            assert slots or not opt.state[p]
            for name in slots:
                codes, absmax = _precision.quantize(twin.state[q][name], name in _nonnegative(opt))
                assert torch.equal(opt.state[p][name], codes), f"step {t}: codes of {name}"
                assert torch.equal(opt.state[p][name + "_absmax"], absmax), f"step {t}: scales of {name}"


def test_quantization_error_is_bounded_per_block():
    """The decoded state is within half a gap of the map (at most 0.9/128 of the block's absmax
    for the signed map, 0.9/256 for the unsigned one) of the float32 twin's state."""
    params = make_params([(9000,)], seed=3)
    opt = emafuse.AdamW(params, lr=1e-3, **EIGHT)
    run_steps(opt, params, 3)
    twins = clone_params(params)
    twin = emafuse.AdamW(twins, lr=1e-3)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(opt, params, 1, first=3)
    run_steps(twin, twins, 1, first=3)
    for name, gap in (("exp_avg", 0.9 / 64), ("exp_avg_sq", 0.9 / 128)):
        st = opt.state[params[0]]
        decoded = _precision.dequantize(st[name], st[name + "_absmax"], name == "exp_avg_sq")
        exact = twin.state[twins[0]][name]
        bound = (st[name + "_absmax"] * gap / 2).repeat_interleave(256)[: exact.numel()] * 1.0001
        assert ((decoded - exact).abs() <= bound).all()
        assert (decoded >= 0).all() if name == "exp_avg_sq" else (decoded < 0).any()


# -- bitsandbytes' 8-bit optimizers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs, kw",
    [
        (emafuse.AdamW, bitsandbytes.optim.AdamW8bit, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
        (emafuse.Adam, bitsandbytes.optim.Adam8bit, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
        (emafuse.Lion, bitsandbytes.optim.Lion8bit, {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.01}),
        (emafuse.SGD, bitsandbytes.optim.SGD8bit, {"lr": 1e-2, "momentum": 0.9}),
    ],
    ids=["AdamW8bit", "Adam8bit", "Lion8bit", "SGD8bit"],
)
def test_trajectory_stays_as_close_to_fp32_as_bitsandbytes(ours, theirs, kw):
    """10 steps beside bitsandbytes' CPU 8-bit optimizer (blockwise, block 256, small tensors in
    float32; its Adam8bit decays weights as AdamW, so it runs without weight decay) and emafuse's
    float32-state one: emafuse's 8-bit trajectory is as close to the fp32 one as bitsandbytes'
    (its quantizer approximates the nearest code, so the two 8-bit runs do not coincide: measured,
    each is 1.3% (AdamW) and 5% (Lion, sign updates) of the movement away from fp32, in norm),
    and they are within 10% of the movement of each other."""
    params = make_params(SHAPES, seed=5)
    start = [p.detach().clone() for p in params]
    twins, full = clone_params(params), clone_params(params)
    runs = ((params, ours(params, **kw, **EIGHT)), (twins, theirs(twins, **kw)), (full, ours(full, **kw)))
    for t in range(10):
        grads = random_grads(params, t)
        for ps, opt in runs:
            set_grads(ps, grads)
            opt.step()
    for p, q, f, s in zip(params, twins, full, start):
        moved = (f.detach() - s).norm()
        ours_off, theirs_off = (p.detach() - f.detach()).norm() / moved, (q.detach() - f.detach()).norm() / moved
        assert ours_off <= 1.1 * theirs_off + 1e-3, (ours_off, theirs_off)
        assert (p.detach() - q.detach()).norm() / moved <= 0.1


# -- memory, resume, checkpoints ---------------------------------------------------------------------


def test_adamw_keeps_2_03_bytes_of_state_per_parameter():
    params = make_params([(4096 * 64,), (1000, 257)], seed=8)
    opt = emafuse.AdamW(params, lr=1e-3, **EIGHT)
    run_steps(opt, params, 1)
    n = sum(p.numel() for p in params)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim() > 0)
    assert state_bytes / n <= 2.1
    assert state_bytes == 2 * n + 2 * 4 * sum(-(-p.numel() // 256) for p in params)


@pytest.mark.parametrize("via_torch_save", [False, True])
def test_resume_is_exact(via_torch_save):
    params = make_params(SHAPES, dtype=torch.bfloat16, seed=11)
    opt = emafuse.AdamW(params, lr=1e-3, **EIGHT)
    run_steps(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    if via_torch_save:
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf)
    resumed_params = clone_params(params)
    resumed = emafuse.AdamW(resumed_params, lr=1e-3, **EIGHT)
    resumed.load_state_dict(saved)
    run_steps(opt, params, 3, first=3)
    run_steps(resumed, resumed_params, 3, first=3)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    for p, q in zip(params, resumed_params):
        for key, v in opt.state[p].items():
            assert v.dtype == resumed.state[q][key].dtype and torch.equal(v, resumed.state[q][key]), key


def test_checkpoints_convert_to_and_from_8bit():
    """An fp32-state checkpoint loaded into an 8-bit optimizer is quantized (as the reference
    quantizer); an 8-bit one loaded into fp32- or bf16-state optimizers is decoded; steps go on."""
    params = make_params(SHAPES, seed=12)
    full = emafuse.AdamW(params, lr=1e-3)
    run_steps(full, params, 2)
    lean_params = clone_params(params)
    lean = emafuse.AdamW(lean_params, lr=1e-3, **EIGHT)
    lean.load_state_dict(full.state_dict())
    for p, q in zip(params, lean_params):
        for name in ("exp_avg", "exp_avg_sq"):
            if p.numel() < 4096:
                assert torch.equal(lean.state[q][name], full.state[p][name])
                continue
            codes, absmax = _precision.quantize(full.state[p][name], name == "exp_avg_sq")
            assert torch.equal(lean.state[q][name], codes) and torch.equal(lean.state[q][name + "_absmax"], absmax)
    run_steps(lean, lean_params, 1, first=2)
    for state_dtype in (None, torch.bfloat16):
        back_params = clone_params(lean_params)
        back = emafuse.AdamW(back_params, lr=1e-3, state_dtype=state_dtype)
        back.load_state_dict(lean.state_dict())
        for p, q in zip(lean_params, back_params):
            st = lean.state[p]
            assert not any(k.endswith("_absmax") for k in back.state[q])
            if p.numel() >= 4096:
                decoded = _precision.dequantize(st["exp_avg"], st["exp_avg_absmax"], False)
                assert torch.equal(back.state[q]["exp_avg"], decoded.to(state_dtype or torch.float32))
        run_steps(back, back_params, 1, first=3)


def test_groups_and_small_parameters_choose_their_own_precision():
    params = make_params([(5000,), (4095,), (6000,)], seed=13)
    opt = emafuse.AdamW([{"params": params[:2], **EIGHT}, {"params": params[2:]}], lr=1e-3)
    run_steps(opt, params, 2)
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.uint8, torch.float32, torch.float32]
    assert opt.state[params[0]]["exp_avg_absmax"].shape == (20,)


# -- memory formats, AMP, torch.compile --------------------------------------------------------------


def test_channels_last_and_transposed_parameters_step_as_contiguous_ones():
    """The codes are kept in row-major order: a channels_last convolution weight and a transposed
    parameter step (through a staged copy) exactly as their contiguous twins, codes included."""
    g = torch.Generator().manual_seed(17)
    conv = torch.randn(64, 32, 3, 3, generator=g)
    mat = torch.randn(300, 70, generator=g)
    params = [torch.nn.Parameter(conv.to(memory_format=torch.channels_last)), torch.nn.Parameter(mat.t().contiguous().t())]
    twins = [torch.nn.Parameter(conv.clone()), torch.nn.Parameter(mat.clone())]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    a, b = emafuse.AdamW(params, lr=1e-2, **EIGHT), emafuse.AdamW(twins, lr=1e-2, **EIGHT)
    for t in range(3):
        grads = random_grads(twins, t)
        set_grads(twins, grads)
        for p, gr in zip(params, grads):
            p.grad = gr.clone().to(memory_format=torch.channels_last) if p.dim() == 4 else gr.t().contiguous().t()
        a.step()
        b.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key


def test_grad_scaler_steps_as_unscaled_and_skips_overflow():
    """AMP's GradScaler: a power-of-two scale gives the unscaled run's bits; an overflowing step
    changes neither the parameters nor the 8-bit state."""
    params = make_params([(5000,), (40, 130)], seed=18)
    twins = clone_params(params)
    a, b = emafuse.AdamW(params, lr=1e-2, **EIGHT), emafuse.AdamW(twins, lr=1e-2, **EIGHT)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # (as a scaled loss would: the scaler's state starts here)
    for t in range(3):
        grads = random_grads(params, t)
        set_grads(params, [gr * scaler.get_scale() for gr in grads])
        set_grads(twins, grads)
        scaler.step(a)
        scaler.update()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    set_grads(params, [torch.full_like(p, float("inf")) for p in params])
    snap = snapshot(params, a)
    scaler.step(a)
    assert_unchanged(params, a, snap)


def test_compiled_step_equals_eager():
    """``torch.compile(fullgraph=True)`` of an 8-bit step: one opaque op, the eager bits."""
    torch._dynamo.reset()
    try:
        params = make_params([(5000,), (33,)], seed=19)
        twins = clone_params(params)
        a, b = emafuse.AdamW(params, lr=1e-2, **EIGHT), emafuse.AdamW(twins, lr=1e-2, **EIGHT)
        step = torch.compile(a.step, backend="aot_eager", fullgraph=True)
        for t in range(4):
            grads = random_grads(params, t)
            set_grads(params, grads)
            set_grads(twins, grads)
            step()
            b.step()
            assert all(torch.equal(p, q) for p, q in zip(params, twins)), t
        assert torch.equal(a.state[params[0]]["exp_avg"], b.state[twins[0]]["exp_avg"])
    finally:
        torch._dynamo.reset()


# -- bad input -----------------------------------------------------------------------------------------


def _trained(seed: int = 14):
    params = make_params([(5000,), (300, 20)], seed=seed)
    opt = emafuse.AdamW(params, lr=1e-3, **EIGHT)
    run_steps(opt, params, 2)
    return params, opt


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda st: st.pop("exp_avg_absmax"), "scales 'exp_avg_absmax' are missing"),
        (lambda st: st.update(exp_avg_absmax=st["exp_avg_absmax"][:-1]), "one per 256 elements"),
    ],
    ids=["no scales", "short scales"],
)
def test_malformed_checkpoints_are_refused_before_loading(damage, match):
    _, opt = _trained()
    sd = opt.state_dict()
    damage(sd["state"][0])
    other_params, other = _trained(seed=15)
    snap = snapshot(other_params, other)
    with pytest.raises(emafuse.errors.InvalidArgumentError, match=match):
        other.load_state_dict(sd)
    assert_unchanged(other_params, other, snap)


def test_scales_the_engine_cannot_use_change_nothing():
    """Scales of the wrong size or dtype placed in the state by hand: the step is refused and
    nothing changes."""
    params, opt = _trained()
    for bad in (torch.full((3,), 0.5), torch.full((20,), 0.5, dtype=torch.float64)):
        opt.state[params[0]]["exp_avg_absmax"] = bad
        set_grads(params, random_grads(params, 5))
        snap = snapshot(params, opt)
        with pytest.raises(emafuse.errors.EmafuseError, match="exp_avg_absmax"):
            opt.step()
        assert_unchanged(params, opt, snap)


def test_unsupported_parameters_are_refused():
    with pytest.raises(emafuse.errors.DTypeError, match="8bit"):
        p = make_params([(5000,)], dtype=torch.float64)
        opt = emafuse.AdamW(p, **EIGHT)
        run_steps(opt, p, 1)
    with pytest.raises(ValueError, match="state_dtype must be"):
        emafuse.AdamW(make_params([(5,)]), state_dtype="4bit")
