"""``conf/data/``: the fields every dataset shares, and one schema per source.

Each schema is the key of its loader in :mod:`transferlab.sources.registry` (a new source is one
schema here with its ``DATA_SCHEMAS`` entry, one module there, one YAML file under ``conf/data/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.schemas.errors import ConfigError, fraction, seed_range

# The torchvision datasets data=<name> can load (transferlab.sources.torchvision maps each to its class).
TORCHVISION_DATASETS = ("cifar10", "flowers102", "oxford_iiit_pet", "dtd")


@dataclass
class DataConfig:
    """Fields every dataset shares; each dataset's schema adds its own."""

    name: str = MISSING
    root: str | None = None
    # Use at most this many images (stratified by class) for smoke runs; None = all.
    limit: int | None = None
    # 0.25: the stratified 75/25 split of Deitsch et al. 2019 (ELPV).
    test_fraction: float = 0.25
    # Carved from the training part for model selection.
    val_fraction: float = 0.1
    # The split is seeded apart from ``seed`` so that seeds vary the training, not the data.
    split_seed: int = 42
    # Keep the decoded, resized images under paths.cache_dir/inputs: later runs skip decoding.
    cache: bool = True
    # K-fold: data.folds=K rotates the test part over K stratified folds (seeded by split_seed),
    # data.fold=0..K-1 picks it; validation is carved from the other folds. None: one test split
    # (test_fraction). Folds and split seeds are replicates in the report, like seeds.
    folds: int | None = None
    fold: int = 0
    # Keep this many training images per class (stratified, seeded by split_seed, nested as it grows);
    # validation and test stay as they are. None: every training image.
    train_per_class: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 4:
            raise ConfigError(
                "data.limit",
                f"must be >= 4 or null, got {self.limit}",
                "use data.limit=null for the whole dataset",
            )
        fraction("data.test_fraction", self.test_fraction)
        fraction("data.val_fraction", self.val_fraction)
        seed_range("data.split_seed", self.split_seed)
        if self.folds is not None and self.folds < 2:
            raise ConfigError(
                "data.folds", f"must be >= 2 or null, got {self.folds}", "use e.g. data.folds=5"
            )
        if self.folds is None and self.fold != 0:
            raise ConfigError("data.fold", f"is {self.fold} but data.folds is null", "set data.folds=K too")
        if self.folds is not None and not 0 <= self.fold < self.folds:
            raise ConfigError(
                "data.fold",
                f"must be in 0..{self.folds - 1} (data.folds={self.folds}), got {self.fold}",
                f"use data.fold=0..{self.folds - 1}",
            )
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError(
                "data.train_per_class",
                f"must be >= 1 or null, got {self.train_per_class}",
                "use e.g. data.train_per_class=10, or null for every training image",
            )


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
    # A shifted test set: every cell of this other type, tested with the same model (shift_test_*
    # metrics), e.g. data.cell_type=mono data.shift_cell_type=poly. null: none.
    shift_cell_type: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _named("data.name", self.name, "elpv")
        if self.shift_cell_type is not None:
            if self.shift_cell_type not in ("mono", "poly"):
                raise ConfigError(
                    "data.shift_cell_type", f"unknown cell type {self.shift_cell_type!r}", "use mono or poly"
                )
            if self.cell_type in ("all", self.shift_cell_type):
                raise ConfigError(
                    "data.shift_cell_type",
                    f"the shifted set must be cells the run does not train on (data.cell_type={self.cell_type})",
                    f"train on the other type: data.cell_type={'mono' if self.shift_cell_type == 'poly' else 'poly'}",
                )
        if self.labels not in ("binary", "four_class"):
            raise ConfigError("data.labels", f"unknown labelling {self.labels!r}", "use binary or four_class")
        if self.cell_type not in ("all", "mono", "poly"):
            raise ConfigError(
                "data.cell_type", f"unknown cell type {self.cell_type!r}", "use all, mono or poly"
            )
        fraction("data.threshold", self.threshold)


@dataclass
class ImageFolderDataConfig(DataConfig):
    name: str = "imagefolder"
    # Every file is decoded once before the run starts. error: stop, naming the first bad file;
    # skip: leave unreadable files out and log their list (skipped_images.json) with the run.
    on_bad_image: str = "error"
    # A shifted test set: a folder with the same class subfolders, tested with the same model
    # (shift_test_* metrics; never trained or validated on). null: none.
    shift_root: str | None = None

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
    # One of TORCHVISION_DATASETS; downloaded into data.root when missing.
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
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
class HfDataConfig(DataConfig):
    """A Hugging Face ``datasets`` dataset (the optional extra ``transferlab[hf]``)."""

    name: str = "hf"
    # A hub name (``user/dataset``, read from the HF cache offline) or a local ``save_to_disk`` folder.
    path: str = MISSING
    # One split (``train``, ``train[:50%]``): split here like any other source; null: the dataset's
    # own splits (train / validation / test; val is carved from train when it has none).
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"

    def __post_init__(self) -> None:
        super().__post_init__()
        _named("data.name", self.name, "hf")
        if not self.path:
            raise ConfigError(
                "data.path",
                "is required for data=hf",
                "pass a hub name or a save_to_disk folder, e.g. data.path=beans",
            )


# Registered in Hydra's ConfigStore as data/<name>_schema; conf/data/<option>.yaml extends one.
DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "elpv": ElpvDataConfig,
    "imagefolder": ImageFolderDataConfig,
    "torchvision": TorchvisionDataConfig,
    "synthetic": SyntheticDataConfig,
    "hf": HfDataConfig,
}
