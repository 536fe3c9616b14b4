"""The check, at import, that the running torch is the release emafuse was compiled against.

Importing this module runs the check. The native module is compiled against one torch release's
C++ headers and links its libraries; torch changes symbols and object layouts between releases,
so another release would fail to load it with an undefined-symbol message, or load it and crash.
The release it was built for is recorded at build time in ``_built_for.py`` (by
``build_support/torch_build.py``) and compared here, before the native module is loaded. Only ``major.minor.patch`` is compared: the CPU and CUDA
builds of one release (``2.11.0+cpu``, ``2.11.0+cu130``) compile from the same headers.
"""

from __future__ import annotations

import re

import torch


def release(version: str) -> str:
    """``major.minor.patch`` of a torch version string (``"2.11.0+cu130"`` -> ``"2.11.0"``)."""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version


def mismatch(built: str, running: str) -> str | None:
    """Why emafuse built for torch `built` cannot run on torch `running`, or None if it can."""
    if release(running) == built:
        return None
    return (
        f"emafuse was compiled against torch {built}, and this environment runs torch {running}. "
        f"Its native module works only with the torch release it was compiled against. Rebuild "
        f"emafuse for this torch (from a source checkout: `pip install --force-reinstall --no-deps "
        f".`; the build uses the installed torch), or install torch=={built}."
    )


def check() -> None:
    """Raise ImportError unless the running torch is the release emafuse was built for."""
    try:
        from ._built_for import TORCH_VERSION
    except ImportError:
        raise ImportError(
            "emafuse's build record (emafuse/_built_for.py) is missing: it was not built through "
            "its build backend. Install it with `pip install .` (or run build_support/"
            "torch_build.py), which compiles it against the installed torch and records which."
        ) from None
    problem = mismatch(TORCH_VERSION, torch.__version__)
    if problem is not None:
        raise ImportError(problem)


check()
