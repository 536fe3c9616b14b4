"""Running crash-prone test code in another process, so that a crash (a signal) is a test failure
instead of a dead test run.

``in_child(fn, *args)`` forks the test process (torch and emafuse already loaded: cheap) and
returns what ``fn(*args)`` returned there (pickled back), re-raising its exception; a child that
dies (SIGSEGV, abort) or hangs fails the test with its exit status. ``run_python(code)`` runs a
fresh interpreter, for what concerns interpreter start and exit, and for code that starts threads
of its own (a fork of a test process whose earlier tests left threads running, e.g. inductor's
compile workers, may inherit a lock one of them held)."""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ChildDiedError(AssertionError):
    """The child process crashed, hung or exited without a result."""


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """``fn(*args)`` in a forked child; its result, or its exception re-raised here."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_fd)
            try:
                payload = ("ok", fn(*args))
            except BaseException as e:
                payload = ("raised", (e, traceback.format_exc()))
            try:
                data = pickle.dumps(payload)
            except Exception:
                data = pickle.dumps(("raised", (AssertionError(repr(payload[1])), "")))
            with os.fdopen(write_fd, "wb") as f:
                f.write(data)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildDiedError(f"the child did not finish within {timeout} s")
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise ChildDiedError(f"the child was killed by signal {signal.Signals(os.WTERMSIG(status)).name}")
    if not chunks:
        raise ChildDiedError(f"the child exited with status {os.waitstatus_to_exitcode(status)} and no result")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "raised":
        exc, tb = value
        raise exc from AssertionError(f"in the child:\n{tb}")
    return value


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports the emafuse this test process imported (an
    installed one, or a build in place under ``python/``); returns the finished process (exit code,
    stdout, stderr)."""
    import emafuse

    package_dir = str(Path(emafuse.__file__).resolve().parent.parent)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_dir, full_env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout)
