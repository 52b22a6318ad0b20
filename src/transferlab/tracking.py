"""MLflow: one run per invocation, with what it takes to trust and reproduce the numbers.

Under torchrun rank 0 alone logs (the functions marked ``rank_zero_only`` do nothing elsewhere):
one MLflow run per run, whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException

from transferlab import resilient
from transferlab.distributed import is_main, rank_zero_only
from transferlab.schemas import ConfigError, MlflowConfig

_log = logging.getLogger("transferlab.tracking")


def is_bookkeeping(metric: str) -> bool:
    """How long a run took and which caches served it, not what it computed: shown, never compared.

    Timing (``wall_time_s``, ``epoch_time_s``, ``feature_extract_s``, ``input_load_s``, ``images_per_s``)
    and cache use (``feature_cache_hit``, ``input_cache_hit``) differ between two runs of one config
    whenever the first filled a cache the second reads; MLflow's ``system/*`` metrics (CPU, memory,
    GPU) between any two runs.
    """
    return metric.endswith(("_s", "_cache_hit")) or metric.startswith("system/")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow params are flat; lists stay one value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _local_sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# A run's Hydra overrides as a tag too, beside overrides.json: a store copied without its artifacts
# (an experiment's committed mlflow.db) can still be replicated. MLflow caps a tag value at 8,000
# characters; a longer list is in the artifact only.
OVERRIDES_TAG = "overrides"
OVERRIDES_TAG_MAX = 8000

# The kind MLflow records for model-training experiments (what its own training integrations set).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where the MLflow UI shows this experiment's runs table (or one run): a server's own address, or
    for a local store the address ``make ui`` serves.

    MLflow 3.17's UI opens an experiment on its GenAI overview (traces, token usage) unless the address
    asks for the model-training view (``workflowType=machine_learning``; it then remembers the choice in
    the browser); the experiment's kind tag alone does not change that (seen in Chromium, tests/test_ui.py).
    """
    base = (
        tracking_uri.rstrip("/")
        if tracking_uri.startswith(("http://", "https://"))
        else "http://127.0.0.1:5000"
    )
    path = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    return f"{base}{path}?workflowType=machine_learning"


@rank_zero_only
def setup_experiment(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and return the experiment id, creating it with our artifact root
    (and tagged as a model-training experiment, :data:`EXPERIMENT_KIND`)."""
    resilient.configure(cfg)  # an unreachable server answers within seconds, not minutes
    db = _local_sqlite_path(cfg.tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        resilient.reach_database(cfg.tracking_uri, cfg.request_timeout_s)
        experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    except Exception as exc:  # an unreachable server or a broken store: fail before any compute
        raise ConfigError(
            "mlflow.tracking_uri",
            # One line: a database driver's message runs over several.
            f"cannot reach {cfg.tracking_uri} ({type(exc).__name__}: {str(exc).splitlines()[0]})"[:500],
            "start the tracking server, or leave mlflow.tracking_uri at its default local store",
        ) from None
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                "mlflow.experiment_name",
                f"experiment {cfg.experiment_name!r} is deleted",
                "restore it in the MLflow UI (or `mlflow experiments restore`), or choose another name",
            )
        if not EXPERIMENT_KIND.keys() <= experiment.tags.keys():  # created before the tag was set
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = cfg.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment_name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
        assert experiment is not None
        return experiment.experiment_id


@contextmanager
def mlflow_run(
    experiment_id: str,
    run_name: str | None,
    tags: dict[str, str],
    run_id: str | None = None,
    system_metrics: MlflowConfig | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A run that ends FINISHED, FAILED with the error text, or KILLED on a signal; never left RUNNING.

    With ``run_id`` (a resume) the existing run is reopened: its metrics, params and artifacts stay
    and what follows is appended (MLflow's system metrics continue their steps). ``system_metrics``:
    the ``mlflow`` config whose ``system_metrics`` keys say whether MLflow samples CPU, memory and GPU.
    """
    if not is_main():  # another rank of a torchrun run: rank 0 holds the run; this one logs nothing
        yield SimpleNamespace(info=SimpleNamespace(run_id=run_id))
        return
    sample = system_metrics is not None and system_metrics.system_metrics
    if sample:
        mlflow.set_system_metrics_sampling_interval(system_metrics.system_metrics_interval_s)
    if run_id is not None:
        _check_resumable(run_id)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=sample)
        resumes = int(run.data.tags.get("resumes", "0")) + 1
        mlflow.set_tags({**tags, "resumes": str(resumes)})
        if "error" in run.data.tags:  # the interruption being resumed from
            mlflow.delete_tag("error")
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=tags, log_system_metrics=sample
        )
    try:
        yield run
    except KeyboardInterrupt as exc:
        _end_quietly(RunStatus.KILLED, f"interrupted: {exc or type(exc).__name__}", None)
        raise
    except BaseException as exc:
        _end_quietly(RunStatus.FAILED, f"{type(exc).__name__}: {exc}"[:5000], exc)
        raise
    else:
        try:
            resilient.retry(lambda: _end(run.info.run_id), "end the run")
        finally:  # an outage past the limit raises from the retry: the sampler stops all the same
            _stop_sampler(run.info.run_id)


def _end(run_id: str) -> None:
    """FINISHED. MLflow's end_run forgets the run before it calls the server; when that call failed,
    a retry of end_run would end nothing (the run left RUNNING), so the retry ends it by id."""
    if (active := mlflow.active_run()) is not None and active.info.run_id == run_id:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    else:
        mlflow.MlflowClient().set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _check_resumable(run_id: str) -> None:
    """A checkpoint outlives its store (a deleted mlflow.db, another tracking_uri): one line, no run."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        where = "does not have"
    else:
        if run.info.lifecycle_stage != "deleted":
            return
        where = "has deleted"
    raise ConfigError(
        "resume",
        f"this config's checkpoint continues MLflow run {run_id}, which {mlflow.get_tracking_uri()} "
        f"{where} (the store was replaced, or the run deleted)",
        "pass resume=false to start a new run (the checkpoint is overwritten), "
        "or set mlflow.tracking_uri to the run's store",
    )


def _end_quietly(status: int, error: str, exc: BaseException | None) -> None:
    """Record why the run ended; if the server is gone too, say so and let the real error surface."""
    run_id = active.info.run_id if (active := mlflow.active_run()) is not None else None
    try:
        mlflow.set_tag("error", error)
        if exc is not None:
            mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
        mlflow.end_run(RunStatus.to_string(status))
    except Exception as second:  # noqa: BLE001 - the original error matters more
        print(
            f"warning: could not mark the MLflow run {RunStatus.to_string(status)} "
            f"({type(second).__name__}); it shows RUNNING until the run is resumed",
            file=sys.stderr,
        )
        with contextlib.suppress(Exception):  # pops the run locally before it calls the server
            mlflow.end_run(RunStatus.to_string(status))  # (a server back by now gets the right status)
        _stop_sampler(run_id)


def _stop_sampler(run_id: str | None) -> None:
    """The run's system-metrics sampler, which MLflow's end_run stops only after its server call: left
    running it logs into the run once the server is back, beside a resumed run's (two values a step)."""
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor as samplers

    if (sampler := samplers.pop(run_id, None)) is not None:
        sampler.finish()


@rank_zero_only
def log_dataset(name: str, source: str, fingerprint: str, context: str, sizes: dict[str, int]) -> None:
    """The dataset as an MLflow input: its source and a digest of the exact pixels and labels used."""
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local-file sources
        warnings.simplefilter("ignore", UserWarning)
        origin = (
            resolve_dataset_source(source) if Path(source).exists() else CodeDatasetSource({"source": source})
        )
    dataset = MetaDataset(origin, name=name, digest=fingerprint[:32])
    tags = {f"n_{k}": str(v) for k, v in sizes.items()}
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return
        except MlflowException as exc:
            # Parallel jobs (joblib, submitit) registering the same dataset at the same moment: MLflow's
            # SQL store checks for it, then inserts, and the slower job hits the unique constraint.
            # Again, it finds the row the other job wrote and only links it to this run.
            if type(exc.__cause__).__name__ != "IntegrityError" or attempt == 2:
                raise
            _log.info("dataset %s was being registered by a parallel job; linking it again", name)
            time.sleep(0.2 * (attempt + 1))


def log_confusion(labels: np.ndarray, preds: np.ndarray, classes: list[str], prefix: str = "test") -> None:
    """A confusion-matrix plot and sklearn's per-class report, as artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, classification_report

    label_ids = list(range(len(classes)))
    report = classification_report(
        labels, preds, labels=label_ids, target_names=classes, zero_division=0, digits=4
    )
    mlflow.log_text(report, f"{prefix}_classification_report.txt")
    report_dict = classification_report(
        labels, preds, labels=label_ids, target_names=classes, zero_division=0, output_dict=True
    )
    mlflow.log_dict(report_dict, f"{prefix}_classification_report.json")
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, preds, labels=label_ids, display_labels=classes, ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title(f"{prefix} confusion matrix")
    fig.tight_layout()
    mlflow.log_figure(fig, f"{prefix}_confusion_matrix.png")
    plt.close(fig)


@rank_zero_only
def log_json(obj: Any, name: str) -> None:
    mlflow.log_dict(obj, name)


@rank_zero_only
def log_state_dict(state: dict[str, Any], name: str) -> None:
    """A plain tensor state dict (loadable with ``torch.load(weights_only=True)``), as an artifact."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        torch.save(state, path)
        # Mid-run (lp_ft's probe head between stages): waits out an outage like the epochs' values.
        resilient.retry(lambda: mlflow.log_artifact(str(path)), f"log {name}")


@rank_zero_only
def log_params(cfg: Any, raw: Any) -> None:
    """The flattened resolved config as params, and the resolved YAML as an artifact."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(raw, resolve=True)
    assert isinstance(resolved, dict)
    params = {k: ("null" if v is None else v) for k, v in flatten(resolved).items()}
    # A resumed run has them already; MLflow refuses changed values (a relaunch's new output dir).
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    mlflow.log_text(OmegaConf.to_yaml(raw, resolve=True), "config.yaml")


@rank_zero_only
def log_new_metrics(metrics: Mapping[str, float]) -> None:
    """Metrics a run logs once (step 0): those it has not got yet, all with one timestamp.

    So a retry after a send that reached the server, or a resumed run that logged its results before
    the server went away, adds no second point (the values a resume computes again are the same).
    """
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    have = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    new = [Metric(k, float(v), now, 0) for k, v in metrics.items() if k not in have]
    for batch in resilient.batches(new):
        client.log_batch(run_id, metrics=batch)


@rank_zero_only
def log_epoch(row: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics(row, step=epoch)


@rank_zero_only
def log_results(
    metrics: dict[str, float],
    labels: np.ndarray,
    preds: np.ndarray,
    classes: list[str],
    device_type: str,
) -> None:
    """Final metrics, the confusion matrix and report, and the class order. (The tested weights are the
    run's MLflow model, :func:`transferlab.model_store.log_model`: stored once, as safetensors.)"""
    log_new_metrics(metrics)
    mlflow.set_tag("device", device_type)
    log_confusion(labels, preds, classes)
    mlflow.log_dict({"classes": classes}, "classes.json")


def log_stage(
    stage: Any,
    trainable: Any,
    groups: list[dict[str, Any]],
    counts: dict[str, int],
    index: int,
    of: int,
    sink: Callable[[dict[str, float], int], None] | None = None,
) -> Callable[[dict[str, float], int], None]:
    """Record a stage (what trains, at which lrs, over which steps); return its per-epoch logger.

    Params ``stage.<name>.*`` say what trained and at which learning rates, ``stages/<name>.json``
    lists every parameter group and its tensors. Each epoch also logs ``lr_head`` and ``lr_backbone``
    (0 when frozen), and in runs of several stages ``stage`` (0, 1, ...), so the MLflow charts show
    where one stage ends: all stages share the metric names and one step axis.
    """
    head = next(g for g in groups if g["name"] == "head")
    backbone_lrs = [g["lr"] for g in groups if g["name"] != "head"]
    last = stage.first_step + stage.epochs - 1
    prefix = f"stage.{stage.name}"
    what = ",".join(trainable.trainable) if trainable.trainable else "head only"
    params = {
        f"{prefix}.steps": f"{stage.first_step}-{last}",
        f"{prefix}.lr_head": head["lr"],
        f"{prefix}.lr_backbone": (
            f"{min(backbone_lrs):.3g}..{max(backbone_lrs):.3g}" if backbone_lrs else "frozen"
        ),
        f"{prefix}.trainable": what[:6000],
        f"{prefix}.trainable_params": counts["trainable_params"],
        f"{prefix}.eval_modules": len(trainable.eval_modules),
    }
    record = {
        "stage": vars(stage),
        "trainable_stages": list(trainable.trainable),
        "eval_modules": list(trainable.eval_modules),
        "param_groups": groups,
    }

    def send() -> None:  # lp_ft's second stage starts mid-run: it waits out an outage like the epochs
        mlflow.log_params(params)
        mlflow.log_dict(record, f"stages/{stage.name}.json")

    if is_main():
        resilient.retry(send, f"log stage {stage.name}")
    _log.info(
        "stage %s (steps %d-%d): %s trainable parameters (%s), head lr %g, backbone lr %s",
        stage.name,
        stage.first_step,
        last,
        f"{counts['trainable_params']:,}",
        what,
        head["lr"],
        f"{min(backbone_lrs):.3g}..{max(backbone_lrs):.3g}" if backbone_lrs else "frozen",
    )
    extra = {}  # lr_head and lr_backbone come with each epoch's row: the schedule moves them
    if of > 1:
        extra["stage"] = float(index)
    write = sink or log_epoch  # sink: e.g. resilient.EpochLog, which survives a server outage
    return lambda row, step: write({**row, **extra}, step)


@rank_zero_only
def log_cache_use(cfg: Any, trains_backbone: bool, augmented: bool, inputs: Any) -> None:
    """Tags (and a log line) saying whether the caches under paths.cache_dir serve this run, and why not.

    ``inputs`` is the decoded-input cache lookup (None when not cached). Whether the feature cache
    was hit is known after fitting: the ``feature_cache_hit`` metric.
    """
    import logging

    if trains_backbone:
        features = "off: the backbone trains, so its features change every step"
    elif augmented:
        features = (
            f"off: augment={cfg.augment.name} changes the inputs every epoch, so the frozen backbone "
            "runs live on every batch (no gradients through it)"
        )
    elif not cfg.trainer.feature_cache:
        features = "off: trainer.feature_cache=false (features computed once, in memory)"
    else:
        features = "on"
    if features != "on" and not trains_backbone:
        logging.getLogger("transferlab.cache").info("feature cache %s", features)
    if inputs is None:
        state = (
            "off: data.cache=false"
            if not cfg.data.cache
            else "off: images generated in memory or not on disk yet"
        )
    else:
        state = "hit" if inputs.hit else "miss"
        # Once per run: a resume reads the cache again, its second point would be a duplicate.
        use = {"input_cache_hit": float(inputs.hit), "input_load_s": inputs.seconds}
        resilient.retry(lambda: log_new_metrics(use), "log the caches' use")
    tags = {"feature_cache": features, "input_cache": state, "cache_dir": cfg.paths.cache_dir}
    resilient.retry(lambda: mlflow.set_tags(tags), "log the caches' use")
