"""What a Runner computes in eval mode: validation and test predictions, and the frozen-feature pass.

Over several torchrun ranks each rank computes every N-th batch and all gather the whole
(:func:`transferlab.distributed.map_batches`), so each rank holds the metrics of the whole split and
the same features a single process computes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from transferlab import distributed
from transferlab.backbones import TransferModel
from transferlab.cache import FeatureCache
from transferlab.data import PreparedData, eval_crop, normalize
from transferlab.loop_state import Precision, classification_metrics
from transferlab.schemas import TrainerConfig


class Evaluator:
    """The eval-mode half of :class:`transferlab.engine.Runner`, which sets these attributes and the
    forward (``_logits``: the EMA weights when kept, the features on the frozen-feature path)."""

    model: TransferModel
    data: PreparedData
    cfg: TrainerConfig
    device: torch.device
    precision: Precision
    memory_format: torch.memory_format
    pin_memory: bool
    feature_cache: FeatureCache | None
    world: distributed.World

    def _logits(
        self, idx: torch.Tensor, inputs: torch.Tensor | None = None, train: bool = False
    ) -> torch.Tensor:
        raise NotImplementedError

    def compute_identity(self) -> dict[str, object]:
        """How this runner computes backbone outputs: part of the feature cache's key."""
        return {
            "device": self.device.type,
            "dtype": str(self.precision.dtype) if self.precision.enabled else "torch.float32",
            "channels_last": self.cfg.channels_last,
            "batch_size": self.cfg.batch_size,
        }

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The eval crop of stored images, normalised on the device: what validation and test see."""
        batch = self._to_device(eval_crop(self.data.images[idx], self.data.preprocess))
        return normalize(batch, self.data.preprocess).contiguous(memory_format=self.memory_format)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        # pin_memory() draws from PyTorch's caching host allocator, which keeps the block alive
        # until the asynchronous copy has finished, so the non-blocking copy is safe.
        return (batch.pin_memory() if self.pin_memory else batch).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def extract_features(self) -> torch.Tensor:
        """Backbone output for every image, once, in eval mode (inference: BN stats untouched); over
        several ranks each computes every N-th batch and all gather the whole."""
        self.model.eval()

        def batch(idx: torch.Tensor) -> torch.Tensor:
            with self.precision.autocast():
                return self.model.backbone(self._inputs(idx)).float()

        return distributed.map_batches(
            list(torch.arange(len(self.data.labels)).split(self.cfg.batch_size)), batch
        )

    def _cached_features(self) -> torch.Tensor:
        """The frozen features through the on-disk cache; over several ranks rank 0 holds the entry's
        lock and, on a miss, every rank computes its share; the others then read the stored entry."""
        cache = self.feature_cache

        def lookup(extract: Callable[[], torch.Tensor]) -> torch.Tensor:
            return cache.features(self.model.backbone, self.data, self.compute_identity(), extract)

        if not self.world.active:
            return lookup(self.extract_features)
        features = distributed.lead(lookup, self.extract_features)
        return features if features is not None else lookup(_refuse_to_extract)

    @torch.inference_mode()
    def predict(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Eval mode for inference (the article's last gotcha). Returns labels, predictions, mean loss."""
        self.model.eval()
        idx_all = torch.from_numpy(indices)
        losses: list[float] = []

        def batch(idx: torch.Tensor) -> torch.Tensor:
            labels = self.data.labels[idx].to(self.device)
            with self.precision.autocast():
                logits = self._logits(idx).float()
            losses.append(nn.functional.cross_entropy(logits, labels, reduction="sum").item())
            return logits.argmax(1).cpu()

        # Over several ranks each predicts every N-th batch; the metrics are the whole split's.
        batches = list(idx_all.split(self.cfg.batch_size))
        preds = distributed.map_batches(batches, batch)
        total_loss = (
            distributed.all_sum([sum(losses)])[0] if distributed.shares(len(batches)) else sum(losses)
        )
        labels_np = self.data.labels[idx_all].numpy()
        return labels_np, preds.numpy(), total_loss / max(1, len(indices))

    def evaluate(self, indices: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        labels, preds, loss = self.predict(indices)
        return classification_metrics(labels, preds, loss), labels, preds


def _refuse_to_extract() -> torch.Tensor:
    raise RuntimeError("the frozen-feature entry rank 0 stored is unusable to this rank: rerun the command")
