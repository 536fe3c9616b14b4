"""PyTorch's own optimizer tests (``../shared/upstream/pytorch/test_optim.py``, unchanged;
provenance in that folder's README), run against ``emafuse.AdamW``, ``Adam`` and ``SGD``.

The file draws its cases from ``torch.testing._internal.common_optimizers.optim_db``. Before it is
loaded, that table is narrowed to torch's AdamW, Adam and SGD and each entry is retargeted at the
emafuse class of the same name, with the implementations emafuse offers: ``foreach`` and
``fused`` (accepted; emafuse is always fused), not ``differentiable`` (emafuse refuses it with
``UnsupportedOptionError``, its documented difference). The three suites the file imports for its
own test run (LR schedulers, differentiable optimizers, SWA utilities) test torch, not the
optimizers, and are replaced by empty stand-ins. Then every generated CPU test must pass (or skip
where it skips for torch's own classes, e.g. CUDA-only tests).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import emafuse
import torch
from torch.testing._internal import common_optimizers


def _unfreeze_backend_flags() -> None:
    """torch's test utilities freeze ``torch.backends`` flags for the whole process
    (``disable_global_flags``), which breaks later tests that set them (e.g. Lightning's
    ``deterministic=True``): lift the freeze again."""
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


def teardown_module() -> None:
    _unfreeze_backend_flags()


UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "pytorch" / "test_optim.py"
RETARGETED = {"AdamW": emafuse.AdamW, "Adam": emafuse.Adam, "SGD": emafuse.SGD}


def _retarget_optim_db() -> None:
    kept = []
    for info in common_optimizers.optim_db:
        ours = RETARGETED.get(info.optim_cls.__name__)
        if ours is None or info.optim_cls.__module__.startswith("emafuse"):
            continue
        info.optim_cls = ours
        info.supported_impls = tuple(i for i in info.supported_impls if i != "differentiable")
        kept.append(info)
    common_optimizers.optim_db[:] = kept  # the upstream file imports the list object itself


def _load():
    for name, cls in (("optim.test_lrscheduler", "TestLRScheduler"), ("optim.test_optim", "TestDifferentiableOptimizer"),
                      ("optim.test_swa_utils", "TestSWAUtils")):
        module = types.ModuleType(name)
        setattr(module, cls, type(cls, (unittest.TestCase,), {}))
        sys.modules[name] = module
    sys.modules.setdefault("optim", types.ModuleType("optim"))
    _retarget_optim_db()
    spec = importlib.util.spec_from_file_location("upstream_test_optim", UPSTREAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_upstream = _load()
_unfreeze_backend_flags()
TestOptimRenewedCPU = _upstream.TestOptimRenewedCPU
assert {info.optim_cls for info in common_optimizers.optim_db} == set(RETARGETED.values())
