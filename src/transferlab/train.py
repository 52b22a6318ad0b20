"""One transfer-learning experiment: seed -> data -> backbone -> mode -> optimizer -> fit -> test -> log.

python -m transferlab.train                                   # feature extraction, ELPV, EfficientNet-Lite0
python -m transferlab.train mode=full_finetune backbone=resnet50 trainer.epochs=5
python -m transferlab.train mode=lp_ft mode.probe_epochs=5 trainer.epochs=5  # linear probe, then fine-tune
python -m transferlab.train --help                            # config groups and public keys
"""

from __future__ import annotations

import sys
from pathlib import Path

# Absolute, so the entrypoint finds conf/ both as `python -m transferlab.train` and when imported.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
if __name__ == "__main__":
    # Before torch, timm, torchvision and MLflow are imported (about 9 s on 2 cores): a bad override
    # is refused, and --help / --cfg are answered, from the config alone, in about a second.
    from transferlab.preflight import answer_without_compute

    # A run's overrides are checked in a forked child while the imports below go on (a refusal
    # still exits at once); wait_for_preflight gives the verdict before Hydra composes.
    wait_for_preflight = answer_without_compute(sys.argv[1:], CONF_DIR, "train")

import json  # after the fast path above (E402 is allowed in this file: pyproject.toml)
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import hydra
import numpy as np
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transferlab import distributed, model_store, provenance, resilient, sweep, tracking
from transferlab.augment import check_policy
from transferlab.backbones import BuiltBackbone, build_backbone, check_backbone_name, find_classifier
from transferlab.cache import FeatureCache, Lookup
from transferlab.checkpoint import Checkpoint, StopSignal, resume_hint, set_deterministic, stop_signals
from transferlab.data import PreparedData, check_data, class_counts
from transferlab.engine import FitResult, Runner, StopRequested
from transferlab.inputs import prepare_cached
from transferlab.loop_state import check_device
from transferlab.modes import check_stages, count_parameters, make_model
from transferlab.optim import describe, param_groups
from transferlab.preflight import check_overrides, refuse_a_sweep_inside_torchrun
from transferlab.resilient import EpochLog, retry
from transferlab.schedule import build_scheduler
from transferlab.schemas import ConfigError, Stage, TrainConfig, config_hash, register_configs, to_typed

log = logging.getLogger("transferlab.train")
register_configs()


def train(
    cfg: TrainConfig,
    raw: DictConfig,
    choices: dict[str, str],
    overrides: list[str],
    job: sweep.Job | None = None,
) -> dict[str, float]:
    """Run one experiment from a typed config; return its metrics (``test_*``, ``best_val_*``).

    ``job``: in a multirun, the child run's name and tags (parent run, config hash).
    """
    launched = launch_time()
    experiment_id = preflight(cfg)
    seed_everything(cfg.seed)  # before any module is built: random init and the head depend on it
    set_deterministic(cfg.trainer.deterministic)
    built = build_checked_backbone(cfg)
    # Last: it may decode every image (an image folder), and it checks data.train_per_class/folds.
    check_data(cfg.data, cfg.paths.cache_dir if cfg.data.cache else None, cfg.paths.data_dir)
    run_name, tags = run_identity(cfg, choices, job)
    # Also a tag, not only the artifact: a store copied without its artifacts (a committed
    # experiment's mlflow.db) can still be replicated (transferlab.replicate reads it).
    if len(logged := json.dumps(overrides)) <= tracking.OVERRIDES_TAG_MAX:
        tags[tracking.OVERRIDES_TAG] = logged
    pruning = trial_pruning(job)  # None unless this job is a trial of a study with a pruner
    # Resume: this config's checkpoint (a killed or preempted run) names the MLflow run to continue.
    ckpt = Checkpoint.for_config(cfg, raw)
    resilient.resumable(cfg.trainer.checkpoint and cfg.resume)  # what the outage line tells a rerun
    with (
        ckpt.held(),  # before the run starts: the same config twice at once fails here, clearly
        stop_signals(ckpt) as stop,
        tracking.mlflow_run(experiment_id, run_name, tags, ckpt.run_id, cfg.mlflow) as run,
    ):
        started = time.perf_counter()
        tracking.log_params(cfg, raw)
        tracking.log_json(
            {"overrides": overrides, "choices": choices, "command": provenance.command_line()},
            "overrides.json",
        )
        data, inputs = load_data(cfg, built)

        # The new head on the backbone; what trains is decided per stage (transferlab.modes.freeze).
        model = make_model(built.model, data.num_classes)
        per_update = cfg.trainer.batch_size * cfg.trainer.accumulate_steps  # one process's images
        counts = {
            "total_params": count_parameters(model),
            "head_params": count_parameters(model.head),
            "effective_batch_size": per_update,
            # Under torchrun each of world_size processes takes its batch of every update.
            "world_size": distributed.world().size,
            "global_batch_size": per_update * distributed.world().size,
        }
        provenance.log_reproducibility(cfg, built, data, counts)
        # Frozen features are computed once per backbone, weights and images, and shared on disk.
        features = FeatureCache(cfg.paths.cache_dir, built) if cfg.trainer.feature_cache else None
        runner = Runner(model, data, cfg.trainer, cfg.seed, cfg.augment, features)
        # Per-epoch metrics survive a tracking-server outage (kept beside the checkpoint, replayed).
        resume_step = ckpt.resumed_from["epoch"] if ckpt.resumed_from else None
        log_epoch = EpochLog(run.info.run_id, ckpt.path.parent, resume_step)

        stages = cfg.mode.stages(cfg.trainer.epochs, cfg.optimizer.lr)  # lp_ft: probe, then finetune
        costs: list[dict] = []  # each stage's frozen-feature pass, also of stages finished before a stop
        metrics: dict[str, float] = {}
        for index, stage in enumerate(stages):
            if ckpt.done_before_stop(stage.name, [s.name for s in stages]):
                metrics |= finished_results(ckpt, stage)  # its model is in the checkpoint, its results too
                costs.append(ckpt.finished[stage.name]["costs"])
                continue
            # An Optuna study that prunes watches the last stage, whose best epoch is the trial's value.
            watch = pruning if stage is stages[-1] else None
            fit = fit_stage(
                cfg, runner, stage, index, len(stages), counts, ckpt, log_epoch, stop, inputs, watch
            )
            costs.append(stage_costs(fit))
            if stage is not stages[-1]:  # e.g. the linear probe of lp_ft, reported on its own
                metrics |= intermediate_results(runner, fit, stage, ckpt)

        # Test the best-on-validation checkpoint of the last stage, in eval mode.
        test, labels, preds = runner.evaluate(data.splits.test)
        metrics |= final_metrics(test, fit, costs, counts, time.perf_counter() - started)
        metrics |= shift_results(runner)  # data.shift_cell_type: the same model on shifted images
        if pruning is not None and pruning.pruned_at is not None:  # the study's pruner ended it there
            metrics["pruned_at"] = pruning.pruned_at  # main tells the sweeper: a pruned trial
        if runner.first_update_at is not None:  # not when a resume had nothing left to train
            metrics["startup_s"] = runner.first_update_at - launched
        log_epoch.flush()
        retry(
            lambda: tracking.log_results(metrics, labels, preds, data.classes, runner.device.type),
            "log the results",
        )
        # The tested weights as an MLflow model from code: predict, pyfunc and serve read it.
        example = data.images[int(data.splits.val[0])]
        config_yaml = OmegaConf.to_yaml(raw, resolve=True)
        retry(
            lambda: model_store.log_model(
                model.state_dict(), config_yaml, data.classes, data.preprocess, example
            ),
            "log the model",
        )
        log.info("test: %s (run %s)", ", ".join(f"{k}={v:.4f}" for k, v in test.items()), run.info.run_id)
        log.info(
            "in the MLflow UI: %s", tracking.ui_link(cfg.mlflow.tracking_uri, experiment_id, run.info.run_id)
        )
    ckpt.remove()  # finished: the next launch of this config is a new run
    return metrics


# -- the steps of train(), in the order it takes them ---------------------------------------------
_launches = 0  # train() calls in this process (a sweep's in-process launcher makes several)


def launch_time() -> float:
    """When this run was launched (wall clock): the process's start for its first run, so ``startup_s``
    (launch to the first optimizer update) counts the imports, the tracking server, the weights and the
    caches; a later job of an in-process sweep starts counting here, its imports paid by the first."""
    global _launches
    _launches += 1
    return psutil.Process().create_time() if _launches == 1 else time.time()


def preflight(cfg: TrainConfig) -> str:
    """The checks that read nothing heavy, so bad input fails in seconds and logs no run: the device,
    the augmentation policy, the tracking server, then the backbone's name. (Settings were checked by the schemas; the weights and the data
    follow, in that order: an image folder's check decodes every file, so it comes last.)"""
    check_device(cfg.trainer.device)  # trainer.device=cuda on a machine without one: one line, no run
    # Launched by torchrun (or as Slurm tasks): its requests checked on every rank, then the group joined.
    distributed.setup(cfg.trainer.device, cfg.trainer.dist_backend, cfg.trainer.sync_batchnorm)
    check_policy(cfg.augment)  # an auto_augment string timm cannot parse: no store touched yet
    experiment_id = tracking.setup_experiment(cfg.mlflow)
    check_backbone_name(cfg.backbone)
    return experiment_id


def trial_pruning(job: sweep.Job | None) -> Any:
    """The Optuna trial a study's job answers, when the study prunes (``hydra.sweeper.pruner``): it is
    told each epoch's monitored validation value and may end the stage. None otherwise."""
    if job is None or not distributed.is_main() or not sweep.study_prunes(HydraConfig.get().sweep.dir):
        return None  # under torchrun rank 0 reports to the study; every rank obeys (Runner.fit)
    from transferlab.study import pruning  # optuna: imported by the jobs of a pruning study only

    return pruning(HydraConfig.get().sweep.dir, job.num)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_checked_backbone(cfg: TrainConfig) -> BuiltBackbone:
    """Weights before the run starts: a backbone that cannot be had here is bad input, not a failed run."""
    built = build_backbone(cfg.backbone)
    find_classifier(built.model)  # a network whose head no mode can replace: bad input, no run
    check_stages(cfg.mode, built.model, cfg.backbone.name)  # mode=partial: enough stages to train
    return built


def run_identity(cfg: TrainConfig, choices: dict[str, str], job: sweep.Job | None) -> tuple[str | None, dict]:
    """The MLflow run's name and tags: config choices, the headline axes and the config hash."""
    tags = {f"choice.{group}": str(option) for group, option in choices.items()}
    tags |= {
        "mode": cfg.mode.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.data.name,
        "seed": str(cfg.seed),
        # Which weights were validated, kept as best and tested: the EMA's when trainer.ema_decay is set.
        "tested_weights": "ema" if cfg.trainer.ema_decay else "model",
        "world_size": str(distributed.world().size),  # processes of this one run (torchrun)
        sweep.CONFIG_HASH: config_hash(cfg),
    }
    run_name = cfg.mlflow.run_name
    if job is not None:
        tags |= job.tags
        run_name = run_name or job.run_name
    return run_name, tags


def load_data(cfg: TrainConfig, built: BuiltBackbone) -> tuple[PreparedData, Lookup | None]:
    """Data preprocessed exactly as the backbone's weights expect (resize, crop, mean/std), decoded
    once per source and preprocessing, then read from paths.cache_dir; recorded as MLflow datasets."""
    data, inputs = prepare_cached(
        cfg.data,
        built.preprocess,
        cfg.paths.data_dir,
        cfg.paths.cache_dir,
        cfg.data.cache,
        workers=cfg.trainer.num_workers,  # decoding a new source: that many processes
    )
    sizes = data.splits.sizes()
    train_counts = class_counts(data.labels[data.splits.train], data.num_classes)
    log.info("data %s: %s, classes %s, train class counts %s", data.name, sizes, data.classes, train_counts)
    for context in sizes:  # train, val, test (and shift_test: data.shift_cell_type)
        tracking.log_dataset(data.name, data.source, data.fingerprint, context, sizes)
    return data, inputs


def fit_stage(
    cfg: TrainConfig,
    runner: Runner,
    stage: Stage,
    index: int,
    of: int,
    counts: dict[str, int],
    ckpt: Checkpoint,
    log_epoch: EpochLog,
    stop: StopSignal,
    inputs: Lookup | None,
    prune: Callable[[int, float], bool] | None = None,
) -> FitResult:
    """One stage: freeze what it does not train, build its optimizer, fit, keep the best epoch."""
    trainable = runner.enter(stage)  # which parameters train, which modules stay in eval mode
    if index == 0:
        tracking.log_cache_use(cfg, trainable.trains_backbone, runner.augmenting, inputs)
    groups = param_groups(runner.model, stage, cfg.optimizer.weight_decay)  # lr ratio per head/backbone/layer
    optimizer = instantiate(cfg.optimizer)(groups)  # only trainable parameters reach it
    described = describe(runner.model, groups)  # peak lrs, before the schedule's warmup lowers them
    # Stepped per update over this stage alone: lp_ft's fine-tune warms up and decays on its own.
    scheduler = build_scheduler(cfg.scheduler, optimizer, stage.epochs, runner.updates_per_epoch())
    counts["trainable_params"] = count_parameters(runner.model, lambda p: p.requires_grad)
    epoch_log = tracking.log_stage(stage, trainable, described, counts, index, of, log_epoch)
    resume_state = ckpt.bind(log_epoch.run_id, runner, optimizer, scheduler)  # None unless resuming here
    fit = runner.fit(
        optimizer,
        stage.epochs,
        epoch_log,
        start_epoch=stage.first_step,
        state=resume_state,
        checkpoint=ckpt.save,
        should_stop=stop.requested,
        publish=log_epoch.publish,
        scheduler=scheduler,
        prune=prune,
    )
    runner.load_best(fit)  # the best-on-validation checkpoint: tested, or the next stage's start
    return fit


def best_metrics(fit: FitResult, prefix: str = "best_") -> dict[str, float]:
    """The validation metrics of the epoch that was kept (the best on ``trainer.monitor``)."""
    best_row = next(row for row in fit.history if row["epoch"] == fit.best_epoch)
    metrics = {f"{prefix}{k}": v for k, v in best_row.items() if k.startswith("val_")}
    if fit.stopped_early_at is not None:  # trainer.early_stop_patience ended the stage here
        metrics[f"{prefix.removesuffix('best_')}stopped_early_at"] = fit.stopped_early_at
    return metrics


def intermediate_results(runner: Runner, fit: FitResult, stage: Stage, ckpt: Checkpoint) -> dict[str, float]:
    """A stage before the last (lp_ft's probe): its own best-on-validation and test metrics, and its head.

    Kept in the checkpoint from here on, so a run stopped in a later stage still reports them.
    """
    probe_test, _, _ = runner.evaluate(runner.data.splits.test)
    head = {k: v.detach().cpu().clone() for k, v in runner.model.head.state_dict().items()}
    metrics = best_metrics(fit, f"{stage.name}_best_")
    metrics |= {f"{stage.name}_test_{k}": v for k, v in probe_test.items()}
    metrics |= shift_results(runner, f"{stage.name}_")
    ckpt.finished[stage.name] = {"metrics": metrics, "head": head, "costs": stage_costs(fit)}
    return finished_results(ckpt, stage)


def shift_results(runner: Runner, prefix: str = "") -> dict[str, float]:
    """``shift_test_*``: the tested model on the shifted test set, when the data has one (nothing
    chooses on it: it is evaluated once, after the run's selection on validation, as test is)."""
    if not len(runner.data.splits.shift):
        return {}
    shifted, _, _ = runner.evaluate(runner.data.splits.shift)
    return {f"{prefix}shift_test_{k}": v for k, v in shifted.items()}


def finished_results(ckpt: Checkpoint, stage: Stage) -> dict[str, float]:
    """The metrics of a finished stage; its head is (re)written as an artifact (same path, same bytes)."""
    record = ckpt.finished[stage.name]
    tracking.log_state_dict(record["head"], f"{stage.name}_head.pt")
    return dict(record["metrics"])


def stage_costs(fit: FitResult) -> dict[str, float | None]:
    """What a stage spent on its frozen-feature pass, and whether the feature cache served it."""
    return {"feature_seconds": fit.feature_seconds, "feature_cache_hit": fit.feature_cache_hit}


def final_metrics(
    test: dict[str, float], last: FitResult, costs: list[dict], counts: dict[str, int], wall: float
) -> dict[str, float]:
    """The run's headline: test metrics of the last stage's best epoch, its validation metrics, costs.

    ``costs``: every stage's (:func:`stage_costs`), those finished before a stop included (from the
    checkpoint), so a resumed lp_ft run reports its probe's feature pass as one never stopped.
    """
    hits = [c["feature_cache_hit"] for c in costs if c["feature_cache_hit"] is not None]
    return {
        **{f"test_{k}": v for k, v in test.items()},
        **best_metrics(last),
        "best_epoch": last.best_epoch,
        "wall_time_s": wall,
        "feature_extract_s": sum(c["feature_seconds"] for c in costs),
        "frozen_feature_path": float(last.used_feature_path),  # of the last stage
        **({"feature_cache_hit": float(hits[-1])} if hits else {}),
        **counts,
    }


def hydra_context() -> tuple[dict[str, str], list[str], bool]:
    hc = HydraConfig.get()
    # Optional groups left empty (experiment, hparams_search) are no choice: None is not an option.
    choices = {
        k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None
    }
    return choices, list(hc.overrides.task), hc.mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(raw: DictConfig) -> float:
    choices, overrides, multirun = hydra_context()
    try:
        cfg = to_typed(raw)
        job = sweep.job(cfg) if multirun else None  # a child of the sweep's MLflow parent run
        if job is not None and job.done is not None:  # a re-launched sweep: this config FINISHED
            value = float(job.done.get(f"best_val_{cfg.trainer.monitor}", float("nan")))
            return sweep.PrunedValue(value) if "pruned_at" in job.done else value
        metrics = train(cfg, raw, choices, overrides, job)
    except ConfigError as exc:
        if multirun:  # let the sweep record this job as failed and go on
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as exc:  # SIGTERM/SIGINT: checkpoint saved, MLflow run KILLED
        print(f"stopped: {resume_hint(exc)}", file=sys.stderr)
        sys.exit(128 + (getattr(exc, "signum", None) or 15))
    finally:
        distributed.teardown()  # under torchrun: leave the process group (no-op for one process)
    # The value a sweeper (Optuna) maximises: model selection never looks at the test split.
    value = float(metrics[f"best_val_{cfg.trainer.monitor}"])
    return sweep.PrunedValue(value) if "pruned_at" in metrics else value


def cli() -> None:
    """``python -m transferlab.train``: bad overrides are one line and exit 2 before Hydra starts."""
    check_overrides(sys.argv[1:], CONF_DIR, "train")
    refuse_a_sweep_inside_torchrun(any(a in ("-m", "--multirun") for a in sys.argv[1:]))
    main()


if __name__ == "__main__":
    wait_for_preflight()  # the overrides' check, begun at the top before the heavy imports
    main()
