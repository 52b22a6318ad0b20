"""``data=hf``: a Hugging Face ``datasets`` dataset, from the hub (cached) or a ``save_to_disk`` folder.

The same rules as every other source: its images decode through :func:`transferlab.validate.to_array`
(16-bit, alpha, palette, CMYK as for image files), its own splits are used when it has them
(``validation`` is val), the decoded-input cache keys it by the dataset's fingerprint (``datasets``'
own content hash) or, for a local folder, by its files, and the run's MLflow dataset record names it.
``datasets`` is imported only here, so the rest of transferlab runs without the extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from transferlab import validate
from transferlab.schemas import ConfigError, HfDataConfig
from transferlab.sources.base import Meta, RawDataset, Source, folder_identity
from transferlab.versions import package_versions

SCHEMA = HfDataConfig
_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def _datasets() -> Any:  # noqa: ANN401 - the module
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data",
            "data=hf needs the Hugging Face datasets library, which is not installed",
            "pip install 'transferlab[hf]' (or pip install datasets)",
        ) from None
    return datasets


def _open(cfg: HfDataConfig) -> Any:  # noqa: ANN401 - a Dataset or DatasetDict
    datasets = _datasets()
    local = Path(cfg.path).expanduser()
    try:
        if local.is_dir():
            found = datasets.load_from_disk(str(local))
            return found[cfg.split] if cfg.split and isinstance(found, datasets.DatasetDict) else found
        return datasets.load_dataset(cfg.path, split=cfg.split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            "data.path",
            f"cannot load {cfg.path!r} ({'offline: ' if offline else ''}{reason})",
            'load it once on a machine with internet (python -c "import datasets; '
            f"datasets.load_dataset('{cfg.path}')\") and copy $HF_HOME here, or Dataset.save_to_disk() "
            "it and pass that folder as data.path",
        ) from None


def _parts(found: Any, cfg: HfDataConfig) -> list[tuple[str | None, Any]]:  # noqa: ANN401
    """(transferlab split or None, dataset) pairs: a DatasetDict's own splits, or one dataset to split here."""
    if hasattr(found, "keys") and not hasattr(found, "features"):  # a DatasetDict
        parts = [(_SPLIT_NAMES.get(name), ds) for name, ds in found.items()]
        unknown = [name for name, (split, _) in zip(found.keys(), parts, strict=True) if split is None]
        if unknown or "train" not in {s for s, _ in parts} or "test" not in {s for s, _ in parts}:
            raise ConfigError(
                "data.split",
                f"{cfg.path} has splits {list(found.keys())}: transferlab needs train and test "
                "(validation optional) to use them as they are",
                "name one split to split here, e.g. data.split=train",
            )
        return parts
    return [(None, found)]


def _classes(ds: Any, cfg: HfDataConfig, labels: list[Any]) -> tuple[list[str], np.ndarray]:  # noqa: ANN401
    feature = ds.features.get(cfg.label_column)
    names = getattr(feature, "names", None)
    if names:  # a ClassLabel: its own order
        return list(names), np.asarray(labels, dtype=np.int64)
    values = sorted(set(labels), key=str)
    index = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], np.asarray([index[v] for v in labels], dtype=np.int64)


def load(cfg: HfDataConfig, data_dir: str = "", cache_dir: str | None = None) -> RawDataset:
    found = _open(cfg)
    parts = _parts(found, cfg)
    for _, ds in parts:
        missing = [c for c in (cfg.image_column, cfg.label_column) if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"data.{'image' if cfg.image_column in missing else 'label'}_column",
                f"{cfg.path} has no column {missing[0]!r} (columns: {ds.column_names})",
                "name its image and label columns: data.image_column=... data.label_column=...",
            )
    labels: list[Any] = []
    index: list[tuple[int, int]] = []
    given: dict[str, np.ndarray] = {}
    for d, (split, ds) in enumerate(parts):
        column = ds[cfg.label_column]
        if split is not None:
            given[split] = np.arange(len(labels), len(labels) + len(column))
        index += [(d, i) for i in range(len(column))]
        labels += list(column)
    classes, codes = _classes(parts[0][1], cfg, labels)
    datasets = [ds for _, ds in parts]

    def read(i: int) -> np.ndarray:
        d, j = index[i]
        return validate.to_array(datasets[d][j][cfg.image_column])

    return RawDataset("hf", read, codes, classes, cfg.path, given or None)


def identity(cfg: HfDataConfig, data_dir: str) -> Meta | None:
    local = Path(cfg.path).expanduser()
    versions = package_versions(("datasets",))
    if local.is_dir():
        return {**folder_identity(local.resolve(), versions), "split": cfg.split}
    try:
        found = _open(cfg)
    except ConfigError:  # the run's load says why, before anything is decoded
        return None
    parts = found.values() if hasattr(found, "keys") and not hasattr(found, "features") else [found]
    return {
        "hub": cfg.path,
        "split": cfg.split,
        "fingerprints": [ds._fingerprint for ds in parts],
        **versions,
    }


def check(cfg: HfDataConfig, cache_dir: str | None = None) -> None:
    """Pre-flight: the library is there and the dataset opens (from the cache when offline), with its columns."""
    load(cfg)


SOURCE = Source(load, identity, check)
