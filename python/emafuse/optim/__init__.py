"""emafuse's fused optimizers."""

from .adabound import AdaBound
from .adam import Adam, AdamW
from .adan import Adan
from .diffgrad import DiffGrad
from .sgd import SGD
from .sgd_sai import SGDSaI
from .spam import SPAM

__all__ = ["Adam", "AdamW", "SGD", "Adan", "SPAM", "DiffGrad", "AdaBound", "SGDSaI"]
