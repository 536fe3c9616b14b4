"""Test-suite configuration: the ``official`` marker, whose tests may not be skipped.

Comparisons against the official (pinned, test-only) implementations carry
``@pytest.mark.official``. A skip of such a test (a package that stopped importing, a ``skipif``,
a ``pytest.skip`` inside it) is reported as a failure, so CI cannot stay green while the
comparisons silently stop running. Nothing else is imported here: this file is also loaded on the
GPU machine, which has only some of the test dependencies.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "official: compares against an official implementation (a pinned test dependency); never skipped"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("official") is not None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"an official comparison may not be skipped (pinned test dependency missing?): {reason}"
