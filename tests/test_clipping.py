"""emafuse.ZClip and emafuse.AdaGC (spec averaging.md C.2, C.3, C.4): the spec's test vectors (ZClip's
three modes, AdaGC's warm-up and adaptive phases), parity with the reference zclip 1.0.0 and with a
float64 AdaGC written from the spec on a model's gradients over many steps, exact resume through
state_dict, non-finite norms, bad options and gradients, and the Lightning callbacks."""

from __future__ import annotations

import math
import warnings

import emafuse
import lightning.pytorch as pl
import pytest
import torch
import zclip
from emafuse.lightning import AdaGCCallback, ZClipCallback
from torch import nn

warnings.filterwarnings("ignore", ".*does not have many workers.*")

# Spec C.2 test vectors: warmup_steps=5, max_grad_norm=None; norms fed and, per mode, the rows
# (post-clip norm, mu, var) from step 5 on (6 decimals).
NORMS = [1.0, 1.2, 0.8, 1.1, 0.9, 5.0, 1.0, 0.95, 3.0, 1.05]
VECTORS = {
    ("zscore", "adaptive_scaling"): [(0.9, 1.0, 0.02), (1.03125, 1.000938, 0.019428), (1.0, 1.000909, 0.018845),
                                     (0.95, 0.999382, 0.018353), (1.056716, 1.001102, 0.017895), (1.05, 1.002569, 0.017425)],
    ("zscore", "mean"): [(0.9, 1.0, 0.02), (1.0, 1.0, 0.0194), (1.0, 1.0, 0.018818), (0.95, 0.9985, 0.018324),
                         (0.9985, 0.9985, 0.017774), (1.05, 1.000045, 0.017316)],
    ("percentile", "adaptive_scaling"): [(0.9, 1.0, 0.02), (1.353553, 1.010607, 0.022928), (1.0, 1.010288, 0.022244),
                                         (0.95, 1.00848, 0.021679), (1.376574, 1.019523, 0.024853), (1.05, 1.020437, 0.024134)],
}


# (mode, clip_option, max_grad_norm): the spec gives the max_grad_norm=2.0 column for
# adaptive_scaling only (unchanged by that cap).
VECTOR_CASES = [(m, o, None) for m, o in VECTORS] + [("zscore", "adaptive_scaling", 2.0)]


@pytest.mark.parametrize("mode, option, max_grad_norm", VECTOR_CASES, ids=str)
def test_spec_test_vectors(mode, option, max_grad_norm):
    clip = emafuse.ZClip(warmup_steps=5, max_grad_norm=max_grad_norm, mode=mode, clip_option=option)
    p = nn.Parameter(torch.rand(3, dtype=torch.float64) + 0.5)  # a clipper never reads or writes weights
    direction = torch.tensor([2.0, -1.0, 2.0], dtype=torch.float64) / 3  # unit norm, not one element
    for t, g in enumerate(NORMS):
        p.grad = direction * g
        assert clip.step([p]) == pytest.approx(g, rel=1e-15)
        post = float(p.grad.norm())
        if t < 4:
            assert post == pytest.approx(g, rel=1e-15) and not clip.initialized
            continue
        want_post, want_mean, want_var = VECTORS[(mode, option)][t - 4]
        assert (post, clip.mean, clip.var) == pytest.approx((want_post, want_mean, want_var), abs=6e-7), t


def _models():
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 5))
    b = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 5))
    b.load_state_dict(a.state_dict())
    return a, b


def _spiky_grads(model, t):
    """Gradients of a fixed batch, with spikes (x40) every 7th step and a tiny one every 11th."""
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(16, 13, generator=g)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    scale = 40.0 if t % 7 == 6 else 0.01 if t % 11 == 10 else 1.0
    for p in model.parameters():
        p.grad.mul_(scale)


CONFIGS = [
    dict(warmup_steps=5),  # the default max_grad_norm=1.0 cap stays active
    dict(warmup_steps=5, max_grad_norm=None),
    dict(warmup_steps=3, max_grad_norm=None, clip_option="mean", alpha=0.9),
    dict(warmup_steps=4, max_grad_norm=0.5, mode="percentile", z_thresh=2.0),
    dict(warmup_steps=5, max_grad_norm=None, clip_factor=0.7, skip_update_on_spike=True, z_thresh=1.5),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_matches_reference_zclip(kw):
    ours_model, ref_model = _models()
    ours, ref = emafuse.ZClip(**kw), zclip.ZClip(**kw)
    for t in range(40):
        _spiky_grads(ours_model, t)
        _spiky_grads(ref_model, t)
        g_ours, g_ref = ours.step(ours_model), ref.step(ref_model)
        # The reference sums per-tensor fp32 norms in fp32; ours accumulates in fp64.
        assert g_ours == pytest.approx(g_ref, rel=1e-6), t
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-9, msg=lambda m, t=t: f"step {t}: {m}")
        assert ours.initialized == ref.initialized
        if ref.initialized:
            assert (ours.mean, ours.var) == pytest.approx((ref.mean, ref.var), rel=1e-5), t
    assert ours.initialized and ours.num_steps == 40


def test_state_dict_resumes_exactly():
    kw = dict(warmup_steps=4, max_grad_norm=None)
    model_a, model_b = _models()
    straight = emafuse.ZClip(**kw)
    for t in range(20):
        _spiky_grads(model_a, t)
        straight.step(model_a)
    first = emafuse.ZClip(**kw)
    for t in range(10):
        _spiky_grads(model_b, t)
        first.step(model_b)
    state = first.state_dict()
    resumed = emafuse.ZClip(**kw)
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))
    for t in range(10, 20):
        _spiky_grads(model_b, t)
        resumed.step(model_b)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert (resumed.mean, resumed.var, resumed.num_steps) == (straight.mean, straight.var, straight.num_steps)
    # A warm-up state into a ZClip with a shorter warm-up is refused, nothing changed.
    early = emafuse.ZClip(**kw)
    p = nn.Parameter(torch.ones(3))
    for g in (1.0, 2.0, 3.0):
        p.grad = torch.full((3,), g)
        early.step([p])
    short = emafuse.ZClip(warmup_steps=2)
    with pytest.raises(emafuse.InvalidArgumentError, match="warmup_steps=2"):
        short.load_state_dict(early.state_dict())
    assert short.buffer == [] and not short.initialized
    with pytest.raises(emafuse.InvalidArgumentError, match="not a ZClip state"):
        short.load_state_dict({"mean": 1.0})


def _saved(state):
    import io

    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return f


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_norm_skips_by_default_and_follows_the_reference_on_request(bad):
    def warmed(**kw):
        clip = emafuse.ZClip(warmup_steps=3, max_grad_norm=None, **kw)
        p = nn.Parameter(torch.rand(4) + 0.5)
        for g in (1.0, 1.5, 0.5):
            p.grad = torch.full((4,), g / 2)
            clip.step([p])
        return clip, p

    clip, p = warmed()
    before = clip.state_dict()
    p.grad = torch.tensor([1.0, bad, 2.0, 3.0])
    assert not math.isfinite(clip.step([p]))
    assert clip.state_dict() == before
    assert torch.equal(p.grad[[0, 2, 3]], torch.tensor([1.0, 2.0, 3.0]))
    ref, q = zclip.ZClip(warmup_steps=3, max_grad_norm=None), nn.Linear(4, 1, bias=False)
    ours, _ = warmed(nonfinite="reference")
    for g in (1.0, 1.5, 0.5):
        q.weight.grad = torch.full((1, 4), g / 2)
        ref.step(q)
    p.grad = torch.tensor([1.0, bad, 2.0, 3.0])
    q.weight.grad = p.grad.clone().view(1, 4)
    ours.step([p])
    ref.step(q)
    assert torch.equal(p.grad.isnan(), q.weight.grad.view(4).isnan())
    assert (math.isnan(ours.mean), math.isnan(ours.var)) == (math.isnan(ref.mean), math.isnan(ref.var))


@pytest.mark.parametrize("kw, words", [
    (dict(mode="median"), "mode must be"),
    (dict(clip_option="max"), "clip_option must be"),
    (dict(alpha=1.0), "alpha must be"),
    (dict(z_thresh=0.0), "z_thresh and clip_factor"),
    (dict(warmup_steps=0), "warmup_steps must be"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be"),
    (dict(nonfinite="ignore"), "nonfinite must be"),
])
def test_bad_options_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        emafuse.ZClip(**kw)


def test_sparse_gradients_are_refused_unchanged():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.grad.to_dense().clone()
    clip = emafuse.ZClip(warmup_steps=1)
    with pytest.raises(emafuse.SparseGradError, match="dense"):
        clip.step(emb)
    assert torch.equal(emb.weight.grad.to_dense(), before) and clip.num_steps == 0


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * (30.0 if self.global_step % 5 == 4 else 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 2), batch_size=8)


def _fit(callbacks, max_epochs, ckpt_path=None, **kw):
    model = _Module()
    t = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks, **kw)
    t.fit(model, _loader(), ckpt_path=ckpt_path)
    return model


def test_lightning_callback_equals_zclip_by_hand_and_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ByHand(pl.Callback):
        def __init__(self):
            self.clip = zclip.ZClip(warmup_steps=4, max_grad_norm=None)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.clip.step(pl_module)

    kw = dict(warmup_steps=4, max_grad_norm=None)
    straight = ZClipCallback(**kw)
    model = _fit([straight], 3, enable_checkpointing=False)
    hand = ByHand()
    ref = _fit([hand], 3, enable_checkpointing=False)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert straight.clipper.mean == pytest.approx(hand.clip.mean, rel=1e-5) and straight.clipper.num_steps == 24

    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit([ZClipCallback(**kw), ck], 1)
    resumed = ZClipCallback(**kw)
    resumed_model = _fit([resumed], 3, ckpt_path=str(tmp_path / "epoch=0.ckpt"), enable_checkpointing=False)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.clipper.state_dict() == straight.clipper.state_dict()


def test_lightning_callbacks_refuse_a_second_clipper():
    with pytest.raises(ValueError, match="clipped twice"):
        _fit([ZClipCallback()], 1, gradient_clip_val=1.0, enable_checkpointing=False)
    with pytest.raises(ValueError, match="ZClipCallback with AdaGCCallback"):
        _fit([ZClipCallback(), AdaGCCallback()], 1, enable_checkpointing=False)

    class Clipping(_Module):
        def configure_optimizers(self):
            return emafuse.AdamW(self.parameters(), lr=1e-3, grad_clip=emafuse.AdaGC())

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[AdaGCCallback()])
    with pytest.raises(ValueError, match=r"AdaGCCallback with an optimizer built with grad_clip=AdaGC\(.*clipped twice"):
        trainer.fit(Clipping(), _loader())


# -- AdaGC -------------------------------------------------------------------------------------------

# Spec C.3 test vector: warmup_steps=3, two tensors; per step the gradients, the scales applied and
# (γ1, γ2) after it.
ADAGC_STEPS = [
    (([3.0, 4.0], [1.0]), (0.196116135, 0.196116135), (0.980580673768, 0.196116134754)),
    (([0.3, 0.4], [2.0]), (0.485071248, 0.485071248), (0.242535623860, 0.196116134754)),
    (([0.6, 0.8], [0.5]), (0.254662405, 0.411843883), (0.242778159484, 0.196312250888)),
    (([30.0, 40.0], [0.1]), (0.005098341, 1.0), (0.243020937643, 0.194386005871)),
    (([0.0, 0.5], [0.2]), (0.510343969, 1.0), (0.243263958581, 0.194498285753)),
]


def test_adagc_spec_test_vector():
    clip = emafuse.AdaGC(warmup_steps=3)
    a, b = nn.Parameter(torch.rand(2, dtype=torch.float64) + 0.5), nn.Parameter(torch.rand(1, dtype=torch.float64) + 0.5)
    for t, ((ga, gb), scales, gammas) in enumerate(ADAGC_STEPS):
        a.grad, b.grad = torch.tensor(ga, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        total = clip.step([a, b])
        assert total == pytest.approx(math.sqrt(sum(x * x for x in ga + gb)), rel=1e-15)
        got = (float(a.grad.norm() / torch.tensor(ga, dtype=torch.float64).norm()), float(b.grad[0] / gb[0]))
        assert got == pytest.approx(scales, abs=1e-9), t
        assert (clip.gamma[0], clip.gamma[1]) == pytest.approx(gammas, abs=1e-12), t


def _adagc_reference(grads_per_step, warmup_steps, beta=0.98, lambda_rel=1.05, lambda_abs=1.0, eps=1e-8):
    """Spec C.3 in float64 on lists of gradients (None: no gradient this step); returns the
    clipped gradients of every step and the final γ."""
    gamma, out = {}, []
    for t, grads in enumerate(grads_per_step, start=1):
        present = {i: g.double() for i, g in enumerate(grads) if g is not None}
        total = math.sqrt(sum(float(g.square().sum()) for g in present.values()))
        clipped = {}
        for i, g in present.items():
            n = float(g.norm())
            if t < warmup_steps or i not in gamma:
                h = min(lambda_abs / (total + eps), 1.0)
                gamma[i] = h * n if i not in gamma else min(gamma[i], h * n)
            else:
                h = min(lambda_rel * max(gamma[i], eps) / max(n, eps), 1.0)
                gamma[i] = beta * gamma[i] + (1 - beta) * h * n
            clipped[i] = g * h
        out.append(clipped)
    return out, gamma


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_adagc_matches_the_float64_reference(dtype):
    """Odd sizes, spikes, a parameter that has no gradient on some steps, 30 steps."""
    shapes = [(7, 5), (33,), (4097,), (1,)]
    gen = torch.Generator().manual_seed(5)
    steps = []
    for t in range(30):
        spike = 50.0 if t % 9 == 8 else 1.0
        steps.append([None if (i == 3 and t % 4 == 1) else (torch.randn(s, generator=gen) * spike * (i + 1)).to(dtype)
                      for i, s in enumerate(shapes)])
    want, gamma = _adagc_reference(steps, warmup_steps=6)
    clip = emafuse.AdaGC(warmup_steps=6)
    params = [nn.Parameter((torch.rand(s, generator=gen) + 0.5).to(dtype)) for s in shapes]
    weights = [p.detach().clone() for p in params]
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
    for t, grads in enumerate(steps):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        clip.step(params)
        for i, p in enumerate(params):
            if i in want[t]:
                torch.testing.assert_close(p.grad.double(), want[t][i], **tol, msg=lambda m, t=t, i=i: f"step {t}, tensor {i}: {m}")
    assert all(torch.equal(p, w) for p, w in zip(params, weights)), "a clipper changed a weight"
    assert clip.gamma.keys() == gamma.keys()
    for i in gamma:
        # γ is computed from the norms of the (exact) gradients given, in float64 for every dtype.
        assert clip.gamma[i] == pytest.approx(gamma[i], rel=1e-12)


def test_adagc_state_dict_resumes_exactly_and_refuses_garbage():
    straight_model, resumed_model = _models()
    straight = emafuse.AdaGC(warmup_steps=4)
    for t in range(16):
        _spiky_grads(straight_model, t)
        straight.step(straight_model)
    first = emafuse.AdaGC(warmup_steps=4)
    for t in range(7):
        _spiky_grads(resumed_model, t)
        first.step(resumed_model)
    resumed = emafuse.AdaGC(warmup_steps=4)
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))
    for t in range(7, 16):
        _spiky_grads(resumed_model, t)
        resumed.step(resumed_model)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert resumed.gamma == straight.gamma and resumed.num_steps == 16
    with pytest.raises(emafuse.InvalidArgumentError, match="not an AdaGC state"):
        resumed.load_state_dict({"gamma": 3})
    assert resumed.gamma == straight.gamma


def test_adagc_nonfinite_and_bad_options():
    clip = emafuse.AdaGC(warmup_steps=1)
    p = nn.Parameter(torch.rand(3) + 0.5)
    p.grad = torch.tensor([1.0, 2.0, 2.0])
    clip.step([p])
    before = clip.state_dict()
    p.grad = torch.tensor([1.0, math.inf, 2.0])
    assert clip.step([p]) == math.inf and clip.state_dict() == before
    for kw, words in [(dict(beta=1.0), "beta"), (dict(lambda_rel=0.0), "lambda_rel"), (dict(warmup_steps=0), "warmup_steps"),
                      (dict(eps=-1.0), "eps"), (dict(nonfinite="x"), "nonfinite")]:
        with pytest.raises(ValueError, match=words):
            emafuse.AdaGC(**kw)


def test_adagc_lightning_callback_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = AdaGCCallback(warmup_steps=5, log_name="grad_norm")
    model = _fit([straight], 3, enable_checkpointing=False)
    assert straight.clipper.num_steps == 24 and len(straight.clipper.gamma) == 4
    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit([AdaGCCallback(warmup_steps=5), ck], 1)
    resumed = AdaGCCallback(warmup_steps=5)
    resumed_model = _fit([resumed], 3, ckpt_path=str(tmp_path / "epoch=0.ckpt"), enable_checkpointing=False)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.clipper.state_dict() == straight.clipper.state_dict()
