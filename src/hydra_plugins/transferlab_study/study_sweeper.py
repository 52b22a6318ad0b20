"""``hydra/sweeper=study``: an Optuna study as a Hydra sweep (see :mod:`transferlab.study`).

No ``from __future__ import annotations``: Hydra executes plugin modules before they are in
``sys.modules``, where dataclasses look string annotations up."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.transferlab_study.study_sweeper.StudySweeper"
    # Any optuna sampler by _target_; a relaunch seeds it with seed + the study's trials so far.
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: str = "maximize"  # train.main returns best_val_<trainer.monitor>
    storage: str | None = None  # sqlite:///path.db, postgresql://..., a journal file path; null: in memory
    study_name: str | None = None  # required with a storage: a relaunch finds the study by it
    n_trials: int = 20  # finished trials of the study (all launches together)
    n_jobs: int = 1  # trials per batch: the launcher may run a batch in parallel (hydra/launcher=joblib)
    params: Any = None  # key: override grammar, e.g. optimizer.lr: tag(log, interval(1e-5, 1e-2))
    # Any optuna pruner by _target_ (e.g. optuna.pruners.MedianPruner): each trial's job reports its
    # per-epoch validation value and ends early when pruned; needs a storage. null: no pruning.
    pruner: Any = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="study", node=StudySweeperConf, provider="transferlab"
)


class StudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from transferlab.study import Study  # optuna and MLflow: only when a sweep starts

        self.study = Study(**self.settings)
        self.study.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.study.sweep(arguments)
