"""AdaHessian: its step differentiates the gradients again (``loss.backward(create_graph=True)``),
so it has its own tests rather than the registry's concerns (which step on given gradients): timm's
``Adahessian`` (fp32 trajectories on a small conv net, every option; a timm checkpoint continued),
the float64 reference (the Hutchinson estimate from the same Rademacher vectors and the update;
several groups, conv1d/conv2d kernels; every dtype), exact resume, AMP, lean state, and bad input
that changes nothing."""

from __future__ import annotations

import copy

import emafuse
import pytest
import timm.optim
import torch
from helpers import assert_unchanged, make_params, snapshot
from references.adahessian import RefAdaHessian, average_kernels, hutchinson, rademacher
from torch import nn

SEED = 2147483647  # timm's generator seed, emafuse's default

# How AdaHessian is used (timm's and the paper's usage): torch warns of the reference cycle
# between a parameter and its gradient's graph, which zero_grad() breaks.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


class Net(nn.Module):
    """A small conv net with odd sizes (a 4-D kernel; ``conv1d``: a 3-D one too) and smooth
    activations, so that its Hessian has no zero diagonal."""

    def __init__(self, conv1d: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3)
        self.conv1d = nn.Conv1d(2, 3, 2) if conv1d else None
        self.fc1 = nn.Linear(27, 7)
        self.fc2 = nn.Linear(7, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        out = self.fc2(torch.tanh(self.fc1(h)))
        if self.conv1d is not None:
            out = out + torch.tanh(self.conv1d(x[:, :, 0, :])).mean(dim=2)
        return out


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(6, 2, 5, 5, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)


def backward(model: nn.Module, t: int, create_graph: bool = True, scale: float = 1.0) -> torch.Tensor:
    x, y = batch(t, next(model.parameters()).dtype)
    loss = nn.functional.mse_loss(model(x), y)
    (loss * scale).backward(create_graph=create_graph)
    return loss


def train(opt: torch.optim.Optimizer, model: nn.Module, steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        backward(model, t)
        opt.step()


# Every option; eps 1e-4 (the paper's) keeps the first steps' lr·g/|h| moderate where |h| is small.
CONFIGS = [
    dict(lr=0.05, eps=1e-4),
    dict(lr=0.05, eps=1e-4, weight_decay=0.1, hessian_power=0.5),
    dict(lr=0.05, eps=1e-4, update_each=3, n_samples=2, betas=(0.8, 0.99)),
    dict(lr=0.02, eps=1e-3, avg_conv_kernel=True, hessian_power=0.8),
]


def _id(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.official
@pytest.mark.parametrize("kw", CONFIGS, ids=_id)
def test_trajectory_matches_timm(kw):
    """Eight fp32 steps against timm's ``Adahessian`` on the same model: the same Rademacher vectors
    (same seed, same draws), so the same estimates, moments and parameters."""
    ours_model, timm_model = Net(conv1d=False), Net(conv1d=False)
    ours, theirs = emafuse.AdaHessian(ours_model.parameters(), **kw), timm.optim.Adahessian(timm_model.parameters(), **kw)
    for t in range(8):
        train(ours, ours_model, range(t, t + 1))
        train(theirs, timm_model, range(t, t + 1))
    for (name, p), q in zip(ours_model.named_parameters(), timm_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        st, their = ours.state[p], theirs.state[q]
        assert st["step"] == their["step"] == 8
        torch.testing.assert_close(st["exp_avg"], their["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(st["exp_hessian_diag_sq"], their["exp_hessian_diag_sq"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(st["hessian"], q.hess, rtol=1e-4, atol=1e-7)


REFERENCE_CONFIGS = [
    *CONFIGS,
    dict(lr=0.03, eps=1e-3, avg_conv_kernel=True, update_each=2, weight_decay=0.05),
    # the Cautious mask (spec §20), both normalisations
    dict(lr=0.05, eps=1e-4, weight_decay=0.1, caution=True),
    dict(lr=0.05, eps=1e-4, hessian_power=0.5, caution=True, caution_norm="count"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kw", REFERENCE_CONFIGS, ids=_id)
def test_matches_float64_reference(kw, dtype):
    """Six steps of a conv net with 3-D and 4-D kernels in two param groups (the second with its
    own lr, decay and kernel averaging) against the float64 reference fed the same Rademacher
    vectors: the estimates (with reuse between refreshes) and the updates."""
    model = Net(conv1d=True, seed=1, dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    wide = {k: kw[k] for k in ("update_each", "n_samples") if k in kw}
    first = {k: v for k, v in kw.items() if k not in wide}
    second = {**first, "lr": first["lr"] / 2, "weight_decay": 0.02, "avg_conv_kernel": not first.get("avg_conv_kernel", False)}
    split = [list(model.conv.parameters()) + list(model.conv1d.parameters()), list(model.fc1.parameters()) + list(model.fc2.parameters())]
    ref_split = [list(ref_model.conv.parameters()) + list(ref_model.conv1d.parameters()), list(ref_model.fc1.parameters()) + list(ref_model.fc2.parameters())]
    opt = emafuse.AdaHessian([{"params": split[0], **first}, {"params": split[1], **second}], **wide)
    refs = [RefAdaHessian(ps, **{k: v for k, v in g.items() if k != "avg_conv_kernel"}) for ps, g in zip(ref_split, (first, second))]
    gen = torch.Generator().manual_seed(SEED)
    hessians: list[list[torch.Tensor]] = []
    for t in range(6):
        train(opt, model, range(t, t + 1))
        ref_model.zero_grad()
        for ref, ps in zip(refs, ref_split):  # the reference's parameters are the model's own
            for r, p in zip(ref.params, ps):
                p.data = r
        params = [p for ps in ref_split for p in ps]
        grads = torch.autograd.grad(nn.functional.mse_loss(ref_model(batch(t, torch.float64)[0]), batch(t, torch.float64)[1]), params, create_graph=True)
        if t % wide.get("update_each", 1) == 0:
            zs = [rademacher(params, gen) for _ in range(wide.get("n_samples", 1))]
            est = hutchinson(grads, params, zs)
            n0 = len(ref_split[0])
            hessians = [est[:n0], est[n0:]]
            hessians = [average_kernels(h) if g.get("avg_conv_kernel") else h for h, g in zip(hessians, (first, second))]
        n0 = len(ref_split[0])
        with torch.no_grad():
            refs[0].step([g.detach() for g in grads[:n0]], hessians[0])
            refs[1].step([g.detach() for g in grads[n0:]], hessians[1])
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-3, 1e-5)
    for ref, ps in zip(refs, split):
        for i, (p, r, st) in enumerate(zip(ps, ref.params, ref.state)):
            torch.testing.assert_close(p.double(), r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
            torch.testing.assert_close(opt.state[p]["hessian"].double(), st["hessian"], rtol=rtol, atol=atol)
            torch.testing.assert_close(opt.state[p]["exp_hessian_diag_sq"].double(), st["exp_hessian_diag_sq"], rtol=rtol, atol=atol)


# -- a separable loss: its Hessian is diagonal, so z ⊙ Hz is the exact diagonal for every z ----------

SHAPES = [(1,), (3,), (4097,), (7, 5), (3, 4, 2), (2, 3, 2, 5)]


def separable(params: list[torch.Tensor], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Coefficients ``(a, w)`` of the loss ``Σ a·p²/2 + w·p³/3`` (Hessian diagonal ``a + 2wp``,
    well away from 0 near the start)."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5 for p in params]
    w = [0.02 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    return a, w


def separable_backward(params, coeffs, t: int, create_graph: bool = True, scale: float = 1.0) -> None:
    a, w = coeffs
    shift = 0.05 * t
    loss = sum(((ai.to(p.dtype) * (p - shift) ** 2 / 2 + wi.to(p.dtype) * (p - shift) ** 3 / 3).sum() for p, ai, wi in zip(params, a, w)))
    (loss * scale).backward(create_graph=create_graph)


def separable_step(opt, params, coeffs, t: int, **kw) -> None:
    opt.zero_grad()
    separable_backward(params, coeffs, t, **kw)
    opt.step()


def exact_diagonal(params, coeffs, t: int) -> list[torch.Tensor]:
    a, w = coeffs
    return [ai + 2 * wi * (p.detach().double() - 0.05 * t) for p, ai, wi in zip(params, a, w)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_update_matches_reference_in_every_dtype(dtype):
    """On a separable loss (exact estimates): fp64 and fp32 follow the float64 reference for 8
    steps; bf16 and fp16 take one step from identical state (no drift to compound)."""
    kw = dict(lr=0.05, weight_decay=0.1, hessian_power=0.7)
    shapes = SHAPES if dtype != torch.float16 else SHAPES[:-1]
    params = make_params(shapes, dtype, seed=3)
    coeffs = separable(params)
    opt = emafuse.AdaHessian(params, **kw)
    ref = RefAdaHessian(params, **kw)
    steps = 8 if dtype in (torch.float64, torch.float32) else 1
    for t in range(steps):
        before = [p.detach().double().clone() for p in params]
        separable_step(opt, params, coeffs, t)
        grads = [ai * (b - 0.05 * t) + wi * (b - 0.05 * t) ** 2 for b, ai, wi in zip(before, *coeffs)]
        ref.step(grads, exact_diagonal(before, coeffs, t))
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]
    for i, (p, r) in enumerate(zip(params, ref.params)):
        torch.testing.assert_close(p.double(), r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref.state[i]["exp_avg"], rtol=rtol, atol=atol)


@pytest.mark.official
def test_timm_checkpoint_continues_in_emafuse():
    """A timm checkpoint (no stored estimate) loads into emafuse, which estimates afresh at its first
    step and continues timm's trajectory (separable loss: the estimates do not depend on z)."""
    params = make_params(SHAPES, seed=5)
    coeffs = separable(params, seed=1)
    timm_params = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = timm.optim.Adahessian(timm_params, lr=0.05, weight_decay=0.1)
    for t in range(3):
        separable_step(theirs, timm_params, coeffs, t)
    ours_params = [nn.Parameter(p.detach().clone()) for p in timm_params]
    ours = emafuse.AdaHessian(ours_params, lr=0.05, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for t in range(3, 6):
        separable_step(theirs, timm_params, coeffs, t)
        separable_step(ours, ours_params, coeffs, t)
    for p, q in zip(ours_params, timm_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert ours.state[p]["step"] == 6


def test_resume_is_exact():
    """A state dict after 3 steps (with the generator's state), loaded into a new optimizer over a
    copy of the model, continues bit for bit as the uninterrupted run, delayed updates included."""
    kw = dict(lr=0.05, eps=1e-4, update_each=2, n_samples=2, weight_decay=0.01)
    model = Net(conv1d=True, seed=2)
    opt = emafuse.AdaHessian(model.parameters(), **kw)
    train(opt, model, range(3))
    twin = copy.deepcopy(model)
    resumed = emafuse.AdaHessian(twin.parameters(), **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(opt, model, range(3, 7))
    train(resumed, twin, range(3, 7))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["hessian_step"] == resumed.param_groups[0]["hessian_step"] == 7


def test_update_each_reuses_the_estimate_without_a_graph():
    """Between refreshes the stored estimate is reused (unchanged) and the gradients need no graph."""
    params = make_params(SHAPES, seed=6)
    coeffs = separable(params, seed=2)
    opt = emafuse.AdaHessian(params, lr=0.05, update_each=3)
    separable_step(opt, params, coeffs, 0)
    kept = [opt.state[p]["hessian"].clone() for p in params]
    for t in (1, 2):
        separable_step(opt, params, coeffs, t, create_graph=False)
        for p, h in zip(params, kept):
            assert torch.equal(opt.state[p]["hessian"], h)
    with pytest.raises(emafuse.InvalidArgumentError, match=r"loss.backward\(create_graph=True\)"):
        separable_step(opt, params, coeffs, 3, create_graph=False)  # a refresh step needs the graph
    before = [p.detach().clone() for p in params]
    separable_step(opt, params, coeffs, 3)
    for p, h in zip(params, exact_diagonal(before, coeffs, 3)):
        torch.testing.assert_close(opt.state[p]["hessian"].double(), h, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"] == 4


def test_grad_scaler_unscales_the_estimate_and_skips():
    """AMP: with ``grad_scale`` (loss scaled by 1024) the step equals the unscaled one, estimate
    included; with ``found_inf`` nothing changes, the estimates included."""
    params = make_params(SHAPES[:5], seed=9)
    plain_params = [nn.Parameter(p.detach().clone()) for p in params]
    coeffs = separable(params, seed=3)
    opt, plain = emafuse.AdaHessian(params, lr=0.05), emafuse.AdaHessian(plain_params, lr=0.05)
    for t in range(3):
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        separable_step(opt, params, coeffs, t, scale=1024.0)
        separable_step(plain, plain_params, coeffs, t)
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["hessian"], plain.state[q]["hessian"], rtol=1e-6, atol=0.0)
    opt.zero_grad()
    separable_backward(params, coeffs, 3, scale=float("inf"))
    opt.found_inf = torch.tensor(1.0)
    snap = snapshot(params, opt)
    opt.step()
    assert_unchanged(params, opt, snap)


def test_lean_state():
    """bf16 and 8-bit state (the estimate stored as the other slots) train the conv net as fp32
    state does, within a tolerance; the 8-bit estimate is uint8 codes with block scales."""
    def run(**kw):
        model = Net(conv1d=False, seed=4)
        model.fc1 = nn.Linear(27, 160)  # 4320 weights: 8-bit state (4096 and more)
        model.fc2 = nn.Linear(160, 3)
        opt = emafuse.AdaHessian(model.parameters(), lr=0.02, eps=1e-3, **kw)
        train(opt, model, range(6))
        x, y = batch(99)
        return opt, model, float(nn.functional.mse_loss(model(x), y).detach())

    _, _, full = run()
    opt, model, bf16 = run(state_dtype=torch.bfloat16)
    assert opt.state[model.fc1.weight]["hessian"].dtype == torch.bfloat16
    opt, model, eight = run(state_dtype="8bit")
    st = opt.state[model.fc1.weight]
    assert st["hessian"].dtype == torch.uint8 and st["hessian_absmax"].shape == (17,)
    assert opt.state[model.fc2.bias]["hessian"].dtype == torch.float32  # small: fp32 state
    assert bf16 == pytest.approx(full, rel=0.05) and eight == pytest.approx(full, rel=0.05)


def test_bad_input_changes_nothing():
    """A refused step (no graph to differentiate, a NaN gradient with ``check_finite``) changes
    neither the model nor the state nor the generator: the run then continues exactly as one that
    never saw it."""
    model, twin = Net(conv1d=False, seed=7), Net(conv1d=False, seed=7)
    opt = emafuse.AdaHessian(model.parameters(), lr=0.05, eps=1e-4, check_finite=True)
    other = emafuse.AdaHessian(twin.parameters(), lr=0.05, eps=1e-4, check_finite=True)
    train(opt, model, range(1))
    train(other, twin, range(1))
    params = list(model.parameters())
    snap = snapshot(params, opt)
    opt.zero_grad()
    backward(model, 1, create_graph=False)
    with pytest.raises(emafuse.InvalidArgumentError, match=r"call loss.backward\(create_graph=True\)"):
        opt.step()
    assert_unchanged(params, opt, snap)
    opt.zero_grad()
    backward(model, 1)
    with torch.no_grad():
        model.fc2.bias.grad[1] = float("nan")
    with pytest.raises(emafuse.NonFiniteError):
        opt.step()
    assert_unchanged(params, opt, snap)
    train(opt, model, range(1, 3))
    train(other, twin, range(1, 3))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "update_each": 2})
    assert len(opt.param_groups) == 1  # the refused group was not added


@pytest.mark.official
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
        (dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
        (dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
        (dict(betas=(0.9, 1.5)), r"^Invalid beta parameter at index 1: 1.5$"),
        (dict(hessian_power=1.5), r"^Invalid Hessian power value: 1.5$"),
    ],
)
def test_constructor_checks_match_timm(kw, message):
    for cls in (emafuse.AdaHessian, timm.optim.Adahessian):
        with pytest.raises(ValueError, match=message):
            cls([nn.Parameter(torch.ones(2))], **kw)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
        (dict(update_each=0), r"^Invalid update_each value: 0"),
        (dict(n_samples=1.5), r"^Invalid n_samples value: 1.5"),
    ],
)
def test_extra_constructor_checks(kw, message):
    with pytest.raises(ValueError, match=message):
        emafuse.AdaHessian([nn.Parameter(torch.ones(2))], **kw)


def test_refuses_what_it_cannot_estimate():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    (p.abs() ** 4).sum().backward(create_graph=True)
    with pytest.raises(emafuse.UnsupportedOptionError, match="complex parameters"):
        emafuse.AdaHessian([p]).step()


def test_lightning_trains_with_create_graph_backward():
    """In Lightning, a module whose ``backward`` keeps the graph trains with AdaHessian (Lightning
    calls ``step(closure)``): the same parameters as a hand-written loop."""
    import lightning.pytorch as pl

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 5, generator=g), torch.randn(48, 2, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def backward(self, loss, *args, **kwargs):
            loss.backward(create_graph=True)

        def configure_optimizers(self):
            return emafuse.AdaHessian(self.parameters(), lr=0.05, eps=1e-4, update_each=2)

    module = Module()
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).fit(module, data)
    model = net()
    opt = emafuse.AdaHessian(model.parameters(), lr=0.05, eps=1e-4, update_each=2)
    for _ in range(2):
        for xb, yb in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward(create_graph=True)
            opt.step()
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_compiled_training_step_runs_the_step_eagerly():
    """Under ``torch.compile`` the step is a graph break (its Hessian-vector product calls autograd)
    and runs eagerly: the same parameters as an eager run."""
    model, twin = Net(conv1d=False, seed=8), Net(conv1d=False, seed=8)
    opt = emafuse.AdaHessian(model.parameters(), lr=0.05, eps=1e-4)
    other = emafuse.AdaHessian(twin.parameters(), lr=0.05, eps=1e-4)

    @torch.compile(backend="eager")
    def train_step(t: int) -> None:
        opt.zero_grad()
        backward(model, t)
        opt.step()

    for t in range(3):
        train_step(t)
        train(other, twin, range(t, t + 1))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_maximize_ascends_as_minimizing_the_negated_loss():
    """``maximize=True`` on a loss steps exactly as minimizing its negation (the estimate's square
    is the same for both)."""
    model, twin = Net(conv1d=True, seed=9), Net(conv1d=True, seed=9)
    up = emafuse.AdaHessian(model.parameters(), lr=0.05, eps=1e-4, maximize=True, weight_decay=0.1)
    down = emafuse.AdaHessian(twin.parameters(), lr=0.05, eps=1e-4, weight_decay=0.1)
    for t in range(3):
        up.zero_grad()
        backward(model, t)
        up.step()
        down.zero_grad()
        backward(twin, t, scale=-1.0)
        down.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
