"""``conf/sweep/``: how a multirun is tracked (one MLflow parent run) and resumed."""

from __future__ import annotations

from dataclasses import dataclass, field

from transferlab.schemas.errors import ConfigError


@dataclass
class SweepConfig:
    """How a multirun is tracked: one MLflow parent run; jobs whose config already FINISHED are skipped."""

    # The parent run's name; None: the experiment config's name, else the swept overrides.
    name: str | None = None
    # Skip a job whose config hash has a FINISHED sweep job in this experiment (re-launch resumes).
    resume: bool = True
    # The swept keys that are tuned, not compared (e.g. [optimizer.lr, optimizer.weight_decay]):
    # `python -m transferlab.report --select best_val_accuracy` keeps, per arm, their best values on
    # validation. Recorded on the parent run (tag sweep.tune).
    tune: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ConfigError("sweep.name", "is empty", "name the sweep, or use sweep.name=null")
