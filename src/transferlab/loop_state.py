"""What the training loop carries and returns, apart from the loop itself (:mod:`transferlab.engine`).

The device and precision a Runner computes in, the metrics it reports, the state a checkpoint saves
(:class:`FitState`), what a fit returns, the two ways a fit ends early, and how an epoch is batched.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from transferlab.distributed import device_for
from transferlab.schemas import ConfigError

MetricLogger = Callable[[dict[str, float], int], None]


def check_device(name: str) -> None:
    """``trainer.device`` names a device this machine has, or one line saying so (before any run)."""
    if name in ("auto", "cpu"):
        return
    fix = "use trainer.device=auto (cuda, then mps, then cpu) or trainer.device=cpu"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.device", "mps (Apple's GPU) is not available on this machine", fix)
        return
    index = name.removeprefix("cuda").removeprefix(":") or "0"
    if not index.isdigit():
        raise ConfigError(
            "trainer.device", f"{name!r} is no CUDA device name", "use cuda or cuda:N, N = 0, 1, ..."
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise ConfigError(
            "trainer.device",
            f"{name} asked, but this machine has no CUDA device (torch {torch.__version__}, built {built})",
            fix,
        )
    if int(index) >= count:
        raise ConfigError(
            "trainer.device",
            f"{name} asked, but this machine has {count} CUDA device(s)",
            f"use trainer.device=cuda:0 .. cuda:{count - 1}, or auto",
        )


def select_device(name: str) -> torch.device:
    local = device_for(name)  # one of several torchrun processes on CUDA: its own GPU
    if local is not None:
        return local
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
    seeds: torch.Tensor | None = None  # with augmentation: one seed per image of that order
    totals: dict[str, float] = field(default_factory=dict)  # the epoch's running sums
    global_step: int = 0
    updates: int = 0  # optimizer updates of this stage: the lr schedule's position
    stopped_early_at: int | None = None  # trainer.early_stop_patience: the last epoch trained
    best_value: float | None = None
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def next_epoch(self) -> None:
        self.epoch, self.step, self.order, self.seeds, self.totals = self.epoch + 1, 0, None, None, {}


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    feature_seconds: float = 0.0  # time spent computing frozen features (0 when not used)
    used_feature_path: bool = False
    feature_cache_hit: bool | None = None  # None: the on-disk feature cache was not used
    stopped_early_at: int | None = None


def training_batches(
    order: torch.Tensor, batch_size: int, even: bool = False, ranks: int = 1
) -> list[torch.Tensor]:
    """``order`` in batches; a last batch too small to share joins the one before it.

    BatchNorm in train mode cannot normalise a single sample (PyTorch raises), so a split size
    that leaves one image over would crash full fine-tuning in its last step; over ``ranks`` processes
    (torchrun), each takes a share of every batch, so a last batch of fewer than two per process joins
    the one before. ``even`` (mixup pairs each image with another of its share): a last batch is cut
    to a multiple of two per process, the images left out sit out this epoch.
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2 * ranks:
        batches[-2:] = [torch.cat(batches[-2:])]
    if even and len(batches[-1]) % (2 * ranks):
        batches[-1] = batches[-1][: len(batches[-1]) - len(batches[-1]) % (2 * ranks)]
    return [b for b in batches if len(b)]
