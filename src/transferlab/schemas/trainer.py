"""``conf/trainer/``: the loop's settings (epochs, batch, device, precision, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.schemas.errors import ConfigError


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    # Mixed precision on CUDA only; CPU runs stay in fp32 so results are reproducible there.
    amp: bool = True
    # NHWC memory layout for convolutional backbones: 2-3x faster EfficientNet inference on CPU.
    channels_last: bool = True
    # On CUDA: copy batches from page-locked memory without blocking the host.
    pin_memory: bool = True
    # torch.compile the model (first epoch pays the compile time; pays off for long runs on GPU).
    compile: bool = False
    # A frozen backbone's features on disk under paths.cache_dir/features, shared across runs and sweeps.
    feature_cache: bool = True
    num_workers: int = 0
    # Which validation metric picks the best epoch (its checkpoint is the one tested).
    monitor: str = "accuracy"
    progress: bool = True
    # torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG: bit-reproducible GPU runs
    # (slower; an op without a deterministic kernel then raises). CPU runs are reproducible anyway.
    deterministic: bool = False
    # A NaN/inf training loss. error: the run ends FAILED naming the epoch and step; skip: the
    # batch's update is dropped, counted (metric skipped_nonfinite_batches) and the run goes on.
    on_nan: str = "error"
    # Write a checkpoint atomically after every epoch and on SIGTERM/SIGINT (resume needs it).
    checkpoint: bool = True
    # Cross-entropy against (1 - e) one-hot + e / classes (with mixup: timm's soft targets).
    label_smoothing: float = 0.0
    # An exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer
    # update; null: off. When on, the EMA weights are the ones validated, kept as best and tested.
    ema_decay: float | None = None
    # Clip the global gradient norm of the trainable parameters before each update; null: off.
    grad_clip_norm: float | None = None
    # Gradients of this many batches are summed (each loss / window size) before an update:
    # the effective batch is batch_size x accumulate_steps (logged as effective_batch_size).
    accumulate_steps: int = 1
    # Stop a stage after this many epochs without a better validation monitor value (metric
    # stopped_early_at: the last epoch trained); null: train every epoch.
    early_stop_patience: int | None = None
    # Under torchrun (several processes, one run): BatchNorm statistics over the global batch instead of
    # each process's share (GPUs only; PyTorch's SyncBatchNorm has no CPU kernel).
    sync_batchnorm: bool = False
    # torch.distributed backend under torchrun: auto = nccl on GPUs, gloo on CPU.
    dist_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(
                "trainer.epochs", f"must be >= 1, got {self.epochs}", "use trainer.epochs=1 or more"
            )
        if self.batch_size < 1:
            raise ConfigError("trainer.batch_size", f"must be >= 1, got {self.batch_size}", "use e.g. 32")
        if self.num_workers < 0:
            raise ConfigError("trainer.num_workers", f"must be >= 0, got {self.num_workers}", "use 0")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ConfigError(
                "trainer.device", f"unknown device {self.device!r}", "use auto, cpu, cuda, cuda:N or mps"
            )
        if self.on_nan not in ("error", "skip"):
            raise ConfigError("trainer.on_nan", f"unknown policy {self.on_nan!r}", "use error or skip")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                "trainer.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}", "use e.g. 0.1"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(
                "trainer.ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}", "use e.g. 0.999"
            )
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ConfigError(
                "trainer.grad_clip_norm", f"must be > 0 or null, got {self.grad_clip_norm}", "use e.g. 1.0"
            )
        if self.accumulate_steps < 1:
            raise ConfigError(
                "trainer.accumulate_steps", f"must be >= 1, got {self.accumulate_steps}", "use 1 (off)"
            )
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ConfigError(
                "trainer.early_stop_patience",
                f"must be >= 1 or null, got {self.early_stop_patience}",
                "use e.g. 3, or null to train every epoch",
            )
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(
                "trainer.dist_backend", f"unknown backend {self.dist_backend!r}", "use auto, nccl or gloo"
            )
        if self.monitor not in ("accuracy", "balanced_accuracy", "macro_f1", "loss"):
            raise ConfigError(
                "trainer.monitor",
                f"unknown metric {self.monitor!r}",
                "use accuracy, balanced_accuracy, macro_f1 or loss",
            )
