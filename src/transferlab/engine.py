"""Fit and evaluate: the loop, with the mechanics kept out of ``train.py``.

Two paths give the same model. When the backbone is frozen and the inputs are not augmented, the
backbone's output for an image never changes, so it is computed once (inference mode, batched) and
the head trains on those features: one backbone pass per image instead of one per image per epoch.
With a :class:`~transferlab.cache.FeatureCache` that pass is stored on disk and shared by every run
with the same backbone, images and preprocessing (a sweep of learning rates and seeds pays it once).
Otherwise every batch runs the whole model, with only the trainable parts in train mode.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn
from tqdm.auto import tqdm

from transferlab.backbones import TransferModel
from transferlab.cache import FeatureCache
from transferlab.data import PreparedData, augment, normalize
from transferlab.modes import Trainable, freeze
from transferlab.schemas import Stage, TrainerConfig

MetricLogger = Callable[[dict[str, float], int], None]


def select_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Precision:
    """Autocast settings: bf16 (or fp16 with a grad scaler) on CUDA when amp is on, fp32 elsewhere."""

    device: torch.device
    enabled: bool
    dtype: torch.dtype = torch.float32
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> Precision:
        if not (amp and device.type == "cuda"):
            return cls(device, False)
        if torch.cuda.is_bf16_supported():
            return cls(device, True, torch.bfloat16)
        return cls(device, True, torch.float16, torch.amp.GradScaler("cuda"))

    def autocast(self):  # noqa: ANN201 - a context manager
        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()


def classification_metrics(labels: np.ndarray, preds: np.ndarray, loss: float) -> dict[str, float]:
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
    }


def better(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss under ``trainer.on_nan=error``: the run ends FAILED."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived: the current step finished and ``state`` is where to resume.

    A KeyboardInterrupt, so that the MLflow run ends KILLED (not FAILED) and sweeps stop too.
    """

    def __init__(self, state: FitState) -> None:
        self.state = state
        super().__init__(f"stopped after epoch {state.epoch} step {state.step}")


@dataclass
class FitState:
    """Everything the loop carries from step to step: a checkpoint saves it, a resume restores it."""

    epoch: int = 0  # the epoch in progress, or the next one
    step: int = 0  # batches of that epoch already trained
    order: torch.Tensor | None = None  # that epoch's data order; None until it is drawn
    totals: dict[str, float] = field(default_factory=dict)  # the epoch's running sums
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def next_epoch(self) -> None:
        self.epoch, self.step, self.order, self.totals = self.epoch + 1, 0, None, {}


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    feature_seconds: float = 0.0  # time spent computing frozen features (0 when not used)
    used_feature_path: bool = False
    feature_cache_hit: bool | None = None  # None: the on-disk feature cache was not used


def training_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` in batches; a last batch of one image joins the one before it.

    BatchNorm in train mode cannot normalise a single sample (PyTorch raises), so a split size
    that leaves one image over would crash full fine-tuning in its last step.
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


class Runner:
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
        augment_inputs: bool,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.model, self.data, self.cfg, self.seed = model, data, cfg, seed
        self.augment_inputs = augment_inputs
        self.device = select_device(cfg.device)
        self.precision = Precision.for_device(self.device, cfg.amp)
        # channels_last pays off for convolutions; it is a no-op layout hint for ViTs.
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        # The live path's forward; the model itself (and its state dict) stays the plain module.
        self.net = torch.compile(self.model) if cfg.compile else self.model
        # Page-locked host batches let the copy to the GPU overlap with compute.
        self.pin_memory = cfg.pin_memory and self.device.type == "cuda"
        self.feature_cache = feature_cache
        self.generator = torch.Generator().manual_seed(seed)  # data order and augmentation only
        self.stage: Stage | None = None  # set by enter(): fit() and train_epoch() need one
        self.trainable: Trainable | None = None
        self.features: torch.Tensor | None = None

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
        return self.trainable

    @property
    def frozen_features(self) -> bool:
        return not self._trainable().trains_backbone and not self.augment_inputs

    def _trainable(self) -> Trainable:
        if self.trainable is None:
            raise RuntimeError("Runner.enter(stage) must come before fitting: it decides what trains")
        return self.trainable

    def compute_identity(self) -> dict[str, object]:
        """How this runner computes backbone outputs: part of the feature cache's key."""
        return {
            "device": self.device.type,
            "dtype": str(self.precision.dtype) if self.precision.enabled else "torch.float32",
            "channels_last": self.cfg.channels_last,
            "batch_size": self.cfg.batch_size,
        }

    # -- inputs --------------------------------------------------------------------------------
    def _inputs(self, idx: torch.Tensor, train: bool) -> torch.Tensor:
        batch = self.data.images[idx]
        if train and self.augment_inputs:
            batch = augment(batch, self.generator)
        batch = self._to_device(batch)
        return normalize(batch, self.data.preprocess).contiguous(memory_format=self.memory_format)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        # pin_memory() draws from PyTorch's caching host allocator, which keeps the block alive
        # until the asynchronous copy has finished, so the non-blocking copy is safe.
        return (batch.pin_memory() if self.pin_memory else batch).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def extract_features(self) -> torch.Tensor:
        """Backbone output for every image, once, in eval mode (inference: BN stats untouched)."""
        self.model.eval()
        order = torch.arange(len(self.data.labels))
        chunks = []
        for idx in order.split(self.cfg.batch_size):
            with self.precision.autocast():
                chunks.append(self.model.backbone(self._inputs(idx, train=False)).float())
        return torch.cat(chunks)

    # -- loops ---------------------------------------------------------------------------------
    def _logits(self, idx: torch.Tensor, train: bool) -> torch.Tensor:
        if self.features is not None:
            return self.model.head(self.features[idx.to(self.features.device)])
        return self.net(self._inputs(idx, train))

    def train_epoch(
        self, optimizer: torch.optim.Optimizer, state: FitState, should_stop: Callable[[], bool]
    ) -> dict[str, float]:
        """Train from ``state.step`` of epoch ``state.epoch`` to its end (all of it unless resuming)."""
        self._trainable()
        freeze(self.model, self.stage)  # evaluation left everything in eval mode
        if state.order is None:  # a new epoch: draw its data order (a resumed one keeps its own)
            train_idx = torch.from_numpy(self.data.splits.train)
            state.order = train_idx[torch.randperm(len(train_idx), generator=self.generator)]
            state.totals = {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
        loss_fn = nn.CrossEntropyLoss()
        totals = state.totals
        start = time.perf_counter()
        batches = training_batches(state.order, self.cfg.batch_size)
        # In a log file (no TTY) redraw rarely rather than once per batch.
        bar = tqdm(
            batches[state.step :],
            desc=f"epoch {state.epoch}",
            disable=not self.cfg.progress,
            leave=False,
            unit="batch",
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        for idx in bar:
            labels = self._to_device(self.data.labels[idx])
            with self.precision.autocast():
                logits = self._logits(idx, train=True)
                loss = loss_fn(logits.float(), labels)
            value = loss.item()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(value):
                if self.cfg.on_nan == "error":
                    raise NonFiniteLossError(
                        f"training loss is {value} at epoch {state.epoch} step {state.step} "
                        f"(global step {state.global_step}). Fix: lower optimizer.lr, check the data, "
                        "or pass trainer.on_nan=skip to drop such batches"
                    )
                totals["skipped"] += 1  # trainer.on_nan=skip: no update from this batch
            else:
                if self.precision.scaler is not None:
                    self.precision.scaler.scale(loss).backward()
                    self.precision.scaler.step(optimizer)
                    self.precision.scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                totals["loss"] += value * len(idx)
                totals["correct"] += (logits.argmax(1) == labels).sum().item()
                totals["seen"] += len(idx)
                bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.4f}", refresh=False)
            state.step += 1
            state.global_step += 1
            if should_stop():  # a signal arrived: the step is done, the caller saves and exits
                raise StopRequested(state)
        seconds = time.perf_counter() - start
        seen = totals["seen"]
        return {
            "train_loss": totals["loss"] / seen if seen else float("nan"),
            "train_accuracy": totals["correct"] / seen if seen else float("nan"),
            "epoch_time_s": seconds,
            "images_per_s": seen / seconds if seconds else 0.0,
            "skipped_nonfinite_batches": totals["skipped"],
        }

    @torch.inference_mode()
    def predict(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Eval mode for inference (the article's last gotcha). Returns labels, predictions, mean loss."""
        self.model.eval()
        idx_all = torch.from_numpy(indices)
        preds, total_loss = [], 0.0
        for idx in idx_all.split(self.cfg.batch_size):
            labels = self.data.labels[idx].to(self.device)
            with self.precision.autocast():
                logits = self._logits(idx, train=False).float()
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
        labels_np = self.data.labels[idx_all].numpy()
        return labels_np, torch.cat(preds).numpy(), total_loss / max(1, len(indices))

    def evaluate(self, indices: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        labels, preds, loss = self.predict(indices)
        return classification_metrics(labels, preds, loss), labels, preds

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
    ) -> FitResult:
        """Train until ``epochs`` are done, from ``state`` when resuming (see :mod:`transferlab.checkpoint`).

        ``checkpoint(state)`` runs after every epoch and, when ``should_stop()`` turns true after a
        step, once more before :class:`StopRequested` is raised. ``log(row, epoch)`` records an
        epoch's values, ``publish()`` sends them after its checkpoint: a send that fails for good
        then never makes a logged epoch train again on resume (see :mod:`transferlab.resilient`).
        """
        feature_seconds = 0.0
        if self.frozen_features:
            start = time.perf_counter()
            if self.feature_cache is None:
                self.features = self.extract_features()
            else:  # computed once per key on disk, shared with every other run and sweep job
                self.features = self.feature_cache.features(
                    self.model.backbone, self.data, self.compute_identity(), self.extract_features
                ).to(self.device)
            feature_seconds = time.perf_counter() - start
        state = state or FitState(epoch=start_epoch)
        cache_hit = None
        if self.features is not None and self.feature_cache is not None:
            cache_hit = self.feature_cache.lookup is not None and self.feature_cache.lookup.hit
        try:
            if should_stop():  # a signal during data preparation or feature extraction
                raise StopRequested(state)
            while state.epoch < start_epoch + epochs:
                row = self.train_epoch(optimizer, state, should_stop)
                val, _, _ = self.evaluate(self.data.splits.val)
                row.update({f"val_{k}": v for k, v in val.items()})
                log(row, state.epoch)
                state.history.append({"epoch": state.epoch, **row})
                if better(self.cfg.monitor, val[self.cfg.monitor], state.best_value):
                    state.best_value = val[self.cfg.monitor]
                    state.best_epoch = state.epoch
                    # Only what trains can differ from the start; a frozen backbone is not copied.
                    module = self.model if self._trainable().trains_backbone else self.model.head
                    state.best_state = copy.deepcopy(module.state_dict())
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
        )

    def load_best(self, result: FitResult) -> None:
        module = self.model if self._trainable().trains_backbone else self.model.head
        module.load_state_dict(result.best_state)
