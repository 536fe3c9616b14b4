"""The host mirror of an offloaded average (spec ``averaging.md`` T.6): the model's tensors are
copied device-to-host on a side stream into pinned buffers, and the update that reads them runs
on a native background thread while training goes on; reads of the average join it first. A
pending update is also joined (completed) before ``fork()`` and at interpreter exit
(``emafuse._guard.track_pending``): a child process never sees a half-written average, and the
thread never outlives the interpreter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._guard import track_pending
from ._engine import Group, native_step, native_step_async

__all__ = ["HostMirror"]


class _Waiter:
    """A pending "update" that only waits for the copy (nothing to average this time)."""

    def __init__(self, f: Callable[[], Any]) -> None:
        self._f = f

    def wait(self) -> None:
        self._f()


class HostMirror:
    """Buffers on ``device`` (pinned host memory when it is the CPU and CUDA is present) mirroring
    a list of model tensors, and at most one pending update reading them.

    One round: :meth:`fill` copies the model's tensors in (asynchronously from CUDA, returning
    the wait for that copy), :meth:`run` starts the update on them (in the background or now),
    :meth:`join` waits for it and then runs its ``finish`` step. :meth:`wait_on_device` is an
    optimizer step pre-hook that makes the compute stream wait (on the GPU, without a host
    synchronisation) for the last copy before the optimizer changes the weights."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: list[Tensor] | None = None
        self._side_stream: Any = None
        self._copy_event: Any = None
        self._pending: Any = None
        self._finish: Callable[[], None] | None = None

    @property
    def busy(self) -> bool:
        """Whether an update is pending (started and not joined)."""
        return self._pending is not None

    def fill(self, tensors: Sequence[Tensor], dtypes: Sequence[torch.dtype], *, hold_compute: bool) -> tuple[list[Tensor], Callable[[], Any] | None]:
        """Copy ``tensors`` into the buffers (made at the first call, in ``dtypes``). From CUDA the
        copy is queued on a side stream after the work queued so far and the second result is the
        wait for it (None for a synchronous copy); ``hold_compute``: the compute stream waits for
        it right away, for callers without :meth:`wait_on_device` as an optimizer hook."""
        if self._bufs is None:
            pin = torch.cuda.is_available() and self.device.type == "cpu"
            self._bufs = [torch.empty(t.shape, dtype=d, device=self.device, pin_memory=pin) for t, d in zip(tensors, dtypes)]
        bufs = self._bufs
        src = tensors[0].device if tensors else self.device
        if src.type != "cuda":
            torch._foreach_copy_(bufs, list(tensors))
            return bufs, None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=src)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(src))
        with torch.cuda.stream(side):
            for b, t in zip(bufs, tensors):
                b.copy_(t, non_blocking=True)
                # The model tensor must outlive the copy (the caching allocator must not hand its
                # memory out before the side stream is done with it).
                t.record_stream(side)
        ev = torch.cuda.Event()
        ev.record(side)
        self._copy_event = ev
        if hold_compute:
            torch.cuda.current_stream(src).wait_event(ev)
        return bufs, ev.synchronize

    def run(self, who: str, rule: str, update: Group | None, wait_for: Callable[[], Any] | None, finish: Callable[[], None],
            *, background: bool) -> None:
        """Run ``update`` (which reads the buffers) once ``wait_for`` returned: on a native
        background thread when ``background``, else now. ``finish`` runs when the update is done
        (at :meth:`join` if it is pending)."""
        if update is not None and background:
            self._pending = native_step_async(who, rule, update, wait_for)
        elif update is not None:
            if wait_for is not None:
                wait_for()
            native_step(who, rule, update)
        elif wait_for is not None:
            self._pending = _Waiter(wait_for)
        if self._pending is None:
            finish()
        else:
            self._finish = finish
            track_pending(self)  # joined before fork() and at exit

    def join(self) -> None:
        """Wait for the pending update, then finish it."""
        p = self._pending
        if p is not None:
            self._pending = None
            p.wait()
            finish, self._finish = self._finish, None
            if finish is not None:
                finish()

    def wait_on_device(self, *args: Any, **kwargs: Any) -> None:
        """Optimizer step pre-hook: the current CUDA stream waits for the last copy."""
        ev = self._copy_event
        if ev is not None:
            torch.cuda.current_stream(ev.device if hasattr(ev, "device") else None).wait_event(ev)
            self._copy_event = None
