"""emafuse's exceptions.

Every error raised by emafuse's native engine is an :class:`EmafuseError`. Each class also
derives from the built-in exception a PyTorch user would expect for that kind of mistake, so
``except TypeError`` / ``except ValueError`` / ``except RuntimeError`` keep working.

An error is raised before any tensor is written: a refused ``step()`` leaves parameters,
optimizer state and step counters exactly as they were.
"""

from __future__ import annotations

__all__ = [
    "CudaError",
    "DTypeError",
    "DeviceError",
    "EmafuseError",
    "InternalError",
    "InvalidArgumentError",
    "NonFiniteError",
    "ShapeError",
    "SparseGradError",
    "UnsupportedOptionError",
]


class EmafuseError(Exception):
    """Base class of all emafuse errors."""


class DTypeError(EmafuseError, TypeError):
    """A tensor has an unsupported dtype, or a dtype that does not match its parameter."""


class DeviceError(EmafuseError, RuntimeError):
    """A tensor is on an unsupported device, or on another device than its parameter."""


class ShapeError(EmafuseError, ValueError):
    """A gradient or state tensor's shape differs from its parameter's."""


class SparseGradError(EmafuseError, RuntimeError):
    """A gradient is sparse (or has another non-strided layout)."""


class NonFiniteError(EmafuseError, FloatingPointError):
    """A gradient holds NaN or infinity and the optimizer was built with ``check_finite=True``."""


class InvalidArgumentError(EmafuseError, ValueError):
    """A malformed argument reached the native engine (e.g. a corrupted state entry)."""


class UnsupportedOptionError(EmafuseError, NotImplementedError):
    """An option emafuse does not implement (e.g. ``differentiable=True``)."""


class CudaError(EmafuseError, RuntimeError):
    """The CUDA backend failed: no driver, a kernel that did not compile, a failed launch."""


class InternalError(EmafuseError, RuntimeError):
    """A bug in emafuse. Please report it with the message."""


class LayoutError(EmafuseError, ValueError):
    """Internal: tensors that cannot be walked linearly together. The optimizer answers this by
    staging contiguous copies; users do not see it."""
