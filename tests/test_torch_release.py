"""emafuse and the torch release it runs on (issue 11).

- The running torch is in the supported range, and it is the release the native module and its
  build record were compiled against.
- The in-place read of a ``torch.Tensor``'s metadata (the fast path of every step) is active on
  this release and reads what torch's own accessors report. The suite runs per supported release
  (``./dev.sh test`` runs the oldest and the newest; ``tools/torch_matrix.py`` all of them), so
  this is the per-release check of the layout.
- Another torch release is refused at import, with a message, before the native module loads.
- The build finds the installed torch from inside pip's isolated build environment, refuses none
  or one outside the range with a message naming the range, and keeps one build per release.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import emafuse
import pytest
import torch
from emafuse import _built_for, _native, _torch_release
from isolated import run_python

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A module of build_support/ (not a package: it is the build backend's path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "build_support" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch_build = _load("torch_build")


# --- the running release -------------------------------------------------------------------------


def test_running_torch_is_the_release_emafuse_was_built_for():
    running = _torch_release.release(torch.__version__)
    assert _built_for.TORCH_VERSION == running
    assert _native.TORCH_VERSION == running
    low, high = torch_build.supported_range()
    assert low <= torch_build.release_of(running)[:2] < high


def test_each_supported_release_has_one_requirements_file_in_the_range():
    low, high = torch_build.supported_range()
    pinned = {}
    for path in sorted((ROOT / "requirements").glob("torch-*.txt")):
        minor = path.stem.removeprefix("torch-")
        pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", path.read_text(), re.M))
        assert set(pins) == {"torch", "torchvision"}, path
        assert ".".join(pins["torch"].split(".")[:2]) == minor, path
        pinned[torch_build.release_of(pins["torch"])[:2]] = path
    expected = [(low[0], minor) for minor in range(low[1], high[1])]
    assert low[0] == high[0] and sorted(pinned) == expected


# --- the in-place read of tensor metadata ----------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(7, 5, 3, generator=g)
    return {
        "1-d odd": torch.randn(1001, generator=g),
        "0-d": torch.randn((), generator=g),
        "parameter": torch.nn.Parameter(torch.randn(17, 3, generator=g)),
        "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(9, 2, generator=g).to(torch.float16),
        "fp64": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "permuted": base.permute(2, 0, 1),
        "channels_last": torch.randn(2, 3, 5, 4, generator=g).to(memory_format=torch.channels_last),
        "offset view": base.view(-1)[13:40],
        "sliced": base[:, ::2],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),
        "empty": torch.randn(0, 3, generator=g),
    }


def _layout(t: torch.Tensor) -> tuple[str, tuple[int, ...] | None]:
    if t.is_contiguous():
        return "contiguous", None
    by_stride = sorted(range(t.dim()), key=t.stride, reverse=True)
    if t.permute(by_stride).is_contiguous():  # a permutation of a contiguous tensor
        return "dense", tuple(t.stride())
    if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
        return "overlapping", None
    return "strided", None


@pytest.mark.parametrize("name", list(_tensors()))
def test_in_place_read_matches_torch(name):
    t = _tensors()[name]
    read = _native.read_tensor(t)
    assert read["in_place"], f"torch {torch.__version__}: the in-place read is off (the slow unpack is used)"
    assert read["shape"] == tuple(t.shape)
    assert read["dtype"] == str(t.dtype)
    assert read["device"] == "cpu"
    assert (read["layout"], read["strides"]) == _layout(t)
    if t.numel():
        assert read["data_ptr"] == t.data_ptr()


def test_in_place_read_follows_data_swaps_and_resizes():
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    before = _native.read_tensor(p)
    p.data = torch.randn(3, 8, generator=g)
    after = _native.read_tensor(p)
    assert after["data_ptr"] == p.data_ptr() != before["data_ptr"]
    assert after["shape"] == (3, 8)
    t = torch.randn(6, 4, generator=g)
    t.resize_(50)
    assert _native.read_tensor(t)["shape"] == (50,)
    assert _native.read_tensor(t)["data_ptr"] == t.data_ptr()


# --- another torch at import -----------------------------------------------------------------------


def test_release_comparison():
    assert _torch_release.release("2.11.0+cu130") == "2.11.0"
    assert _torch_release.mismatch("2.11.0", "2.11.0+cu130") is None
    assert _torch_release.mismatch("2.11.0", "2.11.0") is None
    message = _torch_release.mismatch("2.11.0", "2.12.1")
    assert "compiled against torch 2.11.0" in message and "runs torch 2.12.1" in message
    assert "pip install --force-reinstall --no-deps ." in message and "torch==2.11.0" in message
    assert _torch_release.mismatch("2.11.0", "2.11.1") is not None


def test_another_torch_release_is_refused_at_import_before_the_native_module_loads():
    other = "2.99.0" if not torch.__version__.startswith("2.99.") else "2.98.0"
    code = f"""
import sys, torch
torch.__version__ = "{other}+cpu"
try:
    import emafuse
except ImportError as e:
    print("REFUSED:", e)
print("NATIVE LOADED:", "emafuse._native" in sys.modules)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert f"REFUSED: emafuse was compiled against torch {_built_for.TORCH_VERSION}" in result.stdout
    assert f"this environment runs torch {other}+cpu" in result.stdout
    assert "NATIVE LOADED: False" in result.stdout


def test_missing_build_record_is_refused_at_import(tmp_path):
    # A copy of the package without _built_for.py, as a build that bypassed torch_build would be.
    package = Path(emafuse.__file__).resolve().parent
    copy = tmp_path / "emafuse"
    copy.mkdir()
    for item in package.iterdir():
        if item.name != "_built_for.py" and item.name != "__pycache__":
            (copy / item.name).symlink_to(item)
    code = "import emafuse"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "emafuse's build record (emafuse/_built_for.py) is missing" in result.stderr


# --- the build: finding the installed torch --------------------------------------------------------


def _pip_like_isolation(tmp_path: Path) -> dict[str, str]:
    """The environment pip's build isolation gives a build backend: a sitecustomize on
    PYTHONPATH that drops the environment's site-packages from sys.path, user site off."""
    site_dir = tmp_path / "overlay"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text("import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n")
    return {"PYTHONPATH": str(site_dir), "PYTHONNOUSERSITE": "1"}


def test_probe_finds_the_installed_torch_from_inside_build_isolation(tmp_path, monkeypatch):
    isolation = _pip_like_isolation(tmp_path)
    hidden = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **isolation}, capture_output=True)
    assert hidden.returncode != 0, "the emulated isolation does not hide torch"
    for name, value in isolation.items():
        monkeypatch.setenv(name, value)
    found = torch_build.probe(sys.executable)
    assert found is not None
    assert found.version == torch.__version__
    assert found.path == Path(torch.__file__).resolve().parent
    assert found.cxx11_abi == bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def _python_without_torch(tmp_path: Path) -> str:
    script = tmp_path / "python-without-site"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_no_torch_is_refused_with_how_to_install_one(tmp_path):
    with pytest.raises(torch_build.TorchBuildError) as err:
        torch_build.installed_torch(_python_without_torch(tmp_path))
    message = str(err.value)
    assert "has none" in message and f"pip install '{torch_build.range_text()}'" in message


def test_torch_that_fails_to_import_is_reported_as_such(tmp_path):
    broken = tmp_path / "site"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    script = tmp_path / "python-with-broken-torch"
    script.write_text(f'#!/bin/sh\nPYTHONSAFEPATH=1 exec "{sys.executable}" -S -c "import sys; sys.path.insert(0, \'{broken}\'); exec(sys.argv[1])" "$2"\n')
    script.chmod(0o755)
    with pytest.raises(torch_build.TorchBuildError, match=r"fails to import .*libtorch_cpu\.so: cannot open shared object file"):
        torch_build.installed_torch(str(script))


@pytest.mark.parametrize("version", ["2.10.0", "2.16.0", "2.16.0.dev20261201", "3.0.0", "1.13.1"])
def test_torch_outside_the_range_is_refused_naming_the_range(version, monkeypatch):
    monkeypatch.setattr(torch_build, "probe", lambda python: torch_build.Torch(version, Path("/x"), True))
    with pytest.raises(torch_build.TorchBuildError) as err:
        torch_build.installed_torch()
    message = str(err.value)
    assert f"emafuse supports {torch_build.range_text()}" in message and f"has torch {version}" in message
    assert "never replaces the installed torch" in message


def test_range_is_read_from_the_package_requirement():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'dependencies = ["{torch_build.range_text()}"]' in pyproject


def test_backend_refuses_before_building(monkeypatch, tmp_path):
    backend = _load("backend")
    monkeypatch.setattr(torch_build, "probe", lambda python: None)
    with pytest.raises(SystemExit) as err:
        backend.get_requires_for_build_wheel()
    assert str(err.value).startswith("error: emafuse is compiled against the torch installed")
    with pytest.raises(SystemExit):
        backend.build_wheel(str(tmp_path))


def test_backend_puts_the_build_record_into_the_wheel(tmp_path):
    backend = _load("backend")
    wheel = tmp_path / "emafuse-0.1.0-cp310-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("emafuse/__init__.py", "x = 1\n")
        whl.writestr("emafuse/_built_for.py", "stale\n")
        whl.writestr("emafuse-0.1.0.dist-info/RECORD", "emafuse/__init__.py,sha256=abc,6\nemafuse-0.1.0.dist-info/RECORD,,\n")
    torch_ = torch_build.Torch("2.13.0+cu130", Path("/x"), True)
    backend._add_build_record(wheel, torch_)
    with zipfile.ZipFile(wheel) as whl:
        assert sorted(whl.namelist()) == ["emafuse-0.1.0.dist-info/RECORD", "emafuse/__init__.py", "emafuse/_built_for.py"]
        record = whl.read("emafuse/_built_for.py")
        assert "TORCH_VERSION = '2.13.0'" in record.decode()
        lines = whl.read("emafuse-0.1.0.dist-info/RECORD").decode().splitlines()
    digest = base64.urlsafe_b64encode(hashlib.sha256(record).digest()).rstrip(b"=").decode()
    assert lines[-1] == f"emafuse/_built_for.py,sha256={digest},{len(record)}"
    assert lines[:2] == ["emafuse/__init__.py,sha256=abc,6", "emafuse-0.1.0.dist-info/RECORD,,"]


def test_build_environment_per_release():
    a = torch_build.Torch("2.11.0+cu130", Path("/envs/a/torch"), True)
    b = torch_build.Torch("2.15.0", Path("/envs/b/torch"), True)
    env_a = torch_build.cargo_env(a, {"LIBTORCH_USE_PYTORCH": "1", "CXXFLAGS": "-O2", "PATH": "/bin"})
    env_b = torch_build.cargo_env(b, {})
    assert "LIBTORCH_USE_PYTORCH" not in env_a and env_a["PATH"] == "/bin"
    assert env_a["LIBTORCH"] == "/envs/a/torch"
    assert env_a["EMAFUSE_TORCH_VERSION"] == "2.11.0"
    assert env_a["CXXFLAGS"].startswith("-O2 -std=c++20 ")
    assert f"-include {torch_build.COMPAT_HEADER}" in env_a["CXXFLAGS"]
    assert "-DEMAFUSE_TORCH_MINOR=11" in env_a["CXXFLAGS"] and "-DEMAFUSE_TORCH_MINOR=15" in env_b["CXXFLAGS"]
    # One target directory per release: a change of torch rebuilds; switching back does not.
    assert env_a["CARGO_TARGET_DIR"].endswith("target/torch-2.11.0")
    assert env_b["CARGO_TARGET_DIR"].endswith("target/torch-2.15.0")
