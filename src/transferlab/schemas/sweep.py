"""``conf/sweep/``: how a multirun is tracked (one MLflow parent run) and resumed."""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.schemas.errors import ConfigError


@dataclass
class SweepConfig:
    """How a multirun is tracked: one MLflow parent run; jobs whose config already FINISHED are skipped."""

    # The parent run's name; None: the experiment config's name, else the swept overrides.
    name: str | None = None
    # Skip a job whose config hash has a FINISHED sweep job in this experiment (re-launch resumes).
    resume: bool = True

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ConfigError("sweep.name", "is empty", "name the sweep, or use sweep.name=null")
