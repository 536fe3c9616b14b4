"""Keyword arguments of :class:`~emafuse.ModelEMA` that reproduce each reference tool (spec
``averaging.md`` A.2-A.8). Parity is tested against timm, ema-pytorch, torch-ema, ``swa_utils``
and Lightning; the NeMo and Keras presets follow the spec's description (A.7, A.8)."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_kwargs"]

#: Keyword arguments of :class:`~emafuse.ModelEMA` per reference tool; explicit keywords override them.
PRESETS: dict[str, dict[str, Any]] = {
    # timm ModelEmaV3 called as timm's train.py does (update(model, step=num_updates), 1-based):
    # copy while step <= update_after_step + 1, float entries lerped, everything else copied
    # (complex too: timm tests is_floating_point()).
    "timm_v3": dict(decay=0.9999, schedule="constant", buffers="average", non_float="copy", complex="copy"),
    # lucidrains ema-pytorch EMA: copy at the first call and while step <= update_after_step,
    # warm-up always on (decay computed in float32 as it does), every update_every calls,
    # non-float buffers never touched.
    "ema_pytorch": dict(
        decay=0.9999, schedule="warmup", update_after_step=100, update_every=10, inv_gamma=1.0, power=2 / 3,
        non_float="skip", _float32_decay=True,
    ),
    # torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay)), use_buffers=False:
    # first call copies, parameters lerped, every buffer copied.
    "torch_swa": dict(decay=0.999, schedule="constant", buffers="copy"),
    # torch-ema ExponentialMovingAverage(parameters, decay): no initial copy, TF num_updates cap,
    # E - (1-d)(E - theta), parameters only.
    "torch_ema": dict(schedule="tf_num_updates", first_update="average", formula="sub", buffers="skip"),
    # Lightning EMAWeightAveraging (AveragedModel + get_ema_avg_fn, use_buffers=True): first
    # update copies, d*E + (1-d)*theta for floats, integer buffers truncated.
    "lightning": dict(decay=0.999, schedule="constant", formula="muladd", buffers="average", non_float="truncate"),
    # NVIDIA NeMo EMA callback (EMAOptimizer): parameters only, E starts as the pre-step clone (no
    # initial copy), d*E + (1-d)*theta, every every_n_steps steps (steps 1, n+1, ...).
    "nemo": dict(decay=0.999, schedule="constant", first_update="average", formula="muladd", buffers="skip"),
    # Keras 3 use_ema: trainable variables only, momentum 0 at the first update (a copy),
    # m*E + (1-m)*theta afterwards.
    "keras": dict(decay=0.99, schedule="constant", formula="muladd", buffers="skip"),
    # BYOL/DINO-style teacher: parameters only, no initial copy (the teacher starts as the
    # student's initial weights), cosine momentum 0.996 -> 1.
    "teacher": dict(decay=0.996, schedule="cosine", final_decay=1.0, first_update="average", buffers="skip"),
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` (see :data:`PRESETS`)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
