"""``conf/sweep/``: how a multirun is tracked (one MLflow parent run) and resumed."""

from __future__ import annotations

from dataclasses import dataclass, field

from transferlab.schemas.errors import ConfigError

# The default replicates: the seed, and the split seed and fold where swept.
REPLICATES = ("seed", "data.split_seed", "data.fold")


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
    # The swept keys whose runs are repeats of one configuration, averaged over and paired by in the
    # report, never compared (tag sweep.replicates); every other swept key but the tuned ones is an arm.
    replicates: list[str] = field(default_factory=lambda: list(REPLICATES))

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ConfigError("sweep.name", "is empty", "name the sweep, or use sweep.name=null")
        if "seed" not in self.replicates:  # every run has one: what pairs two arms' runs first
            raise ConfigError(
                "sweep.replicates",
                f"{list(self.replicates)} leaves out seed",
                "keep seed, e.g. sweep.replicates=[seed,data.fold]",
            )
        if both := sorted(set(self.replicates) & set(self.tune)):
            raise ConfigError(
                "sweep.replicates",
                f"{both[0]} is also in sweep.tune",
                "a key is tuned or a replicate, not both",
            )
