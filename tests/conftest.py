"""Shared fixtures: compose configs, run the real entrypoint in-process, read a temporary MLflow store."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from transferlab.schemas import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A tiny timm network with BatchNorm (random init: no download) on generated images: seconds per run.
TINY = [
    "data=synthetic",
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "backbone.weights=null",
    "trainer.epochs=2",
    "trainer.batch_size=8",
    "trainer.progress=false",
]


@pytest.fixture(autouse=True)
def _clean_global_state() -> Iterator[None]:
    """Hydra and MLflow keep process-wide state, and runs set environment variables (MLflow's HTTP
    retries, CUBLAS_WORKSPACE_CONFIG): every test starts from none and leaves none behind."""
    environ = dict(os.environ)
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # back to $MLFLOW_TRACKING_URI or MLflow's default
    os.environ.clear()
    os.environ.update(environ)


def store_overrides(root: Path) -> list[str]:
    """Overrides that point MLflow, logs, caches and Hydra's job dirs under ``root``."""
    return [
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        f"mlflow.artifact_location={root}/artifacts",
        f"paths.log_dir={root}/logs",
        f"paths.cache_dir={root}/cache",
        f"paths.data_dir={root}/data",
        f"hydra.run.dir={root}/logs/run",
        f"hydra.sweep.dir={root}/logs/multirun",
    ]


@pytest.fixture
def store(tmp_path: Path) -> list[str]:
    """Overrides that point MLflow, logs and caches at a temporary folder."""
    return store_overrides(tmp_path)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the root config as the CLI would (without the hydra node)."""
    register_configs()

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}/out", *overrides])

    return _compose


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """Run ``python -m transferlab.train ARGS`` in this process; returns the exit code."""
    from transferlab import train

    def _run(*args: str) -> int:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["transferlab.train", *args])
        try:
            train.cli()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            while mlflow.active_run():
                mlflow.end_run()
        return 0

    return _run


def runs_in(tmp_path: Path, experiment: str = "transferlab"):  # noqa: ANN201 - a DataFrame
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], search_all_experiments=False)


def metric_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN001
    """Every metric of a run as sorted (step, value) pairs, timing and cache bookkeeping aside. Fails on
    any key, bookkeeping included, with two values at one step (a duplicate from a resume or a retry)."""
    from transferlab.tracking import is_bookkeeping

    out = {}
    for key in client.get_run(run_id).data.metrics:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{key} has more than one value at a step: {points}"
        if not is_bookkeeping(key):
            out[key] = points
    return out


def make_runner(model, data, trainer, seed: int, augment, stage, features=None):  # noqa: ANN001, ANN201
    """A Runner as ``train.py`` builds one: once per run, then ``enter(stage)`` decides what trains.
    ``augment``: an AugmentConfig, None, or True for ``augment=flip`` (random horizontal flips)."""
    from transferlab.engine import Runner
    from transferlab.schemas import AugmentConfig

    if isinstance(augment, bool):
        augment = AugmentConfig(name="flip", hflip=0.5) if augment else None

    runner = Runner(model, data, trainer, seed, augment, features)
    runner.enter(stage)
    return runner


def runner_for_config(cfg, data_dir: str, features_root: Path | None = None):  # noqa: ANN001, ANN201
    """``train.py``'s steps up to fitting, for a typed config: seed, backbone, data, head, Runner in
    the stage that trains the most (the last). Returns the runner and its feature cache (or None)."""
    from transferlab.backbones import build_backbone
    from transferlab.cache import FeatureCache
    from transferlab.data import prepare
    from transferlab.modes import make_model
    from transferlab.train import seed_everything

    seed_everything(cfg.seed)
    built = build_backbone(cfg.backbone)
    data = prepare(cfg.data, built.preprocess, data_dir)
    model = make_model(built.model, data.num_classes)
    features = FeatureCache(features_root, built) if features_root is not None else None
    stage = cfg.mode.stages(cfg.trainer.epochs, cfg.optimizer.lr)[-1]
    return make_runner(model, data, cfg.trainer, cfg.seed, cfg.augment, stage, features), features


def launch(*args: str) -> int:
    """``python -m transferlab.train ARGS`` (a multirun with ``-m``) in this process, outside a
    test's own fixtures (module-scoped fixtures launch sweeps with it); returns the exit code."""
    from transferlab import train

    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["transferlab.train", *args])
        try:
            train.main()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            GlobalHydra.instance().clear()
            while mlflow.active_run():
                mlflow.end_run()
    return 0
