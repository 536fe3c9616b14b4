"""Model weight averaging, fused: EMA with schedules and presets, BEMA, Switch EMA, EDM2 power
EMA with post-hoc reconstruction, LAWA, SWA, and merges (SLERP, LITI, model soups).

Every update is one native call over all tensors of the model (spec ``averaging.md``).
"""

from . import schedules
from .methods import BEMA, LAWA, SWA, PostHocEMA, PowerEMA, SwitchEMA, TeacherEMA, solve_posthoc_coefficients
from .merge import greedy_soup, liti, slerp, uniform_soup, weighted_sum
from .model_ema import PRESETS, ModelEMA, preset_kwargs
from .schedules import scale_momentum, sigma_rel_to_gamma, gamma_to_sigma_rel

__all__ = [
    "ModelEMA",
    "PRESETS",
    "preset_kwargs",
    "BEMA",
    "SwitchEMA",
    "PowerEMA",
    "PostHocEMA",
    "solve_posthoc_coefficients",
    "LAWA",
    "SWA",
    "TeacherEMA",
    "slerp",
    "liti",
    "uniform_soup",
    "greedy_soup",
    "weighted_sum",
    "scale_momentum",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "schedules",
]
