"""Fit and evaluate: the loop, with the mechanics kept out of ``train.py``.

Two paths give the same model. When the backbone is frozen and the inputs are not augmented, the
backbone's output for an image never changes, so it is computed once (inference mode, batched) and
the head trains on those features: one backbone pass per image instead of one per image per epoch.
With a :class:`~transferlab.cache.FeatureCache` that pass is stored on disk and shared by every run
with the same backbone, images and preprocessing (a sweep of learning rates and seeds pays it once).
Otherwise every batch runs the whole model, with only the trainable parts in train mode; augmented
training images come through a DataLoader (``trainer.num_workers``), each under its own seed.

An optimizer update closes a window of ``trainer.accumulate_steps`` batches: gradients are clipped
(``trainer.grad_clip_norm``), the optimizer steps, the EMA (``trainer.ema_decay``) follows, and the
lr schedule moves to the next update. A stop request is honoured after an update, so a checkpoint
never holds half a window's gradients. Under torchrun each rank trains on its share of every batch
(:mod:`transferlab.distributed`); evaluation is :class:`~transferlab.evaluation.Evaluator`'s.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from transferlab import distributed
from transferlab.augment import AugmentedImages, build_mixup, build_train_transform, seeded
from transferlab.backbones import TransferModel
from transferlab.cache import FeatureCache
from transferlab.data import PreparedData, worker_setup
from transferlab.evaluation import Evaluator
from transferlab.loop_state import (  # re-exported: the engine's public names
    FitResult,
    FitState,
    MetricLogger,
    NonFiniteLossError,
    Precision,
    StopRequested,
    better,
    classification_metrics,
    select_device,
    training_batches,
)
from transferlab.modes import Trainable, freeze
from transferlab.schedule import group_lrs
from transferlab.schemas import AugmentConfig, Stage, TrainerConfig

__all__ = [
    "FitResult",
    "FitState",
    "MetricLogger",
    "NonFiniteLossError",
    "Precision",
    "Runner",
    "StopRequested",
    "better",
    "classification_metrics",
    "select_device",
    "training_batches",
]


class Runner(Evaluator):
    """Runs batches of a :class:`TransferModel` over :class:`PreparedData` on one device.

    Built once per run; each stage of the run is one :meth:`fit`, and what trains in it is decided
    by :func:`transferlab.modes.freeze` from the stage.
    """

    def __init__(
        self,
        model: TransferModel,
        data: PreparedData,
        cfg: TrainerConfig,
        seed: int,
        augment: AugmentConfig | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.model, self.data, self.cfg, self.seed = model, data, cfg, seed
        self.augment = augment if augment is not None and augment.active else None
        self.transform = None  # per-image training transform (None: the eval crop)
        if self.augment is not None and self.augment.per_image:
            self.transform = build_train_transform(self.augment, data.preprocess)
        self.mixup = (
            build_mixup(self.augment, cfg.label_smoothing, data.num_classes) if self.augment else None
        )
        self.world = distributed.world()  # one process, or one rank of a torchrun run
        if cfg.sync_batchnorm and self.world.active:
            self.model = distributed.convert_sync_batchnorm(model)
        self.device = select_device(cfg.device)
        self.precision = Precision.for_device(self.device, cfg.amp)
        # channels_last pays off for convolutions; it is a no-op layout hint for ViTs.
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        # The live path's forward; the model itself (and its state dict) stays the plain module.
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.train_net: nn.Module = self.net  # what a training batch runs (enter(): per stage)
        # Page-locked host batches let the copy to the GPU overlap with compute.
        self.pin_memory = cfg.pin_memory and self.device.type == "cuda"
        self.feature_cache = feature_cache
        self.generator = torch.Generator().manual_seed(seed)  # data order and augmentation only
        self.first_update_at: float | None = None  # wall clock (time.time()) of this process's first update
        self.stage: Stage | None = None  # set by enter(): fit() and train_epoch() need one
        self.trainable: Trainable | None = None
        self.features: torch.Tensor | None = None
        self.ema: ModelEmaV3 | None = None  # per stage, when trainer.ema_decay is set
        self.ema_source: torch.nn.Module = model  # what the EMA averages (enter())

    def enter(self, stage: Stage) -> Trainable:
        """Start a stage: freeze what it does not train, and seed its data order afresh.

        Each stage draws its data order from ``seed`` as if it were a run of its own (a resume then
        restores the generator from the checkpoint). A frozen backbone on un-augmented inputs maps
        each image to one fixed feature vector: those stages train the head on features computed once.
        """
        self.stage, self.features = stage, None
        self.generator.manual_seed(self.seed)
        # A fresh fp16 grad scaler too: a stage never starts from the scale the one before it reached.
        self.precision = Precision.for_device(self.device, self.cfg.amp)
        self.trainable = freeze(self.model, stage)
        self.train_net = self.model.head if self.frozen_features else self.net
        if self.world.active:  # gradients averaged over the ranks: DDP over what trains in this stage
            target = distributed.wrap(self.model.head if self.frozen_features else self.model, self.device)
            self.train_net = (
                torch.compile(target) if self.cfg.compile and not self.frozen_features else target
            )
        # The average starts from the stage's starting weights (lp_ft's fine-tune: the probe's head) and
        # covers what trains (a frozen backbone's copy would be averaged for nothing). timm's warmup
        # ramps the decay (1 - (1 + step) ** -2/3, capped at ema_decay): a short fine-tune's average
        # is then not dominated by the weights it started from.
        target = self.model if self.trainable.trains_backbone else self.model.head
        self.ema_source = target  # what each update averages in: the same module the EMA copied
        self.ema = (
            ModelEmaV3(target, decay=self.cfg.ema_decay, use_warmup=True) if self.cfg.ema_decay else None
        )
        return self.trainable

    @property
    def augmenting(self) -> bool:
        """Whether this stage's training inputs are augmented (lp_ft's probe: mode.probe_augment)."""
        return self.augment is not None and self.stage is not None and self.stage.augment

    @property
    def frozen_features(self) -> bool:
        return not self._trainable().trains_backbone and not self.augmenting

    def _trainable(self) -> Trainable:
        if self.trainable is None:
            raise RuntimeError("Runner.enter(stage) must come before fitting: it decides what trains")
        return self.trainable

    def _train_inputs(self, state: FitState, batches: list[torch.Tensor]) -> Iterator[torch.Tensor | None]:
        """Each remaining batch's inputs from ``state.step``: augmented per image through a DataLoader,
        the eval crop otherwise, None on frozen features (the head reads ``self.features``)."""
        if self.features is not None:
            yield from (None for _ in batches[state.step :])
            return
        if self.transform is None or not self.augmenting:
            yield from (self._inputs(state.order[pos]) for pos in batches[state.step :])
            return
        items = [[(int(state.order[p]), int(state.seeds[p])) for p in pos] for pos in batches[state.step :]]
        loader = torch.utils.data.DataLoader(
            AugmentedImages(self.data.images, self.transform),
            batch_sampler=items,
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: the DataLoader draws a base seed per iterator, which must not move
            # the global stream (dropout) by one draw more in a resumed epoch. Images have their seeds.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=worker_setup,
        )
        for batch in loader:
            yield self._to_device(batch).contiguous(memory_format=self.memory_format)

    # -- loops ---------------------------------------------------------------------------------
    def _logits(
        self, idx: torch.Tensor, inputs: torch.Tensor | None = None, train: bool = False
    ) -> torch.Tensor:
        """Training: the live model (its compiled forward); evaluation: the EMA weights when kept (the
        whole model's, or with a frozen backbone the head's)."""
        if train:  # the stage's training forward: DDP-wrapped over several ranks, compiled if asked
            return self.train_net(
                self.features[idx.to(self.features.device)] if self.features is not None else inputs
            )
        ema = self.ema.module if self.ema is not None else None
        frozen = not self._trainable().trains_backbone
        if self.features is not None:
            head = ema if ema is not None else self.model.head
            return head(self.features[idx.to(self.features.device)])
        x = inputs if inputs is not None else self._inputs(idx)
        if ema is None:
            return self.net(x)
        return ema(self.model.backbone(x)) if frozen else ema(x)

    def train_epoch(
        self,
        optimizer: torch.optim.Optimizer,
        state: FitState,
        should_stop: Callable[[], bool],
        scheduler: Any = None,
    ) -> dict[str, float]:
        """Train from ``state.step`` of epoch ``state.epoch`` to its end (all of it unless resuming)."""
        self._trainable()
        freeze(self.model, self.stage)  # evaluation left everything in eval mode
        if state.order is None:  # a new epoch: draw its data order (a resumed one keeps its own)
            train_idx = torch.from_numpy(self.data.splits.train)
            state.order = train_idx[torch.randperm(len(train_idx), generator=self.generator)]
            if self.augmenting:  # one seed per image: its crops, flips, policy ops and erasing
                state.seeds = torch.randint(0, 2**62, (len(train_idx),), generator=self.generator)
            state.totals = {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
        mixup = self.mixup if self.augmenting else None
        loss_fn = (
            SoftTargetCrossEntropy()
            if mixup
            else nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        )
        totals, accumulate = state.totals, self.cfg.accumulate_steps
        start = time.perf_counter()
        batches = self._epoch_batches(len(state.order))  # global: every rank's shares together
        mine = [distributed.shard(b) for b in batches] if self.world.active else batches
        # In a log file (no TTY) redraw rarely rather than once per batch.
        bar = tqdm(
            range(state.step, len(batches)),
            desc=f"epoch {state.epoch}",
            disable=not self.cfg.progress,
            leave=False,
            unit="batch",
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        inputs = self._train_inputs(state, mine)
        contributed = False  # whether a batch of the open window had a finite loss
        try:
            for b in bar:
                idx = state.order[mine[b]]
                window = len(batches[b - b % accumulate : b - b % accumulate + accumulate])
                if b % accumulate == 0:
                    optimizer.zero_grad(set_to_none=True)
                labels = self._to_device(self.data.labels[idx])
                x, targets = next(inputs), labels
                if mixup is not None:  # seeded per batch, like the images: a resumed epoch mixes the same
                    with seeded(int(state.seeds[mine[b][0]]) + 1):
                        x, targets = mixup(x, labels)  # augmenting: never on frozen features
                with self.precision.autocast():
                    logits = self._logits(idx, x, train=True)
                    loss = loss_fn(logits.float(), targets)
                value, seen, correct = loss.item(), len(idx), (logits.argmax(1) == labels).sum().item()
                if self.world.active:  # the whole batch's, summed over the ranks: all agree on it
                    total, correct, seen = distributed.all_sum([value * seen, correct, seen])
                    value, correct, seen = total / seen, int(correct), int(seen)
                    loss = loss * (len(idx) * self.world.size / seen)  # DDP averages: a share's weight
                if not math.isfinite(value):
                    if self.cfg.on_nan == "error":
                        raise NonFiniteLossError(
                            f"training loss is {value} at epoch {state.epoch} step {state.step} "
                            f"(global step {state.global_step}). Fix: lower optimizer.lr, check the data, "
                            "or pass trainer.on_nan=skip to drop such batches"
                        )
                    totals["skipped"] += 1  # trainer.on_nan=skip: no gradient from this batch
                else:
                    scaled = loss / window  # the window's gradient is the mean over its batches
                    if self.precision.scaler is not None:
                        self.precision.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                    contributed = True
                    totals["loss"] += value * seen
                    totals["correct"] += correct
                    totals["seen"] += seen
                    bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.4f}", refresh=False)
                state.step += 1
                state.global_step += 1
                if state.step % accumulate == 0 or state.step == len(batches):  # the window is complete
                    self._update(optimizer, scheduler, state, contributed)
                    contributed = False
                    if should_stop():  # a signal arrived: the update is done, the caller saves and exits
                        raise StopRequested(state)
        finally:
            inputs.close()  # an error or a stop mid-epoch: a DataLoader's workers end now
        for module in (self.model, self.ema.module if self.ema is not None else None):
            if module is not None:  # several ranks: rank 0's BatchNorm statistics are evaluated
                distributed.broadcast_buffers(module)
        seconds = time.perf_counter() - start
        seen = totals["seen"]
        return {
            "train_loss": totals["loss"] / seen if seen else float("nan"),
            "train_accuracy": totals["correct"] / seen if seen else float("nan"),
            "epoch_time_s": seconds,
            "images_per_s": seen / seconds if seconds else 0.0,
            "skipped_nonfinite_batches": totals["skipped"],
            **group_lrs(optimizer),  # the lr the next update runs at
        }

    def _update(
        self, optimizer: torch.optim.Optimizer, scheduler: Any, state: FitState, contributed: bool
    ) -> None:
        """Close a window: clip, step (unless every batch in it was skipped), average, schedule."""
        scaler = self.precision.scaler
        if contributed:
            if self.cfg.grad_clip_norm is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        state.updates += 1  # the schedule follows updates in time, a skipped one included
        if self.first_update_at is None:  # the end of the run's fixed cost (train.py logs startup_s)
            self.first_update_at = time.time()
        if contributed and self.ema is not None:
            self.ema.update(self.ema_source, step=state.updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=state.updates)

    def _epoch_batches(self, images: int) -> list[torch.Tensor]:
        """Batches of positions in an epoch's order (a position indexes the order and the seeds);
        even-sized when mixup pairs the images of a batch."""
        ranks = self.world.size  # over torchrun a batch is every rank's trainer.batch_size
        return training_batches(
            torch.arange(images),
            self.cfg.batch_size * ranks,
            even=self.mixup is not None and self.augmenting,
            ranks=ranks,
        )

    def updates_per_epoch(self) -> int:
        """Optimizer updates in one epoch of this stage (the schedule's unit)."""
        return math.ceil(len(self._epoch_batches(len(self.data.splits.train))) / self.cfg.accumulate_steps)

    def fit(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        log: MetricLogger,
        start_epoch: int = 0,
        *,
        state: FitState | None = None,
        checkpoint: Callable[[FitState], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        publish: Callable[[], None] = lambda: None,
        scheduler: Any = None,
        prune: Callable[[int, float], bool] | None = None,
    ) -> FitResult:
        """Train until ``epochs`` are done, from ``state`` when resuming (see :mod:`transferlab.checkpoint`).

        ``checkpoint(state)`` runs after every epoch and, when ``should_stop()`` turns true after a
        step, once more before :class:`StopRequested` is raised. ``log(row, epoch)`` records an
        epoch's values, ``publish()`` sends them after its checkpoint: a send that fails for good
        then never makes a logged epoch train again on resume (see :mod:`transferlab.resilient`).
        ``prune(step, monitored value)`` (an Optuna trial's pruner) may end the stage after an epoch,
        as early stopping does.
        """
        feature_seconds = 0.0
        if self.frozen_features:
            start = time.perf_counter()
            if self.feature_cache is None:
                self.features = self.extract_features()
            else:  # computed once per key on disk, shared with every other run and sweep job
                self.features = self._cached_features().to(self.device)
            feature_seconds = time.perf_counter() - start
        state = state or FitState(epoch=start_epoch)
        asked = should_stop
        should_stop = lambda: distributed.any_rank(asked())  # noqa: E731 - every rank stops at one step
        cache_hit = None
        if self.features is not None and self.feature_cache is not None:
            cache_hit = self.feature_cache.lookup is not None and self.feature_cache.lookup.hit
        try:
            if should_stop():  # a signal during data preparation or feature extraction
                raise StopRequested(state)
            patience = self.cfg.early_stop_patience
            while state.epoch < start_epoch + epochs and state.stopped_early_at is None:
                row = self.train_epoch(optimizer, state, should_stop, scheduler)
                val, _, _ = self.evaluate(self.data.splits.val)
                row.update({f"val_{k}": v for k, v in val.items()})
                log(row, state.epoch)
                state.history.append({"epoch": state.epoch, **row})
                if better(self.cfg.monitor, val[self.cfg.monitor], state.best_value):
                    state.best_value = val[self.cfg.monitor]
                    state.best_epoch = state.epoch
                    state.best_state = copy.deepcopy(self._kept().state_dict())
                # Told every epoch (on rank 0: the others have no trial); every rank obeys its answer.
                pruned = distributed.any_rank(prune is not None and prune(state.epoch, val[self.cfg.monitor]))
                if pruned or patience is not None and state.epoch - state.best_epoch >= patience:
                    state.stopped_early_at = state.epoch
                state.next_epoch()
                if checkpoint is not None:
                    checkpoint(state)
                publish()
        except StopRequested:
            if checkpoint is not None:
                checkpoint(state)
            raise
        return FitResult(
            state.best_epoch,
            state.best_state,
            state.history,
            feature_seconds,
            self.features is not None,
            cache_hit,
            state.stopped_early_at,
        )

    def _kept(self) -> nn.Module:
        """What a best epoch keeps: the evaluated weights (EMA when on), whole or (frozen backbone) the head."""
        if self.ema is not None:
            return self.ema.module  # already whole or the head (enter())
        return self.model if self._trainable().trains_backbone else self.model.head

    def load_best(self, result: FitResult) -> None:
        """The best epoch's weights into the model, which is tested from here (the EMA's work is done)."""
        module = self.model if self._trainable().trains_backbone else self.model.head
        module.load_state_dict(result.best_state)
        self.ema = None
