"""The optimizer registry: one ``Entry`` per emafuse optimizer. Every concern test file
(test_spec_parity, test_official_parity, test_state_dict, test_amp, test_schedulers,
test_bad_input, test_signatures, test_torch_conventions, ...) is parametrised from ``ENTRIES``, so
adding an optimizer is one entry here plus its float64 reference in ``tests/references/<rule>.py``.

The pinned reference implementations (requirements/test.txt) are imported directly: a missing one
fails the collection instead of turning its comparisons into skips. Tests that compare against
them carry the ``official`` marker, and tests/conftest.py turns a skip of such a test into a
failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import adabelief_pytorch
import adabound
import adamod
import adamp
import emafuse
import lion_pytorch
import pytest
import pytorch_optimizer
import sgd_sai
import timm.optim
import torch
import transformers.optimization
from references.adabelief import RefAdaBelief
from references.adabound import RefAdaBound, RefAdaBoundW
from references.adafactor import RefAdafactor
from references.adafactor_hf import RefAdafactorHF
from references.adam import RefAdam, RefAdamW
from references.adamod import RefAdaMod
from references.adamomentum import RefAdaMomentum
from references.adamp import RefAdamP
from references.adan import RefAdan
from references.ademamix import RefAdEMAMix
from references.base import Reference
from references.diffgrad import RefDiffGrad
from references.lion import RefLion
from references.sgd import RefSGD
from references.sgd_sai import RefSGDSaI
from references.spam import RefSPAM
from references.stable_spam import RefStableSPAM


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what reference implementations print (adabelief-pytorch's notes, sgd_sai's banner)
    and warn (adamod's deprecated overloads)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the entry format -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A refused constructor call: ``kw`` raises ``exc`` whose message matches ``match``
    (``re.search``). ``official``: the official class raises the same type with the same message
    (False: a check the official lacks, or a message it words otherwise)."""

    kw: dict[str, Any]
    match: str
    exc: type[BaseException] = ValueError
    official: bool = True


@dataclass(frozen=True)
class Official:
    """An implementation to compare against: torch's own class, or the official package (or the
    stand-in the spec names where the official has no package).

    ``translate`` maps emafuse's keyword arguments to its own. ``maximize``: its own ``maximize``
    is used; otherwise ``maximize`` is dropped and the tests negate its gradients instead.
    ``applies``: the configurations it implements. Tolerances: ``rtol``/``atol`` for fp32
    trajectories of ``steps`` steps (``state_atol`` for the states), ``step_rtol`` for three steps
    over odd sizes, ``fp64_rtol`` for an fp64 trajectory. ``state_names``: our state names -> its
    names, compared after a trajectory (None: every state tensor under the same name).
    ``checkpoints``: directions in which checkpoints move and continue the same trajectory
    ("to_emafuse", "from_emafuse"). ``low_precision``: bf16/fp16 trajectories and mixed dtypes are
    compared too; ``complex``: complex parameters too."""

    name: str
    cls: type
    translate: Callable[[dict[str, Any]], dict[str, Any]] = dict
    applies: Callable[[dict[str, Any]], bool] = lambda kw: True
    steps: int = 60
    rtol: float = 1e-5
    atol: float = 1e-5
    state_atol: float = 1e-6
    step_rtol: float = 1e-6
    fp64_rtol: float = 1e-12
    state_names: Mapping[str, str] | None = None
    checkpoints: tuple[str, ...] = ("to_emafuse", "from_emafuse")
    low_precision: bool = False
    complex: bool = False
    maximize: bool = False

    def negates(self, kw: dict[str, Any]) -> bool:
        """Whether the test must hand it negated gradients for configuration ``kw``."""
        return bool(kw.get("maximize")) and not self.maximize

    def make(self, params, kw: dict[str, Any]) -> torch.optim.Optimizer:
        theirs = self.translate(dict(kw))
        if not self.maximize:
            theirs.pop("maximize", None)
        with quiet():
            return self.cls(params, **theirs)


def _same_dtype(dtype: torch.dtype, kw: dict[str, Any]) -> torch.dtype:
    return dtype


@dataclass(frozen=True)
class Caps:
    """What an optimizer keeps and supports, which decides the concerns that apply.

    ``complex``: complex parameters are updated as real views (else refused with DTypeError).
    ``scalar_state``: per-parameter 0-dim CPU state entries and their dtype. ``group_counters``:
    param-group keys a step advances. ``optimizer_counters``: optimizer-wide counters (kept, equal, in
    every param group). ``sparse_grads``: sparse gradients are stepped (as torch's SGD does), not
    refused.
    ``rounded_scalars``: scalar state taken from per-tensor sums over values the rule computes in
    the compute type (fp32 for 16-bit and fp32 parameters), so exact to its round-off only.
    ``state_dtype(param dtype, kwargs)``: the dtype of the state tensors. ``int_step_in_state_dict``:
    ``state_dict()`` stores ``step`` as a Python int (as the official does). ``torch_base``: the
    torch.optim class it replaces (and subclasses)."""

    complex: bool = False
    scalar_state: Mapping[str, torch.dtype] = field(default_factory=lambda: {"step": torch.float32})
    rounded_scalars: tuple[str, ...] = ()
    group_counters: tuple[str, ...] = ()
    optimizer_counters: tuple[str, ...] = ()
    sparse_grads: bool = False
    state_dtype: Callable[[torch.dtype, dict[str, Any]], torch.dtype] = _same_dtype
    int_step_in_state_dict: bool = False
    torch_base: type | None = None


@dataclass(frozen=True)
class Entry:
    """One emafuse optimizer.

    ``configs``: constructor keyword arguments reaching every option; each is compared with the
    officials that implement it (``Official.applies``), and the ones none implements with the
    float64 reference alone (a comment says why). ``main``: the one configuration the
    one-per-optimizer concerns use (AMP, state dict, conventions); it reaches most of the rule.
    ``signature``: the official class whose constructor ours repeats (names, defaults, kinds), or,
    where no package ships it, the positional parameters after ``params`` with their defaults as
    the spec lists them; ``signature_differences``: parameters of that class ours does not take
    the same way (and why). ``group_options``: options a param group overrides in the param-group
    test. ``low_precision``: keyword arguments merged in for bf16/fp16 runs (and why);
    ``low_precision_atol(kw)``: extra absolute tolerance of one bf16/fp16 step (and why)."""

    cls: type
    reference: type[Reference]
    configs: tuple[dict[str, Any], ...]
    main: dict[str, Any]
    caps: Caps
    signature: type | Mapping[str, Any]
    officials: tuple[Official, ...] = ()
    bad_args: tuple[Bad, ...] = ()
    signature_differences: Mapping[str, str] = field(default_factory=dict)
    group_options: Mapping[str, Any] = field(default_factory=dict)
    low_precision: Mapping[str, Any] = field(default_factory=dict)
    low_precision_atol: Callable[[dict[str, Any]], float] = lambda kw: 0.0

    @property
    def name(self) -> str:
        return self.cls.__name__

    def officials_for(self, kw: dict[str, Any]) -> list[Official]:
        # ⊥Grad is compared with pytorch_optimizer's wrapper in test_orthograd.py (its one-element
        # tensors differ by decision), not through the officials.
        return [o for o in self.officials if o.applies(kw) and not kw.get("orthograd")]

    @property
    def takes_orthograd(self) -> bool:
        return "orthograd" in inspect.signature(self.cls).parameters


# -- shared pieces ---------------------------------------------------------------------------------


def _no_caution(kw: dict[str, Any]) -> bool:
    return not kw.get("caution")


def _torch(cls: type, low_precision: bool = True) -> tuple[Official, Official]:
    """torch's class, as its two CPU implementations (single-tensor and fused)."""
    return (
        Official(f"{cls.__name__}-foreach_false", cls, lambda kw: {**kw, "foreach": False}, _no_caution, steps=120,
                 complex=True, maximize=True),
        # fused: no complex parameters; checkpoints: the single-tensor one covers the format
        Official(f"{cls.__name__}-fused", cls, lambda kw: {**kw, "fused": True}, _no_caution, steps=120,
                 low_precision=low_precision, checkpoints=(), maximize=True),
    )


# C-AdamW: timm's AdamWLegacy(caution=True) (the "mean" normalisation)
_TIMM_CAUTIOUS_ADAMW = Official(
    "timm-AdamWLegacy-caution", timm.optim.AdamWLegacy, lambda kw: {**kw, "foreach": False},
    lambda kw: kw.get("caution", False) and kw.get("caution_norm", "mean") == "mean", maximize=True, complex=True,
)


_ADAM_BAD = (
    Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
    Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
    Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
    Bad(dict(betas=(0.9, -0.1)), r"^Invalid beta parameter at index 1: -0.1$"),
    Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
    Bad(dict(betas=(0.9, torch.tensor(0.9))), r"^betas must be either both floats or both Tensors$"),
    Bad(dict(lr=torch.tensor([1.0, 2.0])), r"^Tensor lr must be 1-element$"),
    Bad(dict(lr=float("nan")), r"^Invalid learning rate: nan$"),
    Bad(dict(fused=True, foreach=True), r"^`fused` and `foreach` cannot be `True` together.$", RuntimeError),
    # torch differentiates through its own step; emafuse's native step cannot be.
    Bad(dict(differentiable=True), "differentiable=True is not supported", emafuse.UnsupportedOptionError, official=False),
)
_ADAM_CONFIGS = (
    dict(),
    dict(weight_decay=0.1),
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=0.05, maximize=True),
    dict(maximize=True, betas=(0.8, 0.95), eps=1e-6),
    dict(betas=(0.6, 0.9), lr=3e-2),  # 1 - beta1 >= 0.5: the other torch.lerp form
    dict(caution=True, weight_decay=0.1),
    dict(caution=True, caution_norm="count", amsgrad=True, maximize=True),
)
# Stable-SPAM with momentum resets and the cosine factor within a few steps.
STABLE_SPAM_FAST = dict(update_proj_gap=4, total_T=12, eta_min=0.3)


def _stable_spam_official(kw: dict[str, Any]) -> dict[str, Any]:
    theirs = {k: v for k, v in kw.items() if k not in ("gamma3", "update_proj_gap", "reset_mode")}
    return {**theirs, "theta": kw.get("gamma3", 0.999), "update_proj_gap": kw.get("update_proj_gap") or 10**9, "foreach": False}


def _stable_spam_applies(kw: dict[str, Any]) -> bool:
    gap = kw.get("update_proj_gap", 1000)
    return not (kw.get("amsgrad") or kw.get("caution") or kw.get("total_T")) and (gap == 0 or gap > 120)


# Small SPAM periods so that resets, warm-up and spike clipping all happen within a few steps.
SPAM_FAST = dict(warmup_steps=3, DeltaT=5, grad_accu_steps=2, threshold=50)


def _ademamix_state_dtype(dtype: torch.dtype, kw: dict[str, Any]) -> torch.dtype:
    low = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and kw.get("fp32_states", True) else dtype


def _adabelief_state_dtype(dtype: torch.dtype, kw: dict[str, Any]) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype  # as adabelief-pytorch 0.2.1


def _relative_step(kw: dict[str, Any]) -> bool:
    return kw.get("relative_step", True)  # transformers' Adafactor


def _upcast_state_dtype(dtype: torch.dtype, kw: dict[str, Any]) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # transformers' Adafactor


def _lion_official(kw: dict[str, Any]) -> dict[str, Any]:
    if kw.pop("lr_independent_decay", False) or kw.get("decoupled_weight_decay"):
        kw["decoupled_weight_decay"] = True  # lion-pytorch's name for it
    return kw


def _adan_official(kw: dict[str, Any]) -> dict[str, Any]:
    kw["weight_decouple"] = kw.pop("no_prox", False)  # pytorch_optimizer's name for it
    return {**kw, "foreach": False}


_ADABOUND_BAD = (
    Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
    Bad(dict(lr=0.0), r"^Invalid learning rate: 0.0 \(AdaBound divides", official=False),  # extra check
    Bad(dict(gamma=0.0), r"^Invalid gamma parameter: 0.0 \(the upper bound divides", official=False),  # extra
    Bad(dict(gamma=1.0), r"^Invalid gamma parameter: 1.0$"),
    Bad(dict(final_lr=-1.0), r"^Invalid final learning rate: -1.0$"),
    Bad(dict(betas=(0.9, 1.5)), r"^Invalid beta parameter at index 1: 1.5$"),
    Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
    Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0$", official=False),  # extra check
)


# -- the registry ----------------------------------------------------------------------------------

_ENTRIES: tuple[Entry, ...] = (
    Entry(
        emafuse.AdamW, RefAdamW,
        configs=_ADAM_CONFIGS,
        main=dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
        caps=Caps(complex=True, torch_base=torch.optim.AdamW),
        signature=torch.optim.AdamW,
        officials=(*_torch(torch.optim.AdamW), _TIMM_CAUTIOUS_ADAMW),
        bad_args=_ADAM_BAD,
        group_options=dict(lr=1e-1, weight_decay=0.0, amsgrad=True),
    ),
    Entry(
        emafuse.Adam, RefAdam,
        configs=_ADAM_CONFIGS + (dict(weight_decay=0.1, decoupled_weight_decay=True),),
        main=dict(lr=1e-2, weight_decay=0.1),
        caps=Caps(complex=True, torch_base=torch.optim.Adam),
        signature=torch.optim.Adam,
        officials=_torch(torch.optim.Adam),
        bad_args=_ADAM_BAD,
        group_options=dict(lr=1e-1, weight_decay=0.0, amsgrad=True),
    ),
    Entry(
        emafuse.SGD, RefSGD,
        configs=tuple(dict(lr=1e-2, **kw) for kw in (
            dict(),
            dict(momentum=0.9),
            dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
            dict(momentum=0.9, nesterov=True, weight_decay=0.02),
            dict(momentum=0.5, maximize=True),
            dict(weight_decay=0.1, maximize=True),
            dict(momentum=0.9, weight_decay=0.01, caution=True),
            dict(momentum=0.9, nesterov=True, caution=True, caution_norm="count", maximize=True),
        )),
        main=dict(lr=1e-2, momentum=0.9, nesterov=True),
        caps=Caps(complex=True, scalar_state={}, torch_base=torch.optim.SGD, sparse_grads=True),
        signature=torch.optim.SGD,
        # torch 2.11's fused CPU SGD drifts from the f64 reference in bf16 (by ~10 after 20 steps with
        # spikes, where its single-tensor path stays at ~0.1): no low-precision reference.
        officials=_torch(torch.optim.SGD, low_precision=False),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(momentum=-0.5), r"^Invalid momentum value: -0.5$"),
            Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0$"),
            Bad(dict(nesterov=True), r"^Nesterov momentum requires a momentum and zero dampening$"),
            Bad(dict(nesterov=True, momentum=0.9, dampening=0.1), r"^Nesterov momentum requires a momentum and zero dampening$"),
            Bad(dict(lr=torch.tensor([1.0, 2.0])), r"^Tensor lr must be 1-element$"),
            Bad(dict(fused=True, foreach=True), r"^`fused` and `foreach` cannot be `True` together.$", RuntimeError),
            Bad(dict(differentiable=True), "differentiable=True is not supported", emafuse.UnsupportedOptionError, official=False),
        ),
        group_options=dict(lr=1e-1, momentum=0.5, nesterov=False, dampening=0.2),
    ),
    Entry(
        emafuse.Adan, RefAdan,
        configs=(
            dict(),
            dict(lr=1e-2, weight_decay=0.05),
            dict(lr=1e-2, weight_decay=0.05, no_prox=True, betas=(0.9, 0.8, 0.95)),
            dict(lr=1e-2, max_grad_norm=0.5, weight_decay=0.02),
            dict(lr=1e-2, maximize=True, eps=1e-3),
            dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5, caution=True),
            dict(lr=1e-2, no_prox=True, weight_decay=0.02, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-2, max_grad_norm=1.0, weight_decay=0.01),
        # With caution, from bf16/fp16 state the direction of an element can cancel to 0 or flip
        # sign within round-off (the mask flips): such an element moves by up to the masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        caps=Caps(scalar_state={}, group_counters=("step",)),
        # sail-sg/Adan (spec §7 (b)) has no package.
        signature=dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, max_grad_norm=0.0, no_prox=False,
                       foreach=True, fused=False),
        # pytorch_optimizer 4.1.0 equals the official sail-sg/Adan (spec §7 (g)), which has no package,
        # except that it accumulates the global gradient norm in float32 (fp64_rtol) and that its
        # maximize disagrees with negating the gradient (spec 2.2; the tests negate the gradients
        # instead). It keeps +g_prev as
        # "previous_grad" (ours: -g_prev as "neg_pre_grad"); exp_avg_diff, an EMA of gradient
        # differences, carries more round-off (state_atol). Its checkpoints are not the official's.
        officials=(Official("pytorch_optimizer.Adan", pytorch_optimizer.Adan, _adan_official, _no_caution, steps=20, state_atol=1e-5,
                            fp64_rtol=1e-6,
                            state_names=dict(exp_avg="exp_avg", exp_avg_sq="exp_avg_sq", exp_avg_diff="exp_avg_diff"),
                            checkpoints=()),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, 0.9, -0.1)), r"^Invalid beta parameter at index 2: -0.1$"),
            Bad(dict(max_grad_norm=-1.0), r"^Invalid Max grad norm: -1.0$"),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
            Bad(dict(lr=float("nan")), r"^Invalid learning rate: nan$"),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, no_prox=True),
    ),
    Entry(
        emafuse.SPAM, RefSPAM,
        configs=(
            dict(),
            dict(lr=1e-2, weight_decay=0.1, **SPAM_FAST),
            dict(lr=1e-2, correct_bias=False, maximize=True, **SPAM_FAST),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, **{**SPAM_FAST, "threshold": 0, "warmup_steps": 8}),
            dict(lr=1e-2, weight_decay=0.1, caution=True, **SPAM_FAST),
            dict(lr=1e-2, caution=True, caution_norm="count", maximize=True, **SPAM_FAST),
        ),  # no official: TianjinYellow/SPAM (galore_torch/SPAM.py) has no package; f64 reference only
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        main=dict(lr=1e-2, weight_decay=0.01, **SPAM_FAST),
        caps=Caps(optimizer_counters=("total_step", "current_step")),
        signature=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, warmup_steps=150,
                       threshold=5000, DeltaT=500, grad_accu_steps=20),  # spec §10 (b)
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0 - should be >= 0.0$"),
            Bad(dict(betas=(0.9, 1.0)), r"^Invalid beta parameter: 1.0 - should be in \[0.0, 1.0\)$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0 - should be >= 0.0$"),
            Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0 - should be >= 0.0$"),
            Bad(dict(DeltaT=0), r"^Invalid DeltaT: 0 - should be >= 1$"),
            Bad(dict(warmup_steps=-1), r"^Invalid warmup_steps: -1 - should be >= 0$"),
            Bad(dict(threshold=-1), r"^Invalid threshold: -1 - should be >= 0$"),
            Bad(dict(grad_accu_steps=-1), r"^Invalid grad_accu_steps: -1 - should be >= 0$"),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, correct_bias=False),
    ),
    Entry(
        emafuse.StableSPAM, RefStableSPAM,
        configs=(
            dict(),
            dict(lr=1e-2, weight_decay=0.1, gamma1=-1, gamma3=0.9),
            dict(lr=1e-2, amsgrad=True, maximize=True, **STABLE_SPAM_FAST),
            dict(lr=1e-2, weight_decay=0.05, reset_mode="clean", gamma2=0.99, **STABLE_SPAM_FAST),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, update_proj_gap=0, total_T=30, eta_min=0.2),
            dict(lr=1e-2, weight_decay=0.1, caution=True, **STABLE_SPAM_FAST),
            dict(lr=1e-2, caution=True, caution_norm="count", maximize=True),
        ),  # the official (galore_torch/stablespam.py) has no package; pytorch_optimizer stands in where it agrees
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,  # as SPAM's
        main=dict(lr=1e-2, weight_decay=0.01, **{**STABLE_SPAM_FAST, "update_proj_gap": 5}),  # the first reset after step 4
        caps=Caps(scalar_state={"step": torch.float32, "m_max_t": torch.float64, "m_norm_t": torch.float64, "v_norm_t": torch.float64},
                  rounded_scalars=("m_norm_t", "v_norm_t"), optimizer_counters=("total_steps",), int_step_in_state_dict=True),
        signature=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, gamma1=0.7, gamma2=0.9, gamma3=0.999,
                       total_T=None, eta_min=0.5, update_proj_gap=1000),  # spec §11 (b)
        # pytorch_optimizer 4.1.0 implements the official rule while no momentum reset falls within
        # the run (it counts bias corrections with its own group step and resets otherwise, spec
        # §11 (g)) and without total_T (its cosine factor runs one step ahead of the official's).
        # It keeps the norms in the gradient's dtype and sums them in float32 (fp64_rtol); its
        # group-level step makes its checkpoints another format.
        officials=(Official("pytorch_optimizer.StableSPAM", pytorch_optimizer.StableSPAM, _stable_spam_official, _stable_spam_applies,
                            maximize=True, fp64_rtol=1e-9, checkpoints=()),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, -0.1)), r"^Invalid beta parameter at index 1: -0.1$"),
            Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0$", official=False),
            Bad(dict(gamma1=1.0), r"^Invalid gamma1: 1.0 ", official=False),
            Bad(dict(gamma2=-0.5), r"^Invalid gamma2: -0.5 ", official=False),
            Bad(dict(gamma3=1.0), r"^Invalid gamma3: 1.0 ", official=False),
            Bad(dict(total_T=0), r"^Invalid total_T: 0 ", official=False),
            Bad(dict(eta_min=1.5), r"^Invalid eta_min: 1.5 ", official=False),
            Bad(dict(update_proj_gap=-1), r"^Invalid update_proj_gap: -1 ", official=False),
            Bad(dict(reset_mode="zero"), r"^Invalid reset_mode: 'zero' ", official=False),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, amsgrad=True),
    ),
    Entry(
        emafuse.AdamP, RefAdamP,
        configs=(
            dict(),
            # delta 10: every tensor of 2+ dims projects per channel; 1.5 and 1: some per channel,
            # some over the whole layer, some not at all (cos·sqrt(L) of random data is about |N(0, 1)|)
            dict(lr=1e-2, weight_decay=0.1, delta=10.0),
            dict(lr=1e-2, weight_decay=0.1, nesterov=True, delta=1.5),
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, wd_ratio=0.5, delta=1.0, maximize=True),
        ),
        main=dict(lr=1e-2, weight_decay=0.1, delta=1.5),
        caps=Caps(int_step_in_state_dict=True),
        signature=adamp.AdamP,
        officials=(Official("adamp", adamp.AdamP),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$", official=False),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$", official=False),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$", official=False),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$", official=False),
            Bad(dict(delta=-0.1), r"^Invalid delta: -0.1 ", official=False),
            Bad(dict(wd_ratio=1.5), r"^Invalid wd_ratio: 1.5 ", official=False),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, nesterov=True),
    ),
    Entry(
        emafuse.Adafactor, RefAdafactor,
        configs=(
            dict(),
            dict(weight_decay=0.1),
            dict(lr=0.5, eps=(1e-30, 1e-3), d=2.0),  # the spec's checked settings: tiny ε1, update clipping at 2
            dict(lr=3e-2, beta2_decay=-0.5, eps=(1e-6, 1e-2), weight_decay=0.05, maximize=True),
        ),
        # a fixed ε1 in the one-per-optimizer concerns: its default follows the parameters' dtype
        # (torch's), which the lockstep tests of bf16 weights against fp32 ones would otherwise see
        main=dict(lr=1e-2, weight_decay=0.1, eps=(1e-7, 1e-3)),
        # The factors are stored, and read back, in the 16-bit state dtype (as torch's): V̂ carries
        # their rounding (2^-8), each element's step a 2^-9 part of its size (lr·max(ε2, RMS p)·|U|,
        # |U| up to a few units).
        low_precision_atol=lambda kw: 2.0**-5 * kw.get("lr", 1e-2),
        caps=Caps(torch_base=torch.optim.Adafactor),
        signature=torch.optim.Adafactor,
        # torch's single-tensor path (foreach is used only when asked). It computes in the
        # parameter's dtype (no low-precision comparison: bf16 norms and products there, f32 here).
        officials=(Official("torch.Adafactor", torch.optim.Adafactor, lambda kw: {**kw, "foreach": False}, maximize=True),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Learning rate should be >= 0 but is: -1.0$"),
            Bad(dict(beta2_decay=0.5), r"^beta2_decay should be <= 0 but is: 0.5$"),
            Bad(dict(eps=(-1.0, 1e-3)), r"^epsilon1 should be >= 0 but is: -1.0$"),
            Bad(dict(eps=(None, -1.0)), r"^epsilon2 should be >= 0 but is: -1.0$"),
            Bad(dict(d=0.5), r"^Clipping threshold d should be >= 1 but is: 0.5$"),
            Bad(dict(weight_decay=-0.1), r"^weight_decay should be >= 0 but is: -0.1$"),
            Bad(dict(lr=torch.tensor([1.0, 2.0])), r"^Tensor lr must be 1-element$"),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, d=2.0),
    ),
    Entry(
        emafuse.AdafactorHF, RefAdafactorHF,
        configs=(
            dict(),  # relative step sizes scaled by RMS(p), no first moment
            dict(beta1=0.9, weight_decay=0.1),
            # T5's fine-tuning recipe: a fixed step size, no scaling; with a large ε1 and clipping at 2
            dict(lr=1e-2, relative_step=False, scale_parameter=False, eps=(1e-3, 1e-3), clip_threshold=2.0),
            dict(warmup_init=True, beta1=0.5, decay_rate=-0.5, weight_decay=0.05, maximize=True),
            dict(lr=3e-2, relative_step=False, eps=(1e-30, 1e-2), weight_decay=0.01),
        ),
        # a fixed step size, which LR schedulers and tensor lrs act on (relative steps ignore lr)
        main=dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1),
        # 16-bit parameters: float32 state and arithmetic, as transformers', rounded once per step
        low_precision_atol=lambda kw: 2.0**-9,
        caps=Caps(scalar_state={"step": torch.float32, "RMS": torch.float64}, rounded_scalars=("RMS",), state_dtype=_upcast_state_dtype,
                  int_step_in_state_dict=True),
        signature=transformers.optimization.Adafactor,
        # transformers reduces in float32 (the row and column means, RMS(p), RMS(U))
        # (relative steps ignore lr, which the checkpoint test's LR scheduler drives: their
        # checkpoints, of the same format, move in the fixed-step configurations)
        officials=(Official("transformers.Adafactor", transformers.optimization.Adafactor, applies=_relative_step, low_precision=True, checkpoints=()),
                   Official("transformers.Adafactor-fixed_lr", transformers.optimization.Adafactor, applies=lambda kw: not _relative_step(kw),
                            low_precision=True)),
        bad_args=(
            Bad(dict(lr=1e-3), r"^Cannot combine manual `lr` and `relative_step=True` options$"),
            Bad(dict(lr=1e-3, relative_step=False, warmup_init=True), r"^`warmup_init=True` requires `relative_step=True`$"),
            Bad(dict(relative_step=False), r"^relative_step=False needs a step size", official=False),
            # checks transformers lacks (it runs any number)
            Bad(dict(lr=-1.0, relative_step=False), r"^Invalid learning rate: -1.0$", official=False),
            Bad(dict(eps=(-1.0, 1e-3)), r"^Invalid epsilon value at index 0: -1.0$", official=False),
            Bad(dict(clip_threshold=0.0), r"^Invalid clip_threshold: 0.0 ", official=False),
            Bad(dict(decay_rate=0.5), r"^Invalid decay_rate: 0.5 ", official=False),
            Bad(dict(beta1=1.0), r"^Invalid beta1: 1.0 ", official=False),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$", official=False),
        ),
        # a fixed step size in one group, relative ones in the others (which ignore lr)
        group_options=dict(lr=3e-2, relative_step=False, beta1=0.5, weight_decay=0.0, clip_threshold=2.0),
    ),
    Entry(
        emafuse.DiffGrad, RefDiffGrad,
        configs=(
            dict(),
            dict(lr=1e-2, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6),
            dict(lr=1e-2, maximize=True),
            dict(lr=1e-2, weight_decay=0.01, caution=True),
            dict(lr=1e-2, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-2, weight_decay=0.01),
        caps=Caps(),
        signature=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0),  # diffGrad_v2.py, spec §13 (b)
        # pytorch_optimizer 4.1.0 matches diffGrad_v2 (spec §13 (g)), which has no package, with L2
        # decay, except that it adds 1e-15 to v under the square root: ~2e-6 absolute for gradients
        # of ~1e-5 at step 1, relatively 2.5e-4 for the smallest of 278011 (step_rtol, fp64_rtol).
        # Its checkpoints are not the official's format.
        officials=(Official("pytorch_optimizer.DiffGrad", pytorch_optimizer.DiffGrad,
                            lambda kw: {**kw, "weight_decouple": False, "foreach": False}, _no_caution, steps=20, step_rtol=3e-4,
                            fp64_rtol=1e-8, checkpoints=()),),
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(-0.1, 0.9)), r"^Invalid beta parameter at index 0: -0.1$"),
            Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0$"),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, betas=(0.8, 0.99)),
    ),
    Entry(
        emafuse.AdaBound, RefAdaBound,
        configs=(
            dict(),
            dict(lr=1e-2, amsbound=True, weight_decay=0.01),
            dict(lr=1e-2, gamma=0.1, final_lr=0.05, betas=(0.8, 0.99), eps=1e-6, maximize=True),
            dict(lr=1e-2, weight_decay=0.01, caution=True),
            dict(lr=1e-2, amsbound=True, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-2, amsbound=True),
        caps=Caps(),
        signature=adabound.AdaBound,
        officials=(Official("adabound", adabound.AdaBound, dict, _no_caution, steps=20),),
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        bad_args=_ADABOUND_BAD,
        group_options=dict(lr=1e-1, final_lr=0.05, amsbound=False),
    ),
    Entry(
        emafuse.AdaBoundW, RefAdaBoundW,
        configs=(
            dict(lr=1e-2, weight_decay=0.01),
            dict(lr=1e-2, amsbound=True, weight_decay=0.05, maximize=True),
            dict(lr=1e-2, gamma=0.1, final_lr=0.05, betas=(0.8, 0.99), eps=1e-6),
            dict(lr=1e-2, weight_decay=0.01, caution=True, caution_norm="count"),
        ),
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        main=dict(lr=1e-2, amsbound=True, weight_decay=0.01),
        caps=Caps(),
        # Luolc/AdaBound's AdaBoundW (spec §14) is not in the adabound package; its constructor is
        # AdaBound's.
        signature=dict(lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0, amsbound=False),
        # pytorch_optimizer 4.1.0's AdaBound with weight_decouple and fixed_decay computes the same
        # update (it scales p by 1 - wd before the step instead of subtracting wd·p_old after it: to
        # round-off). Its AdaBound differs from the official one (exp_avg by lerp, among others): by
        # up to 8e-9 relatively over the 50 fp64 steps of the trajectory test, measured without
        # AdaBoundW's decay (fp64_rtol). Its step counter is per group; its checkpoints are not the
        # official's format.
        officials=(Official("pytorch_optimizer.AdaBound", pytorch_optimizer.AdaBound, applies=_no_caution, translate=
                            lambda kw: {**{k: v for k, v in kw.items() if k != "amsbound"}, "ams_bound": kw.get("amsbound", False),
                                        "weight_decouple": True, "fixed_decay": True, "foreach": False},
                            steps=20, fp64_rtol=2e-8, state_names=dict(exp_avg="exp_avg", exp_avg_sq="exp_avg_sq"),
                            checkpoints=()),),
        bad_args=_ADABOUND_BAD,
        group_options=dict(lr=1e-1, final_lr=0.05, amsbound=False, weight_decay=0.0),
    ),
    Entry(
        emafuse.SGDSaI, RefSGDSaI,
        configs=(
            dict(),
            dict(lr=1e-3, momentum=0.0, weight_decay=0.0),
            dict(lr=1e-3, momentum=0.5, weight_decay=0.1, eps=1e-3, maximize=True),
            dict(lr=1e-3, caution=True),
            dict(lr=1e-3, momentum=0.0, weight_decay=0.0, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-3),
        caps=Caps(scalar_state={"gsnr": torch.float64}),
        signature=sgd_sai.SGD_sai,
        # The official crashes with momentum = 0 (spec §17); it sums gsnr's norm and std in float32
        # (~1e-5 relative on 278011 elements, step_rtol); it recomputes gsnr from the current batch
        # after every reload, so its continuation of our checkpoint is another trajectory.
        officials=(Official("sgd_sai", sgd_sai.SGD_sai, applies=lambda kw: kw.get("momentum", 0.9) != 0 and not kw.get("caution"), steps=20,
                            step_rtol=1e-5, checkpoints=("to_emafuse",)),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(momentum=1.0), r"^Invalid momentum parameter value: 1.0$"),
            Bad(dict(momentum=-0.1), r"^Invalid momentum parameter value: -0.1$"),
            Bad(dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1.0$"),
        ),
        group_options=dict(lr=1e-2, momentum=0.5, weight_decay=0.0),
        low_precision=dict(eps=1e-2),  # keeps gsnr (and fp16 parameters) of one-element tensors finite
    ),
    Entry(
        emafuse.AdaBelief, RefAdaBelief,
        configs=(
            dict(lr=1e-2),  # rectified, SGD fallback for 5 steps (official defaults)
            dict(lr=1e-2, degenerated_to_sgd=False, weight_decay=0.1),
            dict(lr=1e-2, amsgrad=True, fixed_decay=True, weight_decay=0.01),
            dict(lr=1e-2, rectify=False, eps=1e-12),
            dict(lr=1e-2, rectify=False, amsgrad=True, weight_decouple=False, weight_decay=0.1, maximize=True),
            dict(lr=1e-2, weight_decouple=False, weight_decay=0.05, betas=(0.8, 0.99)),
            dict(lr=1e-2, weight_decay=0.1, caution=True),  # rectified, SGD fallback masked too
            dict(lr=1e-2, rectify=False, weight_decouple=False, weight_decay=0.05, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
        caps=Caps(state_dtype=_adabelief_state_dtype, int_step_in_state_dict=True),
        signature=adabelief_pytorch.AdaBelief,
        officials=(Official("adabelief_pytorch", adabelief_pytorch.AdaBelief,
                            lambda kw: {**kw, "print_change_log": False}, _no_caution),),
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, -0.1)), r"^Invalid beta parameter at index 1: -0.1$"),
            Bad(dict(lr=float("nan")), r"^Invalid learning rate: nan$"),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$", official=False),  # extra check
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, rectify=False, amsgrad=False),
    ),
    Entry(
        emafuse.AdEMAMix, RefAdEMAMix,
        configs=(
            dict(lr=1e-2),
            dict(lr=1e-2, alpha=5.0, weight_decay=0.1, betas=(0.9, 0.99, 0.999), eps=1e-6),
            dict(lr=1e-2, alpha=8.0, alpha_warmup=10, beta3_warmup=15, weight_decay=0.1, maximize=True),
            dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), t_alpha_beta3=12),
            dict(lr=1e-2, betas=(0.0, 0.99, 0.999)),
            dict(lr=1e-2, weight_decay=0.1, fp32_states=False),
            dict(lr=1e-2, alpha=5.0, weight_decay=0.1, caution=True, caution_norm="count"),
            dict(lr=1e-2, alpha=8.0, alpha_warmup=10, beta3_warmup=15, caution=True, maximize=True),
            dict(lr=1e-2, betas=(0.0, 0.99, 0.999), caution=True),
        ),
        main=dict(lr=1e-2, alpha=5.0, alpha_warmup=6, beta3_warmup=8, weight_decay=0.1),
        caps=Caps(state_dtype=_ademamix_state_dtype, int_step_in_state_dict=True),
        signature=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None, eps=1e-8,
                       weight_decay=0),  # apple/ml-ademamix, spec §6 (b)
        # The official (apple/ml-ademamix) has no package; pytorch_optimizer 4.1.0 agrees with it only
        # without warm-ups and with beta1 > 0 (its warm-up schedule and beta1 = 0 differ, spec §6 (g)):
        # those configurations are tested against the f64 reference only. It calls the fast EMA
        # "exp_avg"; its checkpoints are not the official's format.
        # Its cautious=True is the "count" normalisation.
        officials=(Official("pytorch_optimizer.AdEMAMix", pytorch_optimizer.AdEMAMix,
                            lambda kw: {"alpha": 2.0, **{k: v for k, v in kw.items() if k not in ("fp32_states", "caution", "caution_norm")},
                                        "weight_decouple": True, "cautious": kw.get("caution", False)},
                            applies=lambda kw: kw.get("betas", (0.9,))[0] != 0
                            and not any(kw.get(k) for k in ("alpha_warmup", "beta3_warmup", "t_alpha_beta3"))
                            and (not kw.get("caution") or kw.get("caution_norm") == "count"),
                            state_names=dict(exp_avg_fast="exp_avg", exp_avg_slow="exp_avg_slow", exp_avg_sq="exp_avg_sq"),
                            checkpoints=()),),
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, 1.5, 0.9)), r"^Invalid beta parameter at index 1: 1.5$"),
            Bad(dict(betas=(0.9, 0.9, 1.0)), r"^Invalid beta parameter at index 2: 1.0$"),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
            Bad(dict(alpha=-1.0), r"^Invalid alpha value: -1.0$"),
            Bad(dict(alpha=float("nan")), r"^Invalid alpha value: nan$"),
            Bad(dict(alpha_warmup=-1), r"^Invalid alpha_warmup value: -1$"),
            Bad(dict(beta3_warmup=-2), r"^Invalid beta3_warmup value: -2$"),
            Bad(dict(t_alpha_beta3=-3), r"^Invalid alpha_warmup value: -3$"),
            Bad(dict(betas=(0.9, 0.999)), r"^Invalid betas"),
            Bad(dict(t_alpha_beta3=5, alpha_warmup=6), r"^t_alpha_beta3=5 conflicts with alpha_warmup=6$"),
        ),
        group_options=dict(lr=1e-1, t_alpha_beta3=4, betas=(0.0, 0.99, 0.999)),
    ),
    Entry(
        emafuse.AdaMomentum, RefAdaMomentum,
        configs=(
            dict(lr=1e-2),
            dict(lr=1e-2, weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.05, fixed_decay=True, maximize=True),
            dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, betas=(0.8, 0.99), eps=1e-6),
            dict(lr=1e-2, weight_decay=0.1, caution=True),
            dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, caution=True, caution_norm="count", maximize=True),
        ),  # no official implementation exists (spec §4, §22.3): f64 reference only
        main=dict(lr=1e-2, weight_decay=0.1),
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step,
        # lr·k/bc1 with k <= 2 here and bc1 > 0.27 at the compared step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        caps=Caps(int_step_in_state_dict=True),
        signature=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, weight_decouple=True,
                       fixed_decay=False),  # spec §4 (b)
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, 1.0)), r"^Invalid beta parameter at index 1: 1.0$"),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$"),
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, weight_decouple=False),
    ),
    Entry(
        emafuse.Lion, RefLion,
        configs=(
            dict(lr=1e-3),
            dict(lr=1e-3, weight_decay=1.0, betas=(0.95, 0.98)),
            dict(lr=1e-3, weight_decay=0.5, lr_independent_decay=True, maximize=True),
            dict(lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True),  # lion-pytorch's spelling
            dict(lr=1e-3, weight_decay=0.1, caution=True),
            # No package ships the 'count' normalisation (only C-Optim's c_lion.py): f64 reference only.
            dict(lr=1e-3, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-3, weight_decay=0.1, caution=True),
        caps=Caps(scalar_state={}),
        signature=lion_pytorch.Lion,
        # google/automl's lion_pytorch.py has no package; lion-pytorch has the same math with default
        # flags (spec §21.5); timm's Lion(caution=True) is C-Lion with the "mean" normalisation.
        signature_differences=dict(
            use_triton="lion-pytorch's switch to its Triton kernel (not in google/automl)",
            decoupled_weight_decay="keyword-only here, default None: lion-pytorch's spelling of lr_independent_decay (spec §22.12)",
        ),
        officials=(
            Official("lion_pytorch", lion_pytorch.Lion, _lion_official, applies=lambda kw: not kw.get("caution")),
            Official("timm.Lion", timm.optim.Lion, lambda kw: {**kw, "foreach": False}, maximize=True,
                     applies=lambda kw: kw.get("caution", False) and kw.get("caution_norm", "mean") == "mean"),
        ),
        # lion-pytorch asserts (AssertionError) or accepts these; the messages are google/automl's (no
        # package), the weight_decay and option checks emafuse's: none is compared with an official.
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$", official=False),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$", official=False),
            Bad(dict(betas=(0.9, -1.0)), r"^Invalid beta parameter at index 1: -1.0$", official=False),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$", official=False),
            Bad(dict(lr=0.0, lr_independent_decay=True), r"^lr_independent_decay needs lr > 0", official=False),
            Bad(dict(lr_independent_decay=True, decoupled_weight_decay=True), r"^give lr_independent_decay or", official=False),
            Bad(dict(caution=True, caution_norm="sum"), r"^Invalid caution_norm", official=False),
        ),
        group_options=dict(lr=1e-2, weight_decay=0.0, caution=False),
        # From bf16/fp16 state, b1 m + (1 - b1) g can cancel to exactly 0 in fp32 but not in fp64
        # (or flip sign within round-off): such an element moves by lr, by 0 or by -lr.
        low_precision_atol=lambda kw: 2 * kw["lr"] * (1 + 2**-7),  # 2 lr, rounded to bf16
    ),
    Entry(
        emafuse.AdaMod, RefAdaMod,
        configs=(
            dict(lr=1e-2),
            dict(lr=1e-2, weight_decay=0.1, beta3=0.9999),
            dict(lr=1e-2, betas=(0.8, 0.99), beta3=0.99, eps=1e-6, maximize=True),
            dict(lr=1e-2, weight_decay=0.1, beta3=0.99, caution=True),
            dict(lr=1e-2, caution=True, caution_norm="count", maximize=True),
        ),
        main=dict(lr=1e-2, weight_decay=0.1),
        caps=Caps(int_step_in_state_dict=True),
        signature=adamod.AdaMod,
        officials=(Official("adamod", adamod.AdaMod, dict, _no_caution),),
        # With caution, from bf16/fp16 state the new m of an element can cancel to 0 or flip sign
        # within round-off (the mask flips): such an element moves by up to the whole masked step.
        low_precision_atol=lambda kw: 8 * kw["lr"] if kw.get("caution") else 0.0,
        bad_args=(
            Bad(dict(lr=-1.0), r"^Invalid learning rate: -1.0$"),
            Bad(dict(eps=-1.0), r"^Invalid epsilon value: -1.0$"),
            Bad(dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1.0$"),
            Bad(dict(betas=(0.9, 1.0)), r"^Invalid beta parameter at index 1: 1.0$"),
            Bad(dict(beta3=1.0), r"^Invalid beta3 parameter: 1.0$"),
            Bad(dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1$", official=False),  # extra check
        ),
        group_options=dict(lr=1e-1, weight_decay=0.0, beta3=0.99),
    ),
)

def orthograd_config(entry: Entry) -> dict[str, Any]:
    """The entry's main configuration with ⊥Grad (without Lion's caution, which it rules out)."""
    return {**{k: v for k, v in entry.main.items() if k != "caution"}, "orthograd": True, "orthograd_rescale": True}


def _with_orthograd(entry: Entry) -> Entry:
    """Every optimizer that takes ``orthograd`` has its main configuration with it among its
    configurations (AdamW also the paper's form, unrescaled, with maximize; the wrapper around
    each rule is the same code)."""
    if not entry.takes_orthograd:
        return entry
    extra = [orthograd_config(entry)]
    if entry.cls is emafuse.AdamW:
        extra.append({**extra[0], "orthograd_rescale": False, "maximize": True})
    return dataclasses.replace(entry, configs=(*entry.configs, *extra))


ENTRIES: tuple[Entry, ...] = tuple(_with_orthograd(e) for e in _ENTRIES)
BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}


# -- parametrisation --------------------------------------------------------------------------------


def _kw_id(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


def config_id(entry: Entry, kw: dict[str, Any]) -> str:
    return entry.name + (f"-{_kw_id(kw)}" if kw else "")


def entries(where: Callable[[Entry], bool] = lambda e: True) -> list:
    """``pytest.param(entry)`` for every entry that ``where`` accepts."""
    return [pytest.param(e, id=e.name) for e in ENTRIES if where(e)]


def configs(where: Callable[[Entry, dict[str, Any]], bool] = lambda e, kw: True) -> list:
    """``pytest.param(entry, kw)`` for every configuration of every entry that ``where`` accepts."""
    return [pytest.param(e, kw, id=config_id(e, kw)) for e in ENTRIES for kw in e.configs if where(e, kw)]


def official_configs(where: Callable[[Entry, dict[str, Any], Official], bool] = lambda e, kw, o: True) -> list:
    """``pytest.param(entry, kw, official)`` for every configuration and every official that
    implements it, marked ``official``."""
    return [
        pytest.param(e, kw, o, id=f"{o.name}-{_kw_id(kw)}" if kw else o.name, marks=pytest.mark.official)
        for e in ENTRIES
        for kw in e.configs
        for o in e.officials_for(kw)
        if where(e, kw, o)
    ]


def official_mains(where: Callable[[Entry, Official], bool] = lambda e, o: True) -> list:
    """``pytest.param(entry, official)`` for every official that implements the entry's main
    configuration, marked ``official``."""
    return [
        pytest.param(e, o, id=o.name, marks=pytest.mark.official)
        for e in ENTRIES
        for o in e.officials_for(e.main)
        if where(e, o)
    ]
