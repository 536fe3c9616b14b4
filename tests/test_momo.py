"""MoMo and MoMo-Adam (spec §16): the step needs the loss and sums over every parameter of every
group, so these optimizers have their own tests rather than the registry's concerns (which step
without a loss): the float64 reference from the spec (several groups, skipped and late gradients,
every option, every dtype), the official ``momo-opt`` (fp32 trajectories, checkpoints both ways),
exact resume, AMP, and bad input that changes nothing."""

from __future__ import annotations

import copy

import emafuse
import momo
import pytest
import torch
from helpers import ODD_SHAPES, assert_unchanged, grads_with_gaps, make_params, random_grads, set_grads, snapshot
from references.momo import RefMomo

CLASSES = {"Momo": (emafuse.Momo, momo.Momo, False), "MomoAdam": (emafuse.MomoAdam, momo.MomoAdam, True)}

# (class, optimizer-wide options, per-group options): every option, with defaults and the
# configurations the spec lists as verified against the official.
CONFIGS = [
    ("Momo", {}, {}),
    ("Momo", {}, dict(weight_decay=0.1)),
    ("Momo", dict(bias_correction=True), {}),
    ("Momo", dict(bias_correction=True), dict(lr=0.1, weight_decay=0.1)),
    ("Momo", dict(use_fstar=True, beta=0.8), dict(lr=0.5)),
    ("Momo", dict(lb=-0.5, maximize=True), dict(lr=0.3)),
    ("MomoAdam", {}, {}),
    ("MomoAdam", {}, dict(weight_decay=0.1)),
    ("MomoAdam", dict(divide=False), dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    ("MomoAdam", dict(use_fstar=True, lb=-1.0), dict(lr=0.05)),
    # the Cautious mask (spec §20), both normalisations
    ("Momo", {}, dict(weight_decay=0.1, caution=True)),
    ("MomoAdam", dict(use_fstar=True), dict(caution=True, caution_norm="count")),
]


def config_id(c) -> str:
    name, wide, group = c
    return "-".join([name] + [f"{k}={v}" for k, v in {**wide, **group}.items()])


def losses(t: int) -> float:
    """A decreasing, noisy loss sequence (the step size depends on it)."""
    return 2.0 / (1 + 0.3 * t) + 0.05 * ((t * 7919) % 13) / 13


def group_options(name: str, group: dict, i: int) -> dict:
    """Group ``i``'s options: the configuration's, with a second group at half the lr."""
    lr = group.get("lr", 1.0 if name == "Momo" else 1e-2)
    return {**group, "lr": lr * (0.5 if i else 1.0)}


def split(params):
    return [params[: len(params) // 2], params[len(params) // 2 :]]


def reference_groups(name: str, group: dict, params) -> list[dict]:
    defaults = dict(weight_decay=0.0) | ({"betas": (0.9, 0.999), "eps": 1e-8} if name == "MomoAdam" else {})
    return [{**defaults, **group_options(name, group, i), "params": ps} for i, ps in enumerate(split(params))]


def make(name: str, wide: dict, group: dict, params) -> torch.optim.Optimizer:
    cls = CLASSES[name][0]
    return cls([{"params": ps, **group_options(name, group, i)} for i, ps in enumerate(split(params))], **wide)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference(config, dtype):
    """Several groups, odd sizes, a parameter first seen at step 2 and one skipped at step 3,
    against the spec's rule in float64: fp64 to round-off over 8 steps, fp32 over 8 steps, bf16
    and fp16 one step from identical state (no drift to compound)."""
    name, wide, group = config
    params = make_params(ODD_SHAPES if dtype != torch.float16 else ODD_SHAPES[:-1], dtype, seed=3)
    opt = make(name, wide, group, params)
    ref_wide = {k: v for k, v in wide.items() if k != "maximize"}
    ref = RefMomo(reference_groups(name, group, params), adam=CLASSES[name][2], **ref_wide)
    steps = 8 if dtype in (torch.float64, torch.float32) else 1
    sign = -1.0 if wide.get("maximize") else 1.0
    for t in range(steps):
        grads = grads_with_gaps(params, t, seed=5)
        set_grads(params, grads)
        opt.step(loss=torch.tensor(losses(t), dtype=torch.float64))
        ref.step([[None if g is None else sign * g for g in gs] for gs in split(grads)], losses(t))
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]
    for i, (p, r) in enumerate(zip(params, ref.params())):
        torch.testing.assert_close(p.double(), r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
    for i, p in enumerate(params):
        if id(ref.params()[i]) not in ref.state:  # no gradient yet
            assert p not in opt.state
            continue
        st, rst = opt.state[p], ref.state[id(ref.params()[i])]
        torch.testing.assert_close(st["grad_avg"].double(), rst["grad_avg"], rtol=rtol, atol=atol)
        assert st["grad_dot_w"].dtype == torch.float64
        assert float(st["grad_dot_w"]) == pytest.approx(rst["grad_dot_w"], rel=max(rtol, 1e-6), abs=atol * 10)
    group0 = opt.param_groups[0]
    assert group0["momo_step"] == ref.k and group0["loss_avg"] == pytest.approx(ref.loss_avg, rel=1e-12)
    # The lower bound is a difference of large sums divided by ρ (0.1 at step 1): the fp32 sums'
    # round-off shows there first.
    assert group0["lb_current"] == pytest.approx(ref.lb, rel=1e-8 if dtype == torch.float64 else 3e-3)
    assert all(g["momo_step"] == ref.k for g in opt.param_groups)


OFFICIAL_CONFIGS = [c for c in CONFIGS if not c[1].get("maximize") and not c[2].get("caution")]  # (the official has no mask)


@pytest.mark.official
@pytest.mark.parametrize("config", OFFICIAL_CONFIGS, ids=config_id)
def test_fp32_trajectory_matches_official(config):
    """20 fp32 steps against momo-opt (every parameter has a gradient at every step: the official
    crashes otherwise). It adds its sums in float32; emafuse in float64."""
    name, wide, group = config
    params = make_params(ODD_SHAPES, seed=4)
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = make(name, wide, group, params)
    theirs = CLASSES[name][1]([{"params": ps, **group_options(name, group, i)} for i, ps in enumerate(split(theirs_params))], **wide)
    for t in range(20):
        grads = random_grads(params, t, seed=2)
        set_grads(params, grads)
        set_grads(theirs_params, grads)
        ours.step(loss=torch.tensor(losses(t)))
        theirs.step(loss=torch.tensor(losses(t)))
    for i, (p, q) in enumerate(zip(params, theirs_params)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"param {i}: {m}")
        torch.testing.assert_close(ours.state[p]["grad_avg"], theirs.state[q]["grad_avg"], rtol=1e-4, atol=1e-6)
        assert float(ours.state[p]["grad_dot_w"]) == pytest.approx(float(theirs.state[q]["grad_dot_w"]), rel=1e-4, abs=1e-5)
    assert ours.param_groups[0]["lb_current"] == pytest.approx(float(theirs.lb), rel=1e-4, abs=1e-6)


@pytest.mark.official
@pytest.mark.parametrize("name", CLASSES)
def test_official_checkpoint_continues_in_emafuse(name):
    """The official's state dict loads into emafuse (per-parameter state; the official keeps its
    counters on the optimizer, so they are carried over by hand) and both continue alike."""
    params = make_params(ODD_SHAPES[:4], seed=6)
    theirs = CLASSES[name][1]([{"params": params}])
    for t in range(3):
        set_grads(params, random_grads(params, t, seed=3))
        theirs.step(loss=torch.tensor(losses(t)))
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = CLASSES[name][0](ours_params)
    sd = copy.deepcopy(theirs.state_dict())
    sd["state"] = {k: v for k, v in sd["state"].items() if isinstance(k, int)}  # its step_size_list
    sd["param_groups"][0].update(momo_step=theirs._number_steps, loss_avg=float(theirs.loss_avg), lb_current=float(theirs.lb))
    ours.load_state_dict(sd)
    for t in range(3, 6):
        grads = random_grads(params, t, seed=3)
        set_grads(params, grads)
        set_grads(ours_params, grads)
        theirs.step(loss=torch.tensor(losses(t)))
        ours.step(loss=torch.tensor(losses(t)))
    for p, q in zip(ours_params, params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [CONFIGS[3], CONFIGS[4], CONFIGS[8], CONFIGS[9]], ids=config_id)
def test_resume_is_exact(config):
    """A state dict taken after 3 steps, loaded into a new optimizer over copies of the parameters,
    continues bit for bit as the uninterrupted run (counters, loss average and lower bound too)."""
    name, wide, group = config
    params = make_params(ODD_SHAPES, seed=7)
    opt = make(name, wide, group, params)
    for t in range(3):
        set_grads(params, grads_with_gaps(params, t, seed=8))
        opt.step(loss=losses(t))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(name, wide, group, copies)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(3, 6):
        grads = grads_with_gaps(params, t, seed=8)
        set_grads(params, grads)
        set_grads(copies, grads)
        opt.step(loss=losses(t))
        resumed.step(loss=losses(t))
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    def groups(o):
        return [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]

    assert groups(opt) == groups(resumed)


@pytest.mark.parametrize("name", CLASSES)
def test_closure_gives_the_loss(name):
    """``step(closure)`` evaluates the closure once and steps as ``step(loss=...)`` does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    a, b = CLASSES[name][0](model.parameters()), CLASSES[name][0](twin.parameters())
    calls = []

    def closure():
        calls.append(1)
        a.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        returned = a.step(closure)
        b.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(x), y)
        loss.backward()
        b.step(loss=loss)
        assert isinstance(returned, torch.Tensor)
    assert len(calls) == 3
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", CLASSES)
def test_grad_scaler_unscales_and_skips(name):
    """AMP: with ``grad_scale`` the step equals the unscaled one; with ``found_inf`` nothing changes,
    the counters included."""
    params = make_params(ODD_SHAPES[:4], seed=9)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, plain = CLASSES[name][0](params), CLASSES[name][0](plain_params)
    for t in range(3):
        grads = random_grads(params, t, seed=4)
        set_grads(params, [g * 1024 for g in grads])
        set_grads(plain_params, grads)
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        opt.step(loss=losses(t))
        plain.step(loss=losses(t))
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    set_grads(params, [torch.full_like(p, float("inf")) for p in params])
    opt.found_inf = torch.tensor(1.0)
    snap = snapshot(params, opt)
    opt.step(loss=1.0)
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("name", CLASSES)
def test_bad_input_changes_nothing(name):
    cls = CLASSES[name][0]
    params = make_params(ODD_SHAPES[:3], seed=10)
    opt = cls(params)
    set_grads(params, random_grads(params, 0))
    opt.step(loss=1.0)
    set_grads(params, random_grads(params, 1))
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"exactly one of closure= .* or loss="):
        opt.step()
    with pytest.raises(ValueError, match="exactly one of closure="):
        opt.step(lambda: 1.0, loss=1.0)
    with pytest.raises(emafuse.NonFiniteError, match="the loss is nan"):
        opt.step(loss=float("nan"))
    with pytest.raises(ValueError, match="single number"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="a number or a one-element tensor"):
        opt.step(loss="x")
    assert_unchanged(params, opt, snap)
    params[1].grad[0] = float("nan")
    with pytest.raises(emafuse.NonFiniteError, match="sums over the gradients are not finite"):
        opt.step(loss=1.0)
    assert_unchanged(params, opt, snap)
    with pytest.raises(ValueError, match="is optimizer-wide"):
        opt.add_param_group({"params": make_params([(2,)]), "lb": 3.0})


def test_constructor_checks_match_official():
    lr = (dict(lr=-1.0), "Invalid learning rate: -1.0")
    momo_bad = [lr, (dict(weight_decay=-1.0), "Invalid weight decay: -1.0"), (dict(beta=1.5), "Invalid beta parameter: 1.5")]
    adam_bad = [lr, (dict(eps=-1.0), "Invalid epsilon value: -1.0"), (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0")]
    for classes, bad in (((emafuse.Momo, momo.Momo), momo_bad), ((emafuse.MomoAdam, momo.MomoAdam), adam_bad)):
        for kw, msg in bad:
            for cls in classes:
                with pytest.raises(ValueError, match=msg):
                    cls(make_params([(2,)]), **kw)


def test_zero_momentum_norm_takes_the_capped_step():
    """Σ‖d‖² = 0 (every gradient zero on the first step): τ = lr/ρ, and d = 0 leaves p unchanged;
    the state written is the reference's (d = 0, γ = 0), and a second step with random gradients
    from that state matches the reference."""
    params = make_params([(3,), (4,)], dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    opt = emafuse.Momo(params, lr=0.5)
    ref = RefMomo([{"params": params, "lr": 0.5, "weight_decay": 0.0}], adam=False)
    zeros = [torch.zeros_like(p) for p in params]
    set_grads(params, zeros)
    opt.step(loss=1.0)
    ref.step([zeros], 1.0)
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["momo_step"] == 1 == ref.k
    for i, p in enumerate(params):
        rst = ref.state[id(ref.params()[i])]
        assert torch.equal(opt.state[p]["grad_avg"], torch.zeros_like(p)) and torch.equal(rst["grad_avg"], torch.zeros_like(p))
        assert float(opt.state[p]["grad_dot_w"]) == rst["grad_dot_w"] == 0.0
    grads = random_grads(params, 1)
    set_grads(params, grads)
    opt.step(loss=0.5)
    ref.step([grads], 0.5)
    for p, r in zip(params, ref.params()):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    assert opt.param_groups[0]["lb_current"] == pytest.approx(ref.lb, rel=1e-10)
