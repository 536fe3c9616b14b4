"""Which torch emafuse builds against, and the build environment that follows from it.

emafuse's native module is compiled against the C++ headers of one torch release and runs only
with that release (one binary cannot span minor versions: symbols and object layouts change).
So every build of the native module goes through this module, which

- finds the torch installed in the environment being installed into (also from inside pip's
  isolated build environment, which hides it) and refuses one outside the supported range,
  stated once, in pyproject.toml's ``dependencies``;
- gives cargo the environment that builds tch 0.24's torch-sys against that torch: its libtorch
  (``LIBTORCH``), C++20 (2.15's headers need it), and ``torch_compat.h``, which supplies the
  operators later releases removed from what torch-sys's generated bindings call;
- keeps one cargo target directory per torch release (``target/torch-<version>``), so that a
  change of the installed torch always rebuilds, and switching back does not;
- records the release in ``emafuse/_built_for.py`` (in the wheel, or in the source tree for
  builds used from there), which emafuse checks at import before it loads the native module.

Used by the PEP 517 backend (``backend.py``) and, as a command, by the development scripts:

    python build_support/torch_build.py [--python PY] -- cargo clippy ...
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT_HEADER = ROOT / "build_support" / "torch_compat.h"
BUILT_FOR = ROOT / "python" / "emafuse" / "_built_for.py"

# Variables pip's build isolation sets to hide the environment being installed into.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")

_PROBE = """
import json, os, torch
print(json.dumps({"version": torch.__version__, "path": os.path.dirname(torch.__file__),
                  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}))
"""


class TorchBuildError(RuntimeError):
    """The installed torch cannot be built against (none, or outside the supported range)."""


@dataclass(frozen=True)
class Torch:
    """A torch installation: its version string, package directory and C++ ABI flag."""

    version: str
    path: Path
    cxx11_abi: bool

    @property
    def release(self) -> tuple[int, int, int]:
        """``(major, minor, patch)`` of the version, without local (``+cu130``) or pre tags."""
        return release_of(self.version)

    @property
    def release_str(self) -> str:
        return ".".join(map(str, self.release))


def release_of(version: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise TorchBuildError(f"cannot read torch's version {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def supported_range() -> tuple[tuple[int, int], tuple[int, int]]:
    """``(oldest, first_unsupported)`` minor releases, from the torch requirement in
    pyproject.toml's ``dependencies`` (``torch>=2.11,<2.16``)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    if match is None:
        raise TorchBuildError('pyproject.toml must require torch as "torch>=X.Y,<A.B"')
    low_major, low_minor, high_major, high_minor = (int(part) for part in match.groups())
    return (low_major, low_minor), (high_major, high_minor)


def range_text() -> str:
    (low_major, low_minor), (high_major, high_minor) = supported_range()
    return f"torch>={low_major}.{low_minor},<{high_major}.{high_minor}"


def probe(python: str) -> Torch | None:
    """The torch that `python` imports, outside any build isolation, or None if it has none."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    result = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        if "No module named 'torch'" in result.stderr:
            return None
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise TorchBuildError(f"the torch of {python} fails to import ({last}): repair that environment's torch first")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return Torch(found["version"], Path(found["path"]).resolve(), found["cxx11_abi"])


def installed_torch(python: str | None = None) -> Torch:
    """The torch of the environment being built for, checked against the supported range."""
    python = python or sys.executable
    torch = probe(python)
    wanted = range_text()
    if torch is None:
        raise TorchBuildError(
            f"emafuse is compiled against the torch installed in the environment, and {python} "
            f"has none. Install torch first (`pip install '{wanted}'`; emafuse supports every "
            f"release in that range), then install emafuse again."
        )
    low, high = supported_range()
    if not low <= torch.release[:2] < high:
        raise TorchBuildError(
            f"emafuse supports {wanted}, and the environment of {python} has torch "
            f"{torch.version}. Install a torch in that range (`pip install '{wanted}'`) or use "
            f"an environment that has one; emafuse never replaces the installed torch."
        )
    return torch


def target_dir(torch: Torch) -> Path:
    """The cargo target directory of builds against `torch` (one per release)."""
    return ROOT / "target" / f"torch-{torch.release_str}"


def cargo_env(torch: Torch, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment in which cargo builds the native module against `torch`."""
    env = dict(os.environ if base is None else base)
    for name in ("LIBTORCH_USE_PYTORCH", "LIBTORCH_INCLUDE", "LIBTORCH_LIB"):
        env.pop(name, None)
    minor = torch.release[1]
    compat = [
        "-std=c++20",
        f"-DEMAFUSE_TORCH_MINOR={minor}",
        "-include",
        str(COMPAT_HEADER),
    ]
    env.update(
        LIBTORCH=str(torch.path),
        LIBTORCH_CXX11_ABI="1" if torch.cxx11_abi else "0",
        # torch-sys 0.24 expects 2.11.0; torch_compat.h bridges the later releases.
        LIBTORCH_BYPASS_VERSION_CHECK="1",
        # cc splits CXXFLAGS at whitespace: the project's path must not contain any.
        CXXFLAGS=" ".join([env.get("CXXFLAGS", ""), *compat]).strip(),
        CARGO_TARGET_DIR=str(target_dir(torch)),
        EMAFUSE_TORCH_VERSION=torch.release_str,
    )
    return env


def built_for_text(torch: Torch) -> str:
    """``emafuse/_built_for.py``: the release the native module is built against, which emafuse
    checks at import."""
    return (
        '"""The torch release emafuse\'s native module was compiled against (written by\n'
        'build_support/torch_build.py at build time; not in git)."""\n\n'
        f"TORCH_VERSION = {torch.release_str!r}\n"
    )


def write_built_for(torch: Torch) -> None:
    """Write the build record into the source tree, for builds used from it (in place, editable).
    Wheels get theirs from the backend, inside the wheel: two builds from one checkout for two
    releases at once must not share a file."""
    if not BUILT_FOR.exists() or BUILT_FOR.read_text() != built_for_text(torch):
        BUILT_FOR.write_text(built_for_text(torch))


def main(argv: list[str]) -> int:
    """``torch_build.py [--python PY] -- COMMAND...``: run COMMAND with the build environment."""
    python = None
    if argv[:1] == ["--python"]:
        python, argv = argv[1], argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        torch = installed_torch(python)
    except TorchBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_built_for(torch)
    return subprocess.run(argv[1:], env=cargo_env(torch)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
