"""Real weights on real data (`make test-slow`): the claims the README's table rests on."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import runs_in

pytestmark = pytest.mark.slow


def test_feature_extraction_on_elpv_beats_the_svm_baseline(run_cli, store, tmp_path: Path) -> None:
    """Bundled EfficientNet-Lite0, frozen, on the full ELPV 75/25 split: above the SVM's 82.44 %."""
    assert run_cli(*store, "mode=feature_extract", "trainer.epochs=30", "trainer.progress=false") == 0
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FINISHED"
    assert run["metrics.test_accuracy"] > 0.8244
    assert run["metrics.trainable_params"] == 1280 * 2 + 2
    assert run["params.data.name"] == "elpv" and run["tags.weights.source"].endswith(".pth")


def test_full_finetune_on_elpv_limited(run_cli, store, tmp_path: Path) -> None:
    """A short real fine-tuning run (600 images, 2 epochs) learns: better than the majority class."""
    args = ["mode=full_finetune", "trainer.epochs=2", "data.limit=600", "trainer.progress=false"]
    assert run_cli(*store, *args) == 0
    run = runs_in(tmp_path).iloc[0]
    assert run["metrics.trainable_params"] == run["metrics.total_params"]
    assert run["metrics.test_balanced_accuracy"] > 0.6
