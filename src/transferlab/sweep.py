"""A Hydra multirun as one MLflow parent run: linked child runs, recorded failures, resumable re-launches.

``MlflowSweepCallback`` (registered under ``hydra.callbacks`` in ``conf/hydra/default.yaml``):

- ``on_multirun_start`` (the launching process) creates the parent run, named after the sweep and
  tagged with its overrides and swept axes, and writes ``<hydra.sweep.dir>/.transferlab/sweep.json``.
  Jobs read the parent run id from that file, so the link holds across processes (joblib workers,
  submitit jobs on other machines that share the sweep dir).
- In each job, :func:`job` (called by ``train.main``) names the child run after what differs
  (``efficientnet_lite0 · feature_extract · seed=1``), tags it ``mlflow.parentRunId`` and the config
  hash, and finds an earlier FINISHED run of the same config so the job can be skipped.
- ``on_job_end`` (the job's process) records the job's outcome in the sweep dir. A job that raised
  is reported to the sweeper as a :class:`FailedJob` value instead of an exception. Hydra 1.3 runs
  every job of a batch (``run_job`` catches into ``JobReturn(status=FAILED)``), but ``BasicSweeper``
  then reads ``JobReturn.return_value``, which re-raises the first failure: later batches
  (``hydra.sweeper.max_batch_size``) never run, ``on_multirun_end`` is never called and only that one
  failure is shown. The failure is not hidden: its MLflow run is FAILED with the error text, the
  log and the summary list it, and the exit code is 1.
- ``on_multirun_end`` prints the summary (finished / failed / skipped), logs it to the parent run,
  ends the parent FINISHED (FAILED if a job failed) and exits 1 if any job failed.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf

from transferlab.schemas import ConfigError, MlflowConfig, TrainConfig, config_hash
from transferlab.schemas.sweep import REPLICATES
from transferlab.tracking import setup_experiment, ui_link

log = logging.getLogger("transferlab.sweep")

STATE_DIR = ".transferlab"  # under hydra.sweep.dir
ROLE = "sweep.role"  # parent | job | report
CONFIG_HASH = "config_hash"
# Keys that say where and how a run is recorded or shown, not what it computes.
# Display order of swept axes in child run names; the rest follow in sweep order, seed last.
NAME_ORDER = ("backbone", "mode", "optimizer", "data")


@dataclass
class SweepInfo:
    """What every job needs to know about its sweep; written once by the launching process."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    name: str
    axes: list[str]  # the swept keys, in display order
    groups: list[str]  # config groups (their values are option names, shown bare)

    @staticmethod
    def path(sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / STATE_DIR / "sweep.json"

    def save(self, sweep_dir: str | Path) -> None:
        path = self.path(sweep_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, sweep_dir: str | Path) -> SweepInfo | None:
        path = cls.path(sweep_dir)
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def jobs_dir(self, sweep_dir: str | Path) -> Path:
        """One folder of job records per launch: a re-launch into the same dir starts a fresh count."""
        return Path(sweep_dir) / STATE_DIR / self.parent_run_id / "jobs"


@dataclass
class Job:
    """One job of a sweep, as ``train`` needs it: its child run's name and tags, or the run it repeats."""

    num: int
    overrides: list[str]
    run_name: str
    tags: dict[str, str]
    done: dict[str, float] | None = None  # metrics of an earlier FINISHED run of this config
    done_run_id: str | None = None


@dataclass
class FailedJob:
    """What a failed job returns to the sweeper: the failure is recorded, not re-raised mid-sweep.

    ``float()`` of it raises, so the Optuna sweeper marks the trial FAIL and goes on.
    """

    error: str
    overrides: list[str] = field(default_factory=list)

    def __float__(self) -> float:
        raise ValueError(f"the job failed: {self.error}")

    def __str__(self) -> str:
        return f"failed job ({self.error})"


class PrunedValue(float):
    """What the job of an Optuna trial that its pruner ended returns: its best validation value, marked
    so the sweeper tells the study PRUNED (a float subclass: it crosses joblib's process boundary)."""


STUDY_FILE = "study.json"  # under <sweep dir>/.transferlab: how a trial's job reaches its study


def study_prunes(sweep_dir: str | Path) -> bool:
    """Whether this sweep is an Optuna study with a pruner (its jobs then report each epoch)."""
    path = Path(sweep_dir) / STATE_DIR / STUDY_FILE
    return path.is_file() and json.loads(path.read_text()).get("pruner") is not None


# The job running in this process (set by job(), read by on_job_end in the same process).
_current: Job | None = None


def _parse(overrides: list[str]) -> dict[str, Any]:
    """``key -> Override``, later overrides of a key winning, as the BasicSweeper combines them."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.get_key_element().lstrip("+~"): o for o in parsed}


def sweep_axes(config: DictConfig) -> list[str]:
    """The keys this multirun sweeps: ``hydra.sweeper.params`` then the command line, sweeps only."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    lines += list(config.hydra.overrides.task)
    axes = [key for key, o in _parse(lines).items() if o.is_sweep_override()]
    first = [k for k in NAME_ORDER if k in axes]
    rest = [k for k in axes if k not in first and k != "seed"]
    return first + rest + (["seed"] if "seed" in axes else [])


def sweep_overrides(config: DictConfig) -> list[str]:
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def sweep_name(config: DictConfig, axes: list[str]) -> str:
    """``sweep.name``, else the experiment / hparams_search config, else the swept overrides."""
    if OmegaConf.select(config, "sweep.name"):
        return str(config.sweep.name)
    choices = config.hydra.runtime.choices
    for group in ("experiment", "hparams_search"):
        if choices.get(group):
            return str(choices[group])
    swept = _parse(sweep_overrides(config))
    return " ".join(swept[a].input_line.lstrip("+~") for a in axes) or "sweep"


def job_name(overrides: list[str], axes: list[str], groups: list[str], num: int) -> str:
    """What differs: ``efficientnet_lite0 · feature_extract · seed=1`` (group options bare)."""
    values = {k: o.get_value_element_as_str() for k, o in _parse(overrides).items()}
    parts = [values[a] if a in groups else f"{a}={values[a]}" for a in axes if a in values]
    return " · ".join(parts) or f"job {num}"


def _mlflow_config(config: DictConfig) -> MlflowConfig:
    node = OmegaConf.to_object(config.mlflow)
    assert isinstance(node, MlflowConfig)
    return node


def job(cfg: TrainConfig) -> Job | None:
    """This Hydra job as a child of the sweep's parent run; ``None`` outside a tracked multirun.

    With ``sweep.resume`` the earlier FINISHED sweep job of the same config hash is looked up, so a
    re-launched or widened sweep only runs what is missing.
    """
    global _current
    hc = HydraConfig.get()
    info = SweepInfo.load(hc.sweep.dir)
    if info is None:  # the callback is not configured: a multirun without a parent run
        if hc.callbacks and any(
            "MlflowSweepCallback" in str(c.get("_target_")) for c in hc.callbacks.values()
        ):
            log.warning(
                "no %s: this job is not linked to its sweep's parent run", SweepInfo.path(hc.sweep.dir)
            )
        return None
    num = int(hc.job.num)
    overrides = list(hc.overrides.task)
    digest = config_hash(cfg)
    tags = {
        MLFLOW_PARENT_RUN_ID: info.parent_run_id,
        ROLE: "job",
        "sweep.name": info.name,
        "sweep.job": str(num),
        CONFIG_HASH: digest,
    }
    current = Job(num, overrides, job_name(overrides, info.axes, info.groups, num), tags)
    if cfg.sweep.resume:
        earlier = MlflowClient(cfg.mlflow.tracking_uri).search_runs(
            [info.experiment_id],
            filter_string=f"tags.{CONFIG_HASH} = '{digest}' and attributes.status = 'FINISHED' "
            f"and tags.`{ROLE}` = 'job'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if earlier:
            current.done = dict(earlier[0].data.metrics)
            current.done_run_id = earlier[0].info.run_id
            log.info(
                "skipping job #%d (%s): config %s already FINISHED as run %s",
                num,
                current.run_name,
                digest,
                current.done_run_id,
            )
    _current = current
    return current


def _record(info: SweepInfo, sweep_dir: str, record: dict[str, Any]) -> None:
    path = info.jobs_dir(sweep_dir) / f"{record['num']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def _failed_child(info: SweepInfo, name: str, num: int, error: str, text: str) -> str:
    """A FAILED child run for a job that failed before its own run started (e.g. a bad value)."""
    client = MlflowClient(info.tracking_uri)
    run = client.create_run(
        info.experiment_id,
        run_name=name,
        tags={
            MLFLOW_PARENT_RUN_ID: info.parent_run_id,
            ROLE: "job",
            "sweep.name": info.name,
            "sweep.job": str(num),
            "error": error[:5000],
        },
    )
    client.log_text(run.info.run_id, text, "error.txt")
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return run.info.run_id


def _own_run(info: SweepInfo, num: int) -> str | None:
    """The child run this job started, if it got that far (searched: it may run in any process)."""
    runs = MlflowClient(info.tracking_uri).search_runs(
        [info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{info.parent_run_id}' and tags.`sweep.job` = '{num}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def job_record(info: SweepInfo, sweep_dir: str, num: int) -> dict[str, Any] | None:
    """What ``on_job_end`` recorded of job ``num`` in this launch (:func:`_record`), or None."""
    path = info.jobs_dir(sweep_dir) / f"{num}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def job_run(info: SweepInfo, num: int, sweep_dir: str | None = None) -> str | None:
    """The MLflow run of job ``num``: from this launch's record (a skipped job names the earlier run it
    repeats), else the child of the parent tagged with that job number (an earlier launch's)."""
    record = job_record(info, sweep_dir, num) if sweep_dir is not None else None
    if record is not None and record.get("run_id"):
        return record["run_id"]
    return _own_run(info, num)


def summarize(records: list[dict[str, Any]]) -> str:
    """The end-of-sweep summary: counts, then every failed and skipped job with its overrides."""
    by = {s: [r for r in records if r["status"] == s] for s in ("finished", "failed", "skipped")}
    lines = [
        f"{len(records)} jobs: {len(by['finished'])} finished, {len(by['failed'])} failed, "
        f"{len(by['skipped'])} skipped (already FINISHED)"
    ]
    for r in by["failed"]:
        lines.append(f"  FAILED  #{r['num']} {' '.join(r['swept'] or r['overrides'])}: {r.get('error', '')}")
    for r in by["skipped"]:
        lines.append(f"  skipped #{r['num']} {' '.join(r['swept'] or r['overrides'])} (run {r['run_id']})")
    return "\n".join(lines)


class MlflowSweepCallback(Callback):
    """Hydra callback: a multirun is one MLflow parent run (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)  # resolves ${now:} once; jobs get the cached value
        try:
            mlflow_cfg = _mlflow_config(config)
            experiment_id = setup_experiment(mlflow_cfg)
        except ConfigError as exc:  # an unreachable store: one line, before any job starts
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes Hydra's callback guard, which turns exceptions into warnings
        axes = sweep_axes(config)
        groups = [g for g in config.hydra.runtime.choices if not str(g).startswith("hydra/")]
        name = sweep_name(config, axes)
        swept = sweep_overrides(config)
        client = MlflowClient(mlflow_cfg.tracking_uri)
        parent = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                ROLE: "parent",
                "sweep.name": name,
                "sweep.overrides": json.dumps(swept),
                "sweep.axes": json.dumps(axes),
                "sweep.tune": json.dumps(list(OmegaConf.select(config, "sweep.tune", default=[]) or [])),
                "sweep.replicates": json.dumps(
                    list(OmegaConf.select(config, "sweep.replicates", default=None) or REPLICATES)
                ),
                "sweep.dir": sweep_dir,
                "sweep.sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
                "sweep.launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
            },
        )
        info = SweepInfo(parent.info.run_id, experiment_id, mlflow_cfg.tracking_uri, name, axes, groups)
        info.save(sweep_dir)
        # A study's note to its trials' jobs, left in a reused sweep dir: a study writes it anew.
        (Path(sweep_dir) / STATE_DIR / STUDY_FILE).unlink(missing_ok=True)
        client.log_dict(parent.info.run_id, OmegaConf.to_container(config.hydra.overrides), "overrides.json")
        atexit.register(_end_abandoned, sweep_dir)  # Ctrl-C, or a sweeper that raised: never left RUNNING
        log.info("sweep %r: MLflow parent run %s (experiment %s)", name, parent.info.run_id, experiment_id)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        global _current
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        current, _current = _current, None
        failed = job_return.status == JobStatus.FAILED
        exc = job_return._return_value if failed else None  # the property would re-raise it
        error = f"{type(exc).__name__}: {exc}" if failed else ""
        if failed:
            # Before anything that could fail: Hydra turns a callback's exception into a warning,
            # and a still-FAILED JobReturn would stop the BasicSweeper at the end of this batch.
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = FailedJob(error, list(config.hydra.overrides.task))
        sweep_dir = str(config.hydra.sweep.dir)
        info = SweepInfo.load(sweep_dir)
        if info is None:
            return
        num = int(config.hydra.job.num)
        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [
            line
            for line, o in zip(overrides, parsed, strict=True)
            if o.get_key_element().lstrip("+~") in info.axes
        ]
        record: dict[str, Any] = {"num": num, "overrides": overrides, "swept": swept}
        if current is not None:
            record |= {"name": current.run_name, "config_hash": current.tags[CONFIG_HASH]}
        if failed:
            assert exc is not None
            run_id = _own_run(info, num)
            if run_id is None:  # failed before its run started: still a FAILED child in the tree
                name = record.get("name") or job_name(overrides, info.axes, info.groups, num)
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                run_id = _failed_child(info, name, num, error, text)
            record |= {"status": "failed", "run_id": run_id, "error": error[:2000]}
            # A bad value is one line; anything else keeps its traceback (also in the run's error.txt).
            trace = None if isinstance(exc, ConfigError) else exc
            log.error("job #%d failed (%s): %s", num, " ".join(swept or overrides), error, exc_info=trace)
        elif current is not None and current.done is not None:
            record |= {"status": "skipped", "run_id": current.done_run_id}
        else:
            record |= {"status": "finished", "run_id": _own_run(info, num)}
        _record(info, sweep_dir, record)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        info = SweepInfo.load(sweep_dir)
        if info is None:
            return
        atexit.unregister(_end_abandoned)
        jobs_dir = info.jobs_dir(sweep_dir)
        records = sorted((json.loads(p.read_text()) for p in jobs_dir.glob("*.json")), key=lambda r: r["num"])
        counts = {s: sum(r["status"] == s for r in records) for s in ("finished", "failed", "skipped")}
        text = summarize(records)
        client = MlflowClient(info.tracking_uri)
        client.log_dict(info.parent_run_id, {"jobs": records, "counts": counts}, "sweep_jobs.json")
        client.log_text(info.parent_run_id, text + "\n", "sweep_summary.txt")
        for status, n in counts.items():
            client.set_tag(info.parent_run_id, f"sweep.{status}", str(n))
        failed = counts["failed"] > 0
        client.set_terminated(info.parent_run_id, "FAILED" if failed else "FINISHED")
        print(f"\nsweep {info.name!r} (MLflow parent run {info.parent_run_id}): {text}")
        print(f"report: python -m transferlab.report --parent-run {info.parent_run_id}")
        print(
            f"in the MLflow UI: {ui_link(info.tracking_uri, info.experiment_id)} (the runs table, children "
            f"under their parent), {ui_link(info.tracking_uri, info.experiment_id, info.parent_run_id)} (the parent)"
        )
        if failed:
            sys.exit(1)  # SystemExit passes Hydra's callback guard (it only catches Exception)


def _end_abandoned(sweep_dir: str) -> None:
    """At exit of a sweep that never reached on_multirun_end: end the parent KILLED, not RUNNING.
    (Read from the sweep dir: a resumed study may have adopted an earlier parent meanwhile.)"""
    info = SweepInfo.load(sweep_dir)
    if info is None:  # removed with its parent: the sweeper refused its input
        return
    try:
        client = MlflowClient(info.tracking_uri)
        if client.get_run(info.parent_run_id).info.status == "RUNNING":
            client.set_tag(
                info.parent_run_id,
                "error",
                "the sweep stopped before its end (interrupted, or the sweeper raised)",
            )
            client.set_terminated(info.parent_run_id, RunStatus.to_string(RunStatus.KILLED))
    except Exception:  # at interpreter exit, with the store maybe gone: nothing more to do
        pass


__all__ = [
    "FailedJob",
    "Job",
    "MlflowSweepCallback",
    "SweepInfo",
    "config_hash",
    "job",
    "summarize",
]
