"""A run's model in MLflow: logged at the end of every finished run, found by run or registry, fetched
and checked before anything in it is read, registered under a name with the ``champion`` alias.

The model is an MLflow pyfunc built from code (:mod:`transferlab.model_code`): MLflow's own tools load
it (``mlflow.pyfunc.load_model``, ``mlflow models serve``) without unpickling anything. transferlab's
own readers (``predict``) never go through that loader: they fetch the folder, refuse it unless every
file is one transferlab writes (the code file byte for byte), and rebuild the network from the plain
files (:class:`transferlab.classifier.Classifier`).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image
from safetensors.torch import load_file

from transferlab import model_code
from transferlab.backbones import Preprocess
from transferlab.classifier import FILES, WEIGHTS, ModelFilesError, check_folder, write_files
from transferlab.distributed import rank_zero_only
from transferlab.pyfunc import IMAGE
from transferlab.schemas import ConfigError
from transferlab.sweep import CONFIG_HASH
from transferlab.versions import package_versions

ARTIFACT = "model"  # the model's name in the run (runs:/<id>/model)
ALIAS = "champion"
CODE_FILE = Path(model_code.__file__)
# What MLflow writes beside our files, read by MLflow's tools only (transferlab reads none of them).
MLFLOW_FILES = (
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",
)
# The packages the pyfunc imports, pinned to the versions the run used (transferlab itself must be
# installed from the run's commit: its tag mlflow.source.git.commit).
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "hydra-core",
    "omegaconf",
    "pillow",
    "numpy",
    "pandas",
    "scikit-learn",
)


class ModelSourceError(ConfigError):
    """A SOURCE that names no usable model: one line, exit 2, before any work."""


def allowed_files() -> dict[str, bytes | None]:
    """The model folder's files: ours (the code file with exactly its bytes) and MLflow's own."""
    allowed: dict[str, bytes | None] = {name: None for name in MLFLOW_FILES}
    allowed |= {f"artifacts/{name}": None for name in FILES}
    allowed[CODE_FILE.name] = CODE_FILE.read_bytes()
    return allowed


def signature(classes: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"prob_{name}") for name in classes]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE)]), outputs=Schema(outputs))


def example_png(stored: torch.Tensor) -> bytes:
    """One stored image (C, S, S uint8) as PNG bytes: the model's input example is a real image."""
    array = stored.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@rank_zero_only
def log_model(
    state: dict[str, torch.Tensor],
    config_yaml: str,
    classes: list[str],
    pre: Preprocess,
    example: torch.Tensor,
) -> str:
    """Log the tested weights as the active run's pyfunc model ``model``; returns its model URI.

    Once per run: a retry after a send that reached the server, or a resumed run that had logged its
    model before the tracking server went away, finds the READY model and logs no second one.
    """
    run = mlflow.active_run()
    done = logged_model(MlflowClient(), mlflow.get_run(run.info.run_id))
    if done is not None:
        return done.model_uri
    versions = package_versions(REQUIREMENTS)
    requirements = [
        f"{name}=={v}" for name, v in versions.items() if name != "python" and v != "not installed"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_files(folder, state, config_yaml, classes, pre)
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=str(CODE_FILE),
            artifacts={name.split(".")[0]: str(folder / name) for name in FILES},
            signature=signature(classes),
            input_example=pd.DataFrame({IMAGE: [example_png(example)]}),
            pip_requirements=requirements,
        )
    return info.model_uri


@dataclass
class Source:
    """Where a model comes from: its run, the URI MLflow downloads it by, and how the user named it."""

    run_id: str
    uri: str
    named: str


def resolve(client: MlflowClient, source: str) -> Source:
    """SOURCE -> the run and model URI: a run id, ``runs:/<id>[/model]``, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``. A run that does not exist, did not finish or has no model: one line."""
    if source.startswith("models:/"):
        spec = source.removeprefix("models:/")
        try:
            if "@" in spec:
                name, alias = spec.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = spec.rsplit("/", 1)
                version = client.get_model_version(name, number)
        except (MlflowException, ValueError) as exc:
            raise ModelSourceError(
                "SOURCE",
                f"no registered model version {source} ({str(exc).splitlines()[0][:200]})",
                "use models:/NAME@champion or models:/NAME/VERSION of a registered model "
                "(python -m transferlab.report --experiment X --register NAME registers one)",
            ) from None
        if not version.run_id:
            raise ModelSourceError("SOURCE", f"{source} names no run", "register a transferlab run's model")
        check_run(client, version.run_id, source)
        return Source(version.run_id, version.source, source)  # MLflow 3: models:/<logged model id>
    run_id = source.removeprefix("runs:/").split("/")[0]
    model = check_run(client, run_id, source)
    return Source(run_id, f"models:/{model.model_id}", source)


def check_run(client: MlflowClient, run_id: str, named: str) -> Any:
    """The run's logged model (an MLflow ``LoggedModel``), or one line saying why there is none."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ModelSourceError(
            "SOURCE",
            f"no run {run_id!r} in {client.tracking_uri} ({str(exc).splitlines()[0][:200]})",
            "pass a run id from the MLflow UI, and --tracking-uri for another store",
        ) from None
    if run.info.status != "FINISHED":
        raise ModelSourceError(
            "SOURCE",
            f"run {run_id} ({named}) is {run.info.status}: only a finished run has a tested model",
            "finish it (relaunch its command: it resumes) or pass another run",
        )
    return require_model(client, run, "SOURCE", f"run {run_id}")


def require_model(client: MlflowClient, run: Any, key: str, what: str) -> Any:
    """The run's logged model, or one line naming ``key`` and the rerun that logs one."""
    model = logged_model(client, run)
    if model is None:
        raise ModelSourceError(
            key,
            f"{what} has no model (logged before runs logged one)",
            f"rerun it with python -m transferlab.reproduce {run.info.run_id}, whose run logs one",
        )
    return model


def logged_model(client: MlflowClient, run: Any) -> Any:
    """The run's ``model`` whose upload completed (READY; the newest, should there be two), or None.

    A log interrupted by an outage leaves a PENDING one, never served. (MLflow 3.17's search does not
    filter on status, so that is done here: a run has one model, two at most.)
    """
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{ARTIFACT}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    usable = [m for m in models if m.status == LoggedModelStatus.READY]
    return usable[0] if usable else None


def fetch(client: MlflowClient, source: Source, dst: Path) -> Path:
    """Download the model folder into ``dst`` and check it (:func:`allowed_files`); returns the folder
    holding the four files. Nothing in it has been read when a foreign file refuses it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(client.tracking_uri)  # models:/ URIs resolve through the global store
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source.uri, dst_path=str(dst), tracking_uri=client.tracking_uri
            )
        )
    except MlflowException as exc:
        raise ModelSourceError(
            "SOURCE",
            f"cannot download {source.uri} ({str(exc).splitlines()[0][:200]})",
            "check --tracking-uri",
        ) from None
    check_folder(folder, allowed_files(), f"{source.named} ({source.uri})")
    missing = [n for n in FILES if not (folder / "artifacts" / n).is_file()]
    if missing:
        raise ModelFilesError(
            source.named,
            f"the model folder lacks artifacts/{missing[0]}",
            "log the model again (transferlab.reproduce)",
        )
    return folder / "artifacts"


def load_weights(client: MlflowClient, run_id: str, dst: Path) -> dict[str, torch.Tensor]:
    """A finished run's tested weights, as plain tensors (the model folder checked first)."""
    return load_file(str(fetch(client, resolve(client, run_id), dst) / WEIGHTS))


def best_run(runs: list[Any]) -> Any:
    """The finished run with the best ``best_val_<monitor>`` (each run's own trainer.monitor): the
    validation split decides, never the test split. Ties: the smaller ``best_val_loss``, then the older run."""

    def key(run: Any) -> tuple[float, float, int]:
        monitor = run.data.params.get("trainer.monitor", "accuracy")
        value = run.data.metrics.get(f"best_val_{monitor}", float("nan"))
        value = -value if monitor == "loss" else value
        return (
            value if np.isfinite(value) else -np.inf,
            -run.data.metrics.get("best_val_loss", np.inf),
            -run.info.start_time,
        )

    return max(runs, key=key)


def register(client: MlflowClient, run: Any, name: str, why: str) -> Any:
    """A new version of ``name`` from ``run``'s model, tagged, with the alias moved to it; older
    versions stay. Returns the version."""
    model = require_model(client, run, "--register", f"the selected run {run.info.run_id}")
    tags = {k: f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test_")}
    tags |= {
        CONFIG_HASH: run.data.tags.get(CONFIG_HASH, ""),
        "experiment_id": run.info.experiment_id,
        "parent_run": run.data.tags.get(MLFLOW_PARENT_RUN_ID, ""),
        "selected_by": why,
        "run_name": run.info.run_name or "",
    }
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    client.set_registered_model_alias(name, ALIAS, version.version)
    return version
