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
        if self.monitor not in ("accuracy", "balanced_accuracy", "macro_f1", "loss"):
            raise ConfigError(
                "trainer.monitor",
                f"unknown metric {self.monitor!r}",
                "use accuracy, balanced_accuracy, macro_f1 or loss",
            )
