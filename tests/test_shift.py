"""A shifted test set, tested with the same model: ``shift_test_*`` beside ``test_*``, in MLflow and the report."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from PIL import Image

from transferlab import report

from .conftest import TINY, runs_in


def _folder(root: Path, counts: dict[str, int], tint: int) -> None:
    for label, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            # Class = which half is bright; the shifted folder is the same task under another tint.
            image = Image.new("RGB", (32, 32), (tint, tint, tint))
            image.paste((250, 250, 250), (0, 0, 16, 32) if label == 0 else (16, 0, 32, 32))
            image.putpixel((i % 32, 5), (i, 0, 0))  # distinct files
            image.save(root / name / f"{i}.png")


@pytest.fixture
def data(tmp_path: Path) -> list[str]:
    """TINY on an image folder of 32 images and a shifted folder of 12 (same task, another tint)."""
    _folder(tmp_path / "own", {"left": 16, "right": 16}, tint=0)
    _folder(tmp_path / "shifted", {"left": 6, "right": 6}, tint=120)
    return [a for a in TINY if not a.startswith("data=")] + [
        "data=imagefolder",
        f"data.root={tmp_path / 'own'}",
        f"data.shift_root={tmp_path / 'shifted'}",
    ]


def test_a_shifted_folder_is_tested_with_the_same_model_and_reported_beside_test(
    run_cli, store, data: list[str], tmp_path: Path, capsys
) -> None:
    assert run_cli(*data, *store, "mode=lp_ft", "mode.probe_epochs=1", "trainer.epochs=1") == 0
    assert run_cli(*data, *store, "seed=1") == 0  # a second run: the decoded inputs come from the cache
    runs = runs_in(tmp_path).sort_values("start_time")
    lp_ft, fe = runs.iloc[0], runs.iloc[1]
    for run in (lp_ft, fe):
        assert run["status"] == "FINISHED"
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss"):
            assert (
                f"metrics.shift_test_{key}" in run.index
                and run[f"metrics.test_{key}"] == run[f"metrics.test_{key}"]
            )
    assert "metrics.probe_shift_test_accuracy" in lp_ft.index  # the probe, tested on the shift too
    assert fe["metrics.input_cache_hit"] == 1.0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (dataset,) = client.get_run(fe["run_id"]).inputs.dataset_inputs
    assert {t.key: t.value for t in dataset.tags}["n_shift_test"] == "12"  # its size beside the splits

    assert report.main(["--experiment", "transferlab", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                        "--no-log", "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "test acc (%)" in line)
    assert header.index("test acc (%)") < header.index("shifted test acc (%)")


def test_selection_on_validation_reports_the_chosen_configs_shifted_test_too(
    run_cli, store, data: list[str], tmp_path: Path
) -> None:
    import pandas as pd

    for lr in ("0.01", "0.001"):
        assert run_cli(*data, *store, f"optimizer.lr={lr}") == 0
    out = tmp_path / "report"
    assert report.main(["--experiment", "transferlab", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                        "--no-log", "--out", str(out), "--select", "best_val_accuracy",
                        "--tune", "optimizer.lr"]) == 0  # fmt: skip
    (row,) = pd.read_csv(out / "selection.csv").to_dict("records")
    chosen = runs_in(tmp_path).set_index("params.optimizer.lr").loc[str(row["optimizer.lr"])]
    assert row["shift_test_accuracy_mean"] == chosen["metrics.shift_test_accuracy"]
