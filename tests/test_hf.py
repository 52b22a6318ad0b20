"""data=hf: a Hugging Face ``datasets`` dataset the test builds and saves to disk, used like any source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data import check_data, prepare
from transferlab.schemas import ConfigError, HfDataConfig

from .conftest import runs_in, store_overrides

datasets = pytest.importorskip("datasets")  # the hf extra; installed with the dev tools

FAST = ["backbone=timm", "backbone.name=test_efficientnet", "backbone.weights=null", "backbone.image_size=32"]


def _save(root: Path, splits: tuple[str, ...] = ("train", "validation", "test"), per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog"])})
    parts = {}
    for split in splits:
        images = [
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)) for _ in range(2 * per_class)
        ]
        parts[split] = datasets.Dataset.from_dict(
            {"img": images, "kind": [i % 2 for i in range(2 * per_class)]}, features=features
        )
    found = datasets.DatasetDict(parts) if len(splits) > 1 else parts[splits[0]]
    found.save_to_disk(str(root))
    return root


def test_a_saved_dataset_trains_with_its_own_splits_and_is_cached(run_cli, tmp_path: Path) -> None:
    root = _save(tmp_path / "saved")
    args = [*FAST, "data=hf", f"data.path={root}", "data.image_column=img", "data.label_column=kind"]
    args += ["trainer.epochs=1", "trainer.progress=false", *store_overrides(tmp_path)]
    assert run_cli(*args) == 0
    assert run_cli(*args, "seed=1") == 0
    runs = runs_in(tmp_path).sort_values("start_time")
    assert list(runs["status"]) == ["FINISHED", "FINISHED"]
    assert list(runs["tags.input_cache"]) == ["miss", "hit"]  # decoded once, like any source on disk
    data = prepare(HfDataConfig(path=str(root), image_column="img", label_column="kind"), _pre(), "")
    assert data.classes == ["cat", "dog"] and data.splits.sizes() == {"train": 16, "val": 16, "test": 16}


def test_one_split_is_split_here_stratified(tmp_path: Path) -> None:
    root = _save(tmp_path / "one", splits=("train",), per_class=20)
    data = prepare(HfDataConfig(path=str(root), image_column="img", label_column="kind"), _pre(), "")
    sizes = data.splits.sizes()
    assert sum(sizes.values()) == 40 and sizes["test"] == 10  # data.test_fraction=0.25


def test_bad_columns_and_a_hub_name_offline_are_one_line(tmp_path: Path, monkeypatch) -> None:
    root = _save(tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"data.image_column.*no column 'image'"):
        check_data(HfDataConfig(path=str(root), label_column="kind"))
    # No network and no cached copy: datasets reads its offline switch at import, so set both.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-hf-cache")
    with pytest.raises(ConfigError, match=r"data.path: cannot load 'someone/no-such-set' \(offline") as info:
        check_data(HfDataConfig(path="someone/no-such-set"))
    assert "save_to_disk" in str(info.value) and "\n" not in str(info.value)


def _pre():  # noqa: ANN202
    from transferlab.backbones import Preprocess

    return Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
