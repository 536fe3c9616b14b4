"""Guards shared by the optimizers and the averaging methods: interrupts deferred over an update
(so that a step is all-or-nothing), tensor subclasses refused before anything is touched, the
``EMAFUSE_NUM_THREADS`` check, and the join of background updates before exit and ``fork()``.

Interrupts: Python delivers a signal to its handler between bytecodes of the main thread, so a
Ctrl-C arriving while the native update runs would raise right after it, between the update and
the commit of lazily created state and counters. :class:`deferred_interrupts` holds ``SIGINT``
back for the duration of one update (its handler records it) and hands it to the previous handler
as the update ends: the ``KeyboardInterrupt`` then comes after a complete step. An interrupt never
splits a step; it arrives before it (nothing changed) or after it (everything committed).
"""

from __future__ import annotations

import _signal  # signal's C module: the same calls without the enum conversions (tens of µs per step)
import functools
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol, TypeVar

import torch

from . import _native

__all__ = ["check_thread_env", "deferred_interrupts", "refuse_subclass", "track_pending", "uninterrupted"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def refuse_subclass(t: Any, role: str) -> None:
    """Raise the engine's :class:`~emafuse.errors.InvalidArgumentError` if the tensor ``t``
    (``role`` names it) is one the engine cannot update natively (a subclass with its own
    ``__torch_dispatch__``, e.g. a wrapper tensor such as DTensor), before any Python code
    (state creation, staging) dispatches into it. Costs one type check for plain tensors."""
    if type(t) not in _PLAIN:
        _native.check_tensor(t, role)


class deferred_interrupts:  # noqa: N801 - used as a statement: ``with deferred_interrupts():``
    """Hold ``SIGINT`` back while the block runs (main thread, Python-level handler installed);
    on exit, the previous handler gets it (``KeyboardInterrupt`` by default). Nests. Costs three
    calls into ``signal`` per block, none elsewhere (signals only reach the main thread)."""

    __slots__ = ("_pending", "_previous")

    def __enter__(self) -> deferred_interrupts:
        self._previous: Any = None
        self._pending: tuple[int, FrameType | None] | None = None
        if threading.current_thread() is threading.main_thread():
            previous = _signal.getsignal(_signal.SIGINT)
            if callable(previous):  # not SIG_IGN / SIG_DFL / a handler installed from C
                # signal.signal first runs the handlers of signals already pending: an interrupt
                # that came before the block is raised here, before anything changed.
                _signal.signal(_signal.SIGINT, self._record)
                self._previous = previous
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self._pending is None:
            self._pending = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        previous = self._previous
        if previous is None:
            return
        self._previous = None
        _signal.signal(_signal.SIGINT, previous)  # runs _record for one that is pending right now
        if self._pending is not None:
            signum, frame = self._pending
            self._pending = None
            previous(signum, frame)


_F = TypeVar("_F", bound=Callable[..., Any])


def uninterrupted(f: _F) -> _F:
    """Decorator: run ``f`` (an update or a state load) under :class:`deferred_interrupts`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupts():
            return f(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_THREADS = re.compile(r"\s*\+?\d+\s*")


def check_thread_env() -> None:
    """Warn when ``EMAFUSE_NUM_THREADS`` is not used as given: not a positive integer (the
    engine uses every available core instead) or above the cores available (capped)."""
    value = os.environ.get("EMAFUSE_NUM_THREADS")
    if value is None:
        return
    used = _native.num_threads()
    if not _THREADS.fullmatch(value) or int(value) <= 0:
        warnings.warn(
            f"EMAFUSE_NUM_THREADS={value!r} is not a positive integer; emafuse uses the {used} cores available",
            RuntimeWarning,
            stacklevel=3,
        )
    elif int(value) > used:
        warnings.warn(
            f"EMAFUSE_NUM_THREADS={value} is more than the {used} cores available to this process; emafuse uses {used} threads",
            RuntimeWarning,
            stacklevel=3,
        )


class _Joinable(Protocol):
    def join(self) -> None: ...


_pending: weakref.WeakSet[_Joinable] = weakref.WeakSet()


def track_pending(owner: _Joinable) -> None:
    """Register ``owner`` (whose ``join()`` completes its background update) to be joined at
    interpreter exit and before ``fork()``: the pending update is completed, never lost or left
    half-written in a child, and the background thread never outlives the interpreter."""
    _pending.add(owner)


def _join_pending() -> None:
    for owner in list(_pending):
        try:
            owner.join()
        except Exception as e:
            warnings.warn(f"emafuse: a background average update failed: {e}", RuntimeWarning, stacklevel=1)
    _pending.clear()


def _install() -> None:
    import atexit

    atexit.register(_join_pending)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_join_pending)


_install()
