"""torch.compile: an emafuse step (and a ModelEMA update) is one opaque custom op, so it compiles
with ``fullgraph=True`` (inductor and aot_eager, static and dynamic shapes), gives the eager
result bit for bit, and does not recompile as hyper-parameters, counters and state change."""

from __future__ import annotations

import emafuse
import pytest
import torch
from helpers import make_params, random_grads
from registry import entries


class _Counting:
    """A torch.compile backend that counts compilations and hands the graph to ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(entry):
    shapes = [(3,), (7, 5), (33,)]
    a, b = make_params(shapes, seed=4), make_params(shapes, seed=4)
    return a, entry.cls(a, **entry.main), b, entry.cls(b, **entry.main)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("entry", entries())
def test_compiled_step_is_one_graph_and_equals_eager(entry, backend):
    a, oa, b, ob = _pair(entry)
    counting = _Counting(backend)
    step = torch.compile(oa.step, backend=counting, fullgraph=True)
    sched_a = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.9)  # lr changes every step
    sched_b = torch.optim.lr_scheduler.StepLR(ob, step_size=1, gamma=0.9)
    for t in range(12):
        for ps in (a, b):
            for p, g in zip(ps, random_grads(ps, t, seed=3)):
                p.grad = g
        step()
        ob.step()
        sched_a.step()
        sched_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q), f"step {t}"
    # The first call creates the state (a guard on it), the second compiles with it, the first
    # change of lr makes dynamo treat it as dynamic (as for torch's own optimizers); no more.
    assert counting.compiles <= 3, counting.compiles


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_step_equals_eager(dynamic):
    """Forward, backward and step in one compiled function (the backward is a graph break, as for
    torch's own optimizers; the step itself is one node), with a ModelEMA update after it."""

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        return model, emafuse.AdamW(model.parameters(), lr=1e-2), None

    runs = []
    for compiled in (False, True):
        model, opt, _ = build()
        ema = emafuse.ModelEMA(model, decay=0.9)

        def train_step(x, y, model=model, opt=opt, ema=ema):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            ema.update(model)
            return loss

        fn = torch.compile(train_step, dynamic=dynamic) if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        for t in range(5):
            n = 8 + (t % 2 if dynamic else 0)
            fn(torch.randn(n, 16, generator=gen), torch.randn(n, 1, generator=gen))
        runs.append(([p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in ema.module.parameters()]))
    for x, y in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fuse", [False, True])
def test_step_and_average_compile_in_one_full_graph(fuse):
    model_a, model_b = (torch.nn.Linear(6, 4) for _ in range(2))
    model_b.load_state_dict(model_a.state_dict())
    opts = [emafuse.AdamW(m.parameters(), lr=1e-2) for m in (model_a, model_b)]
    emas = [emafuse.ModelEMA(m, decay=0.8) for m in (model_a, model_b)]
    if fuse:
        for ema, opt in zip(emas, opts):
            ema.attach(opt, fuse=True)

    def update(opt, ema, model):
        opt.step()
        if not fuse:
            ema.update(model)

    counting = _Counting("aot_eager")
    compiled = torch.compile(update, backend=counting, fullgraph=True)
    for t in range(4):
        for m in (model_a, model_b):
            for p, g in zip(m.parameters(), random_grads(list(m.parameters()), t)):
                p.grad = g
        compiled(opts[0], emas[0], model_a)
        update(opts[1], emas[1], model_b)
    for x, y in zip([*model_a.parameters(), *emas[0].module.parameters()], [*model_b.parameters(), *emas[1].module.parameters()]):
        assert torch.equal(x, y)
    assert counting.compiles <= 2
