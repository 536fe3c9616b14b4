"""FSDP2 / DTensor parameters on the CPU with gloo and 2 processes spawned here (see
``distributed.py``; the ranks run ``fsdp2_worker.main``): every optimizer configuration of the
registry, and MoMo / MoMo-Adam, on sharded parameters against the unsharded optimizer (bit for
bit, except float sums added across ranks: Adan's global norm, SGD-SaI's gradient statistics,
MoMo's sums, the Adafactors' factor statistics, to round-off; no step gathers a tensor), FSDP2
with bf16 mixed precision and uneven shards, refused placements, Adafactor's factored state on
3-D tensors sharded on each dim, 8-bit state sharded like its parameter (bit for bit), ZClip and
AdaGC on sharded gradients, distributed checkpoints resumed on 2 -> 1 and 1 -> 2 processes for every
optimizer (and for 8-bit state), the shard-local averages (equal to unsharded ones, no collective
per update), PostHocEMA's sharded snapshots through DCP, DDP / ZeroRedundancyOptimizer, and
Lightning's ModelParallelStrategy with EMACallback (validation on the average, resume from
distributed and consolidated checkpoints). One spawned run does every check; each test asserts
one of them."""

from __future__ import annotations

import os

import fsdp2_worker as W
import pytest
import torch
from distributed import spawn
from registry import ENTRIES

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _exact(name: str, kw: dict) -> bool:
    # Float sums added across ranks (float64, in another order) are equal to round-off: Adan's
    # max_grad_norm, SGD-SaI's Σg and Σg², ⊥Grad's ⟨w,u⟩, ⟨w,w⟩, ‖u‖², Stable-SPAM's clipped
    # ‖g‖² (its max|g| is exact), AdamP's layer sums, the Adafactors' column sums, rows' means
    # and RMS sums. (Lion's cautious sums are counts: exact.)
    sums = name in ("SGDSaI", "StableSPAM", "AdamP", "Adafactor", "AdafactorHF")
    sums = sums or kw.get("orthograd") or (name == "Adan" and float(kw.get("max_grad_norm", 0.0)) > 0.0)
    return not sums


# ... and bf16 state (lean state, rounded stochastically: each shard draws the bits of its
# elements' positions in the whole tensor, so the sharded step rounds as the whole one, bit for bit).
OPT_CONFIGS = [(e.name, kw, _exact(e.name, kw)) for e in ENTRIES for kw in e.configs] + [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16), True)
]
MP_CONFIGS = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1), True),
    ("Lion", dict(lr=1e-3, caution=True, weight_decay=0.1), True),
    ("SGDSaI", dict(lr=1e-2), False),
    ("Adan", dict(lr=1e-2, max_grad_norm=0.5), False),
    ("Adafactor", dict(lr=1e-2, weight_decay=0.1), False),
]
# (label, optimizer, keywords, exact, model sizes); 8-bit state on the wide model, whose weights'
# rows are whole blocks, so its codes and scales are sharded like the weights.
CKPT_CONFIGS = [(e.name, e.name, e.main, _exact(e.name, e.main), (5, 7, 3)) for e in ENTRIES] + [
    ("AdamW 8-bit", "AdamW", dict(lr=1e-2, weight_decay=0.1, state_dtype="8bit"), True, W.WIDE)
]

CHECKS = (
    [f"optimizer {n} {kw}" for n, kw, _ in OPT_CONFIGS]
    + ["weight corrections on DTensors", "cached DTensor plan notices changes"]
    + [f"optimizer {n} with the loss" for n in ("Momo", "MomoAdam")]
    + [f"fsdp2 bf16 {n} {kw}" for n, kw, _ in MP_CONFIGS]
    + ["refuses Partial", "refuses 2-D mesh", "AdamP refuses rows split across ranks",
       "Adafactor on 3-D DTensors", "Adafactor refuses matrices sharded on their last dim",
       "AdaHessian refuses DTensor parameters", "refuses plain state of a DTensor parameter",
       "8-bit state on DTensors",
       "merges refuse sharded inputs",
       "Replicate placement steps whole tensors", "ZClip on DTensor gradients", "AdaGC on DTensor gradients",
       "AdaGC inside the step on DTensors"]
    + [f"checkpoint {c[0]}" for c in CKPT_CONFIGS]
    + ["collective counter sees collectives"]
    + [f"average {n}" for n in ("ModelEMA", "ModelEMA offloaded", "ModelEMA bf16 stochastic", "BEMA", "SwitchEMA", "PowerEMA", "LAWA", "SWA")]
    + ["ModelEMA swap, export, DCP"]
    + [f"PostHocEMA snapshots in {where}, DCP" for where in ("memory", "files")]
    + ["DDP", "ZeroRedundancyOptimizer"]
    + ["Lightning BEMA/LAWA callbacks refuse a sharded module"]
    + [f"Lightning ModelParallelStrategy EMACallback, {c} checkpoint" for c in ("distributed", "consolidated")]
)


def _one_process_checkpoints(root: str) -> None:
    """For the 1 -> 2 resumes: each optimizer's checkpoint after 2 steps on an unsharded model
    (written by this one process, no process group) and its parameters after 2 more."""
    for label, name, kw, _, sizes in CKPT_CONFIGS:
        model = W.net(False, sizes)
        opt = W.make(name, list(model.parameters()), kw)
        W.train(model, opt, range(2))
        W.save(model, opt, os.path.join(root, f"{label}-1rank"))
        W.train(model, opt, range(2, 4))
        torch.save(W.full_params(model), os.path.join(root, f"{label}-1rank-expected.pt"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2"))
    _one_process_checkpoints(root)
    outcomes = spawn(W.main, OPT_CONFIGS, MP_CONFIGS, CKPT_CONFIGS, root, timeout=540)
    return outcomes, root


@pytest.mark.parametrize("check", CHECKS)
def test_two_processes(run, check):
    outcomes, _ = run
    assert check in outcomes, f"the ranks did not run '{check}'"
    assert outcomes[check] is None, outcomes[check]


def test_no_unexpected_checks(run):
    outcomes, _ = run
    assert sorted(outcomes) == sorted(CHECKS)


@pytest.mark.parametrize("label,name,kw,exact,sizes", CKPT_CONFIGS, ids=[c[0] for c in CKPT_CONFIGS])
def test_resume_two_processes_on_one(run, label, name, kw, exact, sizes):
    """2 -> 1: the checkpoint the 2 ranks wrote, loaded into an unsharded model in this process,
    continues exactly as the sharded run did."""
    _, root = run
    model = W.net(False, sizes)
    opt = W.make(name, list(model.parameters()), kw)
    W.resume(model, opt, os.path.join(root, f"{label}-2ranks"))
    W.train(model, opt, range(2, 4))
    expected = torch.load(os.path.join(root, f"{label}-2ranks-expected.pt"))
    for n, t in W.full_params(model).items():
        W.assert_same(t, expected[n], exact, f"resumed 2 -> 1, {n}")
