"""The decoded-input cache: every image of a run decoded once per source, selection and preprocessing.

An entry (``<cache_dir>/inputs/<sha256>.safetensors``, a :class:`~transferlab.cache.TensorStore` entry)
holds the stored images (uint8 at the weights' eval resize, :mod:`transferlab.data`), labels, splits and
the dataset's fingerprint. It is written as a stream: each decoded image is appended to a pixel file
as it comes, and the entry is then written from that file (:func:`write_streamed`), so a run's memory
does not grow with the dataset while decoding; it is read back memory-mapped, hit or miss. Decoding
runs in ``trainer.num_workers`` processes when that is above 1; each writes its chunks of images to
part files of its own, which the entry is then copied from in order (only digests come back to this
process). The stream needs twice the entry's size on disk while it is written (pixel or part files,
and the entry); a full disk fails in one line and leaves none of them.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.backbones import Preprocess
from transferlab.cache import CACHE_FORMAT, Lookup, Meta, Tensors, TensorStore, write_error
from transferlab.data import RUN_SPLITS, Part, PreparedData, Splits, decode, prepare, storage_size
from transferlab.schemas import DataConfig
from transferlab.schemas.identity import drop_later_defaults
from transferlab.sources.registry import source_for
from transferlab.validate import BadImage
from transferlab.versions import package_versions

log = logging.getLogger("transferlab.cache")

# dtype names of the safetensors format, for the entries written here as a stream
_ST_DTYPES = {torch.uint8: "U8", torch.int64: "I64", torch.float32: "F32"}


def write_streamed(
    path: Path,
    pixels: Sequence[Path],
    channels: list[int],
    side: int,
    small: Tensors,
    metadata: dict[str, str],
) -> None:
    """A safetensors file of ``small`` and ``images`` (N, C, side, side) uint8 from files of per-image bytes.

    The images never sit in memory together: the ``pixels`` files, read in order, hold each image's
    ``c x side x side`` bytes in order (``channels``: each one's c; no image spans two files); a grey
    image among RGB ones is replicated to 3 channels as it is copied (channel-major bytes, so three
    copies of its one plane). The layout is the safetensors format's own: an 8-byte little-endian
    header length, the JSON header padded with spaces to 8 bytes, then the data; the small (int64)
    tensors come first so that each starts 8-byte aligned, as the format's own writer keeps them for
    zero-copy readers.
    """
    width = max(channels)
    if any(width % c for c in channels):
        raise ValueError(f"images of {sorted(set(channels))} channels cannot share one tensor")
    plane = side * side
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, tensor in small.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    shape = [len(channels), width, side, side]
    header["images"] = {
        "dtype": "U8",
        "shape": shape,
        "data_offsets": [offset, offset + len(channels) * width * plane],
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    same = all(c == width for c in channels)
    k = 0  # the next image's index in ``channels``
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for blob in blobs:
            out.write(blob)
        for part in pixels:
            with open(part, "rb") as src:
                if same:
                    shutil.copyfileobj(src, out, 1 << 24)
                    continue
                while k < len(channels) and (image := src.read(channels[k] * plane)):
                    out.write(image * (width // channels[k]))
                    k += 1


def source_identity(cfg: DataConfig, data_dir: str) -> Meta | None:
    """What the decoded images come from, computed without decoding; None: not cacheable."""
    return source_for(cfg).identity(cfg, data_dir)


def input_key(cfg: DataConfig, pre: Preprocess, identity: Meta) -> Meta:
    # Everything prepare() reads: the selection (limit, split fractions and seed), labelling, and
    # preprocessing. Augmentation runs on the stored images later, so it is no part of the entry.
    # The keys added later at their defaults are left out: the same images keep the same key.
    selection = {
        k: v for k, v in drop_later_defaults(asdict(cfg), "data.").items() if k not in ("cache", "download")
    }
    return {
        "kind": "inputs",
        "format": CACHE_FORMAT,
        "source": identity,
        "data": selection,
        "preprocess": asdict(pre),
        **package_versions(("torch", "torchvision", "pillow", "numpy", "scikit-learn")),
    }


def _pack(data: PreparedData) -> tuple[Tensors, Meta]:
    tensors = {"images": data.images, "labels": data.labels}
    tensors |= {f"split_{s}": torch.from_numpy(getattr(data.splits, s)) for s in RUN_SPLITS}
    meta = {
        "name": data.name,
        "classes": data.classes,
        "fingerprint": data.fingerprint,
        "source": data.source,
        # data.on_bad_image=skip: a hit must still report (and log) what was left out.
        "skipped": [{"path": b.path, "problem": b.problem} for b in data.skipped],
    }
    return tensors, meta


def _check_inputs(pre: Preprocess) -> Callable[[Tensors, Meta], str | None]:
    def check(tensors: Tensors, meta: Meta) -> str | None:
        images, labels = tensors.get("images"), tensors.get("labels")
        if (
            images is None
            or labels is None
            or any(f"split_{s}" not in tensors for s in ("train", "val", "test"))
        ):
            return f"missing tensors (has {sorted(tensors)})"
        side = storage_size(pre)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[2:]) != (side, side):
            return f"images {images.dtype} {tuple(images.shape)}, expected uint8 (N, C, {side}, {side})"
        if labels.shape != (images.shape[0],) or (
            len(labels) and int(labels.max()) >= len(meta.get("classes", []))
        ):
            return f"{tuple(labels.shape)} labels for {images.shape[0]} images and {len(meta.get('classes', []))} classes"
        for s in ("train", "val", "test"):
            idx = tensors[f"split_{s}"]
            if idx.ndim != 1 or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= images.shape[0])):
                return f"split {s} indexes outside the {images.shape[0]} images"
        if not isinstance(meta.get("fingerprint"), str) or len(meta["fingerprint"]) != 64:
            return "no dataset fingerprint"
        return None

    return check


def _inputs_writer(
    cfg: DataConfig, pre: Preprocess, data_dir: str, cache_dir: str, workers: int
) -> Callable[[Path, dict[str, str]], None]:
    """Decode straight into the entry: each stored image is appended to a pixel file as it comes, then the
    entry is written from that file (:func:`write_streamed`), so memory does not grow with the dataset."""

    def make(tmp: Path, header: dict[str, str]) -> None:
        pixels = tmp.with_name(tmp.name + ".pixels")
        sources = [pixels]  # this process's images; decode workers' chunks follow, as files of their own
        channels: list[int] = []
        try:
            with open(pixels, "wb") as out:

                def store(image: torch.Tensor | Part) -> None:
                    if isinstance(image, Part):  # written by a decode worker
                        sources.append(Path(image.path))
                        channels.extend(image.channels)
                        return
                    channels.append(image.shape[0])
                    try:
                        out.write(image.contiguous().numpy().data)  # no bytes copy per image
                    except OSError as exc:  # a full disk: one line, and nothing partial stays
                        raise write_error(tmp, exc) from None

                try:
                    data = decode(cfg, pre, data_dir, cache_dir, store, workers, parts=str(pixels))
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                    raise write_error(tmp, exc) from None  # a decode worker's part file hit it
            tensors, meta = _pack(data)
            del tensors["images"]
            try:
                write_streamed(
                    tmp, sources, channels, storage_size(pre), tensors, {**header, "meta": json.dumps(meta)}
                )
            except OSError as exc:
                raise write_error(tmp, exc) from None
        finally:
            pixels.unlink(missing_ok=True)
            for part in pixels.parent.glob(glob.escape(pixels.name) + ".part*"):  # finished or not
                part.unlink(missing_ok=True)

    return make


def prepare_cached(
    cfg: DataConfig, pre: Preprocess, data_dir: str, cache_dir: str, enabled: bool = True, workers: int = 0
) -> tuple[PreparedData, Lookup | None]:
    """:func:`transferlab.data.prepare`, decoded and resized once per source, selection and preprocessing,
    straight into the store and read back memory-mapped; ``workers`` > 1 decodes in that many processes."""
    identity = source_identity(cfg, data_dir) if enabled else None
    if identity is None:
        return prepare(cfg, pre, data_dir, workers=workers), None
    lookup = TensorStore(cache_dir, "inputs").get_or_make(
        input_key(cfg, pre, identity),
        _inputs_writer(cfg, pre, data_dir, cache_dir, workers),
        _check_inputs(pre),
    )
    t, meta = lookup.tensors, lookup.meta
    # An entry written before the shifted set existed has no split_shift: an empty one.
    splits = Splits(*(t[f"split_{s}"].numpy().astype(np.int64) for s in RUN_SPLITS if f"split_{s}" in t))
    data = PreparedData(
        meta["name"],
        t["images"],
        t["labels"],
        list(meta["classes"]),
        splits,
        pre,
        meta["fingerprint"],
        meta["source"],
        [BadImage(**b) for b in meta.get("skipped", [])],
    )
    log.info(
        "input cache %s: %s (%.1f s)", "hit" if lookup.hit else "miss, stored", lookup.path, lookup.seconds
    )
    return data, lookup
