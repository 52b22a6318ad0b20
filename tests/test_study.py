"""Optuna studies as sweeps (``hydra/sweeper=study``): stored, continued after a kill, trials in parallel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.entities import ViewType
from optuna.trial import TrialState

from transferlab.study_store import SEARCH_ATTR

from .conftest import TINY, store_overrides
from .test_sweep import _assert_one_parent_with, _tree

SEARCH = ["hparams_search=optuna_lr_wd", "hydra.sweeper.study_name=lr_wd"]


def _study(db: Path, name: str = "lr_wd") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def test_a_stored_study_runs_trials_in_parallel_and_a_relaunch_continues_it(
    run_cli, store, tmp_path: Path
) -> None:
    """Two trials at once under joblib; relaunched, the study is continued, not restarted: nothing
    finished is rerun, trial numbers go on, and every trial stays a child of the one parent run."""
    db = tmp_path / "optuna" / "study.db"
    where = [*store, *SEARCH, f"hydra.sweeper.storage=sqlite:///{db}"]
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    assert run_cli("-m", *TINY, *where, *parallel, "hydra.sweeper.n_trials=2") == 0
    parent, children = _assert_one_parent_with(tmp_path, 2)
    first, second = children.sort_values("start_time").to_dict("records")
    assert second["start_time"] < first["end_time"], "the two trials did not run at the same time"
    study = _study(db)
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert sorted(children["tags.optuna.trial"]) == ["0", "1"]
    by_trial = {int(r["tags.optuna.trial"]): r for r in children.to_dict("records")}
    for trial in study.trials:  # the value told is the child's best validation accuracy, never a test metric
        assert trial.value == pytest.approx(by_trial[trial.number]["metrics.best_val_accuracy"])
        assert float(by_trial[trial.number]["params.optimizer.lr"]) == pytest.approx(
            trial.params["optimizer.lr"]
        )
    best = max(study.trials, key=lambda t: t.value)
    assert parent["tags.optuna.best_trial"] == str(best.number) and parent["tags.optuna.study"] == "lr_wd"
    assert parent["tags.optuna.best_run_id"] == by_trial[best.number]["run_id"]
    assert parent["tags.sweep.axes"] == '["optimizer.lr", "optimizer.weight_decay"]'
    results = yaml.safe_load((tmp_path / "logs" / "multirun" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(best.value)

    # The same command again: 2 trials are finished, so nothing runs; then one more trial is asked for.
    assert run_cli("-m", *TINY, *where, "hydra.sweeper.n_trials=2") == 0
    assert len(_study(db).trials) == 2
    assert run_cli("-m", *TINY, *where, "hydra.sweeper.n_trials=3") == 0
    assert [t.number for t in _study(db).trials] == [0, 1, 2]
    again, children = _assert_one_parent_with(tmp_path, 3)  # the first launch's parent, reopened
    assert again["run_id"] == parent["run_id"] and again["status"] == "FINISHED"
    assert sorted(children["tags.optuna.trial"]) == ["0", "1", "2"]
    # Counted over the study's three launches, not the last one's single job.
    assert (again["tags.optuna.complete"], again["tags.optuna.pruned"], again["tags.optuna.fail"]) == (
        "3",
        "0",
        "0",
    )
    assert (children["status"] == "FINISHED").all()


def test_a_pruner_ends_each_trial_at_the_epoch_it_prunes(run_cli, store, tmp_path: Path) -> None:
    """hydra.sweeper.pruner: each trial's job reports its per-epoch val_accuracy to the stored study;
    a pruner that prunes at the first step after its warm-up (no accuracy reaches 1.1) ends every
    trial after 2 of its 4 epochs. The run still finishes (tested on its best epoch); the trial is
    PRUNED with the run's own validation values as its intermediate values."""
    db = tmp_path / "study.db"
    args = [a for a in TINY if not a.startswith("trainer.epochs")] + ["trainer.epochs=4"]
    pruner = "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1,n_warmup_steps:1}"
    where = [*store, *SEARCH, f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.n_trials=2", pruner]
    assert run_cli("-m", *args, *where) == 0
    _, children = _assert_one_parent_with(tmp_path, 2)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    by_trial = {int(r["tags.optuna.trial"]): r for r in children.to_dict("records")}
    for trial in _study(db).trials:
        run = by_trial[trial.number]
        history = {m.step: m.value for m in client.get_metric_history(run["run_id"], "val_accuracy")}
        assert trial.state == TrialState.PRUNED and trial.intermediate_values == history
        assert sorted(history) == [0, 1]
        assert (
            run["status"] == "FINISHED" and run["metrics.pruned_at"] == 1 == run["metrics.stopped_early_at"]
        )
        assert "metrics.test_accuracy" in run


def _one_line_error(capsys) -> str:  # noqa: ANN001
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_bad_study_settings_are_one_line_before_any_trial(run_cli, store, tmp_path: Path, capsys) -> None:
    """A study stored for another search, a storage that cannot be opened, a stored study without a
    name: one line naming the key, exit 2, no trial run and no MLflow run left behind."""
    db = tmp_path / "study.db"
    other = optuna.create_study(study_name="lr_wd", storage=f"sqlite:///{db}", direction="maximize")
    other.set_user_attr(SEARCH_ATTR, {"direction": "maximize", "space": {"optimizer.lr": "{}"}, "fixed": []})
    cases = {
        f"hydra.sweeper.storage=sqlite:///{db}": f"error: hydra.sweeper.study_name: study 'lr_wd' in sqlite:///{db} was created with another space",
        "hydra.sweeper.storage=sqlite:////proc/no/study.db": "error: hydra.sweeper.storage: cannot open sqlite:////proc",
        # PostgreSQL that does not answer (nothing listens on port 9 here): the password is not printed
        "hydra.sweeper.storage=postgresql+psycopg://me:secret@127.0.0.1:9/optuna": "error: hydra.sweeper.storage: cannot open postgresql+psycopg://me:***@127.0.0.1:9/optuna (OperationalError",
        f"hydra.sweeper.storage={tmp_path}/j.log hydra.sweeper.study_name=null": "error: hydra.sweeper.study_name: a stored study needs a name",
        "hydra.sweeper.n_trials=0": "error: hydra.sweeper.n_trials: must be >= 1",
        "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner}": "error: hydra.sweeper.pruner: a trial's job reports",
    }
    for overrides, expected in cases.items():
        assert run_cli("-m", *TINY, *store, *SEARCH, *overrides.split()) == 2, overrides
        line = _one_line_error(capsys)
        assert line.startswith(expected) and "Fix: " in line, line
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.search_runs(search_all_experiments=True, run_view_type=ViewType.ACTIVE_ONLY).empty
    assert len(other.trials) == 0


@pytest.mark.slow  # about 90 s: a search in a subprocess, killed, relaunched; CI runs it with the guarantees
@pytest.mark.guarantee
def test_a_killed_search_relaunched_finishes_with_exactly_its_trials(tmp_path: Path) -> None:
    """SIGKILL while the third of 4 trials trains (after its first checkpoint); the same command again
    ends with exactly trials 0-3 COMPLETE: the killed trial is launched again with its own values, its
    job resumes its own MLflow run, and the finished trials are not rerun."""
    db = tmp_path / "study.db"
    args = [a for a in TINY if not a.startswith("trainer.epochs")] + ["trainer.epochs=4"]
    cmd = [sys.executable, "-m", "transferlab.train", "-m", *args, *store_overrides(tmp_path), *SEARCH,
           f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.n_trials=4"]  # fmt: skip
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = tmp_path / "cache" / "checkpoints"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no third trial with a checkpoint within 300 s"
        try:
            states = [t.state for t in _study(db).trials]
        except KeyError:  # the database is there, the study not yet: "Record does not exist."
            states = []
        if states[:3] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING] and any(
            checkpoints.glob("*/checkpoint.pt")
        ):
            break
        time.sleep(0.2)
    killed = _study(db).trials[2].params
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _study(db).trials[2].state == TrialState.RUNNING  # as the kill left it

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = _study(db).trials
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(4)]
    assert trials[2].params == killed
    parents, children = _tree(tmp_path)
    assert len(parents) == 1 and len(children) == 4  # the killed trial's run resumed, not a fifth
    assert set(children["status"]) == {"FINISHED"} and parents.iloc[0]["status"] == "FINISHED"
    resumed = children[children["tags.optuna.trial"] == "2"].iloc[0]
    assert resumed["tags.resumes"] == "1"


def test_the_search_space_reads_hydras_grammar_last_value_wins_and_bad_ranges_are_one_line() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from transferlab.schemas import ConfigError
    from transferlab.study_store import search_space

    space, fixed = search_space(
        [
            "optimizer.lr=tag(log, interval(1e-5, 1e-2))",
            "optimizer.weight_decay=tag(log, interval(1e-6, 1e-2))",
            "trainer.batch_size=choice(16, 32)",
            "seed=shuffle(range(3, 0, -1))",
            "trainer.epochs=range(1, 4)",
            "optimizer.weight_decay=0.01",  # the command line after hydra.sweeper.params: fixed, not searched
        ]
    )
    assert space == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True),
        "trainer.batch_size": CategoricalDistribution([16, 32]),
        "seed": CategoricalDistribution([1, 2, 3]),  # shuffled by Hydra, sorted here: one space per search
        "trainer.epochs": IntDistribution(1, 4),
    }
    assert fixed == ["optimizer.weight_decay=0.01"]
    for line, needle in [
        (
            "optimizer.lr=tag(log, interval(0, 1))",
            "hydra.sweeper.params.optimizer.lr: optimizer.lr=tag(log, interval(0, 1)): ",
        ),
        ("optimizer.lr=interval(1, 0.5)", "hydra.sweeper.params.optimizer.lr: "),
        ("optimizer.lr=interval(1e-5", "hydra.sweeper.params: "),
    ]:
        with pytest.raises(ConfigError) as error:
            search_space([line])
        assert str(error.value).startswith(needle) and "Fix: " in str(error.value), str(error.value)


def test_a_journal_file_storage_holds_a_study_across_openings(tmp_path: Path) -> None:
    """A path without a scheme is optuna's journal file (for file systems shared between nodes)."""
    from transferlab.study_store import open_storage, open_study

    path = tmp_path / "studies" / "lr.log"
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    first = open_study("lr", open_storage(str(path)), str(path), "maximize", space, ["seed=0"])
    first.tell(first.ask(space), 0.5)
    again = open_study("lr", open_storage(str(path)), str(path), "maximize", space, ["seed=0"])
    assert path.is_file() and [(t.number, t.value) for t in again.trials] == [(0, 0.5)]
