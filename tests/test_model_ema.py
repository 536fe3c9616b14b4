"""ModelEMA: parity with timm, ema-pytorch, torch-ema and swa_utils (spec averaging.md T.2),
the spec's schedule vectors (T.1), tensor-class policy (T.5), devices/async (T.6), resume (T.4),
the fused swap, fusion with AdamW, and clear errors for bad input."""

from __future__ import annotations

import copy

import emafuse
import pytest
import torch
from emafuse import ModelEMA
from emafuse.averaging import schedules as S
from emafuse.errors import InvalidArgumentError, ShapeError
from torch import nn


class Net(nn.Module):
    """Linear + BatchNorm (float running stats, int num_batches_tracked) + an int counter."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin1 = nn.Linear(6, 9)
        self.bn = nn.BatchNorm1d(9)
        self.lin2 = nn.Linear(9, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) + 0.1)
        self.register_buffer("counter", torch.tensor(3, dtype=torch.int64))
        self.to(dtype)

    def forward(self, x):
        return self.lin2(torch.relu(self.bn(self.lin1(x))))


def train_step(model: nn.Module, t: int, seed: int = 7) -> None:
    """Move the weights (random, never zero) and the buffers like a training step would."""
    g = torch.Generator().manual_seed(seed * 1000 + t)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.3).to(dtype))
        model.train()
        model(torch.randn(5, 6, generator=g).to(dtype))
        model.counter += 7


def states_close(ours: dict, ref: dict, rtol=3e-6, atol=3e-6, keys=None) -> None:
    for k in keys or ref:
        a, b = ours[k], ref[k]
        if a.is_floating_point():
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a, b), f"{k}: {a} != {b}"


# -- schedules (T.1) -------------------------------------------------------------------------


def test_timm_warmup_table():
    # Spec A.2 (decay=0.9999, gamma=1, p=2/3, U=0); k = s - 1.
    table = {2: 0.37003948, 3: 0.51925014, 10: 0.78455653, 100: 0.95358411, 1000: 0.99, 31623: 0.999, 10**6: 0.9999}
    for s, d in table.items():
        assert S.warmup_decay(s - 1, 0.9999, 1.0, 2 / 3) == pytest.approx(d, rel=2e-8, abs=1e-8)
    assert S.warmup_decay(0) == 0.0
    ema = ModelEMA(Net(), 0.9999, schedule="warmup")
    assert ema.decay_at(1, n=0) == 0.0 and ema.decay_at(2, n=1) == pytest.approx(0.37003948, rel=1e-7)
    ema = ModelEMA(Net(), 0.9999, update_after_step=5)
    assert [ema.decay_at(s, n=1) for s in range(1, 8)] == [0.0] * 6 + [0.9999]


def test_other_schedule_vectors():
    assert [S.tf_num_updates_decay(n, 0.99) for n in (1, 2, 3, 4)] == [2 / 11, 3 / 12, 4 / 13, 5 / 14]
    dino = [0.996, 0.996097887, 0.996381966, 0.996824429, 0.997381966, 0.998, 0.998618034, 0.999175571, 0.999618034, 0.999902113]
    assert [S.dino_cosine(i, 10) for i in range(10)] == pytest.approx(dino, abs=1e-9)
    assert [S.byol_cosine(i, 10) for i in range(11)] == pytest.approx(dino + [1.0], abs=1e-9)
    assert [S.linear_momentum(i, 10) for i in range(11)] == pytest.approx([0.996 + 0.0004 * i for i in range(11)], abs=1e-12)
    assert S.scale_momentum(0.9999, 8) == pytest.approx(0.99920028, abs=1e-8)
    assert S.scale_momentum(0.999, 4) == pytest.approx(0.996005996, abs=1e-9)
    assert S.scale_momentum(0.99, 0.25) == pytest.approx(0.99749057, abs=1e-8)
    assert S.mean_teacher_decay(1, 0.99) == 0.5
    # The scaling rule applied to a ModelEMA: constant decay -> decay^kappa.
    ema = ModelEMA(Net(), 0.999, batch_scale=4)
    assert ema.decay_at(5, n=3) == pytest.approx(0.999**4, rel=1e-15)
    ema = ModelEMA(Net(), 0.9, update_every=3, interval_compensation=True)
    assert ema.decay_at(4, n=1) == pytest.approx(0.9**3, rel=1e-15)


def test_gating_and_first_copy():
    ema = ModelEMA(Net(), 0.9, update_every=3, start_step=2)
    assert [s for s in range(1, 15) if ema.is_update_step(s)] == [4, 7, 10, 13]


# -- parity with the reference libraries (T.2) ------------------------------------------------


@pytest.mark.parametrize("warmup", [False, True])
def test_timm_model_ema_v3(warmup):
    from timm.utils.model_ema import ModelEmaV3

    model = Net()
    kw = dict(decay=0.995, update_after_step=3, use_warmup=warmup, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.2)
    ref = ModelEmaV3(model, **kw)
    ours = ModelEMA(model, 0.995, preset="timm_v3", update_after_step=3, schedule="warmup" if warmup else "constant",
                    inv_gamma=2.0, power=0.75, min_decay=0.2)
    for s in range(1, 31):
        train_step(model, s)
        ref.update(model, step=s)
        ours.update(model)
        if s in (1, 4, 5, 30):
            states_close(ours.module.state_dict(), ref.module.state_dict())


def test_ema_pytorch():
    from ema_pytorch import EMA

    model = Net()
    ref = EMA(model, beta=0.99, update_after_step=5, update_every=3, inv_gamma=1.5, power=0.8, include_online_model=False)
    ours = ModelEMA(model, 0.99, preset="ema_pytorch", update_after_step=5, update_every=3, inv_gamma=1.5, power=0.8)
    for s in range(1, 41):
        train_step(model, s)
        ref.update()
        ours.update(model)
        if s % 10 == 0:
            states_close(ours.module.state_dict(), ref.ema_model.state_dict())


def test_ema_pytorch_trace():
    # Spec A.3: beta=0.9, U=3, update_every=2, power=1; the live value before call k is k.
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    ema = ModelEMA(m, 0.9, preset="ema_pytorch", update_after_step=3, update_every=2, power=1.0)
    ema._schedule.float32_warmup = False  # exact f64 decays for the f64 trace
    out = []
    for k in range(1, 12):
        with torch.no_grad():
            m.w.fill_(k)
        ema.update(m)
        out.append(ema.module.w.item())
    assert out == pytest.approx([1, 1, 3, 3, 4, 4, 4.75, 4.75, 5.458333, 5.458333, 6.151042], abs=1e-6)


def test_torch_ema():
    from torch_ema import ExponentialMovingAverage

    model = Net()
    ref = ExponentialMovingAverage(model.parameters(), decay=0.98)
    ours = ModelEMA(model, 0.98, preset="torch_ema")
    for s in range(1, 26):
        train_step(model, s)
        ref.update(model.parameters())
        ours.update(model)
    for (name, p), sh in zip(ours.module.named_parameters(), ref.shadow_params):
        torch.testing.assert_close(p.double(), sh.double(), rtol=3e-6, atol=3e-6, msg=name)
    # Spec A.5 vector: theta0 = 0 at construction, theta = 1..4.
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    e = ModelEMA(m, 0.99, preset="torch_ema")
    vals = []
    for v in (1, 2, 3, 4):
        with torch.no_grad():
            m.w.fill_(v)
        e.update(m)
        vals.append(e.module.w.item())
    assert vals == pytest.approx([0.818182, 1.704545, 2.601399, 3.500499], abs=1e-6)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_ema(use_buffers):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = Net()
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.93), use_buffers=use_buffers)
    if use_buffers:
        ours = ModelEMA(model, 0.93, buffers="average", non_float="truncate")
    else:
        ours = ModelEMA(model, 0.93, preset="torch_swa")
    for s in range(1, 21):
        train_step(model, s)
        ref.update_parameters(model)
        ours.update(model)
    ref_sd = {k[len("module."):]: v for k, v in ref.state_dict().items() if k.startswith("module.")}
    states_close(ours.module.state_dict(), ref_sd)


def test_swa_matches_averaged_model():
    from emafuse.averaging import SWA
    from torch.optim.swa_utils import AveragedModel

    model = Net()
    ref = AveragedModel(model)
    ours = SWA(model)
    for s in range(1, 9):
        train_step(model, s)
        ref.update_parameters(model)
        ours.update(model)
    assert ours.n_averaged == int(ref.n_averaged)
    ref_sd = {k[len("module."):]: v for k, v in ref.state_dict().items() if k.startswith("module.")}
    states_close(ours.module.state_dict(), ref_sd)
    # Spec B.7: theta = 1..5 -> 3.
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([0.0]))
    swa = SWA(m)
    for v in range(1, 6):
        with torch.no_grad():
            m.w.fill_(v)
        swa.update(m)
    assert swa.module.w.item() == pytest.approx(3.0, abs=1e-6)


def test_lightning_formula_vector_and_int_truncation():
    # Spec A.6 (decay 0.9, theta_t = t) and A.4 integer buffer vector 7, 7, 8, 10, 12.
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    m.register_buffer("n", torch.tensor(0, dtype=torch.int64))
    e = ModelEMA(m, 0.9, preset="lightning")
    ws, ns = [], []
    for t in range(1, 6):
        with torch.no_grad():
            m.w.fill_(t)
            m.n.fill_(7 * t)
        e.update(m)
        ws.append(e.module.w.item())
        ns.append(int(e.module.n))
    assert ws[:4] == pytest.approx([1, 1.1, 1.29, 1.561], abs=1e-12)
    assert ns == [7, 7, 8, 10, 12]


# -- precision, policy, layouts (T.5) ---------------------------------------------------------


def test_fp32_average_of_bf16_model_against_f64_reference():
    model = Net(dtype=torch.bfloat16)
    ema = ModelEMA(model, 0.97, ema_dtype=torch.float32)
    ref = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for s in range(1, 16):
        train_step(model, s)
        ema.update(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ref[k] = v.double() if s == 1 else ref[k] + 0.03 * (v.double() - ref[k])
    sd = ema.module.state_dict()
    assert all(sd[k].dtype == torch.float32 for k in ref)
    for k in ref:
        torch.testing.assert_close(sd[k].double(), ref[k], rtol=1e-5, atol=1e-5)


def test_bf16_model_without_ema_dtype_warns():
    with pytest.warns(UserWarning, match="ema_dtype"):
        ModelEMA(Net(dtype=torch.bfloat16), 0.9)


def test_tensor_class_policy_and_names():
    model = Net()
    model.register_buffer("z", torch.randn(3, dtype=torch.complex64) + 1)
    before = copy.deepcopy(model.state_dict())
    ema = ModelEMA(model, 0.5, buffers="copy", non_float="skip", exclude=("lin2.bias",), copy_names=("lin1.bias",))
    for s in range(1, 4):
        train_step(model, s)
        with torch.no_grad():
            model.z.mul_(1.5)
        ema.update(model)
    sd, live = ema.module.state_dict(), model.state_dict()
    assert torch.equal(sd["lin2.bias"], before["lin2.bias"])  # excluded
    assert torch.equal(sd["lin1.bias"], live["lin1.bias"])  # copied
    assert torch.equal(sd["bn.running_mean"], live["bn.running_mean"])  # buffers copied
    assert torch.equal(sd["counter"], before["counter"])  # int skipped
    assert not torch.equal(sd["lin1.weight"], live["lin1.weight"])  # averaged
    # Complex buffers are copied too here (buffers="copy"); averaged when buffers="average":
    ema2 = ModelEMA(model, 0.5)
    z0 = model.z.clone()
    with torch.no_grad():
        model.z.mul_(3.0)
    ema2.update(model)
    ema2.update(model)
    torch.testing.assert_close(ema2.module.z, 3 * z0)  # first event copies, then lerp to the same value


def test_complex_average_is_lerped():
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(5, dtype=torch.complex64) + 1j)
    e = ModelEMA(m, 0.75)
    e.update(m)
    prev = m.w.detach().clone()
    with torch.no_grad():
        m.w.mul_(2.0)
    e.update(m)
    torch.testing.assert_close(e.module.w, prev + 0.25 * (m.w.detach() - prev))


def test_non_dense_parameter_is_staged():
    m = nn.Module()
    base = torch.randn(4, 10) + 0.5
    m.w = nn.Parameter(base[:, ::2])  # a strided view: neither contiguous nor dense
    m.v = nn.Parameter(torch.randn(3, 5).t())  # dense, transposed
    e = ModelEMA(m, 0.8)
    e.update(m)
    w0, v0 = m.w.detach().clone(), m.v.detach().clone()
    with torch.no_grad():
        m.w.add_(1.0)
        m.v.mul_(-2.0)
    e.update(m)
    torch.testing.assert_close(e.module.w, w0 + 0.2 * (m.w.detach() - w0))
    torch.testing.assert_close(e.module.v, v0 + 0.2 * (m.v.detach() - v0))


# -- swap, copy, context manager ---------------------------------------------------------------


@pytest.mark.parametrize("ema_dtype", [None, torch.float64])
def test_average_parameters_swaps_in_and_back_exactly(ema_dtype):
    model = Net()
    ema = ModelEMA(model, 0.9, ema_dtype=ema_dtype)
    for s in range(1, 5):
        train_step(model, s)
        ema.update(model)
    live = copy.deepcopy(model.state_dict())
    avg = copy.deepcopy(ema.module.state_dict())
    with ema.average_parameters(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, avg[k].to(v.dtype)), k
        with pytest.raises(InvalidArgumentError, match="swapped"):
            ema.update(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, avg[k]), k
    ema.swap(model)
    ema.swap(model)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    ema.copy_to(model)
    assert torch.equal(model.lin1.weight, avg["lin1.weight"].to(torch.float32))


def test_store_restore():
    model = Net()
    ema = ModelEMA(model, 0.9)
    train_step(model, 1)
    ema.update(model)
    train_step(model, 2)
    live = model.lin1.weight.detach().clone()
    ema.store(model)
    ema.copy_to(model)
    ema.restore(model)
    assert torch.equal(model.lin1.weight, live)


# -- resume (T.4) ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["warmup", "power", "tf_num_updates"])
def test_exact_resume(schedule):
    kw = dict(schedule=schedule, update_every=2, update_after_step=1)
    if schedule == "power":
        kw["sigma_rel"] = 0.1
    m1 = Net()
    e1 = ModelEMA(m1, 0.99, **kw)
    for s in range(1, 21):
        train_step(m1, s)
        e1.update(m1)
    m2 = Net()
    e2 = ModelEMA(m2, 0.99, **kw)
    for s in range(1, 11):
        train_step(m2, s)
        e2.update(m2)
    saved = copy.deepcopy(e2.state_dict())
    m3 = copy.deepcopy(m2)
    e3 = ModelEMA(Net(seed=5), 0.99, **kw)  # a fresh average of another initialisation
    e3.load_state_dict(saved)
    for s in range(11, 21):
        train_step(m3, s)
        e3.update(m3)
    for k, v in e1.module.state_dict().items():
        assert torch.equal(v, e3.module.state_dict()[k]), k
    assert (e3.num_steps_seen, e3.num_updates) == (e1.num_steps_seen, e1.num_updates)


# -- devices and the background update (T.6) ------------------------------------------------------


def test_async_cpu_update_equals_sync():
    m = Net()
    sync = ModelEMA(m, 0.9)
    off = ModelEMA(m, 0.9, device="cpu", async_update=True)
    off.offloaded = True  # force the staged, background path on a CPU model
    for s in range(1, 8):
        train_step(m, s)
        sync.update(m)
        off.update(m)  # returns while the native thread runs; the next call joins it
    assert off._mirror.busy
    for k, v in sync.module.state_dict().items():  # `module` joins the pending update
        assert torch.equal(v, off.module.state_dict()[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_model_with_cpu_average():
    m = Net().cuda()
    ref = ModelEMA(m, 0.9)
    off = ModelEMA(m, 0.9, device="cpu")
    assert off.async_update and all(p.device.type == "cpu" for p in off.module.parameters())
    for s in range(1, 6):
        train_step(m, s)
        ref.update(m)
        off.update(m)
    off.wait()
    for k, v in ref.module.state_dict().items():
        torch.testing.assert_close(off.module.state_dict()[k], v.cpu(), rtol=2e-6, atol=2e-6)


# -- fused with the optimizer (issue item 3, spec D.3) -----------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_ema_in_adamw_equals_separate_update(amsgrad):
    def setup():
        torch.manual_seed(0)
        m = Net()
        m.frozen = nn.Parameter(torch.randn(3) + 0.5, requires_grad=False)
        opt = emafuse.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
        return m, opt

    m1, o1 = setup()
    e1 = ModelEMA(m1, 0.9, schedule="warmup", update_every=2)
    m2, o2 = setup()
    e2 = ModelEMA(m2, 0.9, schedule="warmup", update_every=2).attach(o2, fuse=True)
    x = torch.randn(8, 6) + 0.1
    for s in range(1, 10):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m.train()
            m(x * s).square().mean().backward()
            o.step()
        e1.update(m1)
    for k, v in e1.module.state_dict().items():
        assert torch.equal(v, e2.module.state_dict()[k]), k
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert e2.num_updates == e1.num_updates == 5
    with pytest.raises(InvalidArgumentError, match="fused"):
        e2.update(m2)


# -- errors --------------------------------------------------------------------------------------


def test_changed_model_structure_is_a_clear_error():
    model = Net()
    ema = ModelEMA(model, 0.9)
    model.lin3 = nn.Linear(4, 2)
    with pytest.raises(InvalidArgumentError, match=r"structure changed.*lin3"):
        ema.update(model)
    model = Net()
    ema = ModelEMA(model, 0.9)
    model.lin2 = nn.Linear(9, 5)
    with pytest.raises(ShapeError, match=r"lin2\.weight"):
        ema.update(model)


def test_mismatched_state_dict_is_a_clear_error():
    ema = ModelEMA(Net(), 0.9)
    sd = ema.state_dict()
    other = nn.Sequential(nn.Linear(6, 9))
    with pytest.raises(InvalidArgumentError, match="does not match"):
        ModelEMA(other, 0.9).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["module"]["lin1.weight"] = torch.zeros(2, 2)
    with pytest.raises(ShapeError, match=r"lin1\.weight"):
        ema.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["num_steps_seen"]
    with pytest.raises(InvalidArgumentError, match="num_steps_seen"):
        ema.load_state_dict(bad)
    other_cfg = ModelEMA(Net(), 0.5)
    with pytest.warns(UserWarning, match="hyper-parameters differ"):
        other_cfg.load_state_dict(sd)


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(Net(), 1.5)
    with pytest.raises(ValueError, match="schedule"):
        ModelEMA(Net(), 0.9, schedule="nope")
    with pytest.raises(ValueError, match="total_steps"):
        ModelEMA(Net(), 0.9, schedule="cosine")
    with pytest.raises(ValueError, match="preset"):
        ModelEMA(Net(), preset="nope")


def test_fused_ema_skips_refused_and_amp_skipped_steps():
    m = Net()
    opt = emafuse.AdamW(m.parameters(), lr=1e-2, check_finite=True)
    ema = ModelEMA(m, 0.9).attach(opt, fuse=True)
    x = torch.randn(8, 6) + 0.1
    m(x).square().mean().backward()
    opt.step()
    assert (ema.num_steps_seen, ema.num_updates) == (1, 1)
    avg = copy.deepcopy(ema.module.state_dict())
    m.lin1.weight.grad[0, 0] = float("nan")
    with pytest.raises(emafuse.NonFiniteError):
        opt.step()
    assert (ema.num_steps_seen, ema.num_updates) == (1, 1)
    opt.found_inf = torch.tensor(1.0)  # what GradScaler hands over when it found inf/NaN
    opt.grad_scale = torch.tensor(1.0)
    opt.step()
    assert (ema.num_steps_seen, ema.num_updates) == (1, 1)
    assert all(torch.equal(v, avg[k]) for k, v in ema.module.state_dict().items())


# -- the fusion hook (optim/_fusion.py) ------------------------------------------------------------


def fused_setup(seed=0):
    torch.manual_seed(seed)
    m = Net()
    opt = emafuse.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    return m, opt


def train_with(m, opt, s, ema=None):
    opt.zero_grad()
    m.train()
    m(torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) + 0.1).square().mean().backward()
    opt.step()
    if ema is not None:
        ema.update(m)


def test_fusion_hook_registers_once_and_refuses_optimizers_that_cannot_fuse():
    m, opt = fused_setup()
    ema = ModelEMA(m, 0.9).attach(opt, fuse=True)
    with pytest.raises(InvalidArgumentError, match="already updates a fused average"):
        ModelEMA(m, 0.9).attach(opt, fuse=True)
    with pytest.raises(InvalidArgumentError, match="already updates a fused average"):
        opt.register_fused_average(ema)
    with pytest.raises(InvalidArgumentError, match="already fused"):
        ema.attach(emafuse.AdamW(m.parameters(), lr=1e-2), fuse=True)
    with pytest.raises(InvalidArgumentError, match="cannot update a weight average"):
        ModelEMA(m, 0.9).attach(emafuse.SGD(m.parameters(), lr=0.1), fuse=True)
    with pytest.raises(InvalidArgumentError, match="cannot update a ModelEMA"):
        ModelEMA(m, 0.9).attach(torch.optim.AdamW(m.parameters()), fuse=True)
    # A copy of the optimizer (pickle, deepcopy) comes without the registered average.
    assert emafuse.optim._fusion.fused_average(copy.deepcopy(opt)) is None


def test_removed_hook_no_longer_fuses():
    m1, o1 = fused_setup()
    m2, o2 = fused_setup()
    e1 = ModelEMA(m1, 0.8)
    e2 = ModelEMA(m2, 0.8).attach(o2, fuse=True)
    for s in range(1, 4):
        train_with(m1, o1, s, e1)
        train_with(m2, o2, s)
    e2.detach_optimizer()
    frozen = copy.deepcopy(e2.module.state_dict())
    train_with(m2, o2, 4)  # no longer fused: the average stays as it was ...
    assert e2.num_steps_seen == 3
    assert all(torch.equal(v, frozen[k]) for k, v in e2.module.state_dict().items())
    e2.update(m2)  # ... and update() works again
    train_with(m1, o1, 4, e1)
    for k, v in e1.module.state_dict().items():
        assert torch.equal(v, e2.module.state_dict()[k]), k
    # A handle removed directly unregisters the average too.
    m3, o3 = fused_setup()
    handle = o3.register_fused_average(ModelEMA(m3, 0.8))
    handle.remove()
    assert emafuse.optim._fusion.fused_average(o3) is None


@pytest.mark.parametrize("event", [True, False])
def test_refused_fused_step_changes_neither_counters_nor_average(event):
    m, opt = fused_setup()
    ema = ModelEMA(m, 0.9, update_every=1 if event else 2).attach(opt, fuse=True)
    for s in range(1, 4):
        train_with(m, opt, s)
    before = (ema.num_steps_seen, ema.num_updates)
    avg = copy.deepcopy(ema.module.state_dict())
    good = opt.state[m.lin1.weight]["exp_avg_sq"]
    opt.state[m.lin1.weight]["exp_avg_sq"] = torch.rand(3, 5)  # the native step refuses it
    with pytest.raises(ShapeError):
        train_with(m, opt, 4)
    assert (ema.num_steps_seen, ema.num_updates) == before
    assert all(torch.equal(v, avg[k]) for k, v in ema.module.state_dict().items())
    opt.state[m.lin1.weight]["exp_avg_sq"] = good
    train_with(m, opt, 4)  # and the next good step is counted once
    assert ema.num_steps_seen == before[0] + 1


@pytest.mark.parametrize("cls", ["ModelEMA", "SWA", "TeacherEMA"])
def test_fused_equals_unfused_for_ema_variants(cls):
    from emafuse import averaging

    make = {"ModelEMA": lambda m: ModelEMA(m, 0.7, schedule="tf_num_updates"), "SWA": averaging.SWA,
            "TeacherEMA": lambda m: averaging.TeacherEMA(m, base=0.9, total_steps=6)}[cls]
    m1, o1 = fused_setup(3)
    m2, o2 = fused_setup(3)
    e1, e2 = make(m1), make(m2).attach(o2, fuse=True)
    for s in range(1, 8):
        train_with(m1, o1, s, e1)
        train_with(m2, o2, s)
    assert (e1.num_steps_seen, e1.num_updates) == (e2.num_steps_seen, e2.num_updates) == (7, 7)
    for k, v in e1.module.state_dict().items():
        assert torch.equal(v, e2.module.state_dict()[k]), k


def test_fusion_protocol_with_a_custom_average():
    """The optimizer only speaks the FusedAverage protocol: a hand-written average works too."""
    from emafuse.optim._fusion import FusedRequest

    class Shadow:
        def __init__(self, params):
            self.params = list(params)
            self.avg = [p.detach().clone() for p in self.params]
            self.log = []

        def fused_begin(self, found_inf):
            self.log.append(("begin", found_inf))
            return FusedRequest(weight=0.25, targets={p: a for p, a in zip(self.params[:1], self.avg[:1])})

        def fused_end(self, request, fused):
            self.log.append(("end", fused))

        def fused_abort(self, request):
            self.log.append(("abort", request))

    m, opt = fused_setup()
    shadow = Shadow(m.parameters())
    opt.register_fused_average(shadow)
    a0 = shadow.avg[0].clone()
    train_with(m, opt, 1)
    assert shadow.log == [("begin", None), ("end", {id(m.lin1.weight)})]
    torch.testing.assert_close(shadow.avg[0], torch.lerp(a0, m.lin1.weight.detach(), 0.25), rtol=2.4e-7, atol=2.4e-7)
    opt.state[m.lin1.bias]["exp_avg"] = torch.rand(2)
    with pytest.raises(ShapeError):
        train_with(m, opt, 2)
    assert shadow.log[-1][0] == "abort" and isinstance(shadow.log[-1][1], FusedRequest)


def test_replaced_parameter_is_picked_up():
    model = Net()
    ema = ModelEMA(model, 0.5)
    ema.update(model)
    model.lin1.weight = nn.Parameter(torch.full_like(model.lin1.weight, 3.0))
    before = ema.module.lin1.weight.detach().clone()
    ema.update(model)
    torch.testing.assert_close(ema.module.lin1.weight, before + 0.5 * (3.0 - before))
