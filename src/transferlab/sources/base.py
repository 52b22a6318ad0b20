"""What every dataset source provides: its images not yet decoded, and an identity found without decoding.

A source is registered by its config schema (:data:`transferlab.sources.registry.SOURCES`): ``load`` returns a
:class:`RawDataset`; ``identity`` says what the decoded images come from (a folder's listing and the
package versions) so that the decoded-input cache can key them, or None when they are not worth
caching; ``check`` is the pre-flight that runs before any compute (most sources have nothing to check).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab import validate

SPLITS = ("train", "val", "test")
Meta = dict[str, Any]


@dataclass
class RawDataset:
    """Images not yet decoded: ``read(i)`` yields an HxW or HxWxC uint8 array."""

    name: str
    read: Callable[[int], np.ndarray]
    labels: np.ndarray
    classes: list[str]
    source: str  # where it came from, for the MLflow dataset record
    # Official or on-disk splits (index arrays); None: split here, stratified and seeded.
    given_splits: dict[str, np.ndarray] | None = None
    sources: list[str] = field(default_factory=list)  # per-image origin (file path), if any
    skipped: list[validate.BadImage] = field(default_factory=list)  # data.on_bad_image=skip
    # A shifted test set (data.shift_cell_type): its indices, kept out of train, val and test.
    shift: np.ndarray | None = None


@dataclass(frozen=True)
class Source:
    """One dataset source: how to load it, what identifies it, what to check before a run."""

    # (cfg, data_dir, cache_dir) -> the images, labels and any given splits.
    load: Callable[[Any, str, str | None], RawDataset]
    # (cfg, data_dir) -> the decoded-input cache's source key; None: not cached.
    identity: Callable[[Any, str], Meta | None] = lambda cfg, data_dir: None
    # (cfg, cache_dir) -> None, raising ConfigError: a pre-flight that needs no compute.
    check: Callable[[Any, str | None], None] = lambda cfg, cache_dir: None


def listing_sha256(root: Path) -> tuple[str, int]:
    """Names, sizes and modification times of every file under ``root``: found without decoding."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return digest.hexdigest(), count


def folder_identity(root: Path, package: dict[str, str]) -> Meta:
    """A folder's listing digest (names, sizes, mtimes) with the versions of the package that reads it."""
    files, count = listing_sha256(root)
    return {"root": str(root), "files_sha256": files, "files": count, **package}
