"""On-disk caches under ``paths.cache_dir``: decoded inputs and frozen-backbone features.

A frozen backbone maps an image to the same feature vector in every epoch of every run that shares
the backbone, the images and the preprocessing, so a sweep of learning rates and seeds needs one
backbone pass in all. Likewise the decoded, resized uint8 images depend only on the dataset and the
preprocessing, not on the mode. Both are stored here, keyed by everything that determines them.

An entry is one safetensors file named by the sha256 of its JSON key; its header holds the cache
format, the full key and a little metadata. Entries are written to a temporary file and moved into
place with ``os.replace`` (readers never see a torn file), under a per-entry lock file, so parallel
sweep jobs compute an entry once: the first computes, the others wait and then read it. An entry
that cannot be read, has another format or key, or has the wrong shapes is logged and rebuilt.

Layout: ``<cache_dir>/features/<sha256>.safetensors`` and ``<cache_dir>/inputs/<sha256>.safetensors``
(each with a ``.lock`` beside it). ``make clean-cache`` empties the default ``<repo>/.cache``. Entries are
read memory-mapped (safetensors maps the file): their pages are page cache, not the run's own memory.
The feature cache lives here; the decoded inputs, written as a stream, in :mod:`transferlab.inputs`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.backbones import BuiltBackbone
from transferlab.data import PreparedData
from transferlab.schemas import ConfigError
from transferlab.versions import package_versions

log = logging.getLogger("transferlab.cache")

# Bump when the layout or the meaning of an entry changes: older entries are then rebuilt.
# 2: input entries record the images data.on_bad_image=skip left out; 3: images stored at the eval
# resize (uncropped square) for random crops, read memory-mapped.
CACHE_FORMAT = 3

Tensors = dict[str, torch.Tensor]
Meta = dict[str, Any]


class CacheWriteError(ConfigError):
    """The cache folder cannot take an entry (full disk, no permission): the run stops, nothing partial stays."""


@dataclass
class Lookup:
    """One cache access: what was read or computed, and whether it came from disk."""

    tensors: Tensors
    meta: Meta
    hit: bool
    seconds: float  # loading on a hit, computing and writing on a miss
    path: Path


def key_digest(key: Meta) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class TensorStore:
    """A folder of safetensors entries, each computed once under a lock and written atomically."""

    def __init__(self, root: str | Path, kind: str) -> None:
        self.dir = Path(root).expanduser() / kind
        self.kind = kind

    def path(self, key: Meta) -> Path:
        return self.dir / f"{key_digest(key)}.safetensors"

    def get_or_compute(
        self,
        key: Meta,
        compute: Callable[[], tuple[Tensors, Meta]],
        check: Callable[[Tensors, Meta], str | None],
    ) -> Lookup:
        """Read the entry for ``key``; on a miss (or an unusable entry) compute, write and return it.

        ``check`` returns what is wrong with a loaded entry (or None): shapes a reader relies on.
        """

        def make(tmp: Path, header: dict[str, str]) -> None:
            tensors, meta = compute()
            problem = check(tensors, meta)
            if problem is not None:  # a bug in the producer, not a cache problem: never store it
                raise RuntimeError(f"refusing to cache a {self.kind} entry: {problem}")
            try:
                save_file(
                    {k: v.contiguous() for k, v in tensors.items()},
                    tmp,
                    metadata={**header, "meta": json.dumps(meta)},
                )
            except OSError as exc:
                raise write_error(tmp, exc) from None

        return self.get_or_make(key, make, check)

    def get_or_make(
        self,
        key: Meta,
        make: Callable[[Path, dict[str, str]], None],
        check: Callable[[Tensors, Meta], str | None],
    ) -> Lookup:
        """Like :meth:`get_or_compute`, but ``make(tmp, header)`` writes the entry's file itself (a stream
        that never holds the tensors in memory), with ``header`` and a ``meta`` JSON in its metadata.

        The entry is read back memory-mapped either way: a hit and a miss return the same kind of tensors,
        and the run's own memory does not hold them.
        """
        path = self.path(key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.dir, exc) from None
        start = time.perf_counter()
        lock = FileLock(f"{path}.lock")
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("%s cache: another process is computing %s; waiting for it", self.kind, path.name)
                lock.acquire()
        except OSError as exc:  # a read-only or vanished cache folder
            raise write_error(path, exc) from None
        try:
            if path.exists():
                tensors, meta, problem = self._read(path, key, check)
                if problem is None:
                    return Lookup(tensors, meta, True, time.perf_counter() - start, path)
                log.warning("%s cache entry %s is unusable (%s): rebuilding it", self.kind, path, problem)
                path.unlink(missing_ok=True)
            self._make(path, key, make)
            tensors, meta, problem = self._read(path, key, check)
            if problem is not None:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"refusing to keep a {self.kind} entry: {problem}")
            return Lookup(tensors, meta, False, time.perf_counter() - start, path)
        finally:
            lock.release()

    @staticmethod
    def _read(
        path: Path, key: Meta, check: Callable[[Tensors, Meta], str | None]
    ) -> tuple[Tensors, Meta, str | None]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
            if header.get("format") != str(CACHE_FORMAT):
                return {}, {}, f"cache format {header.get('format')!r}, this code writes {CACHE_FORMAT}"
            if key_digest(json.loads(header.get("key", "null"))) != key_digest(key):
                return {}, {}, "its stored key differs from its file name's"
            meta = json.loads(header.get("meta", "{}"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:  # truncated or garbled file
            return {}, {}, f"unreadable: {type(exc).__name__}: {exc}"
        return tensors, meta, check(tensors, meta)

    @staticmethod
    def _make(path: Path, key: Meta, make: Callable[[Path, dict[str, str]], None]) -> None:
        """``make`` writes a temporary file; on disk (fsync) it gets its final name, else nothing stays."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        header = {"format": str(CACHE_FORMAT), "key": json.dumps(key, sort_keys=True)}
        try:
            make(tmp, header)  # its writes raise CacheWriteError; a source's read errors pass as they are
            try:
                with open(tmp, "rb") as fh:  # on disk before it gets its final name
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                raise write_error(path, exc) from None
        finally:
            tmp.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> CacheWriteError:
    if path.name.startswith(".") and path.name.endswith(".tmp"):  # name the entry, not its temporary file
        path = path.with_name(path.name[1:].rsplit(".", 2)[0])
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return CacheWriteError(
        "paths.cache_dir",
        f"cannot write cache entry {path} ({reason}); nothing partial was kept",
        "free disk space (make clean-cache empties the default cache), point paths.cache_dir at a "
        "larger disk, or turn the caches off (trainer.feature_cache=false data.cache=false)",
    )


def sha256_tensors(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Frozen-backbone features


@dataclass
class FeatureCache:
    """Frozen features of a run's images, shared by every run with the same key (see :func:`feature_key`)."""

    root: str | Path
    built: BuiltBackbone
    lookup: Lookup | None = field(default=None, init=False)

    def features(
        self, backbone: nn.Module, data: PreparedData, compute: Meta, extract: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The backbone output for every image of ``data``: from disk, or ``extract()``-ed once and stored.

        ``compute``: how the caller runs the backbone (device type, dtype, layout, batch size).
        """
        key = feature_key(backbone, self.built, data, compute)
        rows = len(data.labels)

        def produce() -> tuple[Tensors, Meta]:
            log.info("feature cache miss: running the frozen backbone once over %d images", rows)
            return {"features": extract().cpu()}, {"dataset": data.name}

        def check(tensors: Tensors, meta: Meta) -> str | None:
            feats = tensors.get("features")
            if feats is None or feats.ndim != 2 or feats.shape[0] != rows:
                shape = None if feats is None else tuple(feats.shape)
                return f"features of shape {shape}, expected ({rows}, width)"
            if feats.dtype != torch.float32 or not bool(torch.isfinite(feats).all()):
                return "features are not finite float32"
            return None

        self.lookup = TensorStore(self.root, "features").get_or_compute(key, produce, check)
        if self.lookup.hit:
            log.info("feature cache hit: %s (%.1f s to load)", self.lookup.path, self.lookup.seconds)
        return self.lookup.tensors["features"]


def feature_key(backbone: nn.Module, built: BuiltBackbone, data: PreparedData, compute: Meta) -> Meta:
    """Everything that decides the features, and nothing that does not (lr, optimizer, seed, epochs, split).

    The backbone is identified by the sha256 of its state as it runs, which covers pretrained weights
    and random init (whose values depend on the seed) alike. The computation's dtype, device type,
    memory layout and batch size (``compute``) are part of it because each can change the float
    results: a run that hits the cache is bit-identical to one that computes the features itself.
    """
    return {
        "kind": "features",
        "format": CACHE_FORMAT,
        "backbone": {
            "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "weight_source": built.weight_source,
            "weight_sha256": built.weight_sha256,
            "state_sha256": sha256_tensors(backbone.state_dict()),
        },
        "inputs": {
            "fingerprint": data.fingerprint,
            "shape": list(data.images.shape),
            "preprocess": asdict(data.preprocess),
        },
        "compute": {**compute, **package_versions(("torch", "torchvision", "timm"))},
    }
