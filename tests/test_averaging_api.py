"""The API every averaging class shares (``emafuse.averaging``'s vocabulary): ``module`` as a
property, the counters, and the one swap / average_parameters / copy_to / store / restore
implementation (``_tracking.Tracking``: the fused native swap for same-dtype, same-device tensors,
a backup path for the rest) on every class; and the old spellings as aliases."""

from __future__ import annotations

import copy

import pytest
import torch
from emafuse.averaging import BEMA, LAWA, SWA, ModelEMA, PostHocEMA, PowerEMA, SwitchEMA, TeacherEMA, _tracking
from emafuse.errors import InvalidArgumentError
from torch import nn


class Net(nn.Module):
    """Float parameters, a complex parameter, BatchNorm's float and int64 buffers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.z = nn.Parameter(torch.randn(3, generator=g, dtype=torch.complex64) + 1)
        with torch.no_grad():
            for p in (self.lin.weight, self.lin.bias, self.bn.weight, self.bn.bias):
                p.copy_(torch.randn(p.shape, generator=g) + 0.1)

    def forward(self, x):
        return self.bn(self.lin(x))


def move(m: nn.Module, t: int) -> None:
    g = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        m.train()
        m(torch.randn(4, 5, generator=g))


# name -> (constructor, number of update events after 4 calls of update)
CLASSES = {
    "ModelEMA": (lambda m, **kw: ModelEMA(m, 0.6, update_every=2, **kw), 2),
    "SwitchEMA": (lambda m, **kw: SwitchEMA(m, 0.6, **kw), 4),
    "SWA": (lambda m, **kw: SWA(m, **kw), 4),
    "TeacherEMA": (lambda m, **kw: TeacherEMA(m, base=0.6, total_steps=10, **kw), 4),
    "BEMA": (lambda m, **kw: BEMA(m, update_every=2, update_after_step=1, **kw), 2),
    "PowerEMA": (lambda m, **kw: PowerEMA(m, (0.1, 0.2), **kw), 4),
    "PostHocEMA": (lambda m, **kw: PostHocEMA(m, (0.1, 0.2), snapshot_every=2, **kw), 4),
    "LAWA": (lambda m, **kw: LAWA(m, k=2, update_every=1, **kw), 4),
}


def built(name: str, ema_dtype=None):
    model = Net()
    make, _ = CLASSES[name]
    avg = make(model) if ema_dtype is None else make(model, ema_dtype=ema_dtype)
    for t in range(1, 5):
        move(model, t)
        avg.update(model)
    return model, avg


def followed(avg) -> set[str]:
    tr = avg._tracking
    return set(tr.names(tr.followed))


@pytest.mark.parametrize("name", CLASSES)
def test_module_property_and_counters(name):
    _model, avg = built(name)
    assert isinstance(type(avg).module, property)
    assert isinstance(avg.module, nn.Module) and not avg.module.training
    assert avg.num_steps_seen == 4
    assert avg.num_updates == CLASSES[name][1]
    assert avg.n_averaged == (min(avg.num_updates, avg.k) if name == "LAWA" else avg.num_updates)
    assert ("lin.weight" in followed(avg) and "bn.num_batches_tracked" in followed(avg)) or name == "TeacherEMA"


@pytest.mark.parametrize("name", CLASSES)
def test_refused_update_changes_nothing(name):
    model, avg = built(name)
    before = (avg.num_steps_seen, avg.num_updates)
    mean = copy.deepcopy(avg.module.state_dict())
    model.extra = nn.Linear(2, 2)
    with pytest.raises(InvalidArgumentError, match=f"{name}: the model's structure changed.*extra"):
        avg.update(model)  # step 5 is an update event for every class here
    assert (avg.num_steps_seen, avg.num_updates) == before
    assert all(torch.equal(v, mean[k]) for k, v in avg.module.state_dict().items())


@pytest.fixture
def swap_calls(monkeypatch):
    """The rules the shared tracking code runs natively."""
    calls = []
    real = _tracking.native_step

    def record(who, rule, c):
        calls.append(rule)
        return real(who, rule, c)

    monkeypatch.setattr(_tracking, "native_step", record)
    return calls


# An fp64 average of the fp32 model sends its float tensors through the backup path (LAWA keeps
# the model's dtypes); int64 buffers take it in every case.
SWAP_CASES = [(name, None) for name in CLASSES] + [(name, torch.float64) for name in CLASSES if name != "LAWA"]


@pytest.mark.parametrize("name, ema_dtype", SWAP_CASES)
def test_shared_swap_copy_store_restore(name, ema_dtype, swap_calls):
    model, avg = built(name, ema_dtype)
    live = copy.deepcopy(model.state_dict())
    mean = copy.deepcopy(avg.module.state_dict())
    names = followed(avg)

    def model_holds_average():
        for k, v in model.state_dict().items():
            assert torch.equal(v, mean[k].to(v.dtype) if k in names else live[k]), k

    def model_is_live():
        assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())

    avg.swap(model)
    model_holds_average()
    assert swap_calls == ["swap"]  # one native call for all same-dtype tensors
    avg.swap(model)
    model_is_live()
    if ema_dtype is None:  # an exact exchange; an fp64 average holds the model's fp32 values meanwhile
        assert all(torch.equal(v, mean[k]) for k, v in avg.module.state_dict().items())
    else:
        model, avg = built(name, ema_dtype)  # the same state again (deterministic)

    with avg.average_parameters(model) as m:
        assert m is model
        model_holds_average()
        with pytest.raises(InvalidArgumentError, match="swapped"):
            avg.update(model)
    model_is_live()
    assert all(torch.equal(v, mean[k]) for k, v in avg.module.state_dict().items())

    avg.store(model)
    avg.copy_to(model)
    model_holds_average()
    avg.restore(model)
    model_is_live()
    with pytest.raises(InvalidArgumentError, match="store"):
        avg.restore(model)


def test_power_ema_tracks():
    model, pe = built("PowerEMA")
    assert pe.module is pe.modules[0] and pe.module_for(1) is pe.modules[1]
    live = copy.deepcopy(model.state_dict())
    second = copy.deepcopy(pe.module_for(1).state_dict())
    with pe.average_parameters(model, track=1):
        assert torch.equal(model.lin.weight, second["lin.weight"])
    pe.swap(model, track=1)
    assert torch.equal(model.lin.weight, second["lin.weight"]) and torch.equal(pe.modules[1].lin.weight, live["lin.weight"])
    pe.swap(model, track=1)
    pe.copy_to(model, track=1)
    assert torch.equal(model.z, second["z"])
    # Buffers follow the model at every update, in every track.
    assert all(torch.equal(m.bn.running_mean, model.bn.running_mean) for m in pe.modules)


def test_lawa_module_is_the_current_mean():
    model, lawa = built("LAWA")
    j = lawa._tracking.names(lawa._tracking.averaged).index("lin.weight")
    expected = (lawa._ring[0][j].double() + lawa._ring[1][j].double()) / 2  # lin.weight in both snapshots
    torch.testing.assert_close(lawa.module.lin.weight.double(), expected, rtol=1e-6, atol=1e-7)
    move(model, 5)
    lawa.update(model)  # a new snapshot: the mean is recomputed when read
    assert not torch.equal(lawa.module.lin.weight.double(), expected)
    assert lawa.average() is lawa.module


# -- old spellings -------------------------------------------------------------------------------


def test_model_ema_counter_aliases():
    _model, ema = built("ModelEMA")
    assert ema.num_updates_applied == ema.num_updates == ema.n_averaged == 2
    ema.num_updates_applied = 5
    assert ema.num_updates == 5
    swa = built("SWA")[1]
    assert swa.num_updates_applied == swa.n_averaged == 4


def test_bema_aliases():
    m = Net()
    b = BEMA(m, update_after=3, update_freq=5)
    assert (b.update_after_step, b.update_every) == (3, 5)
    assert (b.update_after, b.update_freq) == (3, 5)
    b.update_freq = 7
    assert b.update_every == 7
    b.update(m)
    assert b.step == b.num_steps_seen == 1 and b.num_updates == 1  # a burn-in step
    with pytest.raises(InvalidArgumentError, match="update_every= or its old spelling update_freq="):
        BEMA(m, update_every=2, update_freq=2)
    with pytest.raises(InvalidArgumentError, match="update_after"):
        BEMA(m, update_after_step=2, update_after=2)


def test_lawa_aliases():
    m = Net()
    lawa = LAWA(m, k=2, every=3)
    assert lawa.update_every == lawa.every == 3
    for _t in range(1, 7):
        lawa.update(m)
    assert lawa.step == lawa.num_steps_seen == 6 and lawa.count == lawa.num_updates == 2
    with pytest.raises(InvalidArgumentError, match="update_every="):
        LAWA(m, k=2)
    with pytest.raises(InvalidArgumentError, match="not both"):
        LAWA(m, k=2, update_every=1, every=1)


def test_power_ema_step_alias():
    _model, pe = built("PowerEMA")
    assert pe.num_steps == pe.num_steps_seen == 4
    pe.num_steps = 9
    assert pe.num_steps_seen == 9
