"""Selection on validation (``report --select``), confidence intervals and Holm's correction."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from transferlab import report
from transferlab.report_ci import ci95, holm
from transferlab.report_select import select, with_test_cis
from transferlab.report_stats import ReportError

from .conftest import TINY, launch, store_overrides


def test_holm_equals_statsmodels() -> None:
    rng = np.random.default_rng(3)
    for p in ([0.01, 0.04, 0.03, 0.005], rng.uniform(0, 0.2, 9).tolist(), [0.5], [0.02, 0.02, 0.9]):
        assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    # A comparison with no test (fewer than two pairs) is no member of the family.
    assert holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)


def test_ci95_equals_scipy_t_interval() -> None:
    values = [0.861, 0.874, 0.869, 0.858]
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert ci95(values) == pytest.approx(expected)
    assert all(math.isnan(v) for v in ci95([0.9]))


def _frame() -> pd.DataFrame:
    """Two arms x three lrs x three seeds, with validation and test numbers that disagree."""
    rows = []
    val = {
        ("feature_extract", "0.01"): 0.80,
        ("feature_extract", "0.001"): 0.84,
        ("feature_extract", "0.1"): 0.70,
    }
    val |= {("full_finetune", "0.01"): 0.88, ("full_finetune", "0.001"): 0.86, ("full_finetune", "0.1"): 0.50}
    for (mode, lr), v in val.items():
        for seed in range(3):
            rows.append(
                {
                    "mode": mode,
                    "optimizer.lr": lr,
                    "seed": seed,
                    "best_val_accuracy": v + 0.01 * seed,
                    "test_accuracy": 0.5 + 0.1 * seed,
                    "run_id": f"{mode}-{lr}-{seed}",
                }  # fmt: skip
            )
    return pd.DataFrame(rows)


def test_a_tie_on_validation_goes_to_the_smaller_value_by_number_not_by_text() -> None:
    # MLflow logs params as text: "3e-05" sorts after "0.0001" as a string, before it as a number.
    rows = [
        {"mode": "lp_ft", "optimizer.lr": lr, "seed": 0, "best_val_accuracy": 0.9259, "run_id": lr}
        for lr in ("0.0001", "0.0003", "3e-05")
    ]
    chosen, choices = select(pd.DataFrame(rows), ["mode"], ["optimizer.lr"], "best_val_accuracy")
    assert choices.loc[0, "optimizer.lr"] == "3e-05" and chosen["run_id"].tolist() == ["3e-05"]


def test_selection_reads_validation_only() -> None:
    df = _frame()
    chosen, choices = select(df, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    assert choices.set_index("mode")["optimizer.lr"].to_dict() == {
        "feature_extract": "0.001",
        "full_finetune": "0.01",
    }
    assert (
        set(choices["n"]) == {3} and set(choices["candidates"]) == {3} and set(choices["selected_on"]) == {3}
    )
    assert sorted(chosen["run_id"]) == sorted(
        [f"feature_extract-0.001-{s}" for s in range(3)] + [f"full_finetune-0.01-{s}" for s in range(3)]
    )
    # Only the test numbers change (the worst configs now test best): nothing chosen may change.
    shuffled = df.assign(test_accuracy=np.where(df["best_val_accuracy"] < 0.75, 0.99, 0.1))
    again, choices_again = select(shuffled, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    pd.testing.assert_frame_equal(choices, choices_again)
    assert sorted(again["run_id"]) == sorted(chosen["run_id"])
    # Replicating the winner of one arm on more seeds never moves the choice, however they score.
    more = df[(df["mode"] == "feature_extract") & (df["optimizer.lr"] == "0.001")].assign(
        seed=lambda d: d["seed"] + 10, best_val_accuracy=0.0, run_id=lambda d: d["run_id"] + "-again"
    )
    _, after = select(
        pd.concat([df, more], ignore_index=True), ["mode"], ["optimizer.lr"], "best_val_accuracy"
    )
    assert after["optimizer.lr"].tolist() == choices["optimizer.lr"].tolist()
    assert after.set_index("mode").loc["feature_extract", "n"] == 6 and set(after["selected_on"]) == {3}
    # The number that chose stays the tuning replicates' mean; the row's mean, like its n and its test
    # means, is over every run of the chosen configuration (the replicates' zeros included).
    fe, fe_before = (
        after.set_index("mode").loc["feature_extract"],
        choices.set_index("mode").loc["feature_extract"],
    )
    assert fe["best_val_accuracy_selection_mean"] == fe_before["best_val_accuracy_selection_mean"]
    assert fe["best_val_accuracy_mean"] == pytest.approx(fe_before["best_val_accuracy_mean"] / 2)
    # A loss is minimised.
    losses = df.assign(best_val_loss=1 - df["best_val_accuracy"])
    _, by_loss = select(losses, ["mode"], ["optimizer.lr"], "best_val_loss")
    assert by_loss["optimizer.lr"].tolist() == choices["optimizer.lr"].tolist()


def test_a_choice_at_its_grids_edge_is_flagged_unless_a_tie_put_it_there() -> None:
    df = _frame()  # feature_extract: 0.001 (lowest tried) beats 0.01; full_finetune: 0.01 is inside
    _, choices = select(df, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    edge = choices.set_index("mode")["grid_edge"]
    assert edge["feature_extract"] == "optimizer.lr=0.001 is the lowest tried, better than 0.01"
    assert edge["full_finetune"] == ""
    # The highest edge, by number (not as text: "0.1" < "0.01" would not be the highest).
    high = df.assign(best_val_accuracy=np.where(df["optimizer.lr"] == "0.1", 0.99, df["best_val_accuracy"]))
    _, choices = select(high, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    assert set(choices["grid_edge"]) == {"optimizer.lr=0.1 is the highest tried, better than 0.01"}
    # A tie broken towards the edge (the smaller value) is no evidence that the best lies past it.
    tied = df.assign(
        best_val_accuracy=np.where(
            df["optimizer.lr"] == "0.01", 0.84 + 0.01 * df["seed"], df["best_val_accuracy"]
        )
    )
    tied = tied[tied["mode"] == "feature_extract"]  # 0.001 and 0.01 now tie at 0.84 + 0.01 * seed
    _, choices = select(tied, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    assert choices["optimizer.lr"].tolist() == ["0.001"] and choices["grid_edge"].tolist() == [""]
    # A loss is minimised, so its edge is where the loss is lowest; a value that is no number has no edge.
    _, by_loss = select(
        df.assign(best_val_loss=1 - df["best_val_accuracy"]), ["mode"], ["optimizer.lr"], "best_val_loss"
    )
    assert by_loss.set_index("mode")["grid_edge"].to_dict() == edge.to_dict()
    named = df.assign(
        **{"optimizer.lr": df["optimizer.lr"].map({"0.001": "adam", "0.01": "sgd", "0.1": "lamb"})}
    )
    _, choices = select(named, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    assert set(choices["grid_edge"]) == {""}


def test_a_test_metric_only_some_arms_logged_is_nan_for_the_others_without_a_warning() -> None:
    # shift_test_accuracy exists only where data.shift_* was set: the other arms get NaN, quietly.
    df = _frame().assign(shift_test_accuracy=lambda d: np.where(d["mode"] == "full_finetune", 0.7, np.nan))
    chosen, choices = select(df, ["mode"], ["optimizer.lr"], "best_val_accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = with_test_cis(choices, chosen, ["mode"], ["test_accuracy", "shift_test_accuracy"])
    shift = out.set_index("mode")["shift_test_accuracy_mean"]
    assert math.isnan(shift["feature_extract"]) and shift["full_finetune"] == pytest.approx(0.7)
    assert out.set_index("mode")["test_accuracy_mean"].tolist() == pytest.approx([0.6, 0.6])


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny sweep: two modes x two lrs x two folds (the replicates), the lr declared as tuned."""
    root = tmp_path_factory.mktemp("tuned")
    code = launch(
        "-m", *TINY, *store_overrides(root), "mlflow.experiment_name=tuned", "trainer.epochs=1",
        "mode=feature_extract,full_finetune", "optimizer.lr=0.001,0.01", "data.folds=2", "data.fold=0,1",
        "sweep.tune=[optimizer.lr]",
    )  # fmt: skip
    assert code == 0
    return root


def test_report_select_keeps_each_arms_best_lr_on_validation(
    tuned_sweep: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "r"
    args = ["--experiment", "tuned", "--tracking-uri", f"sqlite:///{tuned_sweep}/mlflow.db", "--no-log"]
    assert (
        report.main([*args, "--out", str(out), "--select", "best_val_accuracy", "--reference", "paper=50"])
        == 0
    )
    text = capsys.readouterr().out
    assert "Selected on validation: per arm, the optimizer.lr with the best mean best_val_accuracy" in text
    assert "At a grid edge (the best may lie past the grid: extend it, on validation): " in text
    mlflow.set_tracking_uri(f"sqlite:///{tuned_sweep}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tuned"])
    jobs = runs[runs["tags.sweep.role"] != "parent"]
    selection = pd.read_csv(out / "selection.csv", dtype={"optimizer.lr": str})
    assert len(selection) == 2 and set(selection["n"]) == {2}
    for _, row in selection.iterrows():
        arm = jobs[jobs["params.mode.name"] == row["mode"]]
        means = arm.groupby("params.optimizer.lr")["metrics.best_val_accuracy"].mean()
        assert (
            means[row["optimizer.lr"]]
            == means.max()
            == pytest.approx(row["best_val_accuracy_selection_mean"])
        )
        assert row["best_val_accuracy_mean"] == pytest.approx(row["best_val_accuracy_selection_mean"])
        picked = arm[arm["params.optimizer.lr"] == row["optimizer.lr"]]["metrics.test_accuracy"]
        assert row["test_accuracy_mean"] == pytest.approx(picked.mean())
        assert (row["test_accuracy_ci95_low"], row["test_accuracy_ci95_high"]) == pytest.approx(
            ci95(picked.tolist())
        )
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 and set(summary["n"]) == {2}  # the chosen configuration's runs only
    paired = pd.read_csv(out / "paired.csv")
    assert {"test_accuracy_p", "test_accuracy_p_holm", "test_accuracy_diff_ci95_low"} <= set(paired.columns)
    assert paired["n_pairs"].tolist() == [2]  # paired fold by fold (both at seed 0)
    chosen = {r["mode"]: r["optimizer.lr"] for _, r in selection.iterrows()}

    def by_fold(mode: str) -> pd.Series:
        arm = jobs[(jobs["params.mode.name"] == mode) & (jobs["params.optimizer.lr"] == chosen[mode])]
        return arm.set_index("params.data.fold")["metrics.test_accuracy"].sort_index()

    diff = (by_fold("full_finetune") - by_fold("feature_extract")).tolist()  # from the runs themselves
    (row,) = [r for _, r in paired.iterrows()]
    assert (row["test_accuracy_diff_ci95_low"], row["test_accuracy_diff_ci95_high"]) == pytest.approx(
        ci95(diff), nan_ok=True
    )
    assert row["test_accuracy_p_holm"] == pytest.approx(row["test_accuracy_p"], nan_ok=True)  # 1 comparison
    for _, r in selection.iterrows():  # the summary table shows each mean's CI, in points
        low, high = r["test_accuracy_ci95_low"] * 100, r["test_accuracy_ci95_high"] * 100
        assert f"| [{low:.2f}, {high:.2f}] |" in text
    assert "## Each mode − feature_extract, paired by replicate (seed, data.fold)" in text
    assert "data.fold" not in summary.columns  # a replicate, averaged over, never a row
    assert "best group here (on validation)" in text

    # Bad input: one line, exit 2, nothing written.
    for extra, needle in (
        (["--select", "test_accuracy"], "is not a validation metric"),
        (["--select", "best_val_nothing"], "no run logged 'best_val_nothing'"),
        (
            ["--select", "best_val_accuracy", "--tune", "optimizer.weight_decay"],
            "'optimizer.weight_decay' was not swept",
        ),
        (["--tune", "optimizer.lr"], "--tune: only with --select"),
    ):
        bad = tmp_path / "bad"
        assert report.main([*args, "--out", str(bad), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not bad.exists()


def test_the_reference_row_is_the_best_group_on_validation() -> None:
    from transferlab.report_render import compare
    from transferlab.report_stats import Reference

    stats_ = pd.DataFrame(
        {
            "mode": ["a", "b"],
            "n": [3, 3],
            "best_val_accuracy_mean": [0.9, 0.8],
            "best_val_accuracy_std": [0.01] * 2,
            "test_accuracy_mean": [0.7, 0.95],
            "test_accuracy_std": [0.01] * 2,
        }  # fmt: skip
    )
    table = compare(stats_, ["mode"], [Reference("paper", 0.5)])
    assert table.iloc[0]["best group here (on validation)"] == "a"  # not b, the better one on test
    # Another data setting has its own validation set: its best is its own row, never "the" best.
    mono = stats_.assign(**{"data.cell_type": "mono", "best_val_accuracy_mean": [0.99, 0.98]})
    both = pd.concat([stats_.assign(**{"data.cell_type": "all"}), mono], ignore_index=True)
    table = compare(both, ["data.cell_type", "mode"], [Reference("paper", 0.5)])
    assert table[["setting", "best group here (on validation)"]].values.tolist() == [
        ["data.cell_type=all", "a"],
        ["data.cell_type=mono", "a"],
    ]
    # So has another dataset, a swept data=... group (the axis "data" once hidden_axes collapsed it).
    datasets = both.rename(columns={"data.cell_type": "data"}).replace(
        {"data": {"all": "elpv", "mono": "folder"}}
    )
    table = compare(datasets, ["data", "mode"], [Reference("paper", 0.5)])
    assert table["setting"].tolist() == ["elpv", "folder"]  # a group axis shows its choice


def test_a_tuned_value_that_never_finished_is_refused_not_silently_dropped(
    tuned_sweep: Path, tmp_path: Path, capsys
) -> None:
    """A tuned configuration whose every run FAILED (here: one more lr of full_finetune, logged as a
    sweep job logs it, then failed) would leave its arm choosing among fewer values than were tried."""
    import shutil

    from mlflow import MlflowClient

    shutil.copy(tuned_sweep / "mlflow.db", tmp_path / "mlflow.db")  # the module's sweep stays as it was
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tuned")
    (job,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.params.get("mode.name") == "full_finetune"
        and r.data.params.get("optimizer.lr") == "0.01"
        and r.data.params.get("data.fold") == "0"
    ]
    tags = {
        k: v for k, v in job.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"
    }
    failed = client.create_run(
        experiment.experiment_id, tags={**tags, "config_hash": "another", "choice.mode": "full_finetune"}
    )
    for key, value in {**job.data.params, "optimizer.lr": "0.1"}.items():
        client.log_param(failed.info.run_id, key, value)
    client.set_terminated(failed.info.run_id, "FAILED")
    out = tmp_path / "r"
    args = ["--experiment", "tuned", "--tracking-uri", uri, "--no-log", "--out", str(out)]
    assert report.main([*args, "--select", "best_val_accuracy"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "1 tuned configuration(s) have no FINISHED run, only FAILED, KILLED or RUNNING ones (" in err
    ), err
    assert "optimizer.lr=0.1)" in err and "mode=full_finetune" in err
    assert not out.exists()
    assert report.main(args) == 0  # without --select the failure is listed, as before
    assert "FAILED" in capsys.readouterr().out
    # A job that failed before its run logged any config (transferlab.sweep._failed_child) names no
    # configuration: listed, it does not block the choice (its re-launch is a new, FINISHED run).
    client.delete_run(failed.info.run_id)
    parent = job.data.tags["mlflow.parentRunId"]
    early = client.create_run(
        experiment.experiment_id, tags={"mlflow.parentRunId": parent, "sweep.role": "job", "error": "x"}
    )
    client.set_terminated(early.info.run_id, "FAILED")
    assert report.main([*args, "--select", "best_val_accuracy"]) == 0


def test_a_declared_replicate_is_averaged_over_and_paired_by(tmp_path: Path, capsys) -> None:
    """sweep.replicates names the keys whose runs repeat one configuration (here, for the test, the
    weight decay, which by default would be an arm): the report averages over it and pairs by it."""
    code = launch(
        "-m", *TINY, *store_overrides(tmp_path), "mlflow.experiment_name=reps", "trainer.epochs=1",
        "mode=feature_extract,full_finetune", "optimizer.weight_decay=0,0.01",
        "sweep.replicates=[seed,optimizer.weight_decay]",
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    out = tmp_path / "r"
    args = ["--experiment", "reps", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-log"]
    assert report.main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["mode"]) == ["feature_extract", "full_finetune"] and set(summary["n"]) == {2}
    assert "optimizer.weight_decay" not in summary.columns
    assert pd.read_csv(out / "paired.csv")["n_pairs"].tolist() == [2]  # paired decay by decay
    assert "replicates: seed, optimizer.weight_decay;" in text
    assert "paired by replicate (seed, optimizer.weight_decay)" in text


def test_select_error_is_a_report_error() -> None:
    with pytest.raises(ReportError, match="arm mode=x has no replicate at which every tuned configuration"):
        select(
            pd.DataFrame(
                {"mode": ["x"], "optimizer.lr": ["1"], "seed": [0], "best_val_accuracy": [math.nan]}
            ),
            ["mode"],
            ["optimizer.lr"],
            "best_val_accuracy",
        )


def test_replicate_launches_exactly_each_arms_winner_and_resumes(tuned_sweep: Path, capsys) -> None:
    """Last in this module: it adds runs to the shared sweep."""
    from transferlab import replicate

    uri = f"sqlite:///{tuned_sweep}/mlflow.db"
    args = ["--experiment", "tuned", "--select", "best_val_accuracy", "--tracking-uri", uri]
    assert replicate.main([*args, "trainer.epochs=1"]) == 2  # no replicate named: nothing launched
    assert "no replicate among the overrides" in capsys.readouterr().err
    # Two lrs per arm: a choice strictly better than the other lr is at its grid's edge, and its
    # replicates are refused (one line, nothing launched) until the grid grows or --allow-edge.
    edges = pd.read_csv(Path(_selection(uri)) / "selection.csv", keep_default_na=False)["grid_edge"]
    assert edges.astype(bool).any(), "the fixture should put a choice at its grid's edge"
    assert replicate.main([*args, "seed=1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "may lie past the grid" in err and "--allow-edge" in err
    args.append("--allow-edge")
    assert replicate.main([*args, "seed=1", "--dry-run"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(printed) == 2 and all("seed=1" in line and "seed=0" not in line for line in printed)
    # The store without its artifacts (a committed mlflow.db): the same commands, from the runs' tags.
    (tuned_sweep / "artifacts").rename(tuned_sweep / "away")
    try:
        assert replicate.main([*args, "seed=1", "--dry-run"]) == 0
        assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")] == printed
        client = mlflow.MlflowClient(uri)
        tagged = client.search_runs(
            [client.get_experiment_by_name("tuned").experiment_id], "tags.overrides LIKE '%'"
        )
        for run in tagged:  # runs logged before the tag existed: one line, exit 2
            client.delete_tag(run.info.run_id, "overrides")
        assert replicate.main([*args, "seed=1", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "has no overrides tag and its overrides.json cannot be read" in err and err.count("\n") == 1
        for run in tagged:
            client.set_tag(run.info.run_id, "overrides", run.data.tags["overrides"])
    finally:
        (tuned_sweep / "away").rename(tuned_sweep / "artifacts")

    chosen = pd.read_csv(Path(_selection(uri)) / "selection.csv", dtype={"optimizer.lr": str})
    launched: list[list[str]] = []

    def in_process(command: list[str]) -> int:  # the real multirun, in this process (no 10 s import)
        launched.append(command)
        return launch(*command[3:])

    assert replicate.main([*args, "seed=1"], launch=in_process) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tuned"])
    jobs = runs[runs["tags.sweep.role"] != "parent"]
    new = jobs[jobs["params.seed"] == "1"]
    assert sorted(
        zip(new["params.mode.name"], new["params.optimizer.lr"], new["params.data.fold"], strict=True)
    ) == sorted(
        (m, lr, f) for m, lr in zip(chosen["mode"], chosen["optimizer.lr"], strict=True) for f in ("0", "1")
    )
    assert set(new["status"]) == {"FINISHED"}
    # The report over tuning and replicates: the same choice (made on the tuning replicate alone).
    after = pd.read_csv(Path(_selection(uri)) / "selection.csv", dtype={"optimizer.lr": str})
    assert after["optimizer.lr"].tolist() == chosen["optimizer.lr"].tolist() and set(after["n"]) == {4}
    assert set(after["selected_on"]) == {2}
    # Relaunched: every job FINISHED already, nothing trains again.
    assert replicate.main([*args, "seed=1"], launch=in_process) == 0
    assert len(mlflow.search_runs(experiment_names=["tuned"]).query("`tags.sweep.role` != 'parent'")) == len(
        jobs
    )


def _selection(uri: str) -> str:
    out = tempfile.mkdtemp()
    assert report.main(["--experiment", "tuned", "--tracking-uri", uri, "--no-log", "--out", out,
                        "--select", "best_val_accuracy"]) == 0  # fmt: skip
    return out


def test_the_data_efficiency_plot_draws_each_arm_against_images_per_class(tmp_path: Path) -> None:
    from transferlab.report_render import plot_efficiency

    rows = []
    for mode, base in (("feature_extract", 0.80), ("full_finetune", 0.70)):
        for n, gain in (("10", 0.0), ("100", 0.1), ("30", 0.05), ("null", 0.15)):
            mean = base + gain * (2.5 if mode == "full_finetune" else 1)
            rows.append({"mode": mode, "data.train_per_class": n, "test_accuracy_mean": mean,
                         "test_accuracy_ci95_low": mean - 0.02, "test_accuracy_ci95_high": mean + 0.02})  # fmt: skip
    # An arm with every training image only (another setting, e.g. mono cells) draws no curve.
    rows.append({"mode": "lp_ft", "data.train_per_class": "null", "test_accuracy_mean": 0.9,
                 "test_accuracy_ci95_low": 0.88, "test_accuracy_ci95_high": 0.92})  # fmt: skip
    curves = plot_efficiency(pd.DataFrame(rows), ["mode", "data.train_per_class"], tmp_path / "e.png")
    assert set(curves) == {"feature_extract", "full_finetune"}
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ft = curves["full_finetune"]
    assert ft["_n"].tolist()[:3] == [10, 30, 100] and math.isnan(ft["_n"].iloc[3])  # N ascending, "all" apart
    assert ft["test_accuracy_mean"].tolist() == pytest.approx([0.70, 0.825, 0.95, 1.075])
    # The crossover: fine-tuning below feature extraction at 10 per class, above it at 100.
    fe = curves["feature_extract"]
    assert ft["test_accuracy_mean"].iloc[0] < fe["test_accuracy_mean"].iloc[0]
    assert ft["test_accuracy_mean"].iloc[2] > fe["test_accuracy_mean"].iloc[2]
