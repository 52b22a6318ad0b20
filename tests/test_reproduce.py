"""python -m transferlab.reproduce: the run's own config, rebuilt without trusting its files."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from transferlab import reproduce

from .conftest import TINY, runs_in


def _where(tmp_path: Path) -> list[str]:
    return [f"mlflow.artifact_location={tmp_path}/artifacts", f"paths.cache_dir={tmp_path}/cache"]


def test_a_rerun_gives_the_same_metrics_side_by_side(run_cli, store, tmp_path: Path, capsys) -> None:
    assert run_cli(*TINY, *store, "mode=full_finetune", "seed=5", "optimizer.lr=3e-4") == 0
    run_id = runs_in(tmp_path).iloc[0]["run_id"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # As if the run had been logged on another kind of CPU: shown, so a difference can be explained,
    # while the verdict stays the results'.
    client = mlflow.MlflowClient(uri)
    record = json.loads(
        Path(client.download_artifacts(run_id, "reproducibility.json", str(tmp_path))).read_text()
    )
    here = record["platform"]["cpu_capability"]
    record["platform"]["cpu_capability"] = "AVX512" if here != "AVX512" else "AVX2"
    client.log_dict(run_id, record, "reproducibility.json")
    assert reproduce.main([run_id, "--tracking-uri", uri, *_where(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "optimizer.lr=3e-4" in out.err and "seed=5" in out.err
    assert "test_accuracy" in out.out and " NO" not in out.out and "identical" in out.out
    differ = out.out.split("these differ:\n")[1].splitlines()
    assert differ[0].split() == [
        "platform.cpu_capability",
        repr(record["platform"]["cpu_capability"]),
        repr(here),
    ]
    assert not differ[1].startswith("  ")  # nothing else differs: the same packages, the same machine
    runs = runs_in(tmp_path)
    assert len(runs) == 2
    rerun = runs[runs["tags.reproduces"] == run_id].iloc[0]
    assert (
        rerun["params.optimizer.lr"] == "0.0003" and rerun["tags.mlflow.runName"] == f"reproduce-{run_id[:8]}"
    )


def _forged_run(tmp_path: Path, overrides: list[str], config_extra: str = "") -> str:
    """A run whose logged files name code to call: reproduce must refuse before importing it."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    # Its own experiment: the Default one keeps artifacts in ./mlruns of the working directory.
    found = mlflow.get_experiment_by_name("forged")
    experiment = (
        found.experiment_id
        if found
        else mlflow.create_experiment("forged", artifact_location=(tmp_path / "artifacts").as_uri())
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_dict({"overrides": overrides, "choices": {"data": "synthetic"}}, "overrides.json")
        mlflow.log_text("seed: 0\n" + config_extra, "config.yaml")
    return run.info.run_id


def test_code_named_by_a_run_is_never_called(tmp_path: Path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    bad = _forged_run(tmp_path, ["optimizer._target_=os.system"])
    assert reproduce.main([bad, "--tracking-uri", uri, *_where(tmp_path)]) == 2
    assert "error: optimizer._target_: 'os.system' is not an optimizer class" in capsys.readouterr().err
    # Pinned from a logged config.yaml: the same allow-list applies.
    pinned = _forged_run(tmp_path, [], "optimizer:\n  _target_: subprocess.call\n")
    assert reproduce.main([pinned, "--tracking-uri", uri, *_where(tmp_path)]) == 2
    assert "'subprocess.call' is not an optimizer class" in capsys.readouterr().err
    # Overrides that would change what is computed are not "where" overrides.
    assert reproduce.main([bad, "--tracking-uri", uri, "optimizer.lr=1"]) == 2
    assert "optimizer.lr: would change what is computed" in capsys.readouterr().err
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(search_all_experiments=True)) == 2  # only the two forged runs


def test_a_run_whose_first_launch_missed_the_caches_reproduces(
    run_cli, store, tmp_path: Path, capsys
) -> None:
    """The logged run computed its frozen features (feature_cache_hit 0), the rerun reads them (1):
    cache use and timing are shown, the verdict is the results'."""
    assert run_cli(*TINY, *store, "mode=feature_extract") == 0
    logged = runs_in(tmp_path).iloc[0]
    assert logged["metrics.feature_cache_hit"] == 0
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert reproduce.main([logged["run_id"], "--tracking-uri", uri, *_where(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("feature_cache_hit"))
    assert row.split()[1:] == ["0", "1", "(bookkeeping)"]
    assert "identical" in out and " NO" not in out
    assert "environment: the packages and platform the logged run recorded are the same here" in out
