"""One transfer-learning experiment: seed -> data -> backbone -> mode -> optimizer -> fit -> test -> log.

python -m transferlab.train                                   # feature extraction, ELPV, EfficientNet-Lite0
python -m transferlab.train mode=full_finetune backbone=resnet50 trainer.epochs=5
python -m transferlab.train --help                            # config groups and public keys
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from transferlab import tracking
from transferlab.backbones import (
    TransferModel,
    build_backbone,
    check_backbone_name,
    find_classifier,
    split_head,
)
from transferlab.checkpoint import Checkpoint, resume_hint, set_deterministic, stop_signals
from transferlab.config import ConfigError, TrainConfig, register_configs, to_typed
from transferlab.data import check_data, class_counts, prepare
from transferlab.engine import Runner, StopRequested
from transferlab.modes import MODES, Mode, count_parameters, freeze_backbone, trainable_parameters
from transferlab.resilient import EpochLog, retry

log = logging.getLogger("transferlab.train")
# Absolute, so the entrypoint finds conf/ both as `python -m transferlab.train` and when imported.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
register_configs()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(network: nn.Module, mode: Mode, num_classes: int) -> TransferModel:
    """Freeze first, then swap the head: the new head arrives trainable, sized to the classes."""
    backbone, width = split_head(network)
    freeze_backbone(backbone, mode)
    return TransferModel(backbone, nn.Linear(width, num_classes))


def preflight(cfg: TrainConfig) -> str:
    """Every check that needs no compute, so bad input fails in seconds and logs no run."""
    check_backbone_name(cfg.backbone)
    check_data(cfg.data)
    return tracking.setup_experiment(cfg.mlflow)


def train(
    cfg: TrainConfig, raw: DictConfig, choices: dict[str, str], overrides: list[str]
) -> dict[str, float]:
    """Run one experiment from a typed config; return its metrics (``test_*``, ``best_val_*``)."""
    experiment_id = preflight(cfg)
    mode = MODES[cfg.mode.name]
    seed_everything(cfg.seed)  # before any module is built: random init and the head depend on it
    set_deterministic(cfg.trainer.deterministic)
    # Weights before the run starts: a backbone that cannot be had here is bad input, not a failed run.
    built = build_backbone(cfg.backbone)
    find_classifier(built.model)  # a network whose head no mode can replace: bad input, no run
    tags = {f"choice.{group}": str(option) for group, option in choices.items()}
    tags |= {
        "mode": mode.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.data.name,
        "seed": str(cfg.seed),
    }
    # Resume: this config's checkpoint (a killed or preempted run) names the MLflow run to continue.
    ckpt = Checkpoint.for_config(cfg, raw)
    with (
        stop_signals(ckpt) as stop,
        tracking.mlflow_run(experiment_id, cfg.mlflow.run_name, tags, run_id=ckpt.run_id) as run,
    ):
        started = time.perf_counter()
        tracking.log_params(cfg, raw)
        tracking.log_json(
            {"overrides": overrides, "choices": choices, "command": tracking.command_line()}, "overrides.json"
        )

        # Data, preprocessed exactly as the backbone's weights expect (resize, crop, mean/std).
        data = prepare(cfg.data, built.preprocess, cfg.paths.data_dir)
        sizes = data.splits.sizes()
        log.info(
            "data %s: %s, classes %s, train class counts %s",
            data.name,
            sizes,
            data.classes,
            class_counts(data.labels[data.splits.train], data.num_classes),
        )
        for context in ("train", "val", "test"):
            tracking.log_dataset(data.name, data.source, data.fingerprint, context, sizes)

        model = make_model(built.model, mode, data.num_classes)
        optimizer = instantiate(cfg.optimizer)(trainable_parameters(model))  # only these reach it
        counts = {
            "trainable_params": count_parameters(model, lambda p: p.requires_grad),
            "total_params": count_parameters(model),
            "head_params": count_parameters(model.head),
        }
        tracking.log_reproducibility(cfg, built, data, counts)
        log.info(
            "%s: %s trainable of %s parameters, lr %g",
            mode.name,
            f"{counts['trainable_params']:,}",
            f"{counts['total_params']:,}",
            cfg.optimizer.lr,
        )

        runner = Runner(model, data, mode, cfg.trainer, cfg.seed, augment_inputs=cfg.data.augment)
        if not runner.frozen_features and not mode.trains_backbone:
            log.info("data.augment=true: the frozen backbone runs on every batch (features change per epoch)")
        resume_state = ckpt.bind(run.info.run_id, runner, optimizer)  # None for a fresh run
        # Per-epoch metrics survive a tracking-server outage (kept beside the checkpoint, replayed).
        log_epoch = EpochLog(run.info.run_id, ckpt.path.parent)
        fit = runner.fit(
            optimizer,
            cfg.trainer.epochs,
            log_epoch,
            state=resume_state,
            checkpoint=ckpt.save,
            should_stop=stop.requested,
        )

        # Test the best-on-validation checkpoint, in eval mode.
        runner.load_best(fit)
        test, labels, preds = runner.evaluate(data.splits.test)
        wall = time.perf_counter() - started
        metrics = {f"test_{k}": v for k, v in test.items()}
        best_row = next(row for row in fit.history if row["epoch"] == fit.best_epoch)
        metrics |= {f"best_{k}": v for k, v in best_row.items() if k.startswith("val_")}
        metrics |= {
            "best_epoch": fit.best_epoch,
            "wall_time_s": wall,
            "feature_extract_s": fit.feature_seconds,
            "frozen_feature_path": float(fit.used_feature_path),
            **counts,
        }
        log_epoch.flush()
        retry(
            lambda: tracking.log_results(metrics, labels, preds, data.classes, model, runner.device.type),
            "log the results",
        )
        log.info("test: %s (run %s)", ", ".join(f"{k}={v:.4f}" for k, v in test.items()), run.info.run_id)
    ckpt.remove()  # finished: the next launch of this config is a new run
    return metrics


def hydra_context() -> tuple[dict[str, str], list[str], bool]:
    hc = HydraConfig.get()
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    return choices, list(hc.overrides.task), hc.mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(raw: DictConfig) -> float:
    choices, overrides, multirun = hydra_context()
    try:
        cfg = to_typed(raw)
        metrics = train(cfg, raw, choices, overrides)
    except ConfigError as exc:
        if multirun:  # let the sweep record this job as failed and go on
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as exc:  # SIGTERM/SIGINT: checkpoint saved, MLflow run KILLED
        print(f"stopped: {resume_hint(exc)}", file=sys.stderr)
        sys.exit(128 + (getattr(exc, "signum", None) or 15))
    # The value a sweeper (Optuna) maximises: model selection never looks at the test split.
    return float(metrics[f"best_val_{cfg.trainer.monitor}"])


if __name__ == "__main__":
    main()
