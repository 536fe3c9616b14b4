"""ModelEMA keeps its update's validated native plan between updates; a change to the tensors it
reads is seen, and the average is then computed from the new tensors."""

from __future__ import annotations

import emafuse
import torch
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _nudge(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_updates_reuse_the_plan():
    model = _model()
    ema = emafuse.ModelEMA(model, decay=0.9)
    ema.update(model)
    plan = ema._step._plan
    for step in range(3):
        _nudge(model, step)
        ema.update(model)
        assert ema._step._plan is plan


def test_a_parameter_given_new_memory_is_read_from_there():
    model = _model()
    ema = emafuse.ModelEMA(model, decay=0.5)
    ema.update(model)
    plan = ema._step._plan
    w = model[0].weight
    w.data = torch.full_like(w, 3.0)  # same Parameter object, new storage
    before = ema.module[0].weight.detach().clone()
    ema.update(model)
    assert ema._step._plan is not plan
    torch.testing.assert_close(ema.module[0].weight, before.lerp(torch.full_like(before, 3.0), 0.5))


def test_a_replaced_submodule_is_averaged_from_its_new_tensors():
    model = _model()
    ema = emafuse.ModelEMA(model, decay=0.5)
    ema.update(model)
    new = nn.Linear(5, 3)
    with torch.no_grad():
        new.weight.fill_(2.0)
        new.bias.fill_(-1.0)
    model[2] = new
    before = ema.module[2].weight.detach().clone()
    ema.update(model)
    torch.testing.assert_close(ema.module[2].weight, before.lerp(torch.full_like(before, 2.0), 0.5))
