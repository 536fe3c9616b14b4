"""emafuse's fused optimizers."""

from .adabelief import AdaBelief
from .adam import Adam, AdamW
from .adamod import AdaMod
from .adamomentum import AdaMomentum
from .ademamix import AdEMAMix
from .lion import Lion
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "AdEMAMix", "AdaBelief", "AdaMomentum", "Lion", "AdaMod"]
