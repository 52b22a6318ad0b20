"""Typed config schemas, one module per config group of ``conf/`` (the package mirrors the tree).

The bottom layer: these modules import nothing of transferlab's beyond this package, and every
other layer may import them (schemas -> domain -> engine -> entrypoints; tests/test_layers.py).
"""

from transferlab.schemas.augment import AugmentConfig
from transferlab.schemas.backbone import BackboneConfig
from transferlab.schemas.data import (
    DATA_SCHEMAS,
    TORCHVISION_DATASETS,
    DataConfig,
    ElpvDataConfig,
    HfDataConfig,
    ImageFolderDataConfig,
    SyntheticDataConfig,
    TorchvisionDataConfig,
)
from transferlab.schemas.errors import ConfigError
from transferlab.schemas.identity import NOT_SEMANTIC, config_hash, semantic_config
from transferlab.schemas.mlflow import MlflowConfig
from transferlab.schemas.mode import (
    ALL_STAGES,
    MODE_SCHEMAS,
    FinetuneModeConfig,
    LpFtModeConfig,
    ModeConfig,
    PartialModeConfig,
    Stage,
)
from transferlab.schemas.optimizer import (
    AdamConfig,
    AdamWConfig,
    OptimizerConfig,
    SGDConfig,
    check_optimizer_target,
)
from transferlab.schemas.paths import PathsConfig
from transferlab.schemas.root import TrainConfig, default_tracking_uri, register_configs, repo_root, to_typed
from transferlab.schemas.scheduler import SCHEDULER_SCHEMAS, SchedulerConfig, StepSchedulerConfig
from transferlab.schemas.sweep import SweepConfig
from transferlab.schemas.trainer import TrainerConfig

__all__ = [
    "ALL_STAGES",
    "DATA_SCHEMAS",
    "MODE_SCHEMAS",
    "NOT_SEMANTIC",
    "TORCHVISION_DATASETS",
    "SCHEDULER_SCHEMAS",
    "AdamConfig",
    "AugmentConfig",
    "AdamWConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "ElpvDataConfig",
    "HfDataConfig",
    "FinetuneModeConfig",
    "ImageFolderDataConfig",
    "LpFtModeConfig",
    "MlflowConfig",
    "ModeConfig",
    "OptimizerConfig",
    "PartialModeConfig",
    "PathsConfig",
    "SGDConfig",
    "SchedulerConfig",
    "StepSchedulerConfig",
    "Stage",
    "SweepConfig",
    "SyntheticDataConfig",
    "TorchvisionDataConfig",
    "TrainConfig",
    "TrainerConfig",
    "check_optimizer_target",
    "config_hash",
    "register_configs",
    "repo_root",
    "default_tracking_uri",
    "semantic_config",
    "to_typed",
]
