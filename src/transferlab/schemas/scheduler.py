"""``conf/scheduler/``: the learning-rate schedule of each stage, stepped per optimizer update.

Built with timm's scheduler factory (:mod:`transferlab.schedule`). Every parameter group follows the
schedule with its own ratio to the head (timm's ``lr_scale``), so discriminative learning rates and
layer decay keep their ratios through warmup and decay, ``min_lr`` and ``warmup_lr`` included: both
are the head's values, each backbone group gets them times its ratio. In ``lp_ft`` each stage warms up
and decays over its own length.
"""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.schemas.errors import ConfigError, positive

SCHEDULES = ("constant", "cosine", "step", "linear")


@dataclass
class SchedulerConfig:
    """The schedule's name and the warmup every schedule has."""

    name: str = "constant"
    # Linear warmup from warmup_lr to the stage's lr over this many epochs (fractions allowed,
    # rounded to whole optimizer updates); the schedule's decay follows it, within the stage.
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    # The head's lr at the end of a decaying schedule (cosine, linear) and its floor.
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(
                "scheduler.name", f"unknown schedule {self.name!r}", f"use scheduler={' | '.join(SCHEDULES)}"
            )
        for key in ("warmup_epochs", "warmup_lr", "min_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"scheduler.{key}", f"must be >= 0, got {getattr(self, key)}", "use 0")

    def check_stage(self, name: str, epochs: int, lr: float) -> None:
        """A stage the schedule cannot fit: warmup as long as the stage, or a floor above its lr."""
        if self.warmup_epochs >= epochs:
            raise ConfigError(
                "scheduler.warmup_epochs",
                f"{self.warmup_epochs} warmup epochs leave nothing of stage {name!r} ({epochs} epochs)",
                f"use scheduler.warmup_epochs below {epochs} (fractions allowed), or train longer",
            )
        if self.min_lr > lr:
            raise ConfigError(
                "scheduler.min_lr",
                f"{self.min_lr} is above stage {name!r}'s learning rate {lr}",
                "use a floor below the learning rate, e.g. scheduler.min_lr=0",
            )


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    """Multiply the lr by ``decay_rate`` every ``decay_epochs`` (after warmup)."""

    name: str = "step"
    decay_epochs: float = 1.0
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("scheduler.decay_epochs", self.decay_epochs, "use e.g. scheduler.decay_epochs=3")
        if not 0 < self.decay_rate <= 1:
            raise ConfigError(
                "scheduler.decay_rate", f"must be in (0, 1], got {self.decay_rate}", "use e.g. 0.1"
            )


SCHEDULER_SCHEMAS: dict[str, type[SchedulerConfig]] = {
    "constant": SchedulerConfig,
    "cosine": SchedulerConfig,
    "linear": SchedulerConfig,
    "step": StepSchedulerConfig,
}
