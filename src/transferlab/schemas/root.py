"""The root config (one field per group plus the seed), its registration in Hydra, and the boundary.

Each YAML option under ``conf/<group>/`` starts from a schema of ``transferlab.schemas.<group>`` (its
defaults list names ``<group>/<schema>``), so a misspelt key or a wrong type fails at compose time,
naming the key. Range checks live in ``__post_init__``: :func:`to_typed` builds the dataclasses
once, at the boundary, and a bad value stops the run before any compute with a :class:`ConfigError`.

Where a default lives: in the schema, once. A YAML option holds only what makes it that option
(a name, a source, a ``_target_``, an interpolation) and the values in which it differs from its
schema; ``python -m transferlab.train --cfg job`` prints every value a run gets.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from transferlab.schemas.augment import AugmentConfig
from transferlab.schemas.backbone import BackboneConfig
from transferlab.schemas.data import DATA_SCHEMAS
from transferlab.schemas.errors import ConfigError, seed_range
from transferlab.schemas.mlflow import MlflowConfig
from transferlab.schemas.mode import MODE_SCHEMAS, ModeConfig
from transferlab.schemas.optimizer import AdamConfig, AdamWConfig, SGDConfig
from transferlab.schemas.paths import PathsConfig
from transferlab.schemas.scheduler import SCHEDULER_SCHEMAS
from transferlab.schemas.sweep import SweepConfig
from transferlab.schemas.trainer import TrainerConfig


@dataclass
class TrainConfig:
    """The root: one field per config group plus the run's seed."""

    backbone: BackboneConfig = MISSING
    mode: ModeConfig = MISSING
    # Each option has its own schema (Adam has betas, SGD momentum): typed per option, not here.
    optimizer: Any = MISSING
    # constant, cosine, linear share a schema; step adds its decay keys.
    scheduler: Any = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    # Continue from this config's checkpoint (left by a kill or preemption) in the same MLflow run.
    resume: bool = True
    # Resume this MLflow run from its checkpoint (the config must be the run's own).
    resume_run: str | None = None

    def __post_init__(self) -> None:
        seed_range("seed", self.seed)
        if self.resume_run is not None and not self.resume:
            raise ConfigError("resume_run", "is set but resume=false", "drop resume=false or resume_run")
        # Settings that are each fine alone but not together, checked before anything runs.
        for stage in self.mode.stages(self.trainer.epochs, self.optimizer.lr):
            self.scheduler.check_stage(stage.name, stage.epochs, stage.lr)
        if self.augment.mixes and self.trainer.batch_size % 2:
            raise ConfigError(
                "trainer.batch_size",
                f"mixup / cutmix pair each image with another of its batch, got an odd {self.trainer.batch_size}",
                f"use an even batch size, e.g. trainer.batch_size={self.trainer.batch_size + 1}",
            )


def repo_root() -> str:
    """The folder holding ``conf/``: one absolute place for the MLflow store, logs and caches."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf").is_dir() and (parent / "pyproject.toml").is_file():
            return str(parent)
    return str(Path.cwd())


def default_tracking_uri() -> str:
    """The store the command-line tools read when given none: ``$MLFLOW_TRACKING_URI``, else the
    repository's own SQLite file (conf/mlflow/default.yaml's default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root()}/mlflow.db"


# Schema names in the ConfigStore: what a YAML option's defaults list extends (mode/<name>).
_MODE_NODES = {"feature_extract": "schema", "full_finetune": "finetune_schema"}


def register_configs() -> None:
    """Register the schemas; YAML options extend them through their defaults lists."""
    if not OmegaConf.has_resolver("tl.repo_root"):
        OmegaConf.register_new_resolver("tl.repo_root", repo_root)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="backbone", name="schema", node=BackboneConfig)
    for mode, schema in MODE_SCHEMAS.items():
        cs.store(group="mode", name=_MODE_NODES.get(mode, f"{mode}_schema"), node=schema)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="optimizer", name="adamw_schema", node=AdamWConfig)
    cs.store(group="optimizer", name="sgd_schema", node=SGDConfig)
    for source, schema in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"{source}_schema", node=schema)
    for name, schema in SCHEDULER_SCHEMAS.items():
        cs.store(group="scheduler", name=f"{name}_schema", node=schema)
    cs.store(group="augment", name="schema", node=AugmentConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="mlflow", name="schema", node=MlflowConfig)
    cs.store(group="paths", name="schema", node=PathsConfig)
    cs.store(group="sweep", name="schema", node=SweepConfig)


def _reject_unknown_keys(node: Any, typed: Any, prefix: str = "") -> None:
    """``+trainer.epoch=3`` gets past Hydra's closed schema (``+`` opens it); catch it here."""
    if not dataclasses.is_dataclass(typed):
        return
    names = {f.name for f in dataclasses.fields(typed)}
    for key in node:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(
                f"{prefix}{key}",
                "is not a known key",
                f"did you mean {prefix}{close[0]}?" if close else f"remove it (known keys: {sorted(names)})",
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, getattr(typed, key), f"{prefix}{key}.")


def to_typed(cfg: Any) -> TrainConfig:
    """Resolve and convert once at the boundary; schema range checks run here."""
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf wraps __post_init__ errors; unwrap ours
        cause = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    assert isinstance(typed, TrainConfig)
    _reject_unknown_keys(cfg, typed)
    return typed
