"""emafuse.lightning on CPU (spec averaging.md A.6, L, T.2, T.4): parity with Lightning's
EMAWeightAveraging in a 2-epoch run, validation on the averaged weights, Lightning's checkpoint
layout, exact resume from a checkpoint, the BEMA, LAWA and Switch EMA callbacks (equal to the
average driven by hand, validation on it, switches, exact resume), and the post-hoc EMA
callback."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from emafuse.averaging import BEMA, LAWA
from emafuse.lightning import BEMACallback, EMACallback, LAWACallback, PostHocEMACallback, SwitchEMACallback
from torch import nn

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), on_epoch=True)

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(96, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(64)), batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(64, 96)), batch_size=16)
    return train, val


def trainer(callbacks, max_epochs=2, **kw):
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kw,
    )


def fit(callback, max_epochs=2, ckpt_path=None, **kw):
    model = Module()
    extra = kw.pop("extra", [])
    options = {k: v for k, v in kw.items() if k != "ckpt"}
    t = trainer([callback, *extra], max_epochs=max_epochs, enable_checkpointing=bool(kw.get("ckpt")), **options)
    train, val = loaders()
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return model, t


@pytest.mark.parametrize("accumulate", [1, 2])
def test_parity_with_lightning_ema_weight_averaging(accumulate):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ref_cb = EMAWeightAveraging(decay=0.9, update_every_n_steps=2)
    ref_model, ref_t = fit(ref_cb, accumulate_grad_batches=accumulate)
    ours_cb = EMACallback(decay=0.9, update_every_n_steps=2, preset="lightning")
    ours_model, ours_t = fit(ours_cb, accumulate_grad_batches=accumulate)
    ref_avg = ref_cb._average_model.module.state_dict()
    ours_avg = ours_cb.ema.module.state_dict()
    for k, v in ref_avg.items():
        assert torch.equal(ours_avg[k], v), k
    # Both end training holding the average.
    for (k, a), (_, b) in zip(ours_model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), k
    assert ours_t.callback_metrics["val_loss"] == ref_t.callback_metrics["val_loss"]
    assert ours_cb.ema.num_updates == ours_cb.ema.n_averaged == int(ref_cb._average_model.n_averaged) == 8 // accumulate


def test_validation_uses_the_average_and_default_lerp():
    cb = EMACallback(decay=0.8, copy_at_train_end=False)
    model, t = fit(cb)
    _, val = loaders()
    avg = cb.ema.module
    with torch.no_grad():
        losses = [nn.functional.mse_loss(avg(x), y) * len(x) for x, y in val]
    expected = sum(losses) / 32
    torch.testing.assert_close(t.callback_metrics["val_loss"], expected, rtol=1e-6, atol=1e-7)
    # copy_at_train_end=False: the module keeps its own (non-averaged) weights ...
    live = model.net[0].weight.detach().clone()
    assert not torch.equal(live, avg.net[0].weight)
    # ... and testing (after fit, same trainer) runs on the average, then swaps back.
    t.test(model, val, verbose=False)
    torch.testing.assert_close(t.callback_metrics["test_loss"], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.net[0].weight, live)


def test_checkpoint_layout_and_exact_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full_cb = EMACallback(decay=0.85, schedule="warmup", copy_at_train_end=False)
    full_model, _ = fit(full_cb, max_epochs=3)

    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first_cb = EMACallback(decay=0.85, schedule="warmup", copy_at_train_end=False)
    fit(first_cb, max_epochs=1, extra=[ck], ckpt=True)
    path = os.path.join(tmp_path, "epoch=0.ckpt")
    ckpt = torch.load(path, weights_only=False)
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(ckpt)
    for k, v in first_cb.ema.module.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert int(ckpt["averaging_state"]["n_averaged"]) == 8
    cb_state = next(v for k, v in ckpt["callbacks"].items() if "EMACallback" in k)
    assert cb_state == {"latest_update_step": 8, "latest_update_epoch": -1}

    resumed_cb = EMACallback(decay=0.85, schedule="warmup", copy_at_train_end=False)
    resumed_model, _ = fit(resumed_cb, max_epochs=3, ckpt_path=path)
    for k, v in full_cb.ema.module.state_dict().items():
        assert torch.equal(resumed_cb.ema.module.state_dict()[k], v), k
    for k, v in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k
    assert resumed_cb.ema.num_steps_seen == full_cb.ema.num_steps_seen == 24


def test_resume_from_a_checkpoint_with_the_old_averaging_names(tmp_path):
    """Checkpoints written before the averaging names were unified (``num_updates_applied`` in
    ``averaging_state["emafuse"]``, PowerEMA's ``num_steps``) resume exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full_cb, full_ph = EMACallback(decay=0.85, copy_at_train_end=False), PostHocEMACallback((0.05, 0.10), snapshot_every=4)
    fit(full_cb, max_epochs=2, extra=[full_ph])
    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(EMACallback(decay=0.85, copy_at_train_end=False), max_epochs=1,
        extra=[PostHocEMACallback((0.05, 0.10), snapshot_every=4), ck], ckpt=True)
    path = os.path.join(tmp_path, "epoch=0.ckpt")
    ckpt = torch.load(path, weights_only=False)
    st = ckpt["averaging_state"]["emafuse"]
    st["num_updates_applied"] = st.pop("num_updates")
    st["initialized"] = True
    ph = next(v for k, v in ckpt["callbacks"].items() if "PostHocEMACallback" in k)["posthoc"]
    ph["num_steps"] = ph.pop("num_steps_seen")
    del ph["num_updates"]
    old_path = os.path.join(tmp_path, "old.ckpt")
    torch.save(ckpt, old_path)

    cb, ph_cb = EMACallback(decay=0.85, copy_at_train_end=False), PostHocEMACallback((0.05, 0.10), snapshot_every=4)
    fit(cb, max_epochs=2, ckpt_path=old_path, extra=[ph_cb])
    for k, v in full_cb.ema.module.state_dict().items():
        assert torch.equal(cb.ema.module.state_dict()[k], v), k
    assert (cb.ema.num_steps_seen, cb.ema.num_updates) == (full_cb.ema.num_steps_seen, full_cb.ema.num_updates) == (16, 16)
    for a, b in zip(full_ph.posthoc.modules, ph_cb.posthoc.modules):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert (ph_cb.posthoc.num_steps_seen, ph_cb.posthoc.num_updates) == (16, 16)


class Probe(pl.Callback):
    """After the callback under test: drives ``make(module)``, an average built at fit start, by
    hand at every optimizer step."""

    def __init__(self, make):
        self.make, self.average, self.step = make, None, 0

    def on_fit_start(self, trainer, pl_module):
        self.average = self.make(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.step:
            self.average.update(pl_module)
            self.step = trainer.global_step


def val_loss_of(module):
    _, val = loaders()
    with torch.no_grad():
        return sum(nn.functional.mse_loss(module(x), y) * len(x) for x, y in val) / 32


STEP_CALLBACKS = {
    "BEMA": (lambda: BEMACallback(update_every=3, update_after_step=2, copy_at_train_end=False),
             lambda m: BEMA(m, update_every=3, update_after_step=2)),
    "LAWA": (lambda: LAWACallback(k=3, update_every=2, copy_at_train_end=False), lambda m: LAWA(m, k=3, update_every=2)),
}


@pytest.mark.parametrize("name", list(STEP_CALLBACKS))
def test_bema_and_lawa_callbacks_equal_the_average_driven_by_hand(name):
    make_cb, make_ref = STEP_CALLBACKS[name]
    cb, probe = make_cb(), Probe(make_ref)
    model, t = fit(cb, extra=[probe])
    ours, ref = cb._average_model.module.state_dict(), probe.average.module.state_dict()
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    assert cb.average.num_updates == probe.average.num_updates > 0
    # Validation ran on the average (the last one, after the last update); the module kept its
    # own weights (copy_at_train_end=False).
    torch.testing.assert_close(t.callback_metrics["val_loss"], val_loss_of(cb.average.module), rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.net[0].weight, cb.average.module.net[0].weight)


def test_switch_ema_callback_switches_each_period():
    class LiveIsAverage(pl.Callback):
        """At each epoch end (after the switch): the module's weights are the average's."""

        def __init__(self, cb):
            self.cb, self.seen = cb, []

        def on_train_epoch_end(self, trainer, pl_module):
            avg = self.cb.switch_ema.module.state_dict()
            self.seen.append(all(torch.equal(v, avg[k]) for k, v in pl_module.state_dict().items()))

    cb = SwitchEMACallback(decay=0.8, copy_at_train_end=False)
    check = LiveIsAverage(cb)
    fit(cb, extra=[check])
    assert check.seen == [True, True] and cb.switch_ema.num_switches == 2
    # Optimizer-step periods: 16 steps, a switch every 4th.
    cb = SwitchEMACallback(decay=0.8, switch_every=4, switch_unit="step", copy_at_train_end=False)
    fit(cb)
    assert cb.switch_ema.num_switches == 4


@pytest.mark.parametrize("name", ["BEMA", "LAWA", "SwitchEMA"])
def test_bema_lawa_switch_callbacks_resume_exactly(tmp_path, name):
    from lightning.pytorch.callbacks import ModelCheckpoint

    make = {**{k: v[0] for k, v in STEP_CALLBACKS.items()}, "SwitchEMA": lambda: SwitchEMACallback(decay=0.8, copy_at_train_end=False)}[name]
    full_cb = make()
    full_model, _ = fit(full_cb, max_epochs=3)
    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(make(), max_epochs=1, extra=[ck], ckpt=True)
    path = os.path.join(tmp_path, "epoch=0.ckpt")
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(torch.load(path, weights_only=False))
    resumed_cb = make()
    resumed_model, _ = fit(resumed_cb, max_epochs=3, ckpt_path=path)
    for k, v in full_cb.average.module.state_dict().items():
        assert torch.equal(resumed_cb.average.module.state_dict()[k], v), k
    for k, v in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k
    assert resumed_cb.average.num_updates == full_cb.average.num_updates


def test_averaging_callbacks_refuse_bad_keywords_when_made():
    with pytest.raises(TypeError, match=r"BEMACallback.*decay"):
        BEMACallback(decay=0.9)
    with pytest.raises(TypeError, match="LAWACallback needs update_every"):
        LAWACallback(k=3)
    with pytest.raises(TypeError, match=r"SwitchEMACallback.*switch_evry"):
        SwitchEMACallback(switch_evry=2)


def test_should_update_timing():
    cb = EMACallback(update_every_n_steps=3, update_starting_at_step=4)
    assert [i for i in range(12) if cb.should_update(step_idx=i)] == [6, 9]
    assert not cb.should_update(epoch_idx=0)
    cb = EMACallback(update_starting_at_epoch=1)  # Lightning's rule: epoch-end updates from epoch 1
    assert cb.should_update(step_idx=3) and not cb.should_update(epoch_idx=0) and cb.should_update(epoch_idx=1)


def test_posthoc_callback_snapshots_and_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = PostHocEMACallback((0.05, 0.10), snapshot_every=4)
    model, _t = fit(cb)
    assert len(cb.posthoc.snapshots) == 2 * (16 // 4)
    rec = cb.posthoc.reconstruct(0.08)
    assert set(dict(rec.named_parameters())) == set(dict(model.named_parameters()))

    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = PostHocEMACallback((0.05, 0.10), snapshot_every=4)
    fit(first, max_epochs=1, extra=[ck], ckpt=True)
    resumed = PostHocEMACallback((0.05, 0.10), snapshot_every=4)
    fit(resumed, max_epochs=2, ckpt_path=os.path.join(tmp_path, "epoch=0.ckpt"))
    for a, b in zip(cb.posthoc.modules, resumed.posthoc.modules):
        for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), k
    assert len(resumed.posthoc.snapshots) == len(cb.posthoc.snapshots)


def test_example_script_runs():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "lightning_ema.py")
    spec = importlib.util.spec_from_file_location("lightning_ema_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(epochs=1, posthoc=True)
    assert all(v == v and v < 10 for v in res.values())
