"""What the spawned ranks of ``test_fsdp2.py`` run (see ``distributed.py``): DTensor / FSDP2
parameters under every emafuse optimizer, distributed checkpoints, the shard-local averages, DDP,
ZeroRedundancyOptimizer and Lightning's ModelParallelStrategy, each compared with the same
computation on unsharded tensors."""

from __future__ import annotations

import functools
import os
from typing import Any

import emafuse
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from emafuse._dtensor import _local_slice
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

# Shapes with uneven shards over 2 ranks (7 -> 4 + 3, 3 -> 2 + 1) and an empty shard on rank 1 (1 row).
SHAPES = [(7, 5), (7,), (1, 5), (3,), (4, 4)]


def seeded(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 0.1).to(dtype)


def part(p: DTensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, the whole tensor of DTensor ``p``."""
    return _local_slice(p, full)


def assert_same(a: torch.Tensor, b: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(a, b), f"{what}: differs by {(a.double() - b.double()).abs().max().item() if a.numel() else 0}"
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")


def make(name: str, params: list, kw: dict[str, Any]) -> torch.optim.Optimizer:
    return getattr(emafuse, name)(params, **kw)


def synthetic_grads(step: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    return [seeded(1000 * step + i, s) for i, s in enumerate(shapes)]


# -- optimizers ------------------------------------------------------------------------------------


def collectives(fn) -> tuple[Any, dict[str, int]]:
    """``fn()``'s result and the collectives it issued, by name."""
    with CommDebugMode() as comm:
        out = fn()
    return out, {str(k): n for k, n in comm.get_comm_counts().items() if n}


def tensor_sum_reduces(opt: torch.optim.Optimizer, step: int) -> int:
    """How many ``all_reduce`` ``opt``'s step ``step`` issues for sums over each whole tensor: one
    per read-only pass (the cautious factor, ⊥Grad's projection, SGD-SaI's gradient
    signal-to-noise ratio on the first step; Stable-SPAM's largest magnitude, then the clipped
    norm, then the cautious factor; AdamP's row sums: one for the added columns, one for the
    largest row cosine; the Adafactors' factor statistics of matrices whose rows are split, then
    the RMS sums of the matrices, then of the vectors)."""
    group = opt.param_groups[0]
    caution = bool(group.get("caution"))
    if type(opt).__name__ == "StableSPAM":
        return 2 + caution
    if type(opt).__name__ in ("AdamP", "Adafactor", "AdafactorHF"):
        return 2 + (type(opt).__name__ != "AdamP")
    return int(caution or bool(group.get("orthograd")) or (type(opt).__name__ == "SGDSaI" and step == 0))


def optimizers_on_dtensors(checks, mesh, configs) -> None:
    """Every optimizer configuration on DTensor parameters (uneven and empty shards) against the
    same optimizer on the whole tensors: parameters and state after 3 steps. No step gathers a
    tensor: the only collectives are one ``all_reduce`` for optimizer-wide norms and one per pass
    of per-tensor sums."""
    for name, kw, exact in configs:
        with checks.check(f"optimizer {name} {kw}"):
            full = [seeded(i, s) for i, s in enumerate(SHAPES)]
            ref = [nn.Parameter(t.clone()) for t in full]
            sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
            opt_ref, opt = make(name, ref, kw), make(name, sharded, kw)
            plans = []
            for step in range(3):
                for p, q, g in zip(ref, sharded, synthetic_grads(step, SHAPES)):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                opt_ref.step()
                _, issued = collectives(opt.step)
                plans.append(opt.__dict__.get("_step_plan"))
                reduces = tensor_sum_reduces(opt, step) + int(float(kw.get("max_grad_norm", 0.0)) > 0.0)
                assert issued == ({"c10d.allreduce_": reduces} if reduces else {}), f"step {step} issued {issued}"
                for i, (p, q) in enumerate(zip(ref, sharded)):
                    assert isinstance(q, DTensor) and isinstance(q, nn.Parameter)
                    assert_same(q._local_tensor, part(q, p.detach()), exact, f"step {step}, param {i}")
                    assert_same_state(opt_ref.state[p], opt.state[q], q, exact, f"step {step}, param {i}")
            # The step plan over the local shards is kept between steps (SGD's first step, which
            # flags fresh momentum buffers, runs a one-step plan).
            assert plans[1] is not None and plans[2] is plans[1], plans


# The factors of factored state that hold a value per column (whole on every rank where the rows
# are split across ranks, else sharded like the parameter).
COLUMN_FACTORS = ("col_var", "exp_avg_sq_col")


def assert_same_state(ref: dict, ours: dict, q: DTensor, exact: bool, what: str) -> None:
    """``ours`` (the state of DTensor parameter ``q``) equals ``ref`` (of the whole tensor)."""
    for key, v in ref.items():
        w = ours[key]
        if v.dim() == 0:
            assert not isinstance(w, DTensor), key
            assert_same(w, v, exact, f"{what}, scalar {key}")
            continue
        rows_split = q.dim() >= 2 and q.placements[0] == Shard(q.dim() - 2)
        want = (Replicate(),) if key in COLUMN_FACTORS and rows_split else q.placements
        assert isinstance(w, DTensor) and tuple(w.placements) == tuple(want), (key, w.placements)
        assert_same(w._local_tensor, part(w, v), exact, f"{what}, state {key}")


def adafactor_on_3d(checks, mesh) -> None:
    """Both Adafactors on 3-D DTensors sharded on each dim but the last: the leading dim (whole
    matrices on each rank), the rows (each matrix's rows split, an empty shard included), against
    the unsharded optimizer; and in bf16 with bf16 state."""
    with checks.check("Adafactor on 3-D DTensors"):
        shapes = [((3, 5, 4), 0), ((2, 5, 3), 1), ((3, 1, 6), 1)]
        for cls, kw, dtype in ((emafuse.Adafactor, dict(weight_decay=0.1), torch.float32),
                               (emafuse.AdafactorHF, dict(beta1=0.9), torch.float32),
                               (emafuse.Adafactor, dict(lr=3e-2), torch.bfloat16)):
            full = [seeded(i, s, dtype) for i, (s, _) in enumerate(shapes)]
            ref = [nn.Parameter(t.clone()) for t in full]
            sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(d)])) for t, (_, d) in zip(full, shapes)]
            opt_ref, opt = cls(ref, **kw), cls(sharded, **kw)
            for step in range(3):
                for i, (p, q) in enumerate(zip(ref, sharded)):
                    g = seeded(100 * step + i, shapes[i][0], dtype)
                    p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, q.placements)
                opt_ref.step()
                opt.step()
                for i, (p, q) in enumerate(zip(ref, sharded)):
                    what = f"{cls.__name__} {dtype} step {step}, param {i}"
                    if dtype == torch.float32:
                        assert_same(q._local_tensor, part(q, p.detach()), False, what)
                        assert_same_state(opt_ref.state[p], opt.state[q], q, False, what)
                    else:  # an ulp of bf16 where a float64 sum rounds the other way
                        torch.testing.assert_close(q._local_tensor, part(q, p.detach()), rtol=2**-7, atol=1e-6, msg=what)


def corrections_on_dtensors(checks, mesh) -> None:
    """bf16 DTensor parameters with weight corrections (int8 state sharded like the parameter) and
    bf16 state rounded to nearest, against the same optimizer on the whole tensors: weights,
    corrections and moments equal after 3 steps."""
    with checks.check("weight corrections on DTensors"):
        full = [seeded(i, s, torch.bfloat16) for i, s in enumerate(SHAPES)]
        ref = [nn.Parameter(t.clone()) for t in full]
        sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, rounding="nearest", weight_correction=True)
        opt_ref, opt = emafuse.AdamW(ref, **kw), emafuse.AdamW(sharded, **kw)
        for step in range(3):
            for p, q, g in zip(ref, sharded, synthetic_grads(step, SHAPES)):
                p.grad = g.to(torch.bfloat16)
                q.grad = distribute_tensor(g.to(torch.bfloat16), mesh, [Shard(0)])
            opt_ref.step()
            opt.step()
        for i, (p, q) in enumerate(zip(ref, sharded)):
            assert_same(q._local_tensor, part(q, p.detach()), True, f"param {i}")
            for key in ("weight_correction", "exp_avg", "exp_avg_sq"):
                w = opt.state[q][key]
                assert isinstance(w, DTensor) and w.placements == q.placements, key
                assert_same(w._local_tensor, part(q, opt_ref.state[p][key]), True, f"param {i}, {key}")


# (rows, row length, placement): rows of whole 8-bit blocks sharded unevenly and with an empty
# shard (8-bit state sharded like the parameter, its scales row by row), rows that are not whole
# blocks and a long vector (their shards would cut blocks: float32 state when sharded), and a
# replicated tensor (whole on every rank: 8-bit, flat scales).
EIGHT_BIT_PARAMS = [((33, 256), Shard(0)), ((5, 1024), Shard(0)), ((1, 4096), Shard(0)), ((64, 100), Shard(0)), ((5000,), Shard(0)), ((40, 130), Replicate())]


def eight_bit_on_dtensors(checks, mesh) -> None:
    """``state_dtype="8bit"`` on DTensor parameters against the unsharded optimizer over 3 steps:
    parameters, codes and scales equal bit for bit (the blocks of each shard are blocks of the
    whole tensor), no collective, state sharded like the parameter; the parameters whose shards
    would cut blocks keep float32 state (equal to float32 state on the whole tensor). Scales
    placed unlike their parameter are refused with nothing written."""
    with checks.check("8-bit state on DTensors"):
        full = [seeded(40 + i, s) for i, (s, _) in enumerate(EIGHT_BIT_PARAMS)]
        ref = [nn.Parameter(t.clone()) for t in full]
        sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [pl])) for t, (_, pl) in zip(full, EIGHT_BIT_PARAMS)]
        kw = dict(lr=1e-2, weight_decay=0.1)
        lean = [i for i, q in enumerate(sharded) if i not in (3, 4)]
        opt_ref = emafuse.AdamW([{"params": [ref[i] for i in lean], "state_dtype": "8bit"}, {"params": [ref[3], ref[4]]}], **kw)
        opt = emafuse.AdamW(sharded, state_dtype="8bit", **kw)
        shapes = [s for s, _ in EIGHT_BIT_PARAMS]
        for step in range(3):
            for p, q, g in zip(ref, sharded, synthetic_grads(step, shapes)):
                p.grad = g.clone()
                q.grad = distribute_tensor(g.clone(), mesh, q.placements)
            opt_ref.step()
            _, issued = collectives(opt.step)
            assert issued == {}, f"step {step} issued {issued}"
        for i, (p, q) in enumerate(zip(ref, sharded)):
            assert_same(q._local_tensor, part(q, p.detach()), True, f"param {i}")
            st = opt.state[q]
            assert st["exp_avg"].dtype == (torch.uint8 if i in lean else torch.float32), (i, st["exp_avg"].dtype)
            for key, v in opt_ref.state[p].items():
                w = st[key]
                if v.dim() == 0:
                    assert_same(w, v, True, f"param {i}, scalar {key}")
                    continue
                assert isinstance(w, DTensor) and w.placements == q.placements and w.shape == v.shape, (key, w)
                assert_same(w._local_tensor, part(w, v), True, f"param {i}, state {key}")
        # Checkpoint conversions convert shard by shard, as on the whole tensors: 8-bit -> float32
        # (decoded) -> 8-bit (encoded again).
        def groups(params, eight):
            return [{"params": [params[i] for i in lean], **eight}, {"params": [params[3], params[4]]}]

        wide, back = emafuse.AdamW(sharded, **kw), emafuse.AdamW(sharded, state_dtype="8bit", **kw)
        wide_ref, back_ref = emafuse.AdamW(groups(ref, {}), **kw), emafuse.AdamW(groups(ref, {"state_dtype": "8bit"}), **kw)
        wide.load_state_dict(opt.state_dict())
        back.load_state_dict(wide.state_dict())
        wide_ref.load_state_dict(opt_ref.state_dict())
        back_ref.load_state_dict(wide_ref.state_dict())
        for ours, theirs in ((wide, wide_ref), (back, back_ref)):
            for i, (p, q) in enumerate(zip(ref, sharded)):
                assert sorted(ours.state[q]) == sorted(theirs.state[p]), (i, sorted(ours.state[q]))
                for key, v in theirs.state[p].items():
                    w = ours.state[q][key]
                    if v.dim():
                        assert isinstance(w, DTensor) and w.placements == q.placements and w.dtype == v.dtype, (key, w)
                        assert_same(w._local_tensor, part(w, v), True, f"converted, param {i}, state {key}")
        assert back.state[sharded[0]]["exp_avg"].dtype == torch.uint8 and wide.state[sharded[0]]["exp_avg"].dtype == torch.float32
        scales = opt.state[sharded[0]]["exp_avg_absmax"]
        assert scales.shape == (33, 1), scales.shape
        opt.state[sharded[0]]["exp_avg_absmax"] = distribute_tensor(scales.full_tensor(), mesh, [Replicate()])
        before = [q._local_tensor.clone() for q in sharded]
        try:
            opt.step()
        except emafuse.errors.InvalidArgumentError as e:
            assert "exp_avg_absmax" in str(e) and "placed" in str(e), e
        else:
            raise AssertionError("scales placed unlike their parameter were accepted")
        assert all(torch.equal(q._local_tensor, b) for q, b in zip(sharded, before))


def cached_plan_notices_changes(checks, mesh) -> None:
    """The kept DTensor step plan is rebuilt when a state tensor is replaced (the new one is
    updated, as on whole tensors), and a gradient placed unlike its parameter is refused with
    nothing written."""
    with checks.check("cached DTensor plan notices changes"):
        full = [seeded(i, s) for i, s in enumerate(SHAPES)]
        ref = [nn.Parameter(t.clone()) for t in full]
        sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        opt_ref, opt = emafuse.AdamW(ref, lr=1e-2), emafuse.AdamW(sharded, lr=1e-2)

        def step(t):
            for p, q, g in zip(ref, sharded, synthetic_grads(t, SHAPES)):
                p.grad = g.clone()
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt_ref.step()
            opt.step()

        step(0)
        step(1)
        kept = opt._step_plan
        opt.state[sharded[0]]["exp_avg"] = opt.state[sharded[0]]["exp_avg"].clone()
        opt_ref.state[ref[0]]["exp_avg"] = opt_ref.state[ref[0]]["exp_avg"].clone()
        step(2)
        assert opt._step_plan is not kept
        for p, q in zip(ref, sharded):
            assert_same(q._local_tensor, part(q, p.detach()), True, "after the state was replaced")
            assert_same(opt.state[q]["exp_avg"]._local_tensor, part(q, opt_ref.state[p]["exp_avg"]), True, "the new state")
        step(3)
        before = [q._local_tensor.clone() for q in sharded]
        sharded[1].grad = distribute_tensor(synthetic_grads(4, SHAPES)[1], mesh, [Replicate()])
        try:
            opt.step()
        except emafuse.errors.InvalidArgumentError as e:
            assert "placed" in str(e), e
        else:
            raise AssertionError("a gradient placed unlike its parameter was accepted")
        assert all(torch.equal(q._local_tensor, b) for q, b in zip(sharded, before))


def loss_taking_on_dtensors(checks, mesh) -> None:
    """MoMo and MoMo-Adam (whose step needs the loss) on DTensor parameters against the same
    optimizer on the whole tensors: the per-tensor sums are added across the mesh (one
    all_reduce per step), then the global sums give every rank the same step size (MoMo-Adam with
    the Cautious mask: its counts are added with the sums)."""
    for name in ("Momo", "MomoAdam"):
        with checks.check(f"optimizer {name} with the loss"):
            full = [seeded(i, s) for i, s in enumerate(SHAPES)]
            ref = [nn.Parameter(t.clone()) for t in full]
            sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
            kw = dict(weight_decay=0.1, use_fstar=True, caution=name == "MomoAdam")
            opt_ref, opt = make(name, ref, kw), make(name, sharded, kw)
            for step in range(3):
                for p, q, g in zip(ref, sharded, synthetic_grads(step, SHAPES)):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                loss = 1.0 / (step + 1)
                opt_ref.step(loss=loss)
                _, issued = collectives(functools.partial(opt.step, loss=loss))
                assert issued == {"c10d.allreduce_": 1}, f"step {step} issued {issued}"
                for i, (p, q) in enumerate(zip(ref, sharded)):
                    assert_same(q._local_tensor, part(q, p.detach()), False, f"step {step}, param {i}")
                    assert_same(opt.state[q]["grad_avg"]._local_tensor, part(q, opt_ref.state[p]["grad_avg"]), False, f"step {step}, param {i}")
            lb, lb_ref = opt.param_groups[0]["lb_current"], opt_ref.param_groups[0]["lb_current"]
            assert abs(lb - lb_ref) <= 1e-9 * max(1.0, abs(lb_ref)), (lb, lb_ref)


def fsdp2_mixed_precision(checks, rank: int, configs) -> None:
    """A model under ``fully_shard`` with bf16 compute and fp32 parameters (uneven shards): each
    step equals the same optimizer on the whole fp32 parameters with the same (gathered) gradients."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name, kw, exact in configs:
        with checks.check(f"fsdp2 bf16 {name} {kw}"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
            for layer in (model[0], model[2], model):
                fully_shard(layer, mp_policy=policy)
            params = list(model.parameters())
            ref = [nn.Parameter(p.full_tensor()) for p in params]
            opt, opt_ref = make(name, params, kw), make(name, ref, kw)
            gen = torch.Generator().manual_seed(10 + rank)
            for step in range(3):
                x = torch.randn(6, 5, generator=gen)
                model(x).float().square().mean().backward()
                for p, q in zip(ref, params):
                    p.grad = q.grad.full_tensor()
                opt.step()
                opt_ref.step()
                opt.zero_grad()
                for i, (p, q) in enumerate(zip(ref, params)):
                    assert q.dtype == torch.float32
                    assert_same(q._local_tensor, part(q, p.detach()), exact, f"step {step}, param {i}")


def clippers_on_dtensors(checks, mesh) -> None:
    """ZClip and AdaGC on DTensor gradients (uneven and empty shards) equal the same clipper on the
    whole gradients, with one all_reduce per step (the per-tensor sums of squares)."""
    for name, make in (("ZClip", lambda: emafuse.ZClip(warmup_steps=2, max_grad_norm=0.8)),
                       ("AdaGC", lambda: emafuse.AdaGC(warmup_steps=3))):
        with checks.check(f"{name} on DTensor gradients"):
            clip_on_dtensors(mesh, make(), make())
    with checks.check("AdaGC inside the step on DTensors"):
        adagc_in_step_on_dtensors(mesh)


def adagc_in_step_on_dtensors(mesh) -> None:
    """``AdamW(grad_clip=AdaGC)`` on DTensor parameters (uneven and empty shards) against the same
    on the whole tensors, a spike after the warm-up: each shard is stepped with its tensor's
    factor (one all_reduce per step, for the per-tensor norms; the factors come from float64 sums
    added in another order: equal to round-off), and the local gradients are not written."""
    full = [seeded(i, s) for i, s in enumerate(SHAPES)]
    ref = [nn.Parameter(t.clone()) for t in full]
    sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    opt_ref, opt = (emafuse.AdamW(ps, lr=1e-2, grad_clip=emafuse.AdaGC(warmup_steps=2, lambda_abs=3.0)) for ps in (ref, sharded))
    for step in range(5):
        scale = 20.0 if step == 3 else 1.0
        for p, q, g in zip(ref, sharded, synthetic_grads(step, SHAPES)):
            p.grad = g * scale
            q.grad = distribute_tensor(g * scale, mesh, [Shard(0)])
        opt_ref.step()
        _, issued = collectives(opt.step)
        assert issued == {"c10d.allreduce_": 1}, (step, issued)
        for i, (p, q, g) in enumerate(zip(ref, sharded, synthetic_grads(step, SHAPES))):
            assert_same(q.grad._local_tensor, part(q, g * scale), True, f"step {step}, grad {i}")
            assert_same(q._local_tensor, part(q, p.detach()), False, f"step {step}, param {i}")
    a, b = opt.param_groups[0]["grad_clip"].state_dict(), opt_ref.param_groups[0]["grad_clip"].state_dict()
    numbers = _numbers(a, b)
    assert numbers and all(abs(x - y) <= 1e-12 * max(abs(y), 1e-300) for x, y in numbers), (a, b)


def clip_on_dtensors(mesh, ours, ref) -> None:
    """6 steps of clipper ``ours`` on DTensor gradients and ``ref`` (the same) on the whole ones,
    with a spike after the warm-up."""
    full = [nn.Parameter(seeded(i, s)) for i, s in enumerate(SHAPES)]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in full]
    for step in range(6):
        scale = 20.0 if step == 4 else 1.0
        for p, q, g in zip(full, sharded, synthetic_grads(step, SHAPES)):
            p.grad = g * scale
            q.grad = distribute_tensor(g * scale, mesh, [Shard(0)])
        norm, issued = collectives(lambda: ours.step(sharded))
        assert issued == {"c10d.allreduce_": 1}, (step, issued)
        ref_norm = ref.step(full)
        assert abs(norm - ref_norm) <= 1e-12 * ref_norm, (step, norm, ref_norm)
        for i, (p, q) in enumerate(zip(full, sharded)):
            assert_same(q.grad._local_tensor, part(q, p.grad), False, f"step {step}, grad {i}")
    # The statistics (float64, from sums added in another order): equal to round-off.
    a, b = ours.state_dict(), ref.state_dict()
    numbers = [(x, y) for k in a for x, y in _numbers(a[k], b[k])]
    assert numbers and all(abs(x - y) <= 1e-12 * max(abs(y), 1e-300) for x, y in numbers), (a, b)


def _numbers(a, b):
    """Pairs of the numbers in two equal structures (dicts, lists, scalars)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return [pair for k in a for pair in _numbers(a[k], b[k])]
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return [pair for x, y in zip(a, b) for pair in _numbers(x, y)]
    if isinstance(a, float):
        return [(a, b)]
    assert a == b
    return []


def unsupported_dtensors(checks, mesh) -> None:
    """Placements and meshes emafuse does not handle are refused, naming DTensor, changing nothing."""
    def refused(opt, p, error, words, what):
        """``opt.step()`` raises ``error`` naming each of ``words`` and leaves ``p`` as it was."""
        before = p._local_tensor.clone()
        try:
            opt.step()
        except error as e:
            assert all(w in str(e) for w in words), str(e)
        else:
            raise AssertionError(f"{what} was stepped")
        assert torch.equal(p._local_tensor, before)

    with checks.check("refuses Partial"):
        p = nn.Parameter(DTensor.from_local(seeded(1, (3, 2)), mesh, [Partial()]))
        p.grad = DTensor.from_local(seeded(2, (3, 2)), mesh, [Partial()])
        opt = emafuse.AdamW([p], lr=0.1)
        refused(opt, p, emafuse.UnsupportedOptionError, ("DTensor", "Partial"), "a Partial DTensor")
        assert not opt.state
    with checks.check("refuses 2-D mesh"):
        mesh2 = init_device_mesh("cpu", (1, 2))
        p = nn.Parameter(distribute_tensor(seeded(3, (4, 2)), mesh2, [Replicate(), Shard(0)]))
        p.grad = distribute_tensor(seeded(4, (4, 2)), mesh2, [Replicate(), Shard(0)])
        opt = emafuse.Lion([p], lr=0.1)
        refused(opt, p, emafuse.UnsupportedOptionError, ("DTensor", "2-D"), "a DTensor on a 2-D mesh")
        assert not opt.state
    with checks.check("AdamP refuses rows split across ranks"):
        p = nn.Parameter(distribute_tensor(seeded(3, (4, 6)), mesh, [Shard(1)]))
        p.grad = distribute_tensor(seeded(4, (4, 6)), mesh, [Shard(1)])
        opt = emafuse.AdamP([p], lr=0.1)
        refused(opt, p, emafuse.UnsupportedOptionError, ("sharded on dim 1", "row (dim-0 slice)"), "an AdamP parameter sharded on dim 1")
        assert not opt.state
    with checks.check("Adafactor refuses matrices sharded on their last dim"):
        for cls in (emafuse.Adafactor, emafuse.AdafactorHF):
            p = nn.Parameter(distribute_tensor(seeded(3, (4, 6)), mesh, [Shard(1)]))
            p.grad = distribute_tensor(seeded(4, (4, 6)), mesh, [Shard(1)])
            opt = cls([p])
            refused(opt, p, emafuse.UnsupportedOptionError, ("DTensor", "sharded on its last dim", "whole rows"), f"a {cls.__name__} matrix split by columns")
            assert not opt.state
    with checks.check("AdaHessian refuses DTensor parameters"):
        p = nn.Parameter(distribute_tensor(seeded(5, (4, 3)), mesh, [Shard(0)]))
        (p * p).sum().backward(create_graph=True)
        opt = emafuse.AdaHessian([p], lr=0.1)
        refused(opt, p, emafuse.UnsupportedOptionError, ("DTensor", "fully_shard", "unsharded"), "an AdaHessian DTensor parameter")
        assert not opt.state
    with checks.check("refuses plain state of a DTensor parameter"):
        p = nn.Parameter(distribute_tensor(seeded(5, (4, 2)), mesh, [Shard(0)]))
        p.grad = distribute_tensor(seeded(6, (4, 2)), mesh, [Shard(0)])
        opt = emafuse.AdamW([p], lr=0.1)
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": seeded(7, (4, 2)), "exp_avg_sq": seeded(8, (4, 2)).abs()}
        refused(opt, p, emafuse.InvalidArgumentError, ("DTensor", "set_optimizer_state_dict"), "plain state of a DTensor parameter")
        assert float(opt.state[p]["step"]) == 1.0
    with checks.check("merges refuse sharded inputs"):
        from emafuse.averaging import uniform_soup

        m = net(True)
        try:
            uniform_soup([m, m])
        except emafuse.UnsupportedOptionError as e:
            assert "DTensor" in str(e) and "full_state_dict" in str(e), str(e)
        else:
            raise AssertionError("a merge read DTensor shards")
    with checks.check("Replicate placement steps whole tensors"):
        full = seeded(7, (5, 3))
        p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Replicate()]))
        p.grad = distribute_tensor(seeded(8, (5, 3)), mesh, [Replicate()])
        r = nn.Parameter(full.clone())
        r.grad = seeded(8, (5, 3))
        for o in (emafuse.Adan([p], lr=0.01, max_grad_norm=0.5), emafuse.Adan([r], lr=0.01, max_grad_norm=0.5)):
            o.step()
        assert torch.equal(p._local_tensor, r.detach())


# -- checkpoints -----------------------------------------------------------------------------------


class Net(nn.Module):
    """A small model whose weights shard unevenly over 2 ranks."""

    def __init__(self, sizes: tuple[int, int, int] = (5, 7, 3)) -> None:
        super().__init__()
        self.a = nn.Linear(sizes[0], sizes[1])
        self.b = nn.Linear(sizes[1], sizes[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


#: A Net whose weights have rows of whole 8-bit blocks (8-bit state sharded like them).
WIDE = (256, 512, 35)


def net(sharded: bool, sizes: tuple[int, int, int] = (5, 7, 3)) -> Net:
    torch.manual_seed(0)
    m = Net(sizes)
    if sharded:
        fully_shard(m.a)
        fully_shard(m.b)
        fully_shard(m)
    return m


def set_grads(model: Net, step: int) -> None:
    """The same whole gradients on every rank (sharded where the parameters are)."""
    for i, p in enumerate(model.parameters()):
        g = seeded(7000 + 100 * step + i, tuple(p.shape))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def full_params(model: Net) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone() for n, p in model.named_parameters()}


def train(model: Net, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        set_grads(model, s)
        opt.step()
        opt.zero_grad()


def save(model: Net, opt: torch.optim.Optimizer, path: str) -> None:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)


def resume(model: Net, opt: torch.optim.Optimizer, path: str) -> None:
    """Load a checkpoint written by :func:`save` (on any number of processes) into ``model`` and
    ``opt`` (whose state is still empty)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def checkpoints(checks, rank: int, configs, root: str) -> None:
    """For every optimizer: save a sharded checkpoint after 2 steps (the parent resumes it in one
    process, 2 -> 1) and the expected parameters after 2 more; resume the parent's one-process
    checkpoint here on 2 processes (1 -> 2) and compare 2 more steps with the parent's run."""
    for label, name, kw, exact, sizes in configs:
        with checks.check(f"checkpoint {label}"):
            model = net(True, sizes)
            opt = make(name, list(model.parameters()), kw)
            train(model, opt, range(2))
            save(model, opt, os.path.join(root, f"{label}-2ranks"))
            for st in opt.state.values():
                for k, v in st.items():
                    assert v.dim() == 0 or isinstance(v, DTensor), f"state {k} is not sharded"
            train(model, opt, range(2, 4))
            expected = full_params(model)  # a collective: on every rank
            if rank == 0:
                torch.save(expected, os.path.join(root, f"{label}-2ranks-expected.pt"))
            # 1 -> 2: the parent's checkpoint, written by one process from an unsharded model.
            model = net(True, sizes)
            opt = make(name, list(model.parameters()), kw)
            resume(model, opt, os.path.join(root, f"{label}-1rank"))
            train(model, opt, range(2, 4))
            expected = torch.load(os.path.join(root, f"{label}-1rank-expected.pt"))
            for n, t in full_params(model).items():
                assert_same(t, expected[n], exact, f"resumed 1 -> 2, {n}")
            dist.barrier()


# -- averaging -------------------------------------------------------------------------------------


def averaging(checks, rank: int, root: str) -> None:
    """Shard-local averages of an FSDP2 model against the same average of an unsharded copy that
    follows the same weights."""
    from emafuse.averaging import BEMA, LAWA, SWA, PowerEMA, SwitchEMA

    with checks.check("collective counter sees collectives"):
        m = net(True)
        assert sum(collectives(lambda: [p.full_tensor() for p in m.parameters()])[1].values()) == 4

    def offloaded(m):
        # The host-mirror path of an average offloaded from CUDA (copy into buffers, update on a
        # native background thread), run here CPU to CPU on the local shards.
        ema = emafuse.ModelEMA(m, decay=0.9, async_update=True)
        ema.offloaded = True
        return ema

    makers = {
        "ModelEMA": lambda m: emafuse.ModelEMA(m, decay=0.9),
        "ModelEMA offloaded": offloaded,
        # a bf16 average rounded stochastically: each shard draws its elements' bits
        "ModelEMA bf16 stochastic": lambda m: emafuse.ModelEMA(m, decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic"),
        "BEMA": lambda m: BEMA(m, ema_power=0.5),
        "SwitchEMA": lambda m: SwitchEMA(m, decay=0.8),
        "PowerEMA": lambda m: PowerEMA(m, gammas=(5.0, 16.0)),
        "LAWA": lambda m: LAWA(m, k=2, update_every=1),
        "SWA": lambda m: SWA(m),
    }
    for name, mk in makers.items():
        with checks.check(f"average {name}"):
            model, plain = net(True), net(False)
            avg, avg_ref = mk(model), mk(plain)
            opt = emafuse.AdamW(model.parameters(), lr=0.05)
            for s in range(4):
                train(model, opt, range(s, s + 1))
                plain.load_state_dict(full_params(model), strict=False)
                n = sum(collectives(lambda a=avg, m=model: a.update(m))[1].values())
                assert n == 0, f"{n} collectives in one update"
                avg_ref.update(plain)
            sd, sd_ref = avg.state_dict(), avg_ref.state_dict()
            mine = avg.full_state_dict()
            ref = avg_ref.module.state_dict() if hasattr(avg_ref, "module") else None
            if name == "PowerEMA":
                ref = avg_ref.modules[0].state_dict()
            for k, v in ref.items():
                assert torch.equal(mine[k], v), f"{k} differs from the unsharded average"
            # The sharded state_dict through DCP into an average of another model (same structure,
            # other weights): it then goes on exactly as this one.
            other_model = net(True)
            other = mk(other_model)
            for _ in range(4):
                other.update(other_model)
            path = os.path.join(root, f"average-{name}")
            dcp.save({"avg": avg.state_dict()}, checkpoint_id=path)
            target = {"avg": other.state_dict()}
            dcp.load(target, checkpoint_id=path)
            other.load_state_dict(target["avg"])
            train(model, opt, range(4, 5))
            avg.update(model)
            other.update(model)
            resumed, mine = other.full_state_dict(), avg.full_state_dict()
            for k, v in mine.items():
                assert torch.equal(resumed[k], v), f"{k} differs after resuming from DCP"
            # Memory per rank: the local shards only.
            local = sum(t._local_tensor.numel() for t in avg.module.parameters())
            whole = sum(p.numel() for p in plain.parameters())
            assert local == sum(p._local_tensor.numel() for p in model.parameters()) < whole
            del sd, sd_ref

    with checks.check("ModelEMA swap, export, DCP"):
        model, plain = net(True), net(False)
        ema, ema_ref = emafuse.ModelEMA(model, decay=0.7), emafuse.ModelEMA(plain, decay=0.7)
        opt = emafuse.AdamW(model.parameters(), lr=0.05)
        for s in range(3):
            train(model, opt, range(s, s + 1))
            plain.load_state_dict(full_params(model), strict=False)
            ema.update()
            ema_ref.update()
        x = seeded(99, (4, 5))
        before = full_params(model)
        with ema.average_parameters():
            out = model(x)
            for k, v in full_params(model).items():
                assert torch.equal(v, ema_ref.module.state_dict()[k]), k
        for k, v in full_params(model).items():
            assert torch.equal(v, before[k]), f"{k} not restored after average_parameters()"
        torch.testing.assert_close(out, ema_ref.module(x), rtol=1e-6, atol=1e-6)
        # Sharded state_dict: DTensors, saved and loaded by DCP into another (diverged) average.
        sd = ema.state_dict()
        assert all(isinstance(v, DTensor) for v in sd["module"].values())
        dcp.save({"ema": sd}, checkpoint_id=os.path.join(root, "ema"))
        other = emafuse.ModelEMA(net(True), decay=0.7)
        target = {"ema": other.state_dict()}
        dcp.load(target, checkpoint_id=os.path.join(root, "ema"))
        other.load_state_dict(target["ema"])
        assert other.num_updates == 3
        for k, v in other.full_state_dict().items():
            assert torch.equal(v, ema_ref.module.state_dict()[k]), k
        # A consolidated (whole-tensor) average loads into the sharded one, each rank keeping its part.
        other.load_state_dict(ema_ref.state_dict())
        for k, v in other.full_state_dict().items():
            assert torch.equal(v, ema_ref.module.state_dict()[k]), k


def posthoc_snapshots(checks, root: str) -> None:
    """PostHocEMA's snapshots of a sharded model (in memory and in per-rank files): saved through
    DCP, loaded into a new average (load_target), reconstructed equal to the unsharded one."""
    from emafuse.averaging import PostHocEMA

    for where in ("memory", "files"):
        with checks.check(f"PostHocEMA snapshots in {where}, DCP"):
            kw = {"snapshot_every": 2}
            if where == "files":
                kw["snapshot_dir"] = os.path.join(root, "snapshots")
            model, plain = net(True), net(False)
            ph = PostHocEMA(model, (0.05, 0.1), **kw)
            ref = PostHocEMA(plain, (0.05, 0.1), snapshot_every=2)
            opt = emafuse.AdamW(model.parameters(), lr=0.05)
            for s in range(6):
                train(model, opt, range(s, s + 1))
                plain.load_state_dict(full_params(model), strict=False)
                ph.update(model)
                ref.update(plain)
            assert len(ph.snapshots) == 6
            if where == "memory":
                assert all(isinstance(v, DTensor) for r in ph.snapshots for v in r["state"].values())
            path = os.path.join(root, f"posthoc-{where}")
            dcp.save({"ph": ph.state_dict()}, checkpoint_id=path)
            other = PostHocEMA(model, (0.05, 0.1), snapshot_every=2)
            target = {"ph": other.load_target(path, "ph")}
            dcp.load(target, checkpoint_id=path)
            other.load_state_dict(target["ph"])
            expected = ref.reconstruct(0.07).state_dict()
            for avg in (ph, other):
                for k, v in avg.reconstruct(0.07).state_dict().items():
                    assert torch.equal(v.full_tensor(), expected[k]), f"{k}: the reconstruction differs from the unsharded one"


# -- DDP and ZeroRedundancyOptimizer -----------------------------------------------------------------


def ddp_and_zero(checks, rank: int) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    with checks.check("DDP"):
        model, plain = net(False), net(False)
        ddp = DistributedDataParallel(model)
        opt, opt_ref = emafuse.AdamW(ddp.parameters(), lr=0.05), emafuse.AdamW(plain.parameters(), lr=0.05)
        xs = [seeded(50 + r, (6, 5)) for r in range(2)]
        for _ in range(2):
            ddp(xs[rank]).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sum(plain(x).square().mean() for x in xs).div(2).backward()
            opt_ref.step()
            opt_ref.zero_grad()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    with checks.check("ZeroRedundancyOptimizer"):
        model, plain = net(False), net(False)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=emafuse.Lion, lr=0.01, weight_decay=0.1)
        opt_ref = emafuse.Lion(plain.parameters(), lr=0.01, weight_decay=0.1)
        for s in range(3):
            set_grads(model, s)
            set_grads(plain, s)
            zero.step()
            opt_ref.step()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p.detach(), q.detach())
        zero.consolidate_state_dict(to=0)
        if rank == 0:
            assert len(zero.state_dict()["state"]) == len(list(model.parameters()))


# -- Lightning: ModelParallelStrategy (FSDP2) with EMACallback ---------------------------------------


def lightning_refusals(checks, world_size: int) -> None:
    """The averaging callbacks whose state cannot go into a distributed checkpoint yet refuse a
    sharded module when the average would be made, naming DTensor/FSDP2."""
    import lightning.pytorch as pl
    from emafuse.lightning import BEMACallback, LAWACallback

    with checks.check("Lightning BEMA/LAWA callbacks refuse a sharded module"):
        module = pl.LightningModule()
        module.net = net(False)
        fully_shard(module.net, mesh=init_device_mesh("cpu", (world_size,)))
        for cb in (BEMACallback(), LAWACallback(update_every=2)):
            try:
                cb.setup(None, module, "fit")
            except emafuse.UnsupportedOptionError as e:
                assert "DTensor/FSDP2" in str(e) and cb.average is None, str(e)
            else:
                raise AssertionError(f"{type(cb).__name__} made an average of a sharded module")


def lightning_sharded(checks, rank: int, world_size: int, root: str) -> None:
    """``EMACallback`` under Lightning's ``ModelParallelStrategy`` (the module shards itself with
    ``fully_shard`` in ``configure_model``): a shard-local average equal to ``ModelEMA`` of an
    unsharded copy fed the gathered weights, validation on the average (and back), and an exact
    resume from the distributed checkpoint Lightning writes at an epoch's end."""
    import lightning.pytorch as pl
    from emafuse.lightning import EMACallback
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule

    # This process group was started outside Lightning: tell its environment so.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), RANK=str(rank))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net(False)

        def configure_model(self) -> None:
            if isinstance(self.net, FSDPModule):  # EMACallback.setup calls it first; it must be idempotent
                return
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net.a, mesh=mesh)
            fully_shard(self.net.b, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            return emafuse.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)

    class Probe(pl.Callback):
        """After EMACallback (callbacks run in order): an unsharded ModelEMA fed the gathered
        weights after each step; what validation sees; the weights after it."""

        def __init__(self) -> None:
            self.plain = net(False)
            self.ref: emafuse.ModelEMA | None = None
            self.validated: list[str] = []

        def setup(self, trainer, pl_module, stage):
            self.plain.load_state_dict(full_params(pl_module.net))
            self.ref = emafuse.ModelEMA(self.plain, decay=0.9)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.plain.load_state_dict(full_params(pl_module.net))
            self.ref.update(self.plain, step=trainer.global_step, force=True)

        def on_validation_epoch_start(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            seen = full_params(pl_module.net)
            for k, v in self.ref.module.state_dict().items():
                assert torch.equal(seen[k], v), f"validation does not see the average: {k}"
            self.validated.append("average")

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            for k, v in full_params(pl_module.net).items():
                assert torch.equal(v, self.plain.state_dict()[k]), f"{k} not restored after validation"

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)
    data = torch.utils.data.TensorDataset(x, y)

    def fit(max_epochs: int, ckpt_path: str | None = None, checkpoint_dir: str | None = None, distributed: bool = True):
        ema = EMACallback(decay=0.9)
        probe = Probe() if ckpt_path is None else None  # its reference starts from the initial weights
        callbacks: list[Any] = [ema] if probe is None else [ema, probe]
        if checkpoint_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1))
        # Data parallel over both ranks (the default would give each rank the whole model and all data).
        strategy = ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=distributed)
        trainer = pl.Trainer(
            accelerator="cpu", devices=world_size, strategy=strategy, max_epochs=max_epochs,
            callbacks=callbacks, logger=False, enable_checkpointing=checkpoint_dir is not None,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        loader = lambda: torch.utils.data.DataLoader(data, batch_size=8)
        trainer.fit(Module(), loader(), loader(), ckpt_path=ckpt_path)
        return ema, probe

    for distributed in (True, False):
        layout = "distributed" if distributed else "consolidated"
        ckpts = os.path.join(root, f"lightning-{layout}")
        with checks.check(f"Lightning ModelParallelStrategy EMACallback, {layout} checkpoint"):
            ema, probe = fit(2, checkpoint_dir=ckpts, distributed=distributed)
            assert probe.validated == ["average", "average"], probe.validated
            assert all(isinstance(p, DTensor) for p in ema.ema.module.parameters())
            assert ema.ema.num_updates == 8, ema.ema.num_updates
            mine = ema.ema.full_state_dict()
            for k, v in probe.ref.module.state_dict().items():
                assert torch.equal(mine["net." + k], v), f"{k} differs from the unsharded average"
            local = sum(p._local_tensor.numel() for p in ema.ema.module.parameters())
            assert local < sum(p.numel() for p in probe.plain.parameters())
            # Resumed from the checkpoint written at the end of epoch 0, the run ends as this one.
            first = os.path.join(ckpts, sorted(os.listdir(ckpts))[0])
            resumed, _ = fit(2, ckpt_path=first, distributed=distributed)
            assert resumed.ema.num_updates == 8, resumed.ema.num_updates
            for k, v in resumed.ema.full_state_dict().items():
                assert torch.equal(v, mine[k]), f"{k}: the resumed average differs"

def main(rank: int, world_size: int, checks, opt_configs, mp_configs, ckpt_configs, root: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    optimizers_on_dtensors(checks, mesh, opt_configs)
    corrections_on_dtensors(checks, mesh)
    eight_bit_on_dtensors(checks, mesh)
    cached_plan_notices_changes(checks, mesh)
    loss_taking_on_dtensors(checks, mesh)
    fsdp2_mixed_precision(checks, rank, mp_configs)
    unsupported_dtensors(checks, mesh)
    adafactor_on_3d(checks, mesh)
    clippers_on_dtensors(checks, mesh)
    checkpoints(checks, rank, ckpt_configs, root)
    averaging(checks, rank, root)
    posthoc_snapshots(checks, root)
    ddp_and_zero(checks, rank)
    lightning_refusals(checks, world_size)
    lightning_sharded(checks, rank, world_size, root)  # last: Lightning changes process-wide settings
