"""emafuse's fused optimizers."""

from .adabelief import AdaBelief
from .adabound import AdaBound, AdaBoundW
from .adafactor import Adafactor, AdafactorHF
from .adahessian import AdaHessian
from .adam import Adam, AdamW
from .adamod import AdaMod
from .adamomentum import AdaMomentum
from .adamp import AdamP
from .adan import Adan
from .ademamix import AdEMAMix
from .diffgrad import DiffGrad
from .lion import Lion
from .momo import Momo, MomoAdam
from .sgd import SGD
from .sgd_sai import SGDSaI
from .spam import SPAM
from .stable_spam import StableSPAM

__all__ = [
    "SGD",
    "SPAM",
    "AdEMAMix",
    "AdaBelief",
    "AdaBound",
    "AdaBoundW",
    "AdaHessian",
    "AdaMod",
    "AdaMomentum",
    "Adafactor",
    "AdafactorHF",
    "Adam",
    "AdamP",
    "AdamW",
    "Adan",
    "DiffGrad",
    "Lion",
    "Momo",
    "MomoAdam",
    "SGDSaI",
    "StableSPAM",
]
