"""emafuse: fused multi-tensor EMA-family optimizers and weight averaging for PyTorch.

Drop-in replacements for ``torch.optim.AdamW``, ``Adam`` and ``SGD``, and the EMA-family
optimizers of the research literature (AdEMAMix, AdaBelief, AdaMomentum, Adan, Lion, SPAM,
AdaMod, diffGrad, AdaBound/AdaBoundW, SGD-SaI, MoMo/MoMo-Adam, AdaHessian), whose whole step runs as one native (Rust) call over all
parameters of the optimizer; and model weight averaging (``emafuse.ModelEMA``,
``emafuse.averaging``; Lightning callbacks in ``emafuse.lightning``) updated the same way.
"""

from __future__ import annotations

import torch as _torch  # noqa: F401  (loads libtorch before the native module links against it)

from . import (
    _torch_release,  # noqa: F401  (checks the running torch; must run before _native loads)
    averaging,
    clipping,
    errors,
    optim,
)
from ._guard import check_thread_env as _check_thread_env
from ._native import num_threads
from .averaging import ModelEMA
from .clipping import AdaGC, ZClip
from .errors import (
    CudaError,
    DeviceError,
    DTypeError,
    EmafuseError,
    InternalError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    SparseGradError,
    UnsupportedOptionError,
)
from .optim import *  # noqa: F403  (every optimizer class, as listed in optim.__all__)

_check_thread_env()

__version__ = "0.1.0"

__all__ = [
    *optim.__all__,
    "AdaGC",
    "CudaError",
    "DTypeError",
    "DeviceError",
    "EmafuseError",
    "InternalError",
    "InvalidArgumentError",
    "ModelEMA",
    "NonFiniteError",
    "ShapeError",
    "SparseGradError",
    "UnsupportedOptionError",
    "ZClip",
    "averaging",
    "clipping",
    "errors",
    "num_threads",
]
