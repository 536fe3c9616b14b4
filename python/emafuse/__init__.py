"""emafuse: fused multi-tensor EMA-family optimizers and weight averaging for PyTorch.

Drop-in replacements for ``torch.optim.AdamW``, ``Adam`` and ``SGD``, and the EMA-family
optimizers of the research literature (AdEMAMix, AdaBelief, AdaMomentum, Adan, Lion, SPAM,
AdaMod, diffGrad, AdaBound, SGD-SaI), whose whole step runs as one native (Rust) call over all
parameters of the optimizer; and model weight averaging (``emafuse.ModelEMA``,
``emafuse.averaging``; Lightning callbacks in ``emafuse.lightning``) updated the same way.
"""

from __future__ import annotations

import torch as _torch  # noqa: F401  (loads libtorch before the native module links against it)

from . import errors
from ._native import num_threads
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
from .optim import SGD, SPAM, AdaBelief, AdaBound, Adam, AdaMod, AdaMomentum, Adan, AdamW, AdEMAMix, DiffGrad, Lion, SGDSaI
from . import averaging
from .averaging import ModelEMA

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "Adam",
    "SGD",
    "AdEMAMix",
    "AdaBelief",
    "AdaMomentum",
    "Lion",
    "AdaMod",
    "Adan",
    "SPAM",
    "DiffGrad",
    "AdaBound",
    "SGDSaI",
    "ModelEMA",
    "averaging",
    "num_threads",
    "errors",
    "EmafuseError",
    "DTypeError",
    "DeviceError",
    "ShapeError",
    "SparseGradError",
    "NonFiniteError",
    "InvalidArgumentError",
    "UnsupportedOptionError",
    "CudaError",
    "InternalError",
]
