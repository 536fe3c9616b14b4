r"""PyTorch Lightning callbacks for emafuse's weight averaging (spec ``averaging.md`` A.6, L).

``lightning`` is an optional dependency (``pip install emafuse[lightning]``), imported only by
this module.

* :class:`EMACallback` — a :class:`~emafuse.ModelEMA` of the LightningModule, with the hooks,
  update timing (``should_update``) and checkpoint layout of Lightning's ``WeightAveraging`` /
  ``EMAWeightAveraging``, validating and testing with the averaged weights through the fused
  in-place swap, saving the average in checkpoints and resuming exactly.
* :class:`SwitchEMACallback`, :class:`BEMACallback`, :class:`LAWACallback` — the same for
  :class:`~emafuse.averaging.SwitchEMA` (the average copied into the module at the end of each
  switching period), :class:`~emafuse.averaging.BEMA` and :class:`~emafuse.averaging.LAWA`.
* :class:`ZClipCallback`, :class:`AdaGCCallback` — :class:`~emafuse.ZClip` / :class:`~emafuse.AdaGC`
  gradient clipping before each optimizer step.
* :class:`PostHocEMACallback` — EDM2 power-function EMA tracks (:class:`~emafuse.averaging.
  PostHocEMA`) with periodic snapshots for post-hoc reconstruction of any ``sigma_rel``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("emafuse.lightning needs PyTorch Lightning: pip install 'lightning>=2.5'") from e

from . import _dtensor
from .averaging import BEMA, LAWA, ModelEMA, PostHocEMA, SwitchEMA
from .averaging._averager import Averager
from .clipping import AdaGC, ZClip
from .errors import UnsupportedOptionError

__all__ = [
    "AdaGCCallback", "BEMACallback", "EMACallback", "LAWACallback", "PostHocEMACallback", "SwitchEMACallback", "ZClipCallback",
]


def _check_keywords(who: str, cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for keywords that averaging class ``cls`` does not take (those its
    constructor passes on through ``**kwargs`` are checked against its base class's)."""
    sig = inspect.signature(cls)
    try:
        bound = sig.bind(None, **kwargs)
    except TypeError as e:
        raise TypeError(f"{who}: {e} (keywords of {cls.__name__})") from None
    rest = next((v for k, v in bound.arguments.items() if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD), None)
    if rest:
        _check_keywords(who, cls.__mro__[1], rest)


class _AveragingCallback(Callback):
    """What the averaging callbacks share: the average is built in ``setup("fit")`` (after
    ``configure_model``) by :meth:`_build`; it is advanced once per optimizer step by
    :meth:`_optimizer_step` (``trainer.global_step`` advanced: once per step under gradient
    accumulation); validation (and test, ``swap_for_test``) runs with the average swapped into the
    module in place once there is one; ``copy_at_train_end`` copies it into the module; checkpoints
    keep Lightning's ``WeightAveraging`` layout (see :class:`EMACallback`) and resume exactly."""

    #: The averaging class, built from the module and the callback's averaging keywords.
    _averager: type[Averager]
    #: Whether the average may be of a sharded (FSDP2) module: its state beside the averaged
    #: weights must then be counters only (the rest of a distributed checkpoint is rank 0's file).
    _shardable = True

    def __init__(self, averager_kwargs: Mapping[str, Any], *, swap_before_first_update: bool, swap_for_test: bool,
                 copy_at_train_end: bool) -> None:
        _check_keywords(type(self).__name__, self._averager, averager_kwargs)  # here, not when fit starts
        self._averager_kwargs = dict(averager_kwargs)
        self.swap_before_first_update = swap_before_first_update
        self.swap_for_test = swap_for_test
        self.copy_at_train_end = copy_at_train_end
        self.average: Averager | None = None
        self._latest_update_step = 0
        self._latest_update_epoch = -1
        self._swapped = False
        self._finished = False

    def _build(self, pl_module: pl.LightningModule) -> Averager:
        """The average of ``pl_module`` (called once, in ``setup("fit")``)."""
        return self._averager(pl_module, **self._averager_kwargs)

    def _optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Account for optimizer step ``step`` (1-based ``global_step``); returns whether it was
        taken into account (else the next batch end asks again). The average's own schedule
        decides what each step does."""
        assert self.average is not None
        self.average.update(pl_module)  # type: ignore[attr-defined]
        return True

    @property
    def _average_model(self) -> Averager | None:
        """The average, where Lightning's ``WeightAveraging`` keeps its ``AveragedModel`` (``.module``,
        ``.n_averaged``)."""
        return self.average

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.average is not None:
            return
        name = type(self).__name__
        if is_overridden("configure_model", pl_module):
            pl_module.configure_model()
            if not _dtensor.any_dtensor(pl_module.parameters()):
                rank_zero_warn(f"{name} with a model that overrides configure_model: the average is a full, unsharded copy")
            # A model that configure_model shards with fully_shard (FSDP2, e.g. under
            # ModelParallelStrategy) gets a shard-local average (see emafuse._dtensor).
        if not self._shardable and _dtensor.any_dtensor(pl_module.parameters()):
            raise UnsupportedOptionError(
                f"{name}: the module is sharded (DTensor/FSDP2 parameters, e.g. ModelParallelStrategy); this callback "
                "cannot yet save its averaging state in a distributed checkpoint. Use EMACallback (a shard-local EMA), "
                "or a strategy that does not shard the module."
            )
        self.average = self._build(pl_module)
        self._finished = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > self._latest_update_step and self._optimizer_step(trainer, pl_module, step):
            self._latest_update_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average is not None and self.copy_at_train_end and self._has_average():
            self.average.copy_to(pl_module)
            self._finished = True

    def _has_average(self) -> bool:
        return self.average is not None and (self.average.num_updates > 0 or self.swap_before_first_update)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.average is not None and not self._swapped and not self._finished and self._has_average():
            self.average.swap(pl_module)
            self._swapped = True

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            assert self.average is not None
            self.average.swap(pl_module)
            self._swapped = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.swap_for_test:
            self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step, "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)

    def _saved_state(self, averaging_state: dict[str, Any]) -> dict[str, Any]:
        """The average's own state (:meth:`Averager.state_dict` without ``module``) from a
        checkpoint's ``averaging_state``; empty when another callback wrote it."""
        return dict(averaging_state.get("emafuse") or {})

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        name = type(self).__name__
        if self.average is None:
            rank_zero_info(f"{name}: checkpoint saved outside fit; it holds the module's current weights only")
            return
        st = self.average.state_dict()
        average = st.pop("module")
        live = checkpoint["state_dict"]
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.average.n_averaged, dtype=torch.long), "emafuse": st}
        distributed = _dtensor.any_dtensor(live.values())
        if not distributed and _dtensor.any_dtensor(average.values()):
            # A consolidated checkpoint of a sharded module: whole tensors (every rank gathers).
            average = self.average.full_state_dict()
        checkpoint["state_dict"] = {k: v.detach().clone() for k, v in average.items()}
        if distributed:
            # A distributed checkpoint of a sharded module (ModelParallelStrategy): only
            # "state_dict" is saved by torch.distributed.checkpoint, shard by shard; the rest is
            # rank 0's file. So the live weights go into it too, under LIVE_PREFIX.
            checkpoint["state_dict"].update((LIVE_PREFIX + k, v) for k, v in live.items())
        else:
            checkpoint["current_model_state"] = live

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        name = type(self).__name__
        if self.average is None:
            rank_zero_warn(f"{name}: checkpoint loaded outside fit; the average cannot be restored (the module holds it)")
            return
        # A sharded module's checkpoint (ModelParallelStrategy) comes without "state_dict": the
        # strategy loaded it into the module already.
        weights = checkpoint["state_dict"] if "state_dict" in checkpoint else pl_module.state_dict()
        st = self._saved_state(checkpoint["averaging_state"]) if "averaging_state" in checkpoint else {}
        if not st or ("state_dict" in checkpoint and "current_model_state" not in checkpoint):
            rank_zero_warn(f"{name}: the checkpoint holds no average of this kind; it starts from the checkpoint's weights")
            self.average.module.load_state_dict(weights, strict=False)
            return
        st["module"] = weights
        self.average.load_state_dict(st)
        if "state_dict" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])
            return
        # The module holds the average now: restore its live weights, from the consolidated
        # checkpoint's whole tensors or the distributed checkpoint's LIVE_PREFIX entries (read
        # here, each rank its shards).
        if "current_model_state" in checkpoint:
            with torch.no_grad():
                own = pl_module.state_dict(keep_vars=True)
                for k, v in checkpoint["current_model_state"].items():
                    _dtensor.copy_into(own[k], v)
            return
        _load_live_weights(pl_module, trainer.ckpt_path)


class EMACallback(_AveragingCallback):
    r"""Keep an exponential moving average of the LightningModule's weights (Polyak averaging),
    :math:`E \leftarrow \mathrm{lerp}(E, \theta, 1 - d)` after optimizer steps, updated by one
    native call per step (:class:`emafuse.ModelEMA`).

    Follows Lightning's ``WeightAveraging``/``EMAWeightAveraging`` contract (spec A.6):

    * the average is created in ``setup("fit")`` (after ``configure_model``, as Lightning does);
    * ``on_train_batch_end`` updates when ``trainer.global_step`` advanced since the last update
      and :meth:`should_update` ``(step_idx=global_step - 1)`` agrees (so once per optimizer step
      under gradient accumulation); ``on_train_epoch_end`` updates if it returns True for
      ``epoch_idx``. :meth:`should_update` is ``EMAWeightAveraging``'s, to the letter: a step
      update every ``update_every_n_steps`` steps from ``update_starting_at_step``, and an epoch-end
      update at every epoch from ``update_starting_at_epoch`` (when given); override it for other
      timings;
    * the average is reachable as Lightning's is: ``callback._average_model`` (the
      :class:`~emafuse.ModelEMA`, with ``.module`` and ``.n_averaged``), also as ``callback.ema``;
    * validation (and test, ``swap_for_test``) runs with the averaged weights: they are swapped
      into the module in place at epoch start and back at epoch end by the fused swap kernel (no
      copy of the model);
    * ``on_train_end`` copies the average into the module (``copy_at_train_end=True``);
    * checkpoints: ``state_dict`` = the averaged weights, ``current_model_state`` = the live
      weights, ``averaging_state`` = ``{"n_averaged", "emafuse"}`` (``n_averaged`` =
      ``ema.num_updates``; ``emafuse``: counters and schedule position); the callback's own
      state holds ``latest_update_step`` and ``latest_update_epoch``. Resuming with
      ``Trainer.fit(ckpt_path=...)`` continues exactly (also from checkpoints written before the
      averaging names were unified);
    * sharded modules (``ModelParallelStrategy``: ``configure_model`` applies ``fully_shard``, and
      must be idempotent, as Lightning asks, since the callback calls it first in ``setup``) get a
      shard-local average (no collective per update, 1/world_size of the weights per rank).
      Checkpoints keep the layout above, except that with a distributed checkpoint
      (``save_distributed_checkpoint=True``, the default) the live weights are saved shard by
      shard inside ``state_dict`` under the prefix ``emafuse_live_weights.`` (only ``state_dict``
      and the optimizer states go through ``torch.distributed.checkpoint``); a consolidated one
      holds whole tensors (the average is gathered when it is saved).

    Deliberate deviations (spec Q7; flags restore Lightning's behaviour):

    * no swap before the first update (``swap_before_first_update=False``): Lightning would
      validate the initial weights as if they were an average;
    * ``latest_update_epoch`` is saved too.

    Arguments, in ``EMAWeightAveraging``'s order: ``device`` (e.g. ``"cpu"`` to keep the average in
    host memory, updated on a background thread), ``use_buffers`` (average float buffers; else copy
    them), ``decay`` (0.999), ``update_every_n_steps``, ``update_starting_at_step``,
    ``update_starting_at_epoch``; then any :class:`~emafuse.ModelEMA` keyword (``schedule``,
    ``ema_dtype``, ``preset="lightning"`` for bitwise parity with ``EMAWeightAveraging``, ...).
    Lightning's own tests of ``EMAWeightAveraging`` run against this class
    (``tests/test_upstream_lightning.py``).
    """

    _averager = ModelEMA

    def __init__(
        self,
        device: torch.device | str | None = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        *,
        swap_before_first_update: bool = False,
        swap_for_test: bool = True,
        copy_at_train_end: bool = True,
        **ema_kwargs: Any,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        super().__init__(ema_kwargs, swap_before_first_update=swap_before_first_update, swap_for_test=swap_for_test,
                         copy_at_train_end=copy_at_train_end)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self._device = torch.device(device) if isinstance(device, str) else device
        self._use_buffers = use_buffers

    @property
    def ema(self) -> ModelEMA | None:
        """The :class:`~emafuse.ModelEMA` (None before ``setup``)."""
        return self.average  # type: ignore[return-value]

    # -- timing ---------------------------------------------------------------------------------

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after optimizer step ``step_idx`` (0-based) or after epoch
        ``epoch_idx``: ``EMAWeightAveraging``'s rule. A step qualifies every
        ``update_every_n_steps`` steps from ``update_starting_at_step`` (from the first when None);
        an epoch end qualifies from ``update_starting_at_epoch`` on, when it is given."""
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0:
                return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch

    # -- hooks ----------------------------------------------------------------------------------

    def _build(self, pl_module: pl.LightningModule) -> ModelEMA:
        kw = dict(self._averager_kwargs)
        kw.setdefault("buffers", "average" if self._use_buffers else "copy")
        return self._averager(pl_module, self.decay, device=self._device, **kw)  # type: ignore[call-arg, return-value]

    def _optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        if not self.should_update(step_idx=step - 1):
            return False
        assert self.ema is not None
        self.ema.update(pl_module, step=step, force=True)
        return True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            assert self.ema is not None
            self.ema.update(pl_module, step=trainer.global_step, force=True)
            self._latest_update_epoch = trainer.current_epoch

    # -- checkpoints ------------------------------------------------------------------------------

    def _saved_state(self, averaging_state: dict[str, Any]) -> dict[str, Any]:
        st = super()._saved_state(averaging_state)
        if not st:  # written by Lightning's WeightAveraging: its counters only
            st = {"num_steps_seen": self._latest_update_step, "num_updates": int(averaging_state.get("n_averaged", 0))}
        return st


class SwitchEMACallback(EMACallback):
    r"""Switch EMA (:class:`~emafuse.averaging.SwitchEMA`; Li et al., arXiv 2402.09240) of the
    LightningModule: :class:`EMACallback` (the same arguments, update timing, validation on the
    average and checkpoints), and at the end of every switching period the average is copied into
    the module, from which training goes on (the optimizer state is kept).

    ``switch_every`` periods of ``switch_unit`` (``"epoch"``, the paper's, or ``"step"``: optimizer
    steps), from period ``switch_start`` to ``switch_end`` (inclusive; None: to the end). An
    epoch's switch happens right after its last training batch, before validation, so that
    validation and a checkpoint saved at its end see the switched weights and resuming continues
    exactly (with a training loader of unknown length: at the epoch's end). Other keywords go to
    :class:`~emafuse.averaging.SwitchEMA` as for :class:`EMACallback`.
    """

    _averager = SwitchEMA

    def __init__(self, *args: Any, switch_every: int = 1, switch_unit: str = "epoch", switch_start: int = 0,
                 switch_end: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, switch_every=switch_every, switch_unit=switch_unit, switch_start=switch_start,
                         switch_end=switch_end, **kwargs)

    @property
    def switch_ema(self) -> SwitchEMA | None:
        """The :class:`~emafuse.averaging.SwitchEMA` (None before ``setup``)."""
        return self.average  # type: ignore[return-value]

    def _optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        updated = super()._optimizer_step(trainer, pl_module, step)
        if updated:
            assert self.switch_ema is not None
            self.switch_ema.end_of_step(pl_module)
        return updated

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self.switch_ema
        if ema is not None and ema.epoch <= trainer.current_epoch:  # not yet done for this epoch
            ema.end_of_epoch(pl_module, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 == trainer.num_training_batches:
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._end_epoch(trainer, pl_module)


class BEMACallback(_AveragingCallback):
    r"""Bias-corrected EMA (:class:`~emafuse.averaging.BEMA`; Block & Zhang, arXiv 2508.00180) of
    the LightningModule's parameters, with :class:`EMACallback`'s hooks: every optimizer step is
    passed to :meth:`BEMA.update <emafuse.averaging.BEMA.update>` (its ``update_after_step`` and
    ``update_every`` decide the events), validation and test run with the BEMA weights swapped in,
    ``copy_at_train_end`` copies them into the module, and checkpoints hold them in
    ``state_dict`` (the live weights in ``current_model_state``, BEMA's EMA, anchor and counters in
    ``averaging_state``), so ``Trainer.fit(ckpt_path=...)`` resumes exactly. Keywords:
    ``swap_before_first_update``, ``swap_for_test``, ``copy_at_train_end`` as for
    :class:`EMACallback`; the others go to :class:`~emafuse.averaging.BEMA`. Sharded modules
    (FSDP2) are refused: BEMA's state beside its weights cannot go into a distributed checkpoint
    yet.
    """

    _averager = BEMA
    _shardable = False

    def __init__(self, *, swap_before_first_update: bool = False, swap_for_test: bool = True, copy_at_train_end: bool = True,
                 **bema_kwargs: Any) -> None:
        super().__init__(bema_kwargs, swap_before_first_update=swap_before_first_update, swap_for_test=swap_for_test,
                         copy_at_train_end=copy_at_train_end)


class LAWACallback(_AveragingCallback):
    r"""Latest weight averaging (:class:`~emafuse.averaging.LAWA`: the mean of the ``k`` latest
    snapshots, one every ``update_every`` optimizer steps from ``start_step``) of the
    LightningModule, with :class:`EMACallback`'s hooks: validation and test run with the mean
    swapped in once there is a snapshot, ``copy_at_train_end`` copies it into the module, and
    checkpoints hold it in ``state_dict`` (the live weights in ``current_model_state``, the
    snapshots and counters in ``averaging_state``), so ``Trainer.fit(ckpt_path=...)`` resumes
    exactly. ``update_every`` has no default (as :class:`~emafuse.averaging.LAWA`); other keywords
    as :class:`BEMACallback`. Sharded modules (FSDP2) are refused, as for :class:`BEMACallback`.
    """

    _averager = LAWA
    _shardable = False

    def __init__(self, k: int = 5, *, update_every: int | None = None, swap_before_first_update: bool = False,
                 swap_for_test: bool = True, copy_at_train_end: bool = True, **lawa_kwargs: Any) -> None:
        if update_every is None:
            raise TypeError("LAWACallback needs update_every= (the step spacing of LAWA's snapshots; there is no default)")
        super().__init__({"k": k, "update_every": update_every, **lawa_kwargs}, swap_before_first_update=swap_before_first_update,
                         swap_for_test=swap_for_test, copy_at_train_end=copy_at_train_end)


# The prefix of the live (training) weights in the "state_dict" of a distributed checkpoint written
# by EMACallback for a sharded module; "state_dict" itself holds the average, as Lightning's.
LIVE_PREFIX = "emafuse_live_weights."


def _load_live_weights(pl_module: pl.LightningModule, path: Any) -> None:
    """Read the live weights of a distributed checkpoint (``LIVE_PREFIX`` entries) into the sharded
    module, each rank its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if path is None:
        raise RuntimeError("EMACallback: a distributed checkpoint was loaded, but the trainer does not say from where "
                           "(trainer.ckpt_path); resume with Trainer.fit(ckpt_path=...)")
    own = get_model_state_dict(pl_module)
    target = {"state_dict": {LIVE_PREFIX + k: v for k, v in own.items()}}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(pl_module, {k[len(LIVE_PREFIX):]: v for k, v in target["state_dict"].items()})


class PostHocEMACallback(Callback):
    r"""EDM2 power-function EMA (Karras et al., CVPR 2024) of the LightningModule's parameters:
    one track per ``sigma_rels`` entry, all updated in one native pass after each optimizer step
    (:math:`\beta = (1 - 1/t)^{\gamma+1}`, t in steps), with a snapshot of every track each
    ``snapshot_every`` steps (fp16, in memory or in ``snapshot_dir``) for post-hoc
    reconstruction of any ``sigma_rel`` (``callback.posthoc.reconstruct(sigma_rel)``).

    Validation runs with the track of ``eval_sigma_rel`` (default: the first) swapped in, after
    the first update. Tracks, time and snapshot records are saved in the callback state, so
    ``Trainer.fit(ckpt_path=...)`` resumes exactly; the checkpoint's ``state_dict`` keeps the
    live weights."""

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int = 1000, *,
                 snapshot_dir: str | None = None, eval_sigma_rel: float | None = None, **kwargs: Any) -> None:
        self.sigma_rels = tuple(sigma_rels)
        self.snapshot_every = snapshot_every
        self.snapshot_dir = snapshot_dir
        self.eval_track = 0 if eval_sigma_rel is None else self.sigma_rels.index(eval_sigma_rel)
        self._kwargs = kwargs
        self.posthoc: PostHocEMA | None = None
        self._latest_update_step = 0
        self._pending_state: dict[str, Any] | None = None
        self._swapped = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.posthoc is None:
            self.posthoc = PostHocEMA(pl_module, self.sigma_rels, snapshot_every=self.snapshot_every,
                                      snapshot_dir=self.snapshot_dir, **self._kwargs)
            if self._pending_state is not None:
                self.posthoc.load_state_dict(self._pending_state)
                self._pending_state = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > self._latest_update_step and self.posthoc is not None:
            self.posthoc.update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.posthoc is not None and self.posthoc.num_updates > 0:
            self.posthoc.swap(pl_module, track=self.eval_track)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            assert self.posthoc is not None
            self.posthoc.swap(pl_module, track=self.eval_track)
            self._swapped = False

    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {"latest_update_step": self._latest_update_step}
        if self.posthoc is not None:
            st["posthoc"] = self.posthoc.state_dict()
        return st

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        if "posthoc" in state_dict:
            if self.posthoc is not None:
                self.posthoc.load_state_dict(state_dict["posthoc"])
            else:
                self._pending_state = state_dict["posthoc"]


class _ClipCallback(Callback):
    """A gradient clipper of :mod:`emafuse.clipping` (``_clipper``, built from the callback's
    keywords) run in ``on_before_optimizer_step``; see :class:`ZClipCallback`."""

    _clipper: type[ZClip] | type[AdaGC]

    def __init__(self, *, log_name: str | None = None, **clipper_kwargs: Any) -> None:
        self.clipper = self._clipper(**clipper_kwargs)
        self.log_name = log_name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a second clipper (spec C.4): Lightning's ``gradient_clip_val`` (it runs right after
        this hook) or another clipping callback."""
        if stage != "fit":
            return
        name = type(self).__name__
        if trainer.gradient_clip_val:
            raise ValueError(
                f"{name} with Trainer(gradient_clip_val={trainer.gradient_clip_val}): the gradients would be clipped twice; "
                f"leave gradient_clip_val unset, or use one clipper ({self._clipper.__name__} or Lightning's)"
            )
        others = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, _ClipCallback) and cb is not self]
        if others:
            raise ValueError(f"{name} with {', '.join(others)}: the gradients would be clipped twice; keep one clipping callback")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None) or [{}]
        if groups[0].get("grad_clip") is not None:
            raise ValueError(
                f"{type(self).__name__} with an optimizer built with grad_clip={groups[0]['grad_clip']!r}: the gradients would be "
                "clipped twice; keep one clipper (the callback, or the optimizer's grad_clip=, which clips inside its step)"
            )
        norm = self.clipper.step(pl_module)
        if self.log_name is not None:
            pl_module.log(self.log_name, norm, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict)


class ZClipCallback(_ClipCallback):
    r""":class:`~emafuse.ZClip` on the LightningModule's gradients, for users who keep their own
    optimizer: :meth:`ZClip.step <emafuse.ZClip.step>` runs in ``on_before_optimizer_step`` (after
    AMP's unscaling, once per optimizer step under gradient accumulation, before the step), as the
    reference's ``ZClipLightningCallback``. The statistics are saved in the callback's state, so
    ``Trainer.fit(ckpt_path=...)`` resumes exactly. The norm before clipping is logged as
    ``log_name`` (None: not logged). Other keywords go to :class:`~emafuse.ZClip`; the clipper is
    ``callback.clipper``.

    Lightning's own clipping (``Trainer(gradient_clip_val=...)``) runs right after this hook and
    would clip twice: a non-zero ``gradient_clip_val`` is refused when fit starts, and an emafuse
    optimizer built with ``grad_clip=`` at the first step (spec C.4).
    """

    _clipper = ZClip


class AdaGCCallback(_ClipCallback):
    r""":class:`~emafuse.AdaGC` on the LightningModule's gradients: as :class:`ZClipCallback`
    (the same hook, logging, checkpointed state and refusal of ``gradient_clip_val``), with
    :class:`~emafuse.AdaGC`'s keywords. :math:`\gamma_i` is keyed by the position of each parameter
    in ``pl_module.parameters()``."""

    _clipper = AdaGC
