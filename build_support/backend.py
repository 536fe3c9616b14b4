"""emafuse's PEP 517 build backend: maturin, run against the torch already installed.

pip builds in an isolated environment that holds only the build requirements (maturin). torch
is not one of them: a build requirement would download some torch into that environment, and
the wheel would then fit that torch rather than the user's. Instead, before maturin compiles,
``torch_build`` finds the torch of the environment being installed into, refuses one outside the
supported range with a message naming it, and sets up the build against it; the wheel then gets
the build record (``emafuse/_built_for.py``) that emafuse checks at import. Metadata and sdists
need no torch and go straight to maturin.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import maturin
import torch_build

get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
build_sdist = maturin.build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable


@contextmanager
def _built_against_installed_torch() -> Iterator[torch_build.Torch]:
    try:
        torch = torch_build.installed_torch()
    except torch_build.TorchBuildError as err:
        raise SystemExit(f"error: {err}") from None
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(torch_build.cargo_env(torch, saved))
    try:
        yield torch
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _add_build_record(wheel: Path, torch: torch_build.Torch) -> None:
    """Put ``emafuse/_built_for.py`` into the wheel maturin built, and into its RECORD."""
    name, data = "emafuse/_built_for.py", torch_build.built_for_text(torch).encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rewritten = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename == name:  # a record maturin packed from the source tree: replaced
                continue
            content = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + f"\n{name},sha256={digest},{len(data)}\n".encode()
            dst.writestr(info, content)
        dst.writestr(name, data)
    os.replace(rewritten, wheel)


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    # Checks the torch too, so that pip refuses before it downloads anything.
    with _built_against_installed_torch():
        return maturin.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    with _built_against_installed_torch():
        return maturin.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None) -> str:
    with _built_against_installed_torch() as torch:
        name = maturin.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_build_record(Path(wheel_directory) / name, torch)
    return name


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None) -> str:
    # An editable install imports the package from python/: the record goes there.
    with _built_against_installed_torch() as torch:
        torch_build.write_built_for(torch)
        return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
