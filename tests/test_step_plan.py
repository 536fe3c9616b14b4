"""The cached step plan: while an optimizer's tensors are unchanged, steps reuse the validated
plan; every change to them (new gradient objects, load_state_dict, add_param_group, replaced or
re-allocated tensors, new state, toggled flags) is seen, and the step then equals torch's on the
same tensors."""

from __future__ import annotations

import copy

import emafuse
import pytest
import torch
from helpers import make_params, random_grads

STEPS = 4


def _pair(shapes=((3,), (7, 5), (4097,)), check_finite=False):
    """emafuse.AdamW and torch.optim.AdamW on identical copies of the same parameters."""
    ours = make_params(shapes, seed=3)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    return ours, emafuse.AdamW(ours, check_finite=check_finite, **kw), theirs, torch.optim.AdamW(theirs, foreach=False, **kw)


def _step(t, params_a, opt_a, params_b, opt_b):
    grads = random_grads(params_a, t, seed=5)
    for a, b, g in zip(params_a, params_b, grads):
        a.grad = g.clone()  # new gradient objects every step, as zero_grad(set_to_none=True) leaves them
        b.grad = g.clone()
    opt_a.step()
    opt_b.step()


def _assert_same(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key, value in opt_b.state[b].items():
            torch.testing.assert_close(opt_a.state[a][key].to(value.dtype), value, rtol=1e-6, atol=1e-7)


def test_unchanged_tensors_reuse_the_plan_and_new_gradient_objects_are_read():
    pa, oa, pb, ob = _pair()
    _step(0, pa, oa, pb, ob)
    plan = oa._step_plan
    assert plan is not None
    for t in range(1, STEPS):
        _step(t, pa, oa, pb, ob)
        assert oa._step_plan is plan
    _assert_same(pa, oa, pb, ob)


def _replace_param_storage(pa, oa, pb, ob):
    for a, b in ((pa[1], pb[1]),):
        new = a.detach().clone()
        a.data = new
        b.data = b.detach().clone()


def _replace_state_tensor(pa, oa, pb, ob):
    oa.state[pa[0]]["exp_avg"] = oa.state[pa[0]]["exp_avg"].clone()


def _replace_state_dict(pa, oa, pb, ob):
    oa.state[pa[2]] = {k: v.clone() for k, v in oa.state[pa[2]].items()}


def _reallocate_state_in_place(pa, oa, pb, ob):
    s = oa.state[pa[2]]["exp_avg_sq"]
    s.set_(s.clone())  # same object and shape, new memory


def _reallocate_param_storage_in_place(pa, oa, pb, ob):
    for p in (pa[1], pb[1]):
        storage, keep, old = p.untyped_storage(), p.detach().clone(), p.data_ptr()
        blockers = []  # hold the freed memory, so that the storage gets other memory
        for _ in range(8):  # the allocator may hand the same address back: free and take again
            storage.resize_(0)  # as FSDP frees and re-allocates unsharded parameters
            blockers.append(torch.empty_like(keep))
            storage.resize_(keep.numel() * keep.element_size())
            if p.data_ptr() != old:
                break
        assert p.data_ptr() != old, "could not move the parameter's storage"
        with torch.no_grad():
            p.copy_(keep)


def _load_state_dict(pa, oa, pb, ob):
    oa.load_state_dict(copy.deepcopy(ob.state_dict()))  # torch's loader keeps same-dtype tensors as they are


def _toggle_amsgrad(pa, oa, pb, ob):
    oa.param_groups[0]["amsgrad"] = True
    ob.param_groups[0]["amsgrad"] = True
    for p in pb:  # torch cannot switch amsgrad on mid-run; emafuse starts the new slot at zero
        ob.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


def _swap_param_in_group(pa, oa, pb, ob):
    extra_a = torch.nn.Parameter(torch.randn(6, dtype=torch.float32))
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    oa.param_groups[0]["params"][0] = extra_a
    ob.param_groups[0]["params"][0] = extra_b
    pa[0], pb[0] = extra_a, extra_b


def _add_param_group(pa, oa, pb, ob):
    extra_a = torch.nn.Parameter(torch.randn(5))
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    oa.add_param_group({"params": [extra_a]})
    ob.add_param_group({"params": [extra_b]})
    pa.append(extra_a)
    pb.append(extra_b)


def _clear_state(pa, oa, pb, ob):
    oa.state.clear()
    ob.state.clear()


CHANGES = [
    _replace_param_storage,
    _replace_state_tensor,
    _replace_state_dict,
    _reallocate_state_in_place,
    _reallocate_param_storage_in_place,
    _load_state_dict,
    _toggle_amsgrad,
    _swap_param_in_group,
    _add_param_group,
    _clear_state,
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.strip("_") for c in CHANGES])
def test_a_change_is_seen_and_the_step_equals_torch(change):
    pa, oa, pb, ob = _pair()
    for t in range(2):
        _step(t, pa, oa, pb, ob)
    before = oa._step_plan
    change(pa, oa, pb, ob)
    for t in range(2, 2 + STEPS):
        _step(t, pa, oa, pb, ob)
    assert oa._step_plan is not None and oa._step_plan is not before
    _assert_same(pa, oa, pb, ob)


def test_parameters_gaining_and_losing_gradients():
    pa, oa, pb, ob = _pair()
    for t in range(6):
        grads = random_grads(pa, t, seed=7)
        for i, (a, b, g) in enumerate(zip(pa, pb, grads)):
            has = (i + t) % 3 != 0
            a.grad = g.clone() if has else None
            b.grad = g.clone() if has else None
        oa.step()
        ob.step()
    _assert_same(pa, oa, pb, ob)


def test_a_refused_cached_step_changes_nothing_and_the_next_one_recovers():
    pa, oa, pb, ob = _pair(check_finite=True)
    for t in range(2):
        _step(t, pa, oa, pb, ob)
    plan = oa._step_plan
    snapshot = [p.detach().clone() for p in pa]
    states = {k: v.clone() for k, v in oa.state[pa[1]].items()}
    pa[1].grad = torch.full_like(pa[1], float("nan"))
    with pytest.raises(emafuse.NonFiniteError):
        oa.step()
    assert all(torch.equal(p, s) for p, s in zip(pa, snapshot))
    assert all(torch.equal(oa.state[pa[1]][k], v) for k, v in states.items())
    assert oa._step_plan is plan
    for t in range(2, 4):
        _step(t, pa, oa, pb, ob)
    _assert_same(pa, oa, pb, ob)


def test_a_gradient_strided_unlike_its_parameter_takes_the_staged_path():
    pa, oa, pb, ob = _pair()
    for t in range(2):
        _step(t, pa, oa, pb, ob)
    g = torch.randn(5, 7).t()  # (7, 5), column-major: the parameter is row-major
    pa[1].grad, pb[1].grad = g, g.clone()
    for p, q in ((pa[0], pb[0]), (pa[2], pb[2])):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    oa.step()
    ob.step()
    _assert_same(pa, oa, pb, ob)
    for t in range(2, 4):
        _step(t, pa, oa, pb, ob)
    _assert_same(pa, oa, pb, ob)


def test_plan_does_not_keep_gradients_alive():
    import weakref

    pa, oa, _, _ = _pair()
    for p in pa:
        p.grad = torch.randn_like(p)
    oa.step()
    refs = [weakref.ref(p.grad) for p in pa]
    for p in pa:
        p.grad = None
    assert all(r() is None for r in refs)


def test_native_plan_reports_a_stale_plan_without_writing():
    from emafuse import _native

    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    st = {"exp_avg": torch.rand(5), "exp_avg_sq": torch.rand(5), "step": torch.tensor(0.0)}
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=True)
    group = _native.Group(hyper=hyper, params=[p], inputs=[p.grad], states=[st], slots=("exp_avg", "exp_avg_sq"), scalars=("step",))
    plan = _native.StepPlan("t", "adam", [group], [[p]])
    assert plan.run([hyper]) is True
    st["exp_avg"] = st["exp_avg"].clone()
    before = (p.detach().clone(), {k: v.clone() for k, v in st.items()})
    assert plan.run([hyper]) is None
    assert torch.equal(p, before[0]) and all(torch.equal(st[k], v) for k, v in before[1].items())


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
)
def test_per_tensor_sums_computed_apart_then_given_to_the_update(device):
    """What sharded (DTensor) steps use: ``StepPlan.sums`` writes the rule's per-tensor sums in
    group order (here across two batches: f32 and bf16 tensors interleaved) and updates nothing;
    ``run(sums=)`` with them equals the usual step bit for bit, and with other sums follows them
    (Lion's cautious factor, spec §20); bad sums arrays are refused, nothing written."""
    from emafuse import _native

    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_base_lr=1.0, lr_independent_decay=False, caution=True, caution_count=False)
    shapes_dtypes = [((7, 5), torch.float32), ((33,), torch.bfloat16), ((4097,), torch.float32), ((3,), torch.bfloat16)]

    def tensors(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for shape, dtype in shapes_dtypes:
            p, grad, m = (torch.randn(shape, generator=g).to(dtype=dtype, device=device) for _ in range(3))
            out.append((torch.nn.Parameter(p), grad, {"exp_avg": m}))
        return out

    def plan(ts):
        group = _native.Group(hyper=hyper, params=[t[0] for t in ts], inputs=[t[1] for t in ts], states=[t[2] for t in ts], slots=("exp_avg",), scalars=())
        return _native.StepPlan("t", "lion", [group])

    def snapshot(ts):
        return [(p.detach().clone(), st["exp_avg"].clone()) for p, _, st in ts]

    def assert_equal(a, b):
        assert all(torch.equal(x, y) and torch.equal(m, n) for (x, m), (y, n) in zip(a, b))

    ours, usual = tensors(7), tensors(7)
    before = snapshot(ours)
    sums = [torch.zeros((len(ours), _native.MAX_SUMS), dtype=torch.float64, device=device)]
    native = plan(ours)
    assert native.sums(sums) is True
    assert_equal(snapshot(ours), before)
    for i, (p, g, st) in enumerate(ours):
        u = (st["exp_avg"].float() * 0.9 + g.float() * 0.1).sign()
        assert sums[0][i].tolist() == [float((u * g.float() > 0).sum()), float(p.numel())] + [0.0] * (_native.MAX_SUMS - 2), i

    bad = [
        [torch.zeros((len(ours), _native.MAX_SUMS), dtype=torch.float32, device=device)],
        [torch.zeros((len(ours) - 1, _native.MAX_SUMS), dtype=torch.float64, device=device)],
        [sums[0], sums[0]],
    ]
    if device == "cuda":
        bad.append([sums[0].cpu()])
    for arrays in bad:
        with pytest.raises((emafuse.InvalidArgumentError, emafuse.DeviceError)):
            native.run(sums=arrays)
        assert_equal(snapshot(ours), before)

    assert native.run(sums=sums) is True
    assert plan(usual).run() is True
    assert_equal(snapshot(ours), snapshot(usual))

    # Sums saying every element agrees: the cautious factor is 1, the mask stays the element's own.
    ours = tensors(8)
    before = snapshot(ours)
    numels = torch.tensor([float(p.numel()) for p, _, _ in ours], dtype=torch.float64, device=device)
    given = torch.zeros((len(ours), _native.MAX_SUMS), dtype=torch.float64, device=device)
    given[:, 0], given[:, 1] = numels, numels
    assert plan(ours).run(sums=[given]) is True
    for (p, g, st), (p0, m0) in zip(ours, before):
        u = (m0.float() * 0.9 + g.float() * 0.1).sign()
        expected = p0.float() * (1 - 0.1 * 0.1) + -0.1 * (u * (u * g.float() > 0))
        torch.testing.assert_close(p.detach(), expected.to(p.dtype))
        torch.testing.assert_close(st["exp_avg"], (m0.float() * 0.99 + 0.01 * g.float()).to(m0.dtype))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
)
def test_per_tensor_grad_factors_scale_each_gradient_as_loaded(device):
    """``run(grad_factors=)`` / ``sums(grad_factors=)`` (what ``grad_clip=AdaGC`` uses): each
    tensor's gradient is multiplied by its own factor in the sums pass and in the update (here
    Lion's cautious counts, over two batches, f32 and bf16 tensors interleaved, so that the
    factors follow each tensor into its batch), equal bit for bit to the usual step on
    pre-multiplied gradients (powers of two: exact in every dtype); the gradients are not
    written; bad factor lists are refused with nothing written."""
    from emafuse import _native

    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_base_lr=1.0, lr_independent_decay=False, caution=True, caution_count=False)
    shapes_dtypes = [((7, 5), torch.float32), ((33,), torch.bfloat16), ((4097,), torch.float32), ((3,), torch.bfloat16)]
    factors = [0.5, 2.0, 0.25, 1.0]

    def tensors(seed, scaled):
        g = torch.Generator().manual_seed(seed)
        out = []
        for (shape, dtype), f in zip(shapes_dtypes, factors):
            p, grad, m = (torch.randn(shape, generator=g).to(dtype=dtype, device=device) for _ in range(3))
            out.append((torch.nn.Parameter(p), grad * f if scaled else grad, {"exp_avg": m}))
        return out

    def plan(ts):
        group = _native.Group(hyper=hyper, params=[t[0] for t in ts], inputs=[t[1] for t in ts], states=[t[2] for t in ts], slots=("exp_avg",), scalars=())
        return _native.StepPlan("t", "lion", [group])

    def snapshot(ts):
        return [(p.detach().clone(), g.clone(), st["exp_avg"].clone()) for p, g, st in ts]

    def same(a, b):
        return all(all(torch.equal(x, y) for x, y in zip(u, v)) for u, v in zip(a, b))

    ours, usual = tensors(11, False), tensors(11, True)
    before = snapshot(ours)
    native = plan(ours)
    for bad in ([factors[:3]], [[*factors[:3], -1.0]], [[*factors[:3], float("nan")]], [factors, factors], ["abc"]):
        with pytest.raises(emafuse.InvalidArgumentError, match="gradient factor"):
            native.run(grad_factors=bad)
        assert same(snapshot(ours), before)
    sums, expected = ([torch.zeros((len(ours), _native.MAX_SUMS), dtype=torch.float64, device=device)] for _ in range(2))
    assert native.sums(sums, grad_factors=[factors]) is True and plan(usual).sums(expected) is True
    assert torch.equal(sums[0], expected[0]) and same(snapshot(ours), before)
    assert native.run(grad_factors=[factors]) is True
    assert plan(usual).run() is True
    for (p, g, m), (q, _, n), (_, g0, _) in zip(snapshot(ours), snapshot(usual), before):
        assert torch.equal(p, q) and torch.equal(m, n) and torch.equal(g, g0)
    # None: no factors for that group (the usual step)
    assert native.run(grad_factors=[None]) is True
