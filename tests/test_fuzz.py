"""Fuzz-style tests: seeded random cases (shapes, dtypes, strides, aliasing, corrupted state) over
every optimizer of the registry and the averaging classes. Each case must end as the expected
result or a clear emafuse error with nothing changed (parameters, gradients, state, counters,
averages: bit for bit). The loops run in a forked child (``isolated.in_child``): a crash fails the
test instead of killing the run. The generator is seeded: a failure names its case and repeats."""

from __future__ import annotations

import itertools
import random

import emafuse
import pytest
import torch
from emafuse import errors
from emafuse.averaging import BEMA, LAWA, SWA, PowerEMA
from helpers import ULP_RTOL, assert_unchanged, snapshot
from isolated import in_child
from registry import ENTRIES
from test_hardening import Wrapper, _average_state, _corruptions

CASES_PER_OPTIMIZER = 30
SIZES = (1, 2, 3, 5, 7, 17)
DTYPES = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)

CORRUPTIONS = (
    "none", "none", "none", "grad_dtype", "grad_shape", "grad_is_param", "grad_is_state", "grad_overlaps_param",
    "state_meta", "grad_wrapper", "grad_int", "state_alias", "state_shape", "state_int", "state_wrapper", "state_not_tensor",
    "state_expanded", "step_negative", "step_nan", "step_missing", "param_expanded",
)


def _tensor(rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape``: contiguous, transposed, or a strided slice of a larger one."""
    kind = rng.choice(("contiguous", "transposed", "sliced"))
    if kind == "transposed" and len(shape) >= 2:
        return torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=gen).to(dtype).transpose(-1, -2)
    if kind == "sliced":
        big = torch.randn((*shape[:-1], shape[-1] * 2), generator=gen).to(dtype)
        return big[..., ::2]
    return torch.randn(shape, generator=gen).to(dtype)


def _slot_names(opt, p) -> list[str]:
    return [k for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape]


def _corrupt(kind: str, rng: random.Random, params, opt) -> bool:
    """Apply corruption ``kind``; False if it does not apply to this optimizer/state."""
    i = rng.randrange(len(params))
    p = params[i]
    slots = _slot_names(opt, p)
    st = opt.state.get(p, {})
    if kind == "grad_dtype":
        other = rng.choice([d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16) if d != p.dtype])
        p.grad.data = p.grad.to(other)
    elif kind == "grad_shape":
        p.grad.data = torch.randn(p.numel() + 1).to(p.dtype)
    elif kind == "grad_is_param":
        p.grad = p.detach()
    elif kind == "grad_is_state":
        if not slots:
            return False
        p.grad = st[rng.choice(slots)]
    elif kind == "grad_overlaps_param":
        if p.numel() < 2:
            return False
        flat = torch.randn(p.numel() * 2).to(p.dtype)
        q = torch.nn.Parameter(flat[: p.numel()].view(p.shape))
        with torch.no_grad():
            q.copy_(p)
        params[i] = q
        for g in opt.param_groups:
            g["params"] = [q if x is p else x for x in g["params"]]
        if p in opt.state:
            opt.state[q] = opt.state.pop(p)
        q.grad = flat[1: p.numel() + 1].view(p.shape)
    elif kind == "grad_wrapper":
        p.grad = Wrapper(p.grad.clone())
    elif kind == "grad_int":
        p.grad.data = torch.ones(p.shape, dtype=torch.int32)
    elif kind.startswith("state_"):
        if not slots:
            return False
        name = rng.choice(slots)
        if kind == "state_alias":
            if len(slots) < 2:
                return False
            st[name] = st[next(s for s in slots if s != name)]
        elif kind == "state_shape":
            st[name] = torch.randn(p.numel() + 1).to(st[name].dtype)
        elif kind == "state_int":
            st[name] = torch.randint(1, 9, p.shape)
        elif kind == "state_wrapper":
            st[name] = Wrapper(st[name].clone())
        elif kind == "state_not_tensor":
            st[name] = 0.5
        elif kind == "state_expanded":
            if p.numel() < 2:
                return False
            st[name] = torch.randn([1] * p.dim()).to(st[name].dtype).expand(p.shape)
        elif kind == "state_meta":
            st[name] = torch.empty(p.shape, dtype=st[name].dtype, device="meta")
    elif kind.startswith("step_"):
        if "step" not in st:
            return False
        if kind == "step_negative":
            st["step"] = torch.tensor(-float(rng.randint(1, 5)))
        elif kind == "step_nan":
            st["step"] = torch.tensor(float("nan"))
        else:
            del st["step"]
    elif kind == "param_expanded":
        base = torch.randn((1, *p.shape[1:])).to(p.dtype)
        if p.shape[0] < 2:
            return False
        q = torch.nn.Parameter(base.expand(p.shape))
        q.grad = p.grad
        params[i] = q
        for g in opt.param_groups:
            g["params"] = [q if x is p else x for x in g["params"]]
        opt.state.pop(p, None)
    return True


def _optimizer_cases(entry, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    for case in range(CASES_PER_OPTIMIZER):
        gen = torch.Generator().manual_seed(seed * 1000 + case)
        dtype = rng.choice(DTYPES)
        kw = {**entry.main, **(entry.low_precision if dtype in (torch.bfloat16, torch.float16) else {})}
        shapes = [tuple(rng.choice(SIZES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        params = [torch.nn.Parameter(_tensor(rng, s, dtype, gen)) for s in shapes]
        twin_params = [torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
        opt, twin = entry.cls(params, **kw), entry.cls(twin_params, **kw)
        for _ in range(rng.randint(0, 2)):
            for p, q in zip(params, twin_params):
                p.grad = _tensor(rng, tuple(p.shape), dtype, gen)
                q.grad = p.grad.contiguous()
            opt.step()
            twin.step()
        for p, q in zip(params, twin_params):
            p.grad = _tensor(rng, tuple(p.shape), dtype, gen)
            q.grad = p.grad.contiguous()
        kind = rng.choice(CORRUPTIONS)
        if kind != "none" and not _corrupt(kind, rng, params, opt):
            kind = "none"
        where = f"{entry.name} case {case} (seed {seed}): {kind}, {dtype}, shapes {shapes}"
        if kind == "none":
            opt.step()
            twin.step()
            rtol = 8 * ULP_RTOL[dtype]
            for p, q in zip(params, twin_params):
                torch.testing.assert_close(p.detach().double(), q.detach().double(), rtol=rtol, atol=rtol, msg=f"{where}: parameters differ")
        else:
            snap = snapshot(params, opt)
            grads = [p.grad.clone() if type(p.grad) is torch.Tensor and p.grad.device.type == "cpu" else None for p in params]
            try:
                opt.step()
            except errors.EmafuseError:
                pass
            else:
                raise AssertionError(f"{where}: accepted")
            assert_unchanged(params, opt, snap)
            for p, g in zip(params, grads):
                if g is not None:
                    assert torch.equal(p.grad.nan_to_num(), g.nan_to_num()), f"{where}: a gradient changed"
        seen[kind] = seen.get(kind, 0) + 1
    return seen


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_random_optimizer_cases_end_as_expected_or_refused_with_nothing_changed(entry):
    seed = sum(map(ord, entry.name))
    seen = in_child(_optimizer_cases, entry, seed)
    assert seen.get("none", 0) >= 3 and len(seen) >= 6, seen


# -- averaging ------------------------------------------------------------------------------------

AVERAGERS = {
    "ModelEMA": lambda m, rng: emafuse.ModelEMA(m, rng.choice((0.5, 0.9, 0.999)), update_every=rng.randint(1, 3)),
    "SWA": lambda m, rng: SWA(m),
    "BEMA": lambda m, rng: BEMA(m),
    "LAWA": lambda m, rng: LAWA(m, k=rng.randint(1, 3), update_every=1),
    "PowerEMA": lambda m, rng: PowerEMA(m),
}


def _model(rng: random.Random, dtype: torch.dtype, widths: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers.append(torch.nn.Linear(a, b))
        if rng.random() < 0.4:
            layers.append(torch.nn.BatchNorm1d(b))
    return torch.nn.Sequential(*layers).to(dtype)


def _averaging_cases(name: str, seed: int, n: int) -> dict[str, int]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seen: dict[str, int] = {}
    for case in range(n):
        dtype = rng.choice((torch.float32, torch.float64))
        widths = [rng.choice(SIZES) for _ in range(rng.randint(2, 4))]
        m = _model(rng, dtype, widths)
        avg = AVERAGERS[name](m, random.Random(case))
        for _ in range(rng.randint(1, 3)):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
            avg.update(m)
        kind = rng.choice(("update_ok", "wrong_model", "load_ok", "load_corrupt", "load_corrupt"))
        where = f"{name} case {case} (seed {seed}): {kind}, widths {widths}"
        before_sd = avg.state_dict()
        before = _average_state(avg)
        if kind == "update_ok":
            steps = avg.num_steps_seen
            avg.update(m)
            assert avg.num_steps_seen == steps + 1, where
            assert all(torch.isfinite(t).all() for t in avg.state_dict().get("module", {}).values() if t.is_floating_point()), where
            continue
        if kind == "load_ok":
            other = AVERAGERS[name](m, random.Random(case))
            other.load_state_dict(before_sd)
            assert _average_state(other) == before, where
            continue
        try:
            if kind == "wrong_model":
                wrong = list(widths)
                wrong[rng.randrange(len(wrong))] += 1
                avg.update(_model(random.Random(0), dtype, wrong))
            else:
                what, broken = rng.choice(_corruptions(before_sd))
                where += f" ({what})"
                avg.load_state_dict(broken)
        except errors.EmafuseError:
            pass
        else:
            raise AssertionError(f"{where}: accepted")
        assert _average_state(avg) == before, f"{where}: changed"
        seen[kind] = seen.get(kind, 0) + 1
    return seen


@pytest.mark.parametrize("name", sorted(AVERAGERS))
def test_random_averaging_cases_end_as_expected_or_refused_with_nothing_changed(name):
    seen = in_child(_averaging_cases, name, sum(map(ord, name)), 40)
    assert seen.get("load_corrupt", 0) >= 3 and seen.get("wrong_model", 0) >= 2, seen


def test_every_registry_optimizer_is_fuzzed():
    assert len(ENTRIES) >= 12
