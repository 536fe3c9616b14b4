"""The native engine below the optimizers: malformed native calls, the float64 sum-of-squares
reduction, results that do not depend on the number of threads, and a worker pool that survives
fork (DataLoader workers)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import subprocess
import sys

import emafuse
import pytest
import torch
from emafuse import _native, errors
from emafuse.optim._base import sum_squares
from registry import ENTRIES


def test_native_call_rejects_malformed_arguments():
    p = torch.nn.Parameter(torch.randn(3))
    g = torch.randn(3)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=True)
    st = {"exp_avg": torch.rand(3), "exp_avg_sq": torch.rand(3), "step": torch.tensor(0.0)}
    slots, scalars = ("exp_avg", "exp_avg_sq"), ("step",)
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "no_such_rule", [_native.Group(hyper=hyper, params=[p], inputs=[g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=[g, g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=["not a tensor"], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper={**hyper, "beta1": 1.5}, params=[p], inputs=[g], states=[st], slots=slots, scalars=scalars)])
    with pytest.raises(errors.InvalidArgumentError):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=[g], states=[st], slots=("exp_avg",), scalars=scalars)])
    # a gradient has its parameter's dtype (only an average may read narrower weights)
    before = p.detach().clone()
    with pytest.raises(errors.DTypeError, match="parameter's dtype"):
        _native.step("t", "adam", [_native.Group(hyper=hyper, params=[p], inputs=[g.bfloat16()], states=[st], slots=slots, scalars=scalars)])
    assert st["step"].item() == 0.0 and torch.equal(p.detach(), before)


def test_native_sum_squares_any_dtype_and_layout():
    gen = torch.Generator().manual_seed(36)
    ts = [
        torch.randn(278011, generator=gen),
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),  # dense, permuted
        torch.randn(9, 8, generator=gen)[:, ::2],  # gaps: copied first
        torch.randn(7, generator=gen).to(torch.bfloat16),
        torch.randn(6, generator=gen).to(torch.float16),
        torch.randn(4, generator=gen, dtype=torch.complex64),
        torch.empty(0),
    ]
    expect = sum(float(torch.view_as_real(t).double().pow(2).sum()) if t.is_complex() else float(t.double().pow(2).sum()) for t in ts)
    got = sum_squares(ts)
    assert math.isclose(got, expect, rel_tol=1e-13)
    assert sum_squares(ts) == got, "reproducible"
    assert sum_squares([]) == 0.0


def test_results_do_not_depend_on_thread_count_or_vector_unit(tmp_path):
    """Every element is independent, chunking is deterministic and per-tensor / global sums
    (SGD-SaI's statistics, Adan's global norm, Cautious Lion's mask) are folded in a fixed order:
    every optimizer gives the same bits with 1, 2 and 3 threads. The kernels form no fused
    multiply-add, so the portable code (EMAFUSE_NO_SIMD) gives the bits of the AVX2/AVX-512 code."""
    script = tmp_path / "run.py"
    mains = [(e.name, e.main) for e in ENTRIES]  # plain literals: the child imports emafuse only
    script.write_text(
        "import sys, torch, emafuse\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from helpers import make_params, run_steps\n"
        "out = []\n"
        f"for name, kw in {mains!r}:\n"
        "    ps = make_params([(300001,), (1000, 77), (5,)], seed=1)\n"
        "    o = getattr(emafuse, name)(ps, **kw)\n"
        "    run_steps(o, ps, 3, seed=2)\n"
        "    out += [p.detach() for p in ps]\n"
        "torch.save(out, sys.argv[1])\n"
    )
    outs = []
    runs = [{"EMAFUSE_NUM_THREADS": "1"}, {"EMAFUSE_NUM_THREADS": "2"}, {"EMAFUSE_NUM_THREADS": "3"}, {"EMAFUSE_NO_SIMD": "1"}]
    for i, variables in enumerate(runs):
        path = tmp_path / f"out{i}.pt"
        env = {k: v for k, v in os.environ.items() if k != "EMAFUSE_NO_SIMD"} | variables
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
    assert len(outs[0]) == 3 * len(ENTRIES)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def _child_step(conn):
    try:
        # As DataLoader workers do: torch's own OpenMP team does not survive fork (GNU OpenMP
        # hangs in the child otherwise, with or without emafuse).
        torch.set_num_threads(1)
        ps = [torch.nn.Parameter(torch.randn(200_000)) for _ in range(4)]
        opt = emafuse.AdamW(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        conn.send(("ok", emafuse.num_threads()))
    except Exception as e:  # pragma: no cover - reported to the parent
        conn.send(("error", repr(e)))


def test_pool_survives_fork():
    """DataLoader workers fork; a step in the child must not hang on the parent's pool."""
    ps = [torch.nn.Parameter(torch.randn(300_000)) for _ in range(4)]
    opt = emafuse.AdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # the parent's pool is running now
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_step, args=(child,))
    proc.start()
    assert parent.poll(120), "the forked child hung"
    status, detail = parent.recv()
    proc.join(30)
    assert status == "ok", detail
    opt.step()  # and the parent's pool still works


def test_dataloader_workers_with_emafuse_in_the_parent():
    ps = [torch.nn.Parameter(torch.randn(100_000))]
    opt = emafuse.AdamW(ps)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2, multiprocessing_context="fork")
    for (_batch,) in loader:
        ps[0].grad = torch.randn_like(ps[0])
        opt.step()
    assert opt.state[ps[0]]["step"].item() == 8
