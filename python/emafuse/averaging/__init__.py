"""Model weight averaging, fused: EMA with schedules and presets, BEMA, Switch EMA, EDM2 power
EMA with post-hoc reconstruction, LAWA, SWA, and merges (SLERP, LITI, model soups).

Every update is one native call over all tensors of the model (spec ``averaging.md``).

Vocabulary, the same on every class (``ModelEMA``, ``SwitchEMA``, ``SWA``, ``TeacherEMA``,
``BEMA``, ``PowerEMA``, ``PostHocEMA``, ``LAWA``):

==========================  ======================================================  ==========================================
name                        meaning                                                 old spellings (still accepted)
==========================  ======================================================  ==========================================
``update(model)``           account for one optimizer step, average if it is due
``module``                  property: the ``nn.Module`` holding the average
                            (multi-track ``PowerEMA``/``PostHocEMA``: the first
                            track; ``module_for(j)`` / ``modules`` the others)
``num_steps_seen``          calls of ``update`` observed (optimizer steps)          ``step`` (BEMA, LAWA), ``num_steps``
                                                                                    (PowerEMA)
``num_updates``             update events applied (calls that changed the           ``num_updates_applied`` (ModelEMA family),
                            average; LAWA: snapshots taken)                         ``count`` (LAWA)
``n_averaged``              torch ``AveragedModel`` / Lightning name: models in
                            the average (``num_updates``; LAWA: ``min(count, k)``)
``update_every``            period of update events, in steps                       ``update_freq`` (BEMA), ``every`` (LAWA)
``update_after_step``       burn-in: until this step an event copies the model      ``update_after`` (BEMA)
``start_step``              no update event before this step (ModelEMA, LAWA)
``swap(model)``             exchange model and average in place (fused swap)
``average_parameters``      context manager: the model holds the average inside
``copy_to`` / ``store`` /   write the average into the model / keep and write back
``restore``                 the model's own weights
==========================  ======================================================  ==========================================

Old spellings work as keyword arguments, as attributes (properties) and in checkpoints:
``load_state_dict`` reads state dicts written before the names were unified. One change is not
backward compatible: ``PowerEMA.module(track, model)`` was a method that also copied the live
buffers into the track; use ``module_for(track)`` (every track now takes the model's buffers at
each update).
"""

from . import schedules
from .bema import BEMA
from .ema_variants import SWA, SwitchEMA, TeacherEMA
from .lawa import LAWA
from .merge import greedy_soup, liti, slerp, uniform_soup, weighted_sum
from .model_ema import ModelEMA
from .power_ema import PostHocEMA, PowerEMA, solve_posthoc_coefficients
from .presets import PRESETS, preset_kwargs
from .schedules import gamma_to_sigma_rel, scale_momentum, sigma_rel_to_gamma

__all__ = [
    "BEMA",
    "LAWA",
    "PRESETS",
    "SWA",
    "ModelEMA",
    "PostHocEMA",
    "PowerEMA",
    "SwitchEMA",
    "TeacherEMA",
    "gamma_to_sigma_rel",
    "greedy_soup",
    "liti",
    "preset_kwargs",
    "scale_momentum",
    "schedules",
    "sigma_rel_to_gamma",
    "slerp",
    "solve_posthoc_coefficients",
    "uniform_soup",
    "weighted_sum",
]
