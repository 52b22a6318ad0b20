"""``data=elpv``: the ELPV solar-cell images (Deitsch et al. 2019), shipped in the elpv-dataset wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from transferlab.schemas import ElpvDataConfig
from transferlab.sources.base import Meta, RawDataset, Source, folder_identity
from transferlab.versions import package_versions

SCHEMA = ElpvDataConfig


def root() -> Path:
    """The wheel's data folder. Imported on use: a machine without the wheel (a bare GPU box running
    the GPU check) still loads every other source."""
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


def load(cfg: ElpvDataConfig, data_dir: str = "", cache_dir: str | None = None) -> RawDataset:
    # The package's labels.csv, parsed as its utils.load_dataset() does; that function also decodes
    # all 2,624 PNGs up front (seconds), where a run with data.limit or cell_type needs only some.
    src = root()
    table = np.genfromtxt(
        src / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"]
    )
    paths, probs, types = (np.char.decode(table["path"]), table["probability"], np.char.decode(table["type"]))
    keep = np.ones(len(probs), dtype=bool) if cfg.cell_type == "all" else types == cfg.cell_type
    keep |= types == cfg.shift_cell_type  # the shifted test set (none when null)
    paths, probs, types = paths[keep], probs[keep], types[keep]
    shift = np.flatnonzero(types == cfg.shift_cell_type) if cfg.shift_cell_type else None
    if cfg.labels == "binary":
        labels = (probs >= cfg.threshold).astype(np.int64)
        classes = ["functional", "defective"]
    else:
        labels = np.rint(probs * 3).astype(np.int64)
        classes = ["p=0", "p=1/3", "p=2/3", "p=1"]

    def read(i: int) -> np.ndarray:
        with PIL.Image.open(src / paths[i]) as image:
            return np.asarray(image)

    return RawDataset(
        "elpv", read, labels, classes, str(src), sources=[str(src / p) for p in paths], shift=shift
    )


def identity(cfg: ElpvDataConfig, data_dir: str) -> Meta:
    return folder_identity(root(), package_versions(("elpv-dataset",)))


SOURCE = Source(load, identity)
