"""End to end through ``python -m transferlab.train`` (in-process), read back from a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from transferlab import model_store
from transferlab.tracking import is_bookkeeping

from .conftest import TINY, runs_in


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.parametrize("mode", ["feature_extract", "full_finetune"])
def test_a_tiny_run_logs_everything(run_cli, store, tmp_path: Path, mode: str) -> None:
    assert run_cli(*TINY, *store, f"mode={mode}", "seed=7") == 0
    runs = runs_in(tmp_path)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    # The flattened resolved config as params; the group choices as tags.
    assert run["params.mode.name"] == mode and run["params.trainer.epochs"] == "2"
    assert run["params.optimizer.lr"] == str(1e-3 if mode == "feature_extract" else 1e-4)
    assert run["params.data.name"] == "synthetic" and run["params.seed"] == "7"
    assert run["tags.choice.mode"] == mode and run["tags.choice.backbone"] == "timm"
    assert run["tags.choice.optimizer"] == "adam" and run["tags.mlflow.source.git.commit"]
    for key in (
        "test_accuracy",
        "test_balanced_accuracy",
        "test_macro_f1",
        "test_loss",
        "wall_time_s",
        "trainable_params",
        "total_params",
        "best_val_accuracy",
        "epoch_time_s",
        "images_per_s",
    ):
        assert f"metrics.{key}" in run and run[f"metrics.{key}"] == run[f"metrics.{key}"], key  # not NaN
    if mode == "feature_extract":
        assert run["metrics.trainable_params"] == run["metrics.head_params"] < run["metrics.total_params"]
    else:
        assert run["metrics.trainable_params"] == run["metrics.total_params"]

    client = MlflowClient()
    history = client.get_metric_history(run["run_id"], "val_accuracy")
    assert [m.step for m in history] == [0, 1]  # one point per epoch
    assert {
        "config.yaml",
        "overrides.json",
        "reproducibility.json",
        "classes.json",
        "test_confusion_matrix.png",
        "test_classification_report.txt",
    } <= _artifacts(client, run["run_id"])
    local = Path(client.download_artifacts(run["run_id"], "reproducibility.json", str(tmp_path)))
    record = json.loads(local.read_text())
    assert record["seed"] == 7 and record["weights"]["source"] == "random-init"
    assert set(record["packages"]) >= {"torch", "timm", "mlflow", "hydra-core"}
    assert record["dataset"]["fingerprint"] == run["tags.dataset.fingerprint"]
    assert run["tags.git.commits"] == run["tags.mlflow.source.git.commit"] == record["git"]["commit"]  # one
    assert "environ" not in json.dumps(record).lower()
    # The kind of CPU decides torch's kernels and so the bits of a fine-tuning run: recorded, and a tag.
    assert record["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert run["tags.platform.cpu_capability"] == record["platform"]["cpu_capability"]
    assert record["platform"]["cpu"]
    # The dataset as an MLflow input, with the fingerprint as digest.
    inputs = client.get_run(run["run_id"]).inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} == {record["dataset"]["fingerprint"][:32]}
    # The tested weights: the run's MLflow model, plain tensors (safetensors, no pickle of code).
    state = model_store.load_weights(client, run["run_id"], tmp_path / "model")
    assert state["head.weight"].shape[0] == 2


def test_same_config_same_metrics(run_cli, store, tmp_path: Path) -> None:
    for _ in range(2):
        assert run_cli(*TINY, *store, "mode=full_finetune") == 0
    runs = runs_in(tmp_path)
    metrics = [
        c for c in runs.columns if c.startswith("metrics.") and not is_bookkeeping(c.removeprefix("metrics."))
    ]
    assert "metrics.test_accuracy" in metrics and "metrics.startup_s" in runs.columns
    assert runs.iloc[0][metrics].tolist() == runs.iloc[1][metrics].tolist()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["optimizer.lr=-1"], "optimizer.lr: must be > 0"),
        (["backbone.name=efficientnet_b99"], "backbone.name: timm has no model"),
        (
            ["data=imagefolder", "data.root=/nonexistent/folder"],
            "data.root: /nonexistent/folder is not a folder",
        ),
        (["data=imagefolder"], "data.root: is required"),
    ],
)
def test_bad_input_is_one_clear_line_and_no_run(run_cli, store, tmp_path: Path, capsys, args, needle) -> None:
    assert run_cli(*TINY, *store, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1] and "Fix:" in err[-1]
    db = tmp_path / "mlflow.db"
    if db.exists():
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_folder_with_one_class(run_cli, store, tmp_path: Path, capsys) -> None:
    from PIL import Image

    (tmp_path / "imgs" / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / "only" / f"{i}.png")
    assert run_cli(*TINY, *store, "data=imagefolder", f"data.root={tmp_path / 'imgs'}") == 2
    assert "at least two classes" in capsys.readouterr().err


def test_a_misspelt_group_option_fails_before_compute(run_cli, store, tmp_path: Path, capsys) -> None:
    assert run_cli(*TINY, *store, "mode=feature_extrct") == 2
    err = capsys.readouterr().err
    assert "error: mode=feature_extrct: no such option. Fix: did you mean mode=feature_extract?" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_an_error_during_the_run_ends_it_failed(run_cli, store, tmp_path: Path, capsys) -> None:
    """An exception after the run started: status FAILED, the error text as a tag and an artifact."""
    # 4 images cannot be split three ways stratified over 2 classes: raised inside the run.
    assert run_cli(*TINY, *store, "data.limit=4") == 2
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FAILED"
    assert "cannot split synthetic" in run["tags.error"]
    assert "error.txt" in _artifacts(MlflowClient(), run["run_id"])
