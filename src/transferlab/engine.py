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
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn
from tqdm.auto import tqdm

from transferlab.backbones import TransferModel
from transferlab.config import TrainerConfig
from transferlab.data import PreparedData, augment, normalize
from transferlab.modes import Mode, set_train_mode

if TYPE_CHECKING:
    from transferlab.cache import FeatureCache

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


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    feature_seconds: float = 0.0  # time spent computing frozen features (0 when not used)
    used_feature_path: bool = False
    feature_cache_hit: bool | None = None  # None: the on-disk feature cache was not used


class Runner:
    """Runs batches of a :class:`TransferModel` over :class:`PreparedData` on one device."""

    def __init__(
        self,
        model: TransferModel,
        data: PreparedData,
        mode: Mode,
        cfg: TrainerConfig,
        seed: int,
        augment_inputs: bool,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.model, self.data, self.mode, self.cfg = model, data, mode, cfg
        self.augment_inputs = augment_inputs
        # A frozen backbone on un-augmented inputs maps each image to one fixed feature vector.
        self.frozen_features = not mode.trains_backbone and not augment_inputs
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
        self.features: torch.Tensor | None = None

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
        """Backbone output for every image, once. The backbone is in eval mode: BN stats untouched."""
        self.model.backbone.eval()
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

    def train_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        set_train_mode(self.model, self.mode)
        if self.features is not None:
            self.model.backbone.eval()
        train_idx = torch.from_numpy(self.data.splits.train)
        order = train_idx[torch.randperm(len(train_idx), generator=self.generator)]
        loss_fn = nn.CrossEntropyLoss()
        total_loss, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        batches = order.split(self.cfg.batch_size)
        # In a log file (no TTY) redraw rarely rather than once per batch.
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}",
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
            optimizer.zero_grad(set_to_none=True)
            if self.precision.scaler is not None:
                self.precision.scaler.scale(loss).backward()
                self.precision.scaler.step(optimizer)
                self.precision.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        seconds = time.perf_counter() - start
        return {
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            "epoch_time_s": seconds,
            "images_per_s": seen / seconds,
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
        self, optimizer: torch.optim.Optimizer, epochs: int, log: MetricLogger, start_epoch: int = 0
    ) -> FitResult:
        feature_seconds = 0.0
        if self.frozen_features:
            start = time.perf_counter()
            if self.feature_cache is None:
                self.features = self.extract_features()
            else:  # computed once per key on disk, shared with every other run and sweep job
                self.features = self.feature_cache.features(self)
            feature_seconds = time.perf_counter() - start
        best_value: float | None = None
        result = FitResult(-1, {}, [], feature_seconds, self.features is not None)
        if self.features is not None and self.feature_cache is not None:
            result.feature_cache_hit = self.feature_cache.lookup is not None and self.feature_cache.lookup.hit
        for epoch in range(start_epoch, start_epoch + epochs):
            row = self.train_epoch(optimizer, epoch)
            val, _, _ = self.evaluate(self.data.splits.val)
            row.update({f"val_{k}": v for k, v in val.items()})
            log(row, epoch)
            result.history.append({"epoch": epoch, **row})
            if better(self.cfg.monitor, val[self.cfg.monitor], best_value):
                best_value = val[self.cfg.monitor]
                result.best_epoch = epoch
                # Only what trains can differ from the start; a frozen backbone is not copied.
                module = self.model if self.mode.trains_backbone else self.model.head
                result.best_state = copy.deepcopy(module.state_dict())
        return result

    def load_best(self, result: FitResult) -> None:
        module = self.model if self.mode.trains_backbone else self.model.head
        module.load_state_dict(result.best_state)
