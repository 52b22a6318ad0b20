"""Datasets as in-memory uint8 tensors, preprocessed once the way the backbone's weights expect.

Each image is decoded once, resized and centre-cropped with the numbers of the weights' own eval
transform (:class:`~transferlab.backbones.Preprocess`), and kept as uint8. Normalisation and
augmentation then run per batch on the device, which is both faster than per-sample PIL work and
exactly the same arithmetic for every mode. Splits are index arrays into that one tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torchvision
from sklearn.model_selection import train_test_split
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from transferlab import validate
from transferlab.backbones import Preprocess
from transferlab.config import (
    ConfigError,
    DataConfig,
    ElpvDataConfig,
    ImageFolderDataConfig,
    SyntheticDataConfig,
    TorchvisionDataConfig,
)

TORCHVISION_DATASETS = ("cifar10", "flowers102", "oxford_iiit_pet", "dtd")
SPLITS = ("train", "val", "test")
log = logging.getLogger("transferlab.data")


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


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class PreparedData:
    """What a run trains on: preprocessed images, labels, splits and a fingerprint of all of it."""

    name: str
    images: torch.Tensor  # (N, C, S, S) uint8, C = 1 (grayscale) or 3
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    splits: Splits
    preprocess: Preprocess
    fingerprint: str  # sha256 of decoded pixels + labels of the images used
    source: str
    skipped: list[validate.BadImage] = field(default_factory=list)  # left out as unreadable

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# Sources


def _elpv(cfg: ElpvDataConfig) -> RawDataset:
    import elpv_dataset

    # The package's labels.csv, parsed as its utils.load_dataset() does; that function also decodes
    # all 2,624 PNGs up front (seconds), where a run with data.limit or cell_type needs only some.
    src = Path(elpv_dataset.__file__).parent / "data"
    table = np.genfromtxt(
        src / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"]
    )
    paths, probs, types = (np.char.decode(table["path"]), table["probability"], np.char.decode(table["type"]))
    keep = np.ones(len(probs), dtype=bool) if cfg.cell_type == "all" else types == cfg.cell_type
    paths, probs = paths[keep], probs[keep]
    if cfg.labels == "binary":
        labels = (probs >= cfg.threshold).astype(np.int64)
        classes = ["functional", "defective"]
    else:
        labels = np.rint(probs * 3).astype(np.int64)
        classes = ["p=0", "p=1/3", "p=2/3", "p=1"]

    def read(i: int) -> np.ndarray:
        with PIL.Image.open(src / paths[i]) as image:
            return np.asarray(image)

    return RawDataset("elpv", read, labels, classes, str(src))


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


def listing_sha256(root: Path) -> tuple[str, int]:
    """Names, sizes and modification times of every file under ``root``: found without decoding."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return digest.hexdigest(), count


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


def _imagefolder(cfg: ImageFolderDataConfig, cache_dir: str | None = None) -> RawDataset:
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
    )


def _torchvision(cfg: TorchvisionDataConfig, data_dir: str) -> RawDataset:
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


def synthetic_images(cfg: SyntheticDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a grating at angle k*pi/K with a random phase and noise: learnable, not trivial."""
    rng = np.random.default_rng(cfg.split_seed)
    size, k = cfg.image_size, cfg.num_classes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels = [], []
    for label in range(k):
        angle = math.pi * label / k
        for _ in range(cfg.images_per_class):
            phase = rng.uniform(0, 2 * math.pi)
            wave = np.sin(2 * math.pi * 4 * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
            rgb = np.stack([wave, wave * 0.5, -wave], axis=-1) + rng.normal(0, 0.3, (size, size, 3))
            images.append(np.clip((rgb + 1.5) / 3 * 255, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _synthetic(cfg: SyntheticDataConfig) -> RawDataset:
    images, labels = synthetic_images(cfg)
    return RawDataset(
        "synthetic",
        lambda i: images[i],
        labels,
        [f"class_{c}" for c in range(cfg.num_classes)],
        f"synthetic://{cfg.num_classes}x{cfg.images_per_class}@{cfg.image_size}px",
    )


def load_raw(cfg: DataConfig, data_dir: str, cache_dir: str | None = None) -> RawDataset:
    """``cache_dir``: where an image folder's check is kept (None: checked anew in each process)."""
    if isinstance(cfg, ElpvDataConfig):
        return _elpv(cfg)
    if isinstance(cfg, ImageFolderDataConfig):
        return _imagefolder(cfg, cache_dir)
    if isinstance(cfg, TorchvisionDataConfig):
        return _torchvision(cfg, data_dir)
    if isinstance(cfg, SyntheticDataConfig):
        return _synthetic(cfg)
    raise ConfigError(
        "data",
        f"no loader for {type(cfg).__name__}",
        "choose data=elpv, imagefolder, synthetic or a torchvision set",
    )


def check_data(cfg: DataConfig, cache_dir: str | None = None) -> None:
    """Pre-flight: an image folder exists, has >= 2 classes and every file decodes (or is skipped)."""
    if isinstance(cfg, ImageFolderDataConfig):
        _imagefolder(cfg, cache_dir)


# ---------------------------------------------------------------------------------------------
# Selection, splits, preprocessing


def _stratified_subset(indices: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n >= len(indices):
        return indices
    subset, _ = train_test_split(indices, train_size=n, stratify=labels[indices], random_state=seed)
    return np.sort(subset)


def make_splits(raw: RawDataset, cfg: DataConfig) -> Splits:
    """Stratified, seeded splits (Deitsch et al. 2019: 75/25 train/test), val carved from train."""
    labels = raw.labels
    try:
        if raw.given_splits is None:
            everything = _stratified_subset(
                np.arange(len(labels)), labels, cfg.limit or len(labels), cfg.split_seed
            )
            train, test = train_test_split(
                everything,
                test_size=cfg.test_fraction,
                stratify=labels[everything],
                random_state=cfg.split_seed,
            )
        else:
            train, test = raw.given_splits["train"], raw.given_splits["test"]
            if cfg.limit:  # keep the given proportions
                share = cfg.limit / (len(train) + len(test) + len(raw.given_splits.get("val", [])))
                train = _stratified_subset(train, labels, max(2, int(len(train) * share)), cfg.split_seed)
                test = _stratified_subset(test, labels, max(2, int(len(test) * share)), cfg.split_seed)
        if raw.given_splits is not None and "val" in raw.given_splits:
            val = raw.given_splits["val"]
            if cfg.limit:
                val = _stratified_subset(val, labels, max(2, int(len(val) * share)), cfg.split_seed)
        else:
            train, val = train_test_split(
                train, test_size=cfg.val_fraction, stratify=labels[train], random_state=cfg.split_seed
            )
    except ValueError as exc:  # sklearn: a class too small to stratify
        raise ConfigError(
            "data.limit",
            f"cannot split {raw.name} stratified ({exc})",
            "use more images (raise data.limit) or fewer classes",
        ) from None
    return Splits(np.sort(np.asarray(train)), np.sort(np.asarray(val)), np.sort(np.asarray(test)))


def preprocess_image(array: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side and centre-crop, as the weights' eval transform does. uint8 in, uint8 out."""
    tensor = torch.tensor(array)  # a copy: source arrays may be read-only
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    tensor = TF.resize(
        tensor, [pre.resize], interpolation=InterpolationMode(pre.interpolation), antialias=True
    )
    return TF.center_crop(tensor, [pre.crop, pre.crop])


def prepare(cfg: DataConfig, pre: Preprocess, data_dir: str, cache_dir: str | None = None) -> PreparedData:
    """Decode the images a run uses once, fingerprint them, and preprocess them for ``pre``."""
    raw = load_raw(cfg, data_dir, cache_dir)
    if raw.skipped:
        first = raw.skipped[0]
        log.warning(
            "data.on_bad_image=skip: left out %d unreadable file(s), e.g. %s: %s",
            len(raw.skipped),
            first.path,
            first.problem,
        )
    splits = make_splits(raw, cfg)
    used = np.sort(np.concatenate([splits.train, splits.val, splits.test]))
    digest = hashlib.sha256()
    processed = []  # preprocessed as they are decoded: full-size images are never all held at once
    for i in used:
        array = raw.read(int(i))
        digest.update(np.ascontiguousarray(array).tobytes())
        processed.append(preprocess_image(array, pre))
    digest.update(raw.labels[used].tobytes())
    # A mixed folder: grey images become RGB (resize and crop act per channel, so the order is free).
    channels = max(t.shape[0] for t in processed)
    out = torch.stack([t.expand(channels, -1, -1) for t in processed])
    # Re-index the splits into the compact tensor of used images.
    position = np.full(len(raw.labels), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    compact = Splits(position[splits.train], position[splits.val], position[splits.test])
    return PreparedData(
        raw.name,
        out,
        torch.from_numpy(raw.labels[used]),
        raw.classes,
        compact,
        pre,
        digest.hexdigest(),
        raw.source,
        raw.skipped,
    )


# ---------------------------------------------------------------------------------------------
# Per-batch transforms (on the device)


def normalize(batch: torch.Tensor, pre: Preprocess, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float, 3 channels (grey replicated for RGB backbones), normalised."""
    x = batch.to(dtype).div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(pre.mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips per image: label-preserving for cells, textures and photos alike."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = batch.clone()
    batch[flip] = batch[flip].flip(-1)
    return batch


def class_counts(labels: torch.Tensor | Sequence[int], num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(labels), minlength=num_classes).tolist()
