"""Datasets as uint8 tensors at the weights' eval resize, decoded once; splits index into them.

Each image is decoded once and resized with the numbers of the weights' own eval transform
(:class:`~transferlab.backbones.Preprocess`): its shorter side to ``resize``, then the central
``resize x resize`` square, kept as uint8. That stored image is large enough for a random-resized crop
(:mod:`transferlab.augment`), and its centre ``crop x crop`` is exactly the eval transform's output
(resize then centre-crop), which validation, test and un-augmented training read with
:func:`eval_crop` and normalise per batch on the device. A square store keeps one fixed shape, so the
decoded-input cache is one tensor, memory-mapped when read (:mod:`transferlab.cache`); for images
that are not square, random crops are drawn from the central square (what the eval crop sees too).
Where the images come from is a source's business (:mod:`transferlab.sources`, one module per dataset).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from transferlab import validate
from transferlab.backbones import Preprocess
from transferlab.schemas import ConfigError, DataConfig
from transferlab.sources.base import SPLITS, RawDataset
from transferlab.sources.registry import source_for

__all__ = [
    "SPLITS",
    "PreparedData",
    "RawDataset",
    "Splits",
    "check_data",
    "decode",
    "load_raw",
    "make_splits",
    "prepare",
]
log = logging.getLogger("transferlab.data")


RUN_SPLITS = ("train", "val", "test", "shift")


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    # A shifted test set (data.shift_cell_type), tested with the same model: shift_test_* metrics.
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        return sizes | ({"shift_test": len(self.shift)} if len(self.shift) else {})

    def used(self) -> np.ndarray:
        """Every index a run uses, sorted."""
        return np.sort(np.concatenate([self.train, self.val, self.test, self.shift]))


@dataclass
class PreparedData:
    """What a run trains on: preprocessed images, labels, splits and a fingerprint of all of it."""

    name: str
    images: torch.Tensor  # (N, C, R, R) uint8 at the eval resize R, C = 1 (grayscale) or 3
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    splits: Splits
    preprocess: Preprocess
    # sha256 over each used image's sha256 (of its decoded pixels), in order, then their labels.
    fingerprint: str
    source: str
    skipped: list[validate.BadImage] = field(default_factory=list)  # left out as unreadable

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# Sources


def load_raw(cfg: DataConfig, data_dir: str, cache_dir: str | None = None) -> RawDataset:
    """The images of ``cfg``'s source, not yet decoded; the source is looked up by the config's schema.

    ``cache_dir``: where an image folder's check is kept (None: checked anew in each process).
    """
    return source_for(cfg).load(cfg, data_dir, cache_dir)


def check_data(cfg: DataConfig, cache_dir: str | None = None, data_dir: str = "") -> None:
    """Pre-flight: what a source can check before any compute (an image folder: every file decodes),
    and, with ``data.train_per_class`` or ``data.folds``, that those splits can be made, from the
    labels alone: a class too small is one line, before any MLflow run or decoded image."""
    if cfg.train_per_class is None and cfg.folds is None:
        source_for(cfg).check(cfg, cache_dir)
    else:  # every source's check is a load (or nothing), so the one load checks both
        make_splits(load_raw(cfg, data_dir, cache_dir), cfg)


# ---------------------------------------------------------------------------------------------
# Selection, splits, preprocessing


def _stratified_subset(indices: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n >= len(indices):
        return indices
    subset, _ = train_test_split(indices, train_size=n, stratify=labels[indices], random_state=seed)
    return np.sort(subset)


def _kfold(pool: np.ndarray, labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``data.folds=K``: the ``data.fold``-th of K stratified, seeded folds is the test part."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.split_seed)
    train, test = list(folds.split(pool, labels[pool]))[cfg.fold]
    return pool[train], pool[test]


def _per_class(train: np.ndarray, raw: RawDataset, n: int, seed: int) -> np.ndarray:
    """``data.train_per_class=N``: N training images of each class. One seeded order per class, of
    which the first N are kept, so the subsets are nested as N grows (a curve over N is not resampling
    noise)."""
    rng = np.random.default_rng(seed)
    kept = []
    for label, name in enumerate(raw.classes):
        own = np.sort(train[raw.labels[train] == label])
        order = rng.permutation(len(own))  # drawn for every class whatever N is: nested subsets
        if len(own) < n:
            raise ConfigError(
                "data.train_per_class",
                f"class {name!r} has {len(own)} training images, fewer than {n}",
                f"use at most data.train_per_class={len(own)} (the smallest class), or null for all",
            )
        kept.append(own[order[:n]])
    return np.sort(np.concatenate(kept))


def make_splits(raw: RawDataset, cfg: DataConfig) -> Splits:
    """Stratified, seeded splits (Deitsch et al. 2019: 75/25 train/test), val carved from train;
    ``data.folds``: K-fold test parts instead; ``data.train_per_class``: fewer training images."""
    labels = raw.labels
    # The shifted set is no part of the splits: the others are those a run without it gets.
    own = np.arange(len(labels)) if raw.shift is None else np.setdiff1d(np.arange(len(labels)), raw.shift)
    try:
        if cfg.folds is not None:  # every image the run may use, whatever splits a source gives
            given = raw.given_splits.values() if raw.given_splits is not None else [own]
            pool = np.sort(np.concatenate(list(given)))
            pool = _stratified_subset(pool, labels, cfg.limit or len(pool), cfg.split_seed)
            train, test = _kfold(pool, labels, cfg)
        elif raw.given_splits is None:
            everything = _stratified_subset(own, labels, cfg.limit or len(own), cfg.split_seed)
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
        if cfg.folds is None and raw.given_splits is not None and "val" in raw.given_splits:
            val = raw.given_splits["val"]
            if cfg.limit:
                val = _stratified_subset(val, labels, max(2, int(len(val) * share)), cfg.split_seed)
        else:
            train, val = train_test_split(
                train, test_size=cfg.val_fraction, stratify=labels[train], random_state=cfg.split_seed
            )
    except ValueError as exc:  # sklearn: a class too small to stratify
        raise ConfigError(
            "data.folds" if cfg.folds is not None else "data.limit",
            f"cannot split {raw.name} stratified ({exc})",
            "use fewer folds, more images (raise data.limit) or fewer classes",
        ) from None
    train = np.sort(np.asarray(train))
    if cfg.train_per_class is not None:
        train = _per_class(train, raw, cfg.train_per_class, cfg.split_seed)
    shift = np.zeros(0, dtype=np.int64) if raw.shift is None else np.sort(raw.shift).astype(np.int64)
    return Splits(train, np.sort(np.asarray(val)), np.sort(np.asarray(test)), shift)


def storage_size(pre: Preprocess) -> int:
    """The side of a stored image: the eval resize, never below the crop."""
    return max(pre.resize, pre.crop)


def _square_offset(length: int, side: int, crop: int) -> int:
    """Where the stored square starts along a side of ``length``: so that its centre crop is the crop the
    eval transform takes from the whole image. torchvision rounds a centre crop's offset half to even,
    so two centre crops in a row can land a pixel off one (235 -> 224 of a 500 x 375 photo does)."""
    want = int(round((length - crop) / 2.0))  # the eval transform's offset in the resized image
    inner = int(round((side - crop) / 2.0))  # eval_crop's offset in the square
    return min(max(want - inner, 0), length - side)


def preprocess_image(array: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side as the weights' eval transform does and keep a square of that side
    around the centre. uint8 in, uint8 out; :func:`eval_crop` of it is the eval transform's output."""
    tensor = torch.tensor(array)  # a copy: source arrays may be read-only
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    tensor = TF.resize(
        tensor, [pre.resize], interpolation=InterpolationMode(pre.interpolation), antialias=True
    )
    side = storage_size(pre)
    height, width = tensor.shape[-2:]
    if height < side or width < side:  # a crop larger than the resize: padded, as center_crop does
        return TF.center_crop(tensor, [side, side])
    top, left = (_square_offset(n, side, pre.crop) for n in (height, width))
    return tensor[:, top : top + side, left : left + side].contiguous()


def eval_crop(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """The centre ``crop x crop`` of stored images: the same pixels as resize-then-centre-crop."""
    return TF.center_crop(batch, [pre.crop, pre.crop])


def _selection(
    cfg: DataConfig, data_dir: str, cache_dir: str | None
) -> tuple[RawDataset, Splits, np.ndarray]:
    """The source's images, the run's splits and the sorted indices of the images they use."""
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
    return raw, splits, splits.used()


# The source a decode worker reads: set before the pool forks, so the workers inherit it (a source's
# ``read`` is a closure over its files, which need not pickle).
_WORKER_SOURCE: tuple[RawDataset, Preprocess] | None = None


CHUNK = 32  # images per decode task: enough work per round trip that the pool's overhead vanishes


def image_digest(array: np.ndarray) -> bytes:
    """sha256 of one decoded image's pixels: the dataset fingerprint hashes these in order (so the
    decode workers can hash what they decode, and nothing full-size travels back)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()


def worker_setup(*_: object) -> None:
    """In a forked worker (decode pool, DataLoader): one torch thread, and the parent's stop handlers
    undone, so a Ctrl-C reaches the run once and a terminate() ends the worker."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass(frozen=True)
class Part:
    """A decode worker's chunk of stored images, written by it to ``path`` as each one's bytes in order
    (``channels``: each one's c): only digests and this record travel back to the parent."""

    path: str
    channels: list[int]


def _decode_chunk(indices: list[int], part: str | None = None) -> tuple[list[bytes], list[np.ndarray] | Part]:
    """In a worker: the chunk's digests and its stored images, or (``part``) the images written there."""
    raw, pre = _WORKER_SOURCE  # type: ignore[misc]
    digests: list[bytes] = []
    images: list[np.ndarray] = []
    channels: list[int] = []
    with open(part, "wb") if part is not None else contextlib.nullcontext() as out:
        for index in indices:
            array = raw.read(index)
            digests.append(image_digest(array))
            stored = preprocess_image(array, pre)
            if out is None:
                images.append(stored.numpy())
            else:
                channels.append(stored.shape[0])
                out.write(stored.contiguous().numpy().data)
    return digests, images if part is None else Part(part, channels)


def decode_workers(asked: int) -> int:
    """How many decode processes to fork: ``asked``, or 0 where forking is unsafe or unavailable.

    Forking a process that runs other threads can hand a child a lock one of them held (the child
    then never starts, and never exits): with other threads running, decoding stays in this process.
    """
    if asked <= 1:
        return 0
    if "fork" not in multiprocessing.get_all_start_methods():
        log.info("decoding in this process: no fork on this platform")
        return 0
    # MLflow's system-metrics sampler is let through: it takes no lock a decode child uses (psutil and
    # the tracking client, never Pillow, torch or NumPy), and the locks of logging and imports are
    # re-initialised in a forked child by Python itself.
    others = [
        t
        for t in threading.enumerate()
        if t is not threading.current_thread() and t.name != "SystemMetricsMonitor"
    ]
    if others:
        log.info(
            "decoding in this process: other threads are running (%s)", ", ".join(t.name for t in others)
        )
        return 0
    return asked


def _decoded(
    raw: RawDataset, used: np.ndarray, pre: Preprocess, workers: int, parts: str | None = None
) -> Iterator[tuple[list[bytes], torch.Tensor | Part]]:
    """Each used image's digest and stored form, in order; ``workers`` > 1 decodes in that many
    processes, which with ``parts`` (a path prefix) write each chunk to a file of their own and send
    back its :class:`Part`: the parent then only hashes, and the images never pass through it."""
    if workers <= 1:
        for i in used:
            array = raw.read(int(i))
            yield [image_digest(array)], preprocess_image(array, pre)
        return
    global _WORKER_SOURCE
    _WORKER_SOURCE = (raw, pre)
    context = multiprocessing.get_context("fork")
    chunks = (
        (used[i : i + CHUNK].tolist(), None if parts is None else f"{parts}.part{i // CHUNK:07d}")
        for i in range(0, len(used), CHUNK)
    )
    try:
        with context.Pool(workers, initializer=worker_setup) as pool:
            # Two chunks per worker in flight: results never pile up in this process faster than
            # they are stored (Pool.imap would queue all of them).
            pending: collections.deque = collections.deque()
            for chunk in itertools.islice(chunks, 2 * workers):
                pending.append(pool.apply_async(_decode_chunk, chunk))
            while pending:
                digests, done = pending.popleft().get()
                for chunk in itertools.islice(chunks, 1):
                    pending.append(pool.apply_async(_decode_chunk, chunk))
                if isinstance(done, Part):
                    yield digests, done
                else:
                    for one, stored in zip(digests, done, strict=True):
                        yield [one], torch.from_numpy(stored)
    finally:
        _WORKER_SOURCE = None


def decode(
    cfg: DataConfig,
    pre: Preprocess,
    data_dir: str,
    cache_dir: str | None,
    store: Callable[[torch.Tensor | Part], None],
    workers: int = 0,
    parts: str | None = None,
) -> PreparedData:
    """Decode the images a run uses once, hand each stored image to ``store`` as it comes, fingerprint
    them all. The returned record has no images yet (``images`` is an empty tensor): the caller keeps them.
    With ``parts`` (a path prefix) decode workers write their chunks to files there themselves and
    ``store`` gets each chunk's :class:`Part`, in order, instead of its images."""
    raw, splits, used = _selection(cfg, data_dir, cache_dir)
    workers = decode_workers(workers)
    digest = hashlib.sha256()
    start = time.perf_counter()
    with contextlib.closing(_decoded(raw, used, pre, workers, parts)) as images:  # an error stops the workers
        for digests, stored in images:
            for image_sha256 in digests:
                digest.update(image_sha256)
            store(stored)
    seconds = time.perf_counter() - start
    log.info(
        "decoded %d images in %.1f s (%.0f images/s, %s)",
        len(used),
        seconds,
        len(used) / seconds if seconds else 0.0,
        f"{workers} worker processes" if workers > 1 else "in this process",
    )
    digest.update(raw.labels[used].tobytes())
    position = np.full(len(raw.labels), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    compact = Splits(*(position[getattr(splits, s)] for s in RUN_SPLITS))
    return PreparedData(
        raw.name,
        torch.empty(0, dtype=torch.uint8),
        torch.from_numpy(raw.labels[used]),
        raw.classes,
        compact,
        pre,
        digest.hexdigest(),
        raw.source,
        raw.skipped,
    )


def prepare(
    cfg: DataConfig, pre: Preprocess, data_dir: str, cache_dir: str | None = None, workers: int = 0
) -> PreparedData:
    """:func:`decode` into memory (``data.cache=false``, generated data): every stored image held at once."""
    stored: list[torch.Tensor] = []
    data = decode(cfg, pre, data_dir, cache_dir, stored.append, workers)
    # A mixed folder: grey images become RGB (resize and crop act per channel, so the order is free).
    channels = max(t.shape[0] for t in stored)
    data.images = torch.stack([t.expand(channels, -1, -1) for t in stored])
    return data


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


def class_counts(labels: torch.Tensor | Sequence[int], num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(labels), minlength=num_classes).tolist()
