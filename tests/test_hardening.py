"""Hostile but realistic input: odd tensors, aliasing, corrupted checkpoints, interrupts, threads,
fork and interpreter exit. Each case ends as torch's result or a clear emafuse error with nothing
changed (parameters, gradients, state, counters, averages: bit for bit). Cases that used to crash
the process run in a forked child (``isolated.in_child``), so a crash fails the test."""

from __future__ import annotations

import copy
import os
import pickle
import signal

import emafuse
import pytest
import torch
from emafuse import errors
from emafuse.averaging import BEMA, LAWA, SWA, PostHocEMA, PowerEMA, SwitchEMA
from emafuse.optim import _base
from helpers import assert_unchanged, make_params, random_grads, run_steps, set_grads, snapshot
from isolated import in_child, run_python
from registry import ENTRIES, entries

SHAPES = [(3, 5), (7,), (4, 1, 3)]


class Wrapper(torch.Tensor):
    """A wrapper tensor subclass (the mechanism behind DTensor): no storage of its own."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = torch.utils._pytree.tree_map_only(Wrapper, lambda w: w.elem, (args, kwargs or {}))
        out = func(*unwrap[0], **unwrap[1])
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: Wrapper(t) if not isinstance(t, Wrapper) else t, out)


def _stepped(entry, steps: int = 1, seed: int = 3):
    params = make_params(SHAPES, seed=seed)
    opt = entry.cls(params, **entry.main)
    if steps:
        run_steps(opt, params, steps)
    set_grads(params, random_grads(params, 7))
    return params, opt


def _refused(params, opt, exc=errors.EmafuseError, match: str | None = None) -> str:
    snap = snapshot(params, opt)
    grads = [p.grad.clone() if p.grad is not None and type(p.grad) is torch.Tensor else None for p in params]
    with pytest.raises(exc, match=match) as info:
        opt.step()
    assert_unchanged(params, opt, snap)
    for p, g in zip(params, grads):
        if g is not None:
            assert torch.equal(p.grad, g), "a gradient changed during a refused step"
    return str(info.value)


# -- wrapper subclasses (used to crash) ------------------------------------------------------------


def _wrapper_as(entry, where: str) -> str:
    params, opt = _stepped(entry, steps=0 if where == "grad" else 1)
    if where == "grad":
        params[1].grad = Wrapper(params[1].grad.clone())
    else:
        st = opt.state[params[1]]
        name = next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
        st[name] = Wrapper(st[name].clone())
    return _refused(params, opt, errors.InvalidArgumentError, "Wrapper")


@pytest.mark.parametrize("where", ["grad", "state"])
@pytest.mark.parametrize("entry", entries(lambda e: e.name in ("AdamW", "SGD", "Adan", "Lion")))
def test_wrapper_subclass_is_refused_not_dereferenced(entry, where):
    if where == "state" and entry.name == "SGD" and not entry.main.get("momentum"):
        pytest.skip("no state tensor")
    message = in_child(_wrapper_as, entry, where)
    assert "__torch_dispatch__" in message and "plain torch.Tensor" in message


def test_native_engine_refuses_wrapper_tensors_directly():
    """The native layer itself refuses them (the Python check is only the early one)."""

    def run() -> str:
        p = torch.randn(5)
        with pytest.raises(errors.InvalidArgumentError, match="Wrapper") as info:
            emafuse._native.step("t", "ema", [emafuse._native.Group(hyper={"weight": 0.5, "muladd": False, "sub": False},
                                                                  params=[p], inputs=[Wrapper(torch.randn(5))])])
        with pytest.raises(errors.InvalidArgumentError, match="Wrapper"):
            emafuse._native.sum_squares([Wrapper(torch.randn(5))])
        with pytest.raises(errors.InvalidArgumentError, match="Wrapper"):
            emafuse._native.check_tensor(Wrapper(torch.randn(2)), "x")
        return str(info.value)

    assert "t" in in_child(run)


def test_tensors_without_memory_are_refused():
    """A state tensor without memory (meta) is refused before the step reads or writes."""

    def run() -> None:
        params, opt = _stepped(next(e for e in ENTRIES if e.name == "AdamW"))
        opt.state[params[0]]["exp_avg"] = torch.empty(params[0].shape, device="meta")
        _refused(params, opt, errors.DeviceError)

    in_child(run)


# -- a `.data` swap from another thread mid-step (used to crash) -----------------------------------


_SWAP_DATA_WHILE_STEPPING = """
import threading
import emafuse, torch
n = 1 << 20
p = torch.nn.Parameter(torch.randn(n))
opt = emafuse.AdamW([p], lr=1e-3)
stop = threading.Event()
swaps = [0]

def swapper():
    while not stop.is_set():
        p.data = torch.randn(n)  # frees the old storage
        swaps[0] += 1

t = threading.Thread(target=swapper)
t.start()
try:
    for _ in range(60):
        p.grad = torch.randn(n)
        opt.step()
finally:
    stop.set()
    t.join()
assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()
print("swaps", swaps[0])
"""


def test_data_swap_from_another_thread_mid_step_does_not_crash():
    """In a fresh interpreter (it starts a thread of its own: see ``isolated.run_python``)."""
    done = run_python(_SWAP_DATA_WHILE_STEPPING)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0, done.stdout


# -- aliasing: a written operand overlapping another one -------------------------------------------


def _alias_cases():
    def grad_view_of_param(params, opt):
        base = torch.randn(40)
        p = torch.nn.Parameter(base[:15].view(3, 5))
        opt.param_groups[0]["params"][0] = p
        params[0] = p
        p.grad = base[5:20].view(3, 5)  # overlaps the parameter's last two rows

    def grad_is_param(params, opt):
        params[1].grad = params[1].detach()

    def grad_overlaps_other_param(params, opt):
        params[1].grad = params[2].detach().view(-1)[:7]

    def slots_share_storage(params, opt):
        st = opt.state[params[0]]
        names = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == params[0].shape]
        if len(names) < 2:
            pytest.skip("one state slot")
        st[names[1]] = st[names[0]]

    def slots_overlap_partially(params, opt):
        st = opt.state[params[1]]
        names = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == params[1].shape]
        if len(names) < 2:
            pytest.skip("one state slot")
        buf = torch.randn(20)
        st[names[0]], st[names[1]] = buf[:7], buf[3:10]

    def state_is_param(params, opt):
        st = opt.state[params[2]]
        names = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == params[2].shape]
        if not names:
            pytest.skip("no state slot")
        st[names[0]] = params[2].detach()

    def step_counters_shared(params, opt):
        if "step" not in opt.state[params[0]]:
            pytest.skip("no step counter")
        opt.state[params[1]]["step"] = opt.state[params[0]]["step"]

    return [grad_view_of_param, grad_is_param, grad_overlaps_other_param, slots_share_storage, slots_overlap_partially,
            state_is_param, step_counters_shared]


@pytest.mark.parametrize("make", _alias_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("entry", entries())
def test_overlapping_operands_are_refused_before_any_write(entry, make):
    params, opt = _stepped(entry)
    make(params, opt)
    _refused(params, opt, errors.InvalidArgumentError, "shares? memory")


def test_overlap_is_checked_again_when_the_cached_plan_runs():
    params, opt = _stepped(next(e for e in ENTRIES if e.name == "AdamW"), steps=2)
    params[0].grad = opt.state[params[0]]["exp_avg"]  # same shape, but the step writes it
    _refused(params, opt, errors.InvalidArgumentError, "shares? memory")


def test_strided_operands_that_overlap_are_refused_on_the_staged_path():
    p = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])  # strided: staged through copies
    opt = emafuse.AdamW([p])
    p.grad = torch.randn(4, 3)
    opt.step()
    base = p.detach()
    p.grad = base.t().contiguous().t()  # fine: its own memory
    opt.step()
    p.grad = torch.as_strided(base, (4, 3), base.stride(), 1)  # interleaved with the parameter
    _refused([p], opt, errors.InvalidArgumentError, "shares? memory")


# -- expanded (stride-0) tensors: refused before the kernel writes ----------------------------------


@pytest.mark.parametrize("entry", entries())
def test_expanded_parameter_is_refused_before_any_write(entry):
    base = torch.randn(1, 5)
    p = torch.nn.Parameter(base.expand(4, 5))
    other = make_params([(3,)], seed=1)[0]
    opt = entry.cls([other, p], **entry.main)
    p.grad, other.grad = torch.randn(4, 5), torch.randn(3)
    before = base.clone()
    _refused([other, p], opt, errors.InvalidArgumentError, "shares? memory")
    assert torch.equal(base, before) and not opt.state


def test_expanded_state_tensor_is_refused_before_any_write():
    params, opt = _stepped(next(e for e in ENTRIES if e.name == "AdamW"))
    st = opt.state[params[1]]
    st["exp_avg"] = st["exp_avg"][:1].expand(7)
    _refused(params, opt, errors.InvalidArgumentError, "shares? memory")


# -- dtypes and counters torch refuses -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entry", entries())
def test_low_precision_grad_for_fp32_param_is_a_dtype_error(entry, dtype):
    """torch refuses ``p.grad = g`` of another dtype, but not ``p.grad.data = g``; its AdamW then
    raises, and so must every emafuse optimizer (a DTypeError), before any write."""
    params, opt = _stepped(entry)
    params[1].grad.data = params[1].grad.to(dtype)
    assert params[1].grad.dtype == dtype
    _refused(params, opt, errors.DTypeError, "dtype")


@pytest.mark.parametrize("bad", [-1.0, -3, float("nan"), float("inf")])
@pytest.mark.parametrize("entry", entries(lambda e: "step" in e.caps.scalar_state))
def test_bad_step_counter_from_a_checkpoint_is_refused_at_load(entry, bad):
    params, opt = _stepped(entry)
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(float(bad)) if isinstance(bad, float) else bad
    snap = snapshot(params, opt)
    with pytest.raises(errors.InvalidArgumentError, match="step"):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("entry", entries(lambda e: "step" in e.caps.scalar_state))
def test_negative_step_counter_set_directly_is_refused_by_the_step(entry):
    params, opt = _stepped(entry)
    opt.state[params[2]]["step"].fill_(-2.0)
    _refused(params, opt, errors.InvalidArgumentError, "step")


# -- interrupts: a step is all or nothing ----------------------------------------------------------


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test run inherited: a run
    started in the background of a non-interactive shell has SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_after_native(monkeypatch) -> list[int]:
    """Deliver SIGINT right as the native call returns (as a Ctrl-C during it would)."""
    calls = [0]
    run = _base._StepPlan.run

    def interrupted(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        calls[0] += 1
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(_base._StepPlan, "run", interrupted)
    return calls


@pytest.mark.usefixtures("sigint_raises")
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("entry", entries())
def test_interrupt_during_the_native_call_leaves_a_complete_step(entry, steps_before, monkeypatch):
    """Ctrl-C during the native update (first step: lazy state; later: group/optimizer counters)
    is deferred until the step, its state and its counters are complete."""
    params, opt = _stepped(entry, steps=steps_before)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = entry.cls(twin_params, **entry.main)
    if steps_before:
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load shares the tensors it needs not cast
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    twin.step()
    calls = _interrupt_after_native(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert calls[0] == 1
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    after, expected = twin.state_dict(), opt.state_dict()
    assert [{k: v for k, v in g.items() if k != "params"} for g in after["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in expected["param_groups"]]
    for i, st in after["state"].items():
        for k, v in st.items():
            got = expected["state"][i][k]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(v)), (i, k)


@pytest.mark.usefixtures("sigint_raises")
def test_interrupt_before_a_step_changes_nothing_and_handlers_are_restored():
    params, opt = _stepped(next(e for e in ENTRIES if e.name == "AdamW"))
    handler = signal.getsignal(signal.SIGINT)
    snap = snapshot(params, opt)
    with pytest.raises(KeyboardInterrupt), emafuse._guard.deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        opt.step()  # runs whole; the interrupt comes after
    assert signal.getsignal(signal.SIGINT) is handler
    assert not all(torch.equal(p, q) for p, q in zip(params, snap[0]))
    assert opt.state[params[0]]["step"].item() == 2


@pytest.mark.usefixtures("sigint_raises")
def test_interrupt_during_a_model_ema_update_leaves_it_complete(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema, twin = emafuse.ModelEMA(model, 0.9), emafuse.ModelEMA(model, 0.9)
    for e in (ema, twin):
        e.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    twin.update(model)
    from emafuse.averaging import _engine

    run = _engine.CachedStep.run

    def interrupted(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(_engine.CachedStep, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ema.update(model)
    assert (ema.num_steps_seen, ema.num_updates) == (twin.num_steps_seen, twin.num_updates)
    assert ema.num_steps_seen == 2
    for (k, v), w in zip(ema.module.state_dict().items(), twin.module.state_dict().values()):
        assert torch.equal(v, w), k


# -- averaging: refused calls and malformed checkpoints change nothing ------------------------------


def _averages():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))

    return [
        ("ModelEMA", model, lambda m: emafuse.ModelEMA(m, 0.9)),
        ("ModelEMA-every3", model, lambda m: emafuse.ModelEMA(m, 0.9, update_every=3)),
        ("SWA", model, lambda m: SWA(m)),
        ("SwitchEMA", model, lambda m: SwitchEMA(m, 0.9)),
        ("PowerEMA", model, lambda m: PowerEMA(m)),
        ("BEMA", model, lambda m: BEMA(m)),
        ("LAWA", model, lambda m: LAWA(m, k=2, update_every=1)),
        ("PostHocEMA", model, lambda m: PostHocEMA(m, snapshot_every=2)),
    ]


AVERAGES = _averages()


def _flat(x, path: str = "") -> list:
    """A state dict as a flat list of (path, value), tensors as (dtype, shape, values)."""
    if isinstance(x, dict):
        return [item for k in x for item in _flat(x[k], f"{path}/{k}")]
    if isinstance(x, (list, tuple)):
        return [item for i, v in enumerate(x) for item in _flat(v, f"{path}/{i}")]
    if isinstance(x, torch.Tensor):
        return [(path, (x.dtype, tuple(x.shape), x.detach().cpu().double().nan_to_num(7.0).flatten().tolist()))]
    return [(path, repr(x))]


def _average_state(avg) -> list:
    return _flat(avg.state_dict())


def _bump(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def _trained_average(model, make):
    """A model and an average of it after three updates from changing weights."""
    m = model()
    avg = make(m)
    for s in range(3):
        _bump(m, s)
        avg.update(m)
    return m, avg


@pytest.mark.parametrize("name, model, make", AVERAGES, ids=[a[0] for a in AVERAGES])
def test_refused_average_update_counts_nothing(name, model, make):
    _, avg = _trained_average(model, make)
    before = _average_state(avg)
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    for _ in range(4):  # event and non-event steps alike
        with pytest.raises(errors.EmafuseError):
            avg.update(wrong)
        assert _average_state(avg) == before


def _corruptions(sd: dict) -> list[tuple[str, dict]]:
    out = []
    for key in ("num_steps_seen", "num_updates", "last_event", "slot", "t", "epoch"):
        if key in sd:
            for bad in ("x", float("nan"), -1, None) + ((1.5,) if key != "t" else ()):
                out.append((f"{key}={bad!r}", {**sd, key: bad}))
    module = sd.get("module") or (sd.get("tracks") or [None])[0]
    if module is not None:
        k = next(iter(module))
        for bad in (3, "x", torch.randn(7)):
            broken = {**module, k: bad}
            out.append((f"module[{k}]={type(bad).__name__}", {**sd, "module": broken} if "module" in sd else {**sd, "tracks": [broken] + sd["tracks"][1:]}))
    return out


@pytest.mark.parametrize("name, model, make", AVERAGES, ids=[a[0] for a in AVERAGES])
def test_malformed_average_checkpoint_is_refused_before_any_write(name, model, make):
    m, avg = _trained_average(model, make)
    sd = avg.state_dict()
    other = make(m)  # a fresh average: loading must not change it
    _bump(m, 9)
    other.update(m)
    before = _average_state(other)
    cases = _corruptions(sd)
    assert len(cases) >= 8
    for what, broken in cases:
        with pytest.raises(errors.EmafuseError):
            other.load_state_dict(broken)
        assert _average_state(other) == before, what


# -- background update: exit and fork --------------------------------------------------------------

_OFFLOADED = """
import torch, emafuse
m = torch.nn.Linear(2048, 2048)
ema = emafuse.ModelEMA(m, 0.9, device="cpu", async_update=True)
ema.offloaded = True  # the staged background path on a CPU model
for _ in range(3):
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
assert ema._mirror.busy
"""


def test_exit_with_a_background_update_in_flight_is_clean():
    done = run_python(_OFFLOADED + "print('exiting')\n")
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout
    assert "panic" not in done.stderr.lower() and "Traceback" not in done.stderr, done.stderr


def test_fork_with_a_background_update_in_flight_completes_it_first():
    code = _OFFLOADED + """
import os, pickle
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    sd = ema.state_dict()
    n = ema.module.weight[0, :16].tolist()  # small: no OpenMP threads, which fork() leaves broken
    os.write(w, pickle.dumps((sd["num_updates"], n)))
    os._exit(0)
os.close(w)
data = b"".join(iter(lambda: os.read(r, 65536), b""))
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
child = pickle.loads(data)
parent = (ema.state_dict()["num_updates"], ema.module.weight[0, :16].tolist())
assert child == parent, (child, parent)
print("ok")
"""
    done = run_python(code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    assert "panic" not in done.stderr.lower(), done.stderr


# -- EMAFUSE_NUM_THREADS ----------------------------------------------------------------------------

_THREADS = """
import warnings, os
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import emafuse, torch
p = torch.nn.Parameter(torch.randn(1 << 16)); o = emafuse.AdamW([p]); p.grad = torch.randn(1 << 16); o.step()
print(emafuse.num_threads(), len(os.sched_getaffinity(0)), len(os.listdir("/proc/self/task")), "|".join(str(x.message) for x in w), sep=";")
"""


@pytest.mark.parametrize("value, warned", [("100000", True), ("99999999999999999999999", True), ("0", True), ("-3", True),
                                           ("abc", True), ("1", False)])
def test_thread_count_from_the_environment_is_validated(value, warned):
    done = run_python(_THREADS, env={"EMAFUSE_NUM_THREADS": value})
    assert done.returncode == 0, done.stderr
    used, cores, tasks, message = done.stdout.strip().split(";", 3)
    assert 1 <= int(used) <= max(int(cores), 1)
    assert int(tasks) < int(cores) + 16  # never thousands of threads
    assert ("EMAFUSE_NUM_THREADS" in message) == warned, message
    if value == "1":
        assert int(used) == 1


# -- loading files: weights_only -------------------------------------------------------------------


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED_BY_PICKLE",))


def test_post_hoc_ema_loads_snapshot_files_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = torch.nn.Linear(3, 2)
    ph = PostHocEMA(m, snapshot_every=1, snapshot_dir=str(tmp_path))
    ph.update(m)
    rec = ph.snapshots[-1]
    assert "path" in rec
    torch.save({"state": _Planted()}, rec["path"])  # a planted file at a path the checkpoint names
    with pytest.raises(pickle.UnpicklingError):
        ph.reconstruct(0.05)
    assert not (tmp_path / "PLANTED_BY_PICKLE").exists()


def test_every_torch_load_in_emafuse_is_weights_only():
    import ast
    import pathlib

    root = pathlib.Path(emafuse.__file__).parent
    calls = 0
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, f"{path}:{node.lineno}"
    assert calls >= 1
