"""emafuse's PEP 517 build backend: maturin, run against the torch already installed.

pip builds in an isolated environment that holds only the build requirements (maturin). torch
is not one of them: a build requirement would download some torch into that environment, and
the wheel would then fit that torch rather than the user's. Instead, before maturin compiles,
``torch_build`` finds the torch of the environment being installed into, refuses one outside the
supported range with a message naming it, and sets up the build against it. Metadata and sdists
need no torch and go straight to maturin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import maturin
import torch_build

get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
build_sdist = maturin.build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable


@contextmanager
def _built_against_installed_torch():
    try:
        torch = torch_build.installed_torch()
    except torch_build.TorchBuildError as err:
        raise SystemExit(f"error: {err}") from None
    torch_build.write_built_for(torch)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(torch_build.cargo_env(torch, saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _against_installed_torch(hook: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with _built_against_installed_torch():
            return hook(*args, **kwargs)

    run.__name__ = hook.__name__
    return run


# The requirement hooks check the torch too, so that pip refuses before it downloads anything.
get_requires_for_build_wheel = _against_installed_torch(maturin.get_requires_for_build_wheel)
get_requires_for_build_editable = _against_installed_torch(maturin.get_requires_for_build_editable)
build_wheel = _against_installed_torch(maturin.build_wheel)
build_editable = _against_installed_torch(maturin.build_editable)
