"""Lightning's own tests of ``EMAWeightAveraging`` (``../shared/upstream/lightning/
test_weight_averaging.py``, unchanged; provenance in that folder's README), run with
``emafuse.lightning.EMACallback`` in its place.

The upstream file is loaded as a module while ``lightning.pytorch.callbacks.EMAWeightAveraging``
is our class; ``tests_pytorch.helpers.runif.RunIf`` (Lightning's test helper, not shipped in the
wheel) is supplied as the skip conditions it stands for. Every test of the file that uses
``EMAWeightAveraging`` is collected here; the others test Lightning's ``WeightAveraging`` itself.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import lightning.pytorch.callbacks as callbacks
import pytest
import torch
from emafuse.lightning import EMACallback

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream" / "lightning" / "test_weight_averaging.py"


def _run_if(min_cuda_gpus: int = 0, mps: bool = False, standalone: bool = False, skip_windows: bool = False, **_):
    """Lightning's ``RunIf``: skip unless the machine has what the test needs."""
    reasons = []
    if torch.cuda.device_count() < min_cuda_gpus:
        reasons.append(f"needs {min_cuda_gpus} CUDA GPU(s)")
    if mps:
        reasons.append("needs Apple MPS")
    if standalone:
        reasons.append("a standalone (multi-process) test of Lightning's")
    if skip_windows and sys.platform == "win32":
        reasons.append("not on Windows")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def _load():
    helpers = types.ModuleType("tests_pytorch.helpers.runif")
    helpers.RunIf = _run_if
    for name in ("tests_pytorch", "tests_pytorch.helpers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["tests_pytorch.helpers.runif"] = helpers
    original = callbacks.EMAWeightAveraging
    callbacks.EMAWeightAveraging = EMACallback
    try:
        spec = importlib.util.spec_from_file_location("upstream_test_weight_averaging", UPSTREAM)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        callbacks.EMAWeightAveraging = original
    assert module.EMAWeightAveraging is EMACallback
    return module


_upstream = _load()

# The tests that use EMAWeightAveraging (the others exercise Lightning's WeightAveraging base).
_TESTS = [
    "test_ema_weight_averaging",
    "test_ema_weight_averaging_step_frequency",
    "test_ema_weight_averaging_starting_step",
    "test_ema_weight_averaging_starting_epoch",
    "test_ema_weight_averaging_should_update",
    "test_ema_weight_averaging_checkpoint_save_load",
    "test_ema_weight_averaging_decay_values",
]
globals().update({name: getattr(_upstream, name) for name in _TESTS})


def test_every_upstream_test_of_ema_weight_averaging_is_collected():
    source = UPSTREAM.read_text()
    uses = {name for name in dir(_upstream) if name.startswith("test_") and "EMAWeightAveraging(" in _body(source, name)}
    assert uses == set(_TESTS)


def _body(source: str, name: str) -> str:
    start = source.index(f"def {name}(")
    end = source.find("\ndef ", start + 1)
    return source[start : end if end != -1 else len(source)]
