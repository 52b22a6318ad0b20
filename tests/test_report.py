"""``python -m transferlab.report``: a real tiny sweep read back from MLflow, and its bad inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunData, RunInfo
from scipy.stats import ttest_rel

from transferlab import report

from .conftest import TINY, launch, store_overrides

EXPERIMENT = "elpv_fe_vs_ft"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The experiment's sweep on a tiny model: mode x seed 0,1 x data.limit (4 fails: too few images)."""
    root = tmp_path_factory.mktemp("swept")
    code = launch(
        "-m",
        f"experiment={EXPERIMENT}",
        *TINY,
        *store_overrides(root),
        "trainer.epochs=2",
        "seed=0,1",
        "data.limit=4,48",
    )
    assert code == 1  # the data.limit=4 jobs failed
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    parent = runs[runs["tags.sweep.role"] == "parent"].iloc[0]
    yield root, parent["run_id"]


def _report(root: Path, *args: str) -> int:
    return report.main([*args, "--tracking-uri", f"sqlite:///{root}/mlflow.db"])


def _children(root: Path, parent: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    return runs[runs["tags.mlflow.parentRunId"] == parent]


def test_report_of_a_parent_run(swept, tmp_path: Path, capsys) -> None:
    root, parent = swept
    out = tmp_path / "report"
    assert _report(root, "--parent-run", parent, "--out", str(out), "--reference", "A paper, 2019=50") == 0
    printed = capsys.readouterr().out
    assert f"# {EXPERIMENT}" in printed and "grouped by mode, data.limit" in printed
    assert "| feature_extract | 48 | 2 |" in printed and "| full_finetune | 48 | 2 |" in printed

    # mean / std / n over seeds, against the runs read back independently.
    children = _children(root, parent)
    done = children[children["status"] == "FINISHED"]
    stats = pd.read_csv(out / "summary.csv")
    assert len(stats) == 2 and set(stats["n"]) == {2} and set(stats["data.limit"]) == {48}
    for mode, expected in done.groupby("params.mode.name"):
        row = stats[stats["mode"] == mode].iloc[0]
        for metric in ("test_accuracy", "wall_time_s", "trainable_params"):
            values = expected[f"metrics.{metric}"]
            assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1), nan_ok=True)
    paired = pd.read_csv(out / "paired.csv")
    assert paired["n_pairs"].tolist() == [2] and paired["mode"].tolist() == ["full_finetune"]

    # A published number beside the best group here on validation (never chosen by test accuracy).
    best = stats.sort_values("best_val_accuracy_mean", ascending=False, kind="stable").iloc[0]
    assert "## Published references (test accuracy)" in printed
    # The data axes are the setting the group was best at (one row per setting; here one).
    assert f"| A paper, 2019 | 50.00 | data.limit=48 | {best['mode']} |" in printed
    assert f"| {(best['test_accuracy_mean'] - 0.5) * 100:+.2f} |" in printed

    # The failed jobs are listed, not averaged in.
    text = (out / "report.md").read_text()
    assert "Not averaged in: 4 run(s)" in text and "cannot split synthetic" in text
    assert "data.limit=4" in text
    assert r"\begin{tabular}" in (out / "report.tex").read_text()
    for png in ("test_accuracy.png", "wall_time.png", "val_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG
    logged = {a.path for a in MlflowClient().list_artifacts(parent, "report")}
    assert {
        f"report/{n}" for n in ("report.md", "report.tex", "summary.csv", "paired.csv", "val_curves.png")
    } <= logged


def test_report_of_an_experiment_is_its_own_run(swept, tmp_path: Path, capsys) -> None:
    root, _ = swept
    for _ in range(2):  # a second report does not count the first as a job
        assert _report(root, "--experiment", EXPERIMENT, "--out", str(tmp_path / "r")) == 0
        assert "| feature_extract | 48 | 2 |" in capsys.readouterr().out
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    reports = runs[runs["tags.sweep.role"] == "report"]
    assert len(reports) == 2 and set(reports["status"]) == {"FINISHED"}
    assert "report/summary.csv" in {
        a.path for a in MlflowClient().list_artifacts(reports.iloc[0]["run_id"], "report")
    }


def test_paired_difference_matches_scipy_paired_by_seed() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for backbone in ("b0", "b1"):
        for seed in (0, 1, 2):
            for mode in ("feature_extract", "full_finetune", "lp_ft"):
                rows.append(
                    {"backbone": backbone, "mode": mode, "seed": seed}
                    | {m: rng.uniform(0.5, 0.9) for m in report.METRICS}
                )
    df = pd.DataFrame(rows).sample(frac=1, random_state=1)  # pairing must not rely on order
    df = df.drop(df[(df["mode"] == "lp_ft") & (df["seed"] == 2)].index)  # a seed lp_ft lacks
    diffs = report.paired(df, ["backbone", "mode"]).set_index(["backbone", "mode"])
    assert list(diffs.index.get_level_values("mode")) == ["lp_ft", "full_finetune"] * 2  # the dial's order
    for backbone in ("b0", "b1"):
        part = df[df["backbone"] == backbone].sort_values("seed")
        fe = part[part["mode"] == "feature_extract"].set_index("seed")["test_accuracy"]
        for mode, n in (("full_finetune", 3), ("lp_ft", 2)):  # lp_ft's missing seed drops only its pair
            treated = part[part["mode"] == mode].set_index("seed")["test_accuracy"]
            base = fe.loc[treated.index].to_numpy()
            expected = ttest_rel(treated.to_numpy(), base)
            row = diffs.loc[(backbone, mode)]
            assert row["n_pairs"] == n
            assert row["test_accuracy_diff_mean"] == pytest.approx((treated.to_numpy() - base).mean())
            assert row["test_accuracy_t"] == pytest.approx(expected.statistic)
            assert row["test_accuracy_p"] == pytest.approx(expected.pvalue)
    assert report.paired(df[df["mode"] == "full_finetune"], ["backbone", "mode"]) is None


def test_pretrained_minus_random_init_is_paired_by_seed_where_the_control_ran() -> None:
    rng = np.random.default_rng(1)
    rows = [
        {"backbone": b, "mode": m, "backbone.weights": w, "seed": seed}
        | {k: rng.uniform(0.5, 0.9) for k in report.METRICS}
        for b in ("b0", "b1")
        for m, weights in (("feature_extract", ("imagenet",)), ("full_finetune", ("imagenet", "null")))
        for w in weights
        for seed in (0, 1, 2)
        if not (b == "b1" and w == "null")  # the control ran on b0 only
    ] + [  # a control with no pretrained twin (another mode)
        {"backbone": "b1", "mode": "lp_ft", "backbone.weights": "null", "seed": seed}
        | {k: 0.6 for k in report.METRICS}
        for seed in (0, 1, 2)
    ]
    df = pd.DataFrame(rows).sample(frac=1, random_state=2)
    groups = ["backbone", "mode", "backbone.weights"]
    gains = report.pretraining(df, groups)
    assert gains[["backbone", "mode", "backbone.weights", "n_pairs"]].values.tolist() == [
        ["b0", "full_finetune", "imagenet", 3],
        ["b1", "lp_ft", "null", 0],  # the control alone: named by the report, no pairs
    ]  # feature_extract ran without a control: no row
    part = df[(df["backbone"] == "b0") & (df["mode"] == "full_finetune")]
    by = {
        w: part[part["backbone.weights"] == w].set_index("seed").sort_index()["test_accuracy"]
        for w in ("imagenet", "null")
    }
    expected = ttest_rel(by["imagenet"].to_numpy(), by["null"].to_numpy())
    assert gains.loc[0, "test_accuracy_diff_mean"] == pytest.approx((by["imagenet"] - by["null"]).mean())
    assert gains.loc[0, "test_accuracy_p"] == pytest.approx(expected.pvalue)
    # A seed the control lacks drops only that pair.
    fewer = report.pretraining(
        df.drop(df[(df["backbone.weights"] == "null") & (df["seed"] == 1)].index), groups
    )
    assert fewer.loc[0, "n_pairs"] == 2
    assert fewer.loc[0, "test_accuracy_diff_mean"] == pytest.approx(
        (by["imagenet"] - by["null"])[[0, 2]].mean()
    )
    assert report.pretraining(df[df["backbone.weights"] != "null"], groups) is None
    assert report.pretraining(df, ["backbone", "mode"]) is None  # backbone.weights is not a group axis


def _one_error_line(capsys, needle: str) -> None:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0].startswith("error: ") and needle in captured.err and "Fix:" in captured.err
    assert "Traceback" not in captured.err


def test_bad_input_is_a_clear_message_and_exit_2(swept, tmp_path: Path, capsys) -> None:
    root, parent = swept
    assert _report(root, "--parent-run", "0123456789abcdef") == 2
    _one_error_line(capsys, "no run '0123456789abcdef'")
    child = _children(root, parent).iloc[0]["run_id"]
    assert _report(root, "--parent-run", child) == 2
    _one_error_line(capsys, f"pass its parent, --parent-run {parent}")
    assert _report(root, "--experiment", "nonexistent") == 2
    _one_error_line(capsys, f"Fix: use one of ['Default', '{EXPERIMENT}']")
    MlflowClient(f"sqlite:///{root}/mlflow.db").create_experiment("empty")
    assert _report(root, "--experiment", "empty") == 2
    _one_error_line(capsys, "experiment 'empty' has no sweep jobs")
    assert report.main(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    _one_error_line(capsys, "no MLflow store at")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("bad", ["nope", "Paper=abc", "Paper=188", "=50"])
def test_a_bad_reference_is_a_usage_error(bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        report.main(["--experiment", "x", "--reference", bad])
    assert info.value.code == 2
    assert (
        "is not LABEL=PERCENT; e.g. --reference 'VGG-19, Deitsch et al. 2019=88.42'"
        in capsys.readouterr().err
    )


def test_a_sweep_whose_jobs_all_failed_exits_1(run_cli, store, tmp_path: Path, capsys) -> None:
    assert run_cli("-m", *TINY, *store, "data.limit=4") == 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transferlab"])
    parent = runs[runs["tags.sweep.role"] == "parent"].iloc[0]["run_id"]
    capsys.readouterr()
    assert report.main(["--parent-run", parent, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "none of its 1 run(s) FINISHED" in captured.err
    assert "cannot split synthetic" in captured.err and "Traceback" not in captured.err


def _logged_runs(
    uri: str,
    tmp_path: Path,
    cells: dict[tuple[str, ...], float | tuple[float, ...]],
    keys: tuple[str, ...],
    axes: str = '["mode", "seed"]',
) -> None:
    """An experiment ``mixed`` as a mode x seed sweep logs it (or one over ``axes``): one run per cell
    and seed 0-2, every metric ``accuracy + seed / 100`` (or the cell's own per-seed values); ``keys``
    name the params each cell's values go to."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("mixed", artifact_location=str(tmp_path / "artifacts"))
    client.create_run(experiment, tags={"sweep.role": "parent", "sweep.axes": axes})
    for cell, accuracy in cells.items():
        per_seed = accuracy if isinstance(accuracy, tuple) else tuple(accuracy + s / 100 for s in (0, 1, 2))
        for seed in (0, 1, 2):
            run = client.create_run(experiment, tags={"sweep.role": "job", "config_hash": f"{cell}{seed}"})
            rid = run.info.run_id
            params = dict(zip(keys, cell, strict=True)) | {"seed": seed, "paths.output_dir": rid}
            for key, value in params.items():
                client.log_param(rid, key, value)
            for metric in report.METRICS:
                client.log_metric(rid, metric, per_seed[seed])
            client.log_metric(rid, "val_accuracy", per_seed[seed], step=0)
            client.set_terminated(rid, "FINISHED")


def test_runs_that_differ_in_an_unswept_key_are_not_averaged_together(tmp_path: Path, capsys) -> None:
    """Two sweeps in one experiment (lp_ft at 3 and at 6 epochs): two groups, each paired with the FE runs."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accuracy = {("feature_extract", "10"): 0.80, ("lp_ft", "3"): 0.84, ("lp_ft", "6"): 0.87}
    _logged_runs(uri, tmp_path, accuracy, ("mode.name", "trainer.epochs"))
    out = tmp_path / "report"
    assert report.main(["--experiment", "mixed", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "grouped by mode, trainer.epochs (trainer.epochs: not swept, but differ" in printed
    stats = pd.read_csv(out / "summary.csv")
    assert [
        (m, e, n) for m, e, n in zip(stats["mode"], stats["trainer.epochs"], stats["n"], strict=True)
    ] == [
        ("feature_extract", 10, 3),
        ("lp_ft", 3, 3),
        ("lp_ft", 6, 3),
    ]  # paths.output_dir differs between every run too: not semantic, no axis
    paired = pd.read_csv(out / "paired.csv").set_index("trainer.epochs")
    assert paired.loc[3, "test_accuracy_diff_mean"] == pytest.approx(0.04)
    assert paired.loc[6, "test_accuracy_diff_mean"] == pytest.approx(0.07)
    assert set(paired["n_pairs"]) == {3}
    assert (
        "feature_extract ran with trainer.epochs=10 only: every other trainer.epochs is paired with it."
        in printed
    )


def test_one_sweep_per_mode_compares_the_modes_at_equal_settings_each_with_its_recipe(
    tmp_path: Path, capsys
) -> None:
    """elpv_protocol's shape: each mode launched as its own seed sweep, with its own epochs and
    augmentation, at two training-set sizes. The mode's keys are one axis; epochs and augmentation are
    each mode's recipe (shown, never a pairing key); the modes pair at each size."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    keys = ("mode.name", "mode.lr", "augment.name", "augment.crop", "trainer.epochs", "data.train_per_class")
    accuracy = {
        ("feature_extract", "0.001", "none", "center", "30", "null"): 0.80,
        ("full_finetune", "0.0001", "standard", "random_resized", "8", "null"): 0.84,
        ("feature_extract", "0.001", "none", "center", "50", "10"): 0.70,
        ("full_finetune", "0.0001", "standard", "random_resized", "50", "10"): 0.65,
    }
    _logged_runs(uri, tmp_path, accuracy, keys, axes='["seed"]')
    out = tmp_path / "report"
    assert report.main(["--experiment", "mixed", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "grouped by data.train_per_class, mode (data.train_per_class, mode: not swept" in printed
    assert "; augment, trainer.epochs: each mode's own recipe at each setting" in printed
    stats = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert stats[["data.train_per_class", "mode", "augment", "trainer.epochs", "n"]].values.tolist() == [
        ["10", "feature_extract", "none", 50, 3],
        ["10", "full_finetune", "standard", 50, 3],
        ["null", "feature_extract", "none", 30, 3],
        ["null", "full_finetune", "standard", 8, 3],
    ]
    assert not {"mode.lr", "augment.crop", "mode.name"} & set(stats.columns)
    paired = pd.read_csv(out / "paired.csv", keep_default_na=False).set_index("data.train_per_class")
    assert paired.loc["null", "test_accuracy_diff_mean"] == pytest.approx(0.04)
    assert paired.loc["10", "test_accuracy_diff_mean"] == pytest.approx(-0.05)
    assert list(paired["n_pairs"]) == [3, 3] and "trainer.epochs" not in paired.columns
    # A key of the mode that varies within one mode (lp_ft's probe epochs) stays an axis of its own.
    assert report.hidden_axes(
        [_run({"mode.name": "lp_ft", "mode.probe_epochs": e, "mode.lr": "0.1"}) for e in ("5", "50")]
        + [_run({"mode.name": "feature_extract", "mode.lr": "0.01"})],
        ["seed"],
    ) == ["mode", "mode.probe_epochs"]


def _run(params: dict[str, str]) -> Run:
    return Run(
        RunInfo("r", "0", "u", "FINISHED", 0, 0, "active"),
        RunData(params=[Param(k, v) for k, v in params.items()]),
    )


def test_the_random_init_control_is_paired_with_its_pretrained_twin_not_with_feature_extraction(
    tmp_path: Path, capsys
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accuracy = {
        ("feature_extract", "imagenet"): 0.80,
        ("full_finetune", "imagenet"): 0.83,
        ("full_finetune", "null"): (0.75, 0.77, 0.74),  # differences 8, 7, 11 points: a real t-test
    }
    _logged_runs(uri, tmp_path, accuracy, ("mode.name", "backbone.weights"))
    out = tmp_path / "report"
    assert report.main(["--experiment", "mixed", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    # No frozen random backbone ran: the control is named once, not a row of dashes.
    assert (
        "No feature_extract run (with a seed in common) to pair with: full_finetune · backbone.weights=null."
        in printed
    )
    assert "| – |" not in printed
    gains = pd.read_csv(out / "pretraining.csv", keep_default_na=False)
    assert gains[["mode", "backbone.weights", "n_pairs"]].values.tolist() == [
        ["full_finetune", "imagenet", 3]
    ]
    assert gains.loc[0, "test_accuracy_diff_mean"] == pytest.approx(0.26 / 3)
    expected = ttest_rel([0.83, 0.84, 0.85], [0.75, 0.77, 0.74])
    assert gains.loc[0, "test_accuracy_p"] == pytest.approx(expected.pvalue)
    assert "## Pretrained − random init (backbone.weights=null), paired by replicate" in printed
    assert "| full_finetune | imagenet | 3 | 8.67 ± 2.08 |" in printed
    tex = (out / "report.tex").read_text()
    assert "Pretrained minus random initialisation" in tex and "No feature\\_extract run" in tex
    assert "−" not in tex and "·" not in tex  # not in pdflatex's default input encoding


def test_cost_from_scratch_counts_the_feature_pass_once_and_apart_from_the_cache() -> None:
    """Three seeds of feature extraction: the first computed the frozen features (a cache miss, 90 s
    of its 100 s), the others read them (0.5 s). Wall time says 40.3 ± 51.7 s; the cost columns say what
    an arm costs from scratch: the head's training time, and the pass once."""
    logged = [
        {"wall_time_s": 100.0, "feature_extract_s": 90.0, "feature_cache_hit": 0.0},
        {"wall_time_s": 11.0, "feature_extract_s": 0.5, "feature_cache_hit": 1.0},
        {"wall_time_s": 10.0, "feature_extract_s": 0.5, "feature_cache_hit": 1.0},
    ]
    rows = [
        {"mode": "feature_extract", "seed": seed, **report.cost_columns(m), **m, "test_accuracy": 0.8}
        for seed, m in enumerate(logged)
    ]
    rows.append({"mode": "full_finetune", "seed": 0, "wall_time_s": 400.0, "test_accuracy": 0.8})
    rows[-1] |= report.cost_columns({"wall_time_s": 400.0, "feature_extract_s": 0.0})
    df = pd.DataFrame(rows).reindex(columns=["mode", "seed", *report.METRICS])
    stats = report.summary(df, ["mode"]).set_index("mode")
    fe, ft = stats.loc["feature_extract"], stats.loc["full_finetune"]
    assert fe["train_time_s_mean"] == pytest.approx(10.0) and fe["train_time_s_std"] == pytest.approx(0.5)
    assert fe["feature_pass_s_mean"] == pytest.approx(90.0)  # from the run that computed it, once
    assert fe["from_scratch_s_mean"] == pytest.approx(100.0)
    assert fe["wall_time_s_std"] > 50  # what the wall-time column alone would have said
    assert ft["feature_pass_s_mean"] == 0 and ft["from_scratch_s_mean"] == pytest.approx(400.0)
