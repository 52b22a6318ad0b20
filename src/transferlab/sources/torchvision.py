"""``data=cifar10|flowers102|oxford_iiit_pet|dtd``: torchvision's datasets with their official splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torchvision

from transferlab.schemas import ConfigError, TorchvisionDataConfig
from transferlab.sources.base import SPLITS, Meta, RawDataset, Source, folder_identity
from transferlab.versions import package_versions

SCHEMA = TorchvisionDataConfig


def load(cfg: TorchvisionDataConfig, data_dir: str, cache_dir: str | None = None) -> RawDataset:
    root = Path(cfg.root or Path(data_dir) / cfg.name).expanduser()
    tv = torchvision.datasets
    makers: dict[str, tuple[Callable[..., object], list[tuple[str, dict]]]] = {
        "cifar10": (tv.CIFAR10, [("train", {"train": True}), ("test", {"train": False})]),
        "flowers102": (tv.Flowers102, [(s, {"split": s}) for s in SPLITS]),
        "oxford_iiit_pet": (
            tv.OxfordIIITPet,
            [("train", {"split": "trainval"}), ("test", {"split": "test"})],
        ),
        "dtd": (tv.DTD, [(s, {"split": s}) for s in SPLITS]),
    }
    maker, parts = makers[cfg.name]
    datasets = []
    try:
        for _, kwargs in parts:
            datasets.append(maker(root=str(root), download=cfg.download, **kwargs))
    except (
        OSError,
        RuntimeError,
    ) as exc:  # URLError is an OSError; a missing, undownloaded set a RuntimeError
        raise ConfigError(
            "data.root",
            f"cannot load {cfg.name} from {root} ({type(exc).__name__}: {exc})".replace("\n", " "),
            f"run once on a machine with internet (data.download=true) and copy {root} here, or use data=elpv",
        ) from None
    index: list[tuple[int, int]] = []
    labels: list[int] = []
    given: dict[str, np.ndarray] = {}
    for d, ((split, _), ds) in enumerate(zip(parts, datasets, strict=True)):
        targets = _targets(ds)
        given[split] = np.arange(len(labels), len(labels) + len(targets))
        index += [(d, i) for i in range(len(targets))]
        labels += targets
    classes = list(getattr(datasets[0], "classes", [])) or [str(c) for c in range(max(labels) + 1)]

    def read(i: int) -> np.ndarray:
        d, j = index[i]
        image = datasets[d][j][0]  # type: ignore[index]
        return np.asarray(image.convert("RGB"))

    return RawDataset(cfg.name, read, np.array(labels, dtype=np.int64), classes, str(root), given)


def _targets(ds: object) -> list[int]:
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type,index]


def identity(cfg: TorchvisionDataConfig, data_dir: str) -> Meta | None:
    root = Path(cfg.root or Path(data_dir) / cfg.name).expanduser().resolve()
    if not root.is_dir():  # not downloaded yet: the next run caches it
        return None
    return folder_identity(root, package_versions(("torchvision",)))


SOURCE = Source(load, identity)
