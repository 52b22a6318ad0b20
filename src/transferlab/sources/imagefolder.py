"""``data=imagefolder``: one subfolder per class under ``data.root`` (or under its train/ val/ test/).

Every file is checked before the run starts (:mod:`transferlab.validate`); the verdicts are kept
per folder listing, in memory and under ``paths.cache_dir/scans``, so each file is decoded once to
check it and once to use it, and a sweep's jobs over an unchanged folder decode nothing to check it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image

from transferlab import validate
from transferlab.schemas import ConfigError, ImageFolderDataConfig
from transferlab.sources.base import SPLITS, Meta, RawDataset, Source, folder_identity, listing_sha256

SCHEMA = ImageFolderDataConfig
log = logging.getLogger("transferlab.data")


def _scan_class_folders(
    root: Path, top: Path
) -> tuple[list[str], list[tuple[Path, int]], list[validate.BadImage]]:
    """Class folders under ``root`` and their files, each decoded once by :mod:`transferlab.validate`."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items, bad = [], []
    for index, name in enumerate(classes):
        good, broken = validate.scan_class_folder(root / name, top)
        items += [(path, index) for path in good]
        bad += broken
    return classes, items, bad


# (root, split parts, listing with sizes and mtimes) -> scan: the pre-flight check and prepare() share
# it in memory, so each file is decoded once to check it and once to use it. With a cache folder the
# scan is also kept on disk, so the jobs of a sweep (and every later run) over an unchanged folder
# decode nothing to check it: a file that changes changes its size or mtime, hence the key.
_SCANS: dict[tuple, tuple] = {}
SCAN_FORMAT = 1  # bump when validate's verdicts change


def _scan_cached(root: Path, parts: list[str], cache_dir: str | None = None) -> tuple:
    key = (str(root.resolve()), tuple(parts), listing_sha256(root)[0])
    if key in _SCANS:
        return _SCANS[key]
    stored = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([SCAN_FORMAT, PIL.__version__, key]).encode()).hexdigest()
        stored = Path(cache_dir) / "scans" / f"{digest}.json"
    scans = _read_scans(stored) if stored is not None and stored.exists() else None
    if scans is None:
        scans = tuple(_scan_class_folders(root / part, root) for part in parts)
        if stored is not None:
            _write_scans(stored, scans)
    _SCANS.clear()  # one folder at a time in memory
    _SCANS[key] = scans
    return scans


def _write_scans(path: Path, scans: tuple) -> None:
    blob = [
        {"classes": c, "items": [[str(p), i] for p, i in items], "bad": [[b.path, b.problem] for b in bad]}
        for c, items, bad in scans
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(blob))
        os.replace(tmp, path)  # atomic: parallel jobs write the same verdicts, one file wins whole
    except OSError as exc:  # a full or read-only cache folder costs a re-scan next time, nothing more
        tmp.unlink(missing_ok=True)
        log.warning("could not store the image-folder scan in %s (%s)", path, exc)


def _read_scans(path: Path) -> tuple | None:
    try:
        blob = json.loads(path.read_text())
        return tuple(
            (
                list(part["classes"]),
                [(Path(p), int(i)) for p, i in part["items"]],
                [validate.BadImage(p, why) for p, why in part["bad"]],
            )
            for part in blob
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:  # torn or foreign: scan again
        log.warning("ignoring unreadable image-folder scan %s (%s)", path, exc)
        return None


def _load(cfg: ImageFolderDataConfig, cache_dir: str | None = None) -> RawDataset:
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(
            "data.root",
            f"{root} is not a folder",
            "pass data.root=/path/to/folder holding one subfolder per class (or train/ val/ test/)",
        )
    presplit = [s for s in SPLITS if (root / s).is_dir()]
    parts = presplit or [""]
    classes: list[str] | None = None
    items: list[tuple[Path, int]] = []
    bad: list[validate.BadImage] = []
    given: dict[str, np.ndarray] = {}
    for part, (part_classes, part_items, part_bad) in zip(
        parts, _scan_cached(root, parts, cache_dir), strict=True
    ):
        bad += part_bad
        if classes is not None and part_classes != classes:
            missing = sorted(set(classes) - set(part_classes))
            extra = sorted(set(part_classes) - set(classes))
            raise ConfigError(
                "data.root",
                f"{root / part} lacks class folder(s) {missing} and has extra {extra} "
                f"compared with {root / parts[0]}",
                "use the same class subfolders in every split",
            )
        classes = part_classes
        held = {label for _, label in part_items}
        empty_here = [c for i, c in enumerate(part_classes) if i not in held]
        if presplit and empty_here:
            raise ConfigError(
                "data.root",
                f"class folder(s) {empty_here} under {root / part} hold no readable images",
                "give every class images in every split folder, or drop the class everywhere",
            )
        given[part] = np.arange(len(items), len(items) + len(part_items))
        items += part_items
    assert classes is not None
    validate.raise_or_report(bad, cfg.on_bad_image, root)
    counts = (
        np.bincount([label for _, label in items], minlength=len(classes))
        if items
        else np.zeros(len(classes))
    )
    if len(classes) < 2:
        raise ConfigError(
            "data.root",
            f"{root} has {len(classes)} class folder(s) {classes}",
            "put each class's images in its own subfolder; at least two classes are needed",
        )
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise ConfigError(
            "data.root",
            f"class folder(s) {empty} under {root} hold no readable images"
            + (f" ({len(bad)} file(s) skipped as bad)" if bad else ""),
            "add images or remove the empty class folders",
        )
    shift = None
    if cfg.shift_root is not None:  # after the run's own images: their indices stay as without it
        shift_items = _shift_items(cfg, classes, cache_dir)
        shift = np.arange(len(items), len(items) + len(shift_items))
        items += shift_items
    paths = [p for p, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    given_splits = None
    if presplit:
        if "train" not in given or "test" not in given:
            raise ConfigError(
                "data.root",
                f"{root} has {presplit} but needs at least train/ and test/",
                "add the missing split folder, or put class folders directly under data.root",
            )
        given_splits = given
    return RawDataset(
        "imagefolder",
        lambda i: validate.load_image(paths[i]),
        labels,
        classes,
        str(root),
        given_splits,
        [str(p) for p in paths],
        bad,
        shift,
    )


def _shift_items(
    cfg: ImageFolderDataConfig, classes: list[str], cache_dir: str | None
) -> list[tuple[Path, int]]:
    """``data.shift_root``: its class folders must be the run's; each file checked like the run's own."""
    root = Path(str(cfg.shift_root)).expanduser()
    if not root.is_dir():
        raise ConfigError(
            "data.shift_root",
            f"{root} is not a folder",
            "pass a folder with the same class subfolders as data.root",
        )
    ((shift_classes, items, bad),) = _scan_cached(root, [""], cache_dir)
    if shift_classes != classes:
        raise ConfigError(
            "data.shift_root",
            f"{root} has class folders {shift_classes}, the run's are {classes}",
            "give the shifted set the same class subfolders as data.root (it is tested with the same head)",
        )
    validate.raise_or_report(bad, cfg.on_bad_image, root)
    if not items:
        raise ConfigError(
            "data.shift_root", f"{root} holds no readable images", "add images, or drop data.shift_root"
        )
    return items


def load(cfg: ImageFolderDataConfig, data_dir: str, cache_dir: str | None = None) -> RawDataset:
    return _load(cfg, cache_dir)


def check(cfg: ImageFolderDataConfig, cache_dir: str | None = None) -> None:
    """Pre-flight: the folder exists, has >= 2 classes and every file decodes (or is skipped)."""
    _load(cfg, cache_dir)


def identity(cfg: ImageFolderDataConfig, data_dir: str) -> Meta:
    own = folder_identity(Path(str(cfg.root)).expanduser().resolve(), {})
    if cfg.shift_root is None:  # the key a run without a shifted set always had
        return own
    return {**own, "shift": folder_identity(Path(str(cfg.shift_root)).expanduser().resolve(), {})}


SOURCE = Source(load, identity, check)
