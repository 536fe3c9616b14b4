"""Lightning's gradient clipping under ``16-mixed`` and ``bf16-mixed`` with emafuse optimizers
(Lightning refuses clipping for optimizers that unscale inside their step; emafuse's honour a
prior ``scaler.unscale_``, so Lightning unscales, clips, and the step unscales nothing more)."""

from __future__ import annotations

import warnings

import emafuse
import lightning.pytorch as pl
import pytest
import torch
from registry import entries


class _Net(pl.LightningModule):
    def __init__(self, make_opt) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.make_opt = make_opt

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y) * 100  # large gradients: clipping bites

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def _fit(make_opt, precision: str, algorithm: str) -> list[torch.Tensor]:
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    model = _Net(make_opt)
    trainer = pl.Trainer(
        max_epochs=2, precision=precision, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return [p.detach().clone() for p in model.parameters()]


CASES = [(p, a) for p in ("16-mixed", "bf16-mixed") for a in ("norm", "value")]


@pytest.mark.parametrize("precision, algorithm", CASES)
@pytest.mark.parametrize("ours, theirs", [(emafuse.AdamW, torch.optim.AdamW), (emafuse.Adam, torch.optim.Adam), (emafuse.SGD, torch.optim.SGD)])
def test_clipping_equals_torch_default_optimizer(ours, theirs, precision, algorithm):
    kw = dict(lr=1e-2, momentum=0.9) if ours is emafuse.SGD else dict(lr=1e-2)
    a = _fit(lambda ps: ours(ps, **kw), precision, algorithm)
    b = _fit(lambda ps: theirs(ps, foreach=False, **kw), precision, algorithm)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", entries())
def test_every_optimizer_clips_under_16_mixed(entry):
    start = [p.detach().clone() for p in _Net(None).parameters()]
    end = _fit(lambda ps: entry.cls(ps, **entry.main), "16-mixed", "norm")
    assert all(torch.isfinite(p).all() for p in end)
    assert any(not torch.equal(p, q) for p, q in zip(start, end))


def test_grad_scaler_still_gets_the_fused_unscale():
    opt = emafuse.AdamW([torch.nn.Parameter(torch.randn(3))])
    assert opt._step_supports_amp_scaling is True  # read here as GradScaler reads it
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    assert _optimizer_handles_unscaling(opt) is False
