"""Multiruns as one MLflow parent run: linked children, recorded failures, resume, launchers, Optuna."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from transferlab.schemas import config_hash, to_typed
from transferlab.sweep import FailedJob

from .conftest import CONF_DIR, TINY, runs_in

FAST = [*TINY, "trainer.epochs=1"]


def _tree(tmp_path: Path, experiment: str = "transferlab"):  # noqa: ANN202 - (parent rows, child rows)
    runs = runs_in(tmp_path, experiment)
    parents = runs[runs["tags.sweep.role"] == "parent"]
    children = runs[runs["tags.sweep.role"] == "job"]
    return parents, children


def _assert_one_parent_with(tmp_path: Path, n_children: int, experiment: str = "transferlab"):  # noqa: ANN202
    parents, children = _tree(tmp_path, experiment)
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert len(children) == n_children
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    return parent, children


def test_a_sweep_is_one_parent_run_with_named_children(run_cli, store, tmp_path: Path, capsys) -> None:
    assert run_cli("-m", *FAST, *store, "mode=feature_extract,full_finetune", "sweep.name=fe_vs_ft") == 0
    parent, children = _assert_one_parent_with(tmp_path, 2)
    assert parent["status"] == "FINISHED" and parent["tags.mlflow.runName"] == "fe_vs_ft"
    assert (
        parent["tags.sweep.axes"] == '["mode"]'
        and "mode=feature_extract,full_finetune" in (parent["tags.sweep.overrides"])
    )
    assert (parent["tags.sweep.finished"], parent["tags.sweep.failed"]) == ("2", "0")
    # Child runs are named after what differs, and carry the hash of their semantic config.
    assert sorted(children["tags.mlflow.runName"]) == ["feature_extract", "full_finetune"]
    assert set(children["status"]) == {"FINISHED"} and children["tags.config_hash"].nunique() == 2
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent["run_id"])}
    assert {"sweep_jobs.json", "sweep_summary.txt", "overrides.json"} <= artifacts
    out = capsys.readouterr().out
    assert "2 jobs: 2 finished, 0 failed, 0 skipped" in out
    assert f"python -m transferlab.report --parent-run {parent['run_id']}" in out


def test_a_single_run_has_no_parent(run_cli, store, tmp_path: Path) -> None:
    assert run_cli(*FAST, *store) == 0
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FINISHED" and run["tags.config_hash"]
    assert "tags.mlflow.parentRunId" not in run or run["tags.mlflow.parentRunId"] is None
    assert "tags.sweep.role" not in run


def test_failures_are_recorded_the_sweep_goes_on_and_exits_1(run_cli, store, tmp_path: Path, capsys) -> None:
    """A bad value (fails before its run) and a run that raises: both FAILED children, others run."""
    # backbone.name=no_such_net: a ConfigError before its run starts (the model registry is asked
    # at the job, not by the preflight, which only composes); data.limit=4: raises inside the run.
    args = ("-m", *FAST, *store, "backbone.name=no_such_net,test_efficientnet", "data.limit=4,48")
    assert run_cli(*args) == 1
    parent, children = _assert_one_parent_with(tmp_path, 4)
    assert parent["status"] == "FAILED"
    assert (parent["tags.sweep.finished"], parent["tags.sweep.failed"]) == ("1", "3")
    by_name = children.set_index("tags.mlflow.runName")
    assert by_name.loc["backbone.name=test_efficientnet · data.limit=48", "status"] == "FINISHED"
    no_net = by_name.loc["backbone.name=no_such_net · data.limit=48", "tags.error"]
    assert "backbone.name: timm has no model 'no_such_net'" in no_net
    assert (
        "cannot split synthetic"
        in by_name.loc["backbone.name=test_efficientnet · data.limit=4", "tags.error"]
    )
    for run_id in children[children["status"] == "FAILED"]["run_id"]:
        assert "error.txt" in {a.path for a in MlflowClient().list_artifacts(run_id)}
    out = capsys.readouterr().out
    assert "4 jobs: 1 finished, 3 failed, 0 skipped" in out
    assert (
        "FAILED  #1 backbone.name=no_such_net data.limit=48: ConfigError: backbone.name: timm has no model"
        in out
    )


def test_relaunch_skips_finished_jobs_and_widening_runs_only_new_ones(
    run_cli, store, tmp_path: Path, capsys
) -> None:
    assert run_cli("-m", *FAST, *store, "data.limit=4,48") == 1  # one fails, one finishes
    capsys.readouterr()
    # The same sweep again: the finished job is skipped, the failed one runs again (and fails again).
    assert run_cli("-m", *FAST, *store, "data.limit=4,48") == 1
    out = capsys.readouterr().out
    assert "2 jobs: 0 finished, 1 failed, 1 skipped" in out and "skipped #1 data.limit=48" in out
    # Widened by a seed, without the failing value: only seed=1 runs.
    assert run_cli("-m", *FAST, *store, "data.limit=48", "seed=0,1") == 0
    assert "2 jobs: 1 finished, 0 failed, 1 skipped" in capsys.readouterr().out
    runs = runs_in(tmp_path)
    jobs = runs[runs["tags.sweep.role"] == "job"]
    finished = jobs[jobs["status"] == "FINISHED"]
    assert sorted(finished["params.seed"]) == ["0", "1"]  # seed 0 trained once, across three launches
    assert (jobs["status"] == "FAILED").sum() == 2
    # sweep.resume=false reruns what already finished.
    assert run_cli("-m", *FAST, *store, "data.limit=48", "seed=0", "sweep.resume=false") == 0
    assert "1 jobs: 1 finished, 0 failed, 0 skipped" in capsys.readouterr().out


def test_config_hash_ignores_paths_tracking_and_display(compose_cfg, tmp_path: Path) -> None:
    base = config_hash(to_typed(compose_cfg(*FAST)))
    same = [
        "mlflow.run_name=x",
        "mlflow.experiment_name=other",
        f"paths.log_dir={tmp_path}/elsewhere",
        "trainer.progress=true",
        "sweep.name=a_name",
        "sweep.resume=false",
        "optimizer.lr=0.001",  # the mode's default, spelt out
        "trainer.num_workers=2",
        "trainer.checkpoint=false",
        "mlflow.max_outage_s=5",
        f"paths.cache_dir={tmp_path}/other-cache",
    ]
    assert config_hash(to_typed(compose_cfg(*FAST, *same))) == base
    # How a launch resumes is not what it computes: a relaunch with these still finds its checkpoint.
    assert config_hash(to_typed(compose_cfg(*FAST, "resume=false"))) == base
    assert config_hash(to_typed(compose_cfg(*FAST, "resume_run=0123abcd"))) == base
    for different in (
        "optimizer.lr=0.01",
        "seed=1",
        "mode=full_finetune",
        "data.limit=40",
        "trainer.epochs=3",
    ):
        assert config_hash(to_typed(compose_cfg(*FAST, different))) != base, different


def test_a_failed_job_fails_float_so_optuna_marks_the_trial_failed() -> None:
    failed = FailedJob("RuntimeError: boom", ["optimizer.lr=0.1"])
    with pytest.raises(ValueError, match="the job failed: RuntimeError: boom"):
        float(failed)
    assert "boom" in str(failed)


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
    ],
    ids=["joblib", "submitit_local"],
)
def test_launchers_link_children_across_processes(run_cli, store, tmp_path: Path, launcher) -> None:
    """Jobs run in other processes: they find the parent run through the sweep dir."""
    assert run_cli("-m", *FAST, *store, *launcher, "seed=0,1") == 0
    parent, children = _assert_one_parent_with(tmp_path, 2)
    assert parent["status"] == "FINISHED"
    assert sorted(children["tags.mlflow.runName"]) == ["seed=0", "seed=1"]
    assert set(children["status"]) == {"FINISHED"}
    assert parent["tags.sweep.launcher"].endswith(
        "JoblibLauncher" if "joblib" in launcher[0] else "LocalLauncher"
    )


def test_launcher_configs_compose(compose_cfg) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.timeout_min, launcher.max_num_timeout) == (1, 240, 3)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm_ddp",
                "hydra.launcher.gpus_per_node=8",
                "hydra.launcher.nodes=2",
            ],
            return_hydra_config=True,
        )
    ddp = cfg.hydra.launcher  # one task per GPU unless told otherwise
    assert ddp._target_.endswith("SlurmLauncher")
    assert (ddp.nodes, ddp.gpus_per_node, ddp.tasks_per_node, ddp.max_num_timeout) == (2, 8, 8, 3)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_runs_one_tiny_step(run_cli, store, tmp_path: Path, experiment: str) -> None:
    """The experiment's deltas compose and run (tiny model and data in place of its own)."""
    assert run_cli(f"experiment={experiment}", *FAST, *store) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"


def test_a_dataset_registered_by_a_parallel_job_meanwhile_is_linked_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two joblib jobs log the same dataset at once: MLflow's SQL store checks, then inserts, so the
    slower one hits the unique constraint (seen in a CI run). It must link the other's row instead."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from transferlab import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    real = mlflow.log_input
    calls = []

    def racing(dataset, context=None, tags=None) -> None:  # noqa: ANN001 - mlflow.log_input's signature
        calls.append(context)
        if len(calls) == 1:  # the other job's row lands between our check and our insert
            with mlflow.start_run(nested=True):
                real(dataset, context=context, tags=tags)
            cause = sqlalchemy.exc.IntegrityError("INSERT INTO datasets", {}, Exception("UNIQUE constraint"))
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed") from cause
        real(dataset, context=context, tags=tags)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        tracking.log_dataset("synthetic", "synthetic://2x4", "ab" * 16, "train", {"train": 8})
    assert calls == ["train", "train"]
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("synthetic", "ab" * 16)]

    def unrelated(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise MlflowException("RESOURCE_DOES_NOT_EXIST")

    monkeypatch.setattr(mlflow, "log_input", unrelated)
    with mlflow.start_run(), pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        tracking.log_dataset("synthetic", "synthetic://2x4", "ab" * 16, "val", {"val": 2})
