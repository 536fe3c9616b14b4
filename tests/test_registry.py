"""The registry itself: one entry per exported optimizer, configurations that reach every
option, references that take every configuration; and the conftest hook that turns a skipped
official comparison into a failure."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import emafuse
import pytest
import torch
from helpers import make_params
from registry import ENTRIES, entries

# Constructor keywords that select no behaviour of the rule (accepted for compatibility, or
# emafuse's own error checking): no configuration needs to set them.
NOT_OPTIONS = {"foreach", "fused", "capturable", "differentiable", "check_finite", "print_change_log", "no_deprecation_warning"}
# Options every optimizer takes that a test runs on every entry itself (the registry's concerns
# compare with references that have no such option).
COVERED_ELSEWHERE = {"grad_clip", "state_dtype", "rounding", "rounding_seed", "weight_correction"}  # test_grad_clip.py, test_lean_state.py


# Optimizers whose step needs the loss (MoMo's Polyak step size), and second-order ones (whose
# step differentiates the gradients again): the registry's concerns step on given gradients
# alone, so test_momo.py and test_adahessian.py cover them on their own.
TAKES_LOSS = {"Momo", "MomoAdam"}
SECOND_ORDER = {"AdaHessian"}


def test_every_exported_optimizer_has_exactly_one_entry():
    exported = {getattr(emafuse, n) for n in emafuse.__all__}
    optimizers = {c for c in exported if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    assert {c.__name__ for c in optimizers if "loss" in inspect.signature(c.step).parameters} == TAKES_LOSS
    assert {c.__name__ for c in optimizers if getattr(c, "is_second_order", False)} == SECOND_ORDER
    assert sorted(e.name for e in ENTRIES) == sorted(c.__name__ for c in optimizers if c.__name__ not in TAKES_LOSS | SECOND_ORDER)
    assert len({e.cls for e in ENTRIES}) == len(ENTRIES)


@pytest.mark.parametrize("entry", entries())
def test_configurations_reach_every_option(entry):
    options = set(inspect.signature(entry.cls).parameters) - {"params"} - NOT_OPTIONS - COVERED_ELSEWHERE
    used = {k for kw in entry.configs for k in kw}
    assert options <= used, sorted(options - used)
    assert set(entry.main) <= options and set(entry.group_options) <= options | {"t_alpha_beta3"}


@pytest.mark.parametrize("entry", entries())
def test_the_reference_takes_every_configuration(entry):
    """``Ref(params, **kw)`` for every configuration (the concern tests rely on it), and the
    reference starts from copies: the parameters it was given are not touched."""
    params = make_params([(3,)])
    before = params[0].detach().clone()
    for kw in (*entry.configs, entry.main, {**entry.main, **entry.group_options}, {**entry.main, **entry.low_precision}):
        ref = entry.reference(params, **kw)
        ref.step([torch.ones(3)])
        assert isinstance(ref.state_of(0), dict), kw
    assert torch.equal(params[0], before)


SAMPLE = '''
import pytest

@pytest.mark.official
def test_official_that_skips():
    pytest.skip("reference package missing")

@pytest.mark.official
@pytest.mark.skipif(True, reason="skipped by a marker")
def test_official_skipped_by_a_marker():
    pass

@pytest.mark.official
def test_official_that_runs():
    pass

def test_plain_skip():
    pytest.skip("allowed")
'''


def test_a_skipped_official_comparison_fails(tmp_path):
    """tests/conftest.py, run on a generated test file: official-marked tests that skip (inside
    the test or by a skipif marker) fail with the reason; other skips stay skips."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert run.returncode == 1, out
    # A skip in setup (the marker) is reported as an error of the setup, one in the test as a failure.
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "FAILED test_sample.py::test_official_that_skips" in out and "ERROR test_sample.py::test_official_skipped_by_a_marker" in out
    assert "reference package missing" in out and "skipped by a marker" in out
    assert "an official comparison may not be skipped" in out
