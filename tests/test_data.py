"""Datasets: ELPV as published, a user's image folder, torchvision sets offline, stratified splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.backbones import Preprocess
from transferlab.data import load_raw, make_splits, prepare
from transferlab.schemas import (
    ConfigError,
    ElpvDataConfig,
    ImageFolderDataConfig,
    SyntheticDataConfig,
    TorchvisionDataConfig,
)

from .conftest import TINY, runs_in, store_overrides

SMALL = Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


def test_elpv_binary_split_as_deitsch_et_al() -> None:
    raw = load_raw(ElpvDataConfig(), "")
    assert len(raw.labels) == 2624 and raw.classes == ["functional", "defective"]
    splits = make_splits(raw, ElpvDataConfig())
    n_test, n_trainval = len(splits.test), len(splits.train) + len(splits.val)
    assert n_test == 656 and n_trainval == 1968  # stratified 75/25
    assert len(set(splits.train) | set(splits.val) | set(splits.test)) == 2624
    share = raw.labels.mean()
    for part in (splits.train, splits.val, splits.test):
        assert abs(raw.labels[part].mean() - share) < 0.02
    # Seeded: the same split every time, independent of the training seed.
    again = make_splits(raw, ElpvDataConfig())
    assert (again.test == splits.test).all()


@pytest.mark.slow
def test_elpv_reads_what_the_package_loader_does() -> None:
    """Labels, types and pixels as ``elpv_dataset.utils.load_dataset()`` (which decodes all 2,624 first)."""
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    raw = load_raw(ElpvDataConfig(), "")
    assert (raw.labels == (probs >= 0.5)).all()
    for i in range(len(images)):
        assert np.array_equal(raw.read(i), images[i])
    poly = load_raw(ElpvDataConfig(cell_type="poly", labels="four_class"), "")
    assert (poly.labels == np.rint(probs[types == "poly"] * 3)).all()
    assert np.array_equal(poly.read(0), images[types == "poly"][0])


def test_elpv_options() -> None:
    four = load_raw(ElpvDataConfig(labels="four_class"), "")
    assert sorted(set(four.labels.tolist())) == [0, 1, 2, 3]
    mono = load_raw(ElpvDataConfig(cell_type="mono"), "")
    poly = load_raw(ElpvDataConfig(cell_type="poly"), "")
    assert len(mono.labels) + len(poly.labels) == 2624 and len(mono.labels) > 0


def test_limit_is_stratified() -> None:
    cfg = ElpvDataConfig(limit=200)
    data = prepare(cfg, SMALL, "")
    assert len(data.labels) == 200
    # Grey kept as one channel until the batch, stored at the eval resize (SMALL: 36, crop 32).
    assert data.images.shape == (200, 1, SMALL.resize, SMALL.resize) and SMALL.resize == 36
    assert abs(data.labels.float().mean().item() - load_raw(ElpvDataConfig(), "").labels.mean()) < 0.02


def _folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 24)) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (10 * i, 100 if name == "a" else 200, 0)).save(root / name / f"{i}.png")


def test_imagefolder_split_here(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 12, "b": 12})
    (tmp_path / ".hidden").mkdir()  # ignored, as are hidden files
    (tmp_path / "a" / ".DS_Store").write_text("x")
    data = prepare(ImageFolderDataConfig(root=str(tmp_path)), SMALL, "")
    assert data.classes == ["a", "b"] and len(data.labels) == 24
    assert sum(data.splits.sizes().values()) == 24 and data.splits.sizes()["test"] == 6


def test_imagefolder_presplit(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 8, "b": 8})
    _folder(tmp_path / "test", {"a": 3, "b": 3})
    data = prepare(ImageFolderDataConfig(root=str(tmp_path)), SMALL, "")
    assert data.splits.sizes() == {"train": 14, "val": 2, "test": 6}
    _folder(tmp_path / "val", {"a": 2, "b": 2})
    data = prepare(ImageFolderDataConfig(root=str(tmp_path)), SMALL, "")
    assert data.splits.sizes() == {"train": 16, "val": 4, "test": 6}


def test_imagefolder_bad_layouts(tmp_path: Path) -> None:
    _folder(tmp_path / "one", {"a": 4})
    with pytest.raises(ConfigError, match="at least two classes"):
        load_raw(ImageFolderDataConfig(root=str(tmp_path / "one")), "")
    _folder(tmp_path / "empty", {"a": 4})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(ConfigError, match=r"\['b'\] .* hold no readable images"):
        load_raw(ImageFolderDataConfig(root=str(tmp_path / "empty")), "")
    _folder(tmp_path / "mismatch" / "train", {"a": 4, "b": 4})
    _folder(tmp_path / "mismatch" / "test", {"a": 4, "c": 4})
    with pytest.raises(ConfigError, match="same class subfolders"):
        load_raw(ImageFolderDataConfig(root=str(tmp_path / "mismatch")), "")


def test_torchvision_dataset_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    with pytest.raises(ConfigError) as info:
        load_raw(TorchvisionDataConfig(name="cifar10", root=str(tmp_path / "cifar10")), "")
    assert info.value.key == "data.root" and "machine with internet" in info.value.fix
    with pytest.raises(ConfigError, match="Dataset not found"):
        load_raw(TorchvisionDataConfig(name="dtd", root=str(tmp_path / "dtd"), download=False), "")


def test_synthetic_is_learnable_and_seeded() -> None:
    a = prepare(SyntheticDataConfig(num_classes=3), SMALL, "")
    b = prepare(SyntheticDataConfig(num_classes=3), SMALL, "")
    assert a.fingerprint == b.fingerprint and a.num_classes == 3
    assert prepare(SyntheticDataConfig(num_classes=3, split_seed=1), SMALL, "").fingerprint != a.fingerprint
    assert np.unique(a.labels.numpy()).tolist() == [0, 1, 2]


def test_every_data_schema_has_a_source_and_a_derived_schema_uses_its_parents() -> None:
    from dataclasses import dataclass

    from transferlab.schemas import DATA_SCHEMAS
    from transferlab.sources.registry import SOURCES, source_for

    assert set(DATA_SCHEMAS.values()) == set(SOURCES)  # a schema without a loader would load nothing

    @dataclass
    class MonoElpv(ElpvDataConfig):
        cell_type: str = "mono"

    assert source_for(MonoElpv()) is SOURCES[ElpvDataConfig]


# -- k-fold and data efficiency (the protocol's replicates and the crossover curve) ------------------


def test_folds_partition_the_data_stratified_and_reproducibly() -> None:
    cfg = SyntheticDataConfig(num_classes=3, images_per_class=20, folds=4)
    raw = load_raw(cfg, "")
    tests = []
    for fold in range(4):
        splits = make_splits(raw, SyntheticDataConfig(num_classes=3, images_per_class=20, folds=4, fold=fold))
        parts = [set(splits.train), set(splits.val), set(splits.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(parts[0] | parts[1] | parts[2]) == 60  # every image, once
        counts = np.bincount(raw.labels[splits.test], minlength=3)
        assert counts.max() - counts.min() <= 1  # stratified
        tests.append(splits.test)
    joined = np.concatenate(tests)
    assert sorted(joined) == list(range(60))  # the test folds partition the data
    again = make_splits(raw, SyntheticDataConfig(num_classes=3, images_per_class=20, folds=4, fold=2))
    assert np.array_equal(again.test, tests[2])
    other = make_splits(
        raw, SyntheticDataConfig(num_classes=3, images_per_class=20, folds=4, fold=2, split_seed=7)
    )
    assert not np.array_equal(other.test, tests[2])


def test_folds_pool_a_sources_own_splits(tmp_path: Path) -> None:
    """A source that comes split (an image folder with train/ val/ test/, like torchvision's and the
    Hub's datasets): data.folds rotates the test fold over all of its images, its own splits pooled."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    raw = load_raw(ImageFolderDataConfig(root=str(tmp_path)), "")
    assert raw.given_splits is not None and len(raw.labels) == 24
    tests = []
    for fold in range(3):
        splits = make_splits(raw, ImageFolderDataConfig(root=str(tmp_path), folds=3, fold=fold))
        parts = [set(splits.train), set(splits.val), set(splits.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(parts[0] | parts[1] | parts[2]) == 24  # every image, whichever folder it came from
        assert np.bincount(raw.labels[splits.test]).tolist() == [4, 4]  # stratified
        tests.append(splits.test)
    assert sorted(np.concatenate(tests)) == list(range(24))  # the test folds partition the pool


def test_train_per_class_subsets_are_nested_and_leave_val_and_test_alone() -> None:
    raw = load_raw(SyntheticDataConfig(num_classes=2, images_per_class=30), "")
    full = make_splits(raw, SyntheticDataConfig(num_classes=2, images_per_class=30))
    previous: set[int] = set()
    for n in (2, 5, 10, 20):
        splits = make_splits(raw, SyntheticDataConfig(num_classes=2, images_per_class=30, train_per_class=n))
        assert np.bincount(raw.labels[splits.train]).tolist() == [n, n]
        assert previous <= set(splits.train) <= set(full.train)  # nested as N grows
        assert np.array_equal(splits.val, full.val) and np.array_equal(splits.test, full.test)
        previous = set(splits.train)
    with pytest.raises(
        ConfigError, match="data.train_per_class: class 'class_0' has 20 training images, fewer than 21"
    ):
        make_splits(raw, SyntheticDataConfig(num_classes=2, images_per_class=30, train_per_class=21))


def test_train_per_class_too_large_is_refused_before_any_run(tmp_path: Path, run_cli, capsys) -> None:
    """From the labels, before the MLflow run starts: one line, exit 2, nothing in the store."""
    assert run_cli(*TINY, *store_overrides(tmp_path), "data.train_per_class=1000") == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: data.train_per_class: class 'class_0' has ") and "Fix: use at most" in line
    assert not (tmp_path / "mlflow.db").exists() or runs_in(tmp_path).empty


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"folds": 1}, "data.folds: must be >= 2"),
        ({"folds": 5, "fold": 5}, "data.fold: must be in 0..4"),
        ({"fold": 1}, "data.fold: is 1 but data.folds is null"),
        ({"train_per_class": 0}, "data.train_per_class: must be >= 1"),
    ],
)
def test_bad_fold_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SyntheticDataConfig(**kwargs)


def test_keys_added_later_leave_the_config_hash_alone_at_their_defaults(compose_cfg) -> None:
    import dataclasses
    import hashlib
    import json

    from transferlab.schemas import config_hash, semantic_config, to_typed

    cfg = to_typed(compose_cfg("data=synthetic"))
    tree = semantic_config(dataclasses.asdict(cfg))
    assert not {"folds", "fold", "train_per_class"} & set(tree["data"])  # as before they existed
    expected = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_hash(cfg) == expected
    assert config_hash(to_typed(compose_cfg("data=synthetic", "data.folds=5"))) != config_hash(cfg)


def test_elpv_shifted_set_is_every_cell_of_the_other_type_and_leaves_the_splits_as_they_were() -> None:
    """data.cell_type=mono data.shift_cell_type=poly: train/val/test are the same mono images as a run
    without the shifted set; the shifted set is every polycrystalline cell, in none of them."""
    mono = ElpvDataConfig(cell_type="mono", limit=300)
    shifted = ElpvDataConfig(cell_type="mono", shift_cell_type="poly", limit=300)
    ra, rb = load_raw(mono, ""), load_raw(shifted, "")
    sa, sb = make_splits(ra, mono), make_splits(rb, shifted)
    for split in ("train", "val", "test"):
        assert [ra.sources[i] for i in getattr(sa, split)] == [rb.sources[i] for i in getattr(sb, split)]
    everything = load_raw(ElpvDataConfig(), "")
    poly = [s for s, t in zip(everything.sources, _cell_types(), strict=True) if t == "poly"]
    assert sorted(rb.sources[i] for i in sb.shift) == sorted(poly) and len(poly) > 1000
    assert not set(sb.shift) & set(np.concatenate([sb.train, sb.val, sb.test]))
    assert sa.sizes().keys() == {"train", "val", "test"} and sb.sizes()["shift_test"] == len(poly)


def _cell_types() -> list[str]:
    from transferlab.sources.elpv import root

    table = np.genfromtxt(root() / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["p", "q", "t"])
    return list(np.char.decode(table["t"]))


@pytest.mark.parametrize(
    ("cell_type", "shift", "match"),
    [("all", "poly", "cells the run does not train on"), ("mono", "mono", "does not train on"),
     ("mono", "amorphous", "unknown cell type")],
)  # fmt: skip
def test_a_shifted_elpv_set_must_be_the_other_cell_type(cell_type: str, shift: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        ElpvDataConfig(cell_type=cell_type, shift_cell_type=shift)
    assert info.value.key == "data.shift_cell_type"


def test_imagefolder_shift_root_is_tested_apart_and_needs_the_same_classes(tmp_path: Path) -> None:
    _folder(tmp_path / "own", {"a": 12, "b": 12})
    _folder(tmp_path / "shifted", {"a": 5, "b": 4}, size=(30, 18))
    plain = prepare(ImageFolderDataConfig(root=str(tmp_path / "own")), SMALL, "")
    data = prepare(
        ImageFolderDataConfig(root=str(tmp_path / "own"), shift_root=str(tmp_path / "shifted")), SMALL, ""
    )
    assert data.splits.sizes() == {**plain.splits.sizes(), "shift_test": 9}
    assert torch.equal(data.images[data.splits.test], plain.images[plain.splits.test])
    assert data.labels[data.splits.shift].tolist() == [0] * 5 + [1] * 4
    _folder(tmp_path / "other", {"a": 3, "c": 3})
    with pytest.raises(ConfigError, match=r"class folders \['a', 'c'\], the run's are \['a', 'b'\]") as info:
        load_raw(ImageFolderDataConfig(root=str(tmp_path / "own"), shift_root=str(tmp_path / "other")), "")
    assert info.value.key == "data.shift_root"
    with pytest.raises(ConfigError, match="is not a folder"):
        load_raw(ImageFolderDataConfig(root=str(tmp_path / "own"), shift_root=str(tmp_path / "nope")), "")
