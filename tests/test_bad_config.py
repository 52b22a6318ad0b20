"""Bad config: one line naming the key and the fix, a non-zero exit, and no MLflow run at all."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from .conftest import TINY


def _no_runs(tmp_path: Path) -> bool:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return True
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trainer.epochs=0"], "trainer.epochs: must be >= 1"),
        (["trainer.batch_size=0"], "trainer.batch_size: must be >= 1"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay: must be >= 0"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas: must be in [0, 1)"),
        (["optimizer=sgd", "optimizer.momentum=1.0"], "optimizer.momentum: must be in [0, 1)"),
        (["optimizer._target_=os.system"], "optimizer._target_: 'os.system' is not an optimizer class"),
        (["optimizer._target_=torch.optim.lr_scheduler.StepLR"], "is not an optimizer class"),
        (["data.test_fraction=1.5"], "data.test_fraction: must be in (0, 1)"),
        (["data.val_fraction=0"], "data.val_fraction: must be in (0, 1)"),
        (["data.split_seed=-1"], "data.split_seed: must be in [0, 2**32)"),
        (["seed=-3"], "seed: must be in [0, 2**32)"),
        (["data.num_classes=1"], "data.num_classes: must be >= 2"),
        (["data.image_size=2"], "data.image_size: must be in [8, 4096]"),
        (
            ["data.name=cifar10"],
            "data.name: is 'cifar10' but this option loads 'synthetic'. Fix: choose data=cifar10",
        ),
        (["trainer.on_nan=ignore"], "trainer.on_nan: unknown policy"),
        (["trainer.monitor=auc"], "trainer.monitor: unknown metric"),
        (["trainer.device=tpu"], "trainer.device: unknown device"),
        (["mlflow.max_outage_s=0"], "mlflow.max_outage_s: must be > 0"),
        (["sweep.replicates=[data.fold]"], "sweep.replicates: ['data.fold'] leaves out seed"),
        (["data.folds=3", "data.fold=3"], "data.fold: must be in 0..2 (data.folds=3), got 3"),
        (["sweep.tune=[seed]"], "sweep.replicates: seed is also in sweep.tune"),
        (["resume=false", "resume_run=abc"], "resume_run: is set but resume=false"),
        (["+trainer.epoch=3"], "trainer.epoch: is not a known key. Fix: did you mean trainer.epochs?"),
        (["backbone.name=no_such_net"], "backbone.name: timm has no model 'no_such_net'"),
        (["backbone=torchvision", "backbone.name=nonet"], "torchvision has no classification model"),
        (["backbone.source=hub"], "backbone.source: unknown source"),
        (
            ["data=imagefolder", "data.root=/x", "data.on_bad_image=ignore"],
            "data.on_bad_image: unknown policy",
        ),
        # SqueezeNet classifies with a 1x1 convolution: no Linear head for any mode to replace.
        (
            ["backbone=torchvision", "backbone.name=squeezenet1_0", "backbone.weights=null"],
            "backbone.name: cannot find the classifier of SqueezeNet",
        ),
    ],
)
def test_bad_setting_is_one_line_exit_2_and_no_run(
    run_cli, store, tmp_path: Path, capsys, args, needle
) -> None:
    assert run_cli(*TINY, *store, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1] and "Fix: " in err[-1], err[-1]
    assert _no_runs(tmp_path)


def test_a_device_this_machine_lacks_is_one_line_before_any_run(
    run_cli, store, tmp_path: Path, capsys
) -> None:
    """trainer.device=cuda / cuda:N / mps where that device is missing (before: a FAILED MLflow run and
    torch's RuntimeError traceback)."""
    missing = [f"cuda:{torch.cuda.device_count()}"]  # one past the last: missing on every machine
    missing += [] if torch.cuda.is_available() else ["cuda"]
    missing += [] if torch.backends.mps.is_available() else ["mps"]
    for device in missing:
        assert run_cli(*TINY, *store, f"trainer.device={device}") == 2, device
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: trainer.device: {device} ") and "Fix: use trainer.device=" in line, (
            line
        )
    assert _no_runs(tmp_path)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["trainer.epochs=three"],
            "trainer.epochs: Value 'three' of type 'str' could not be converted to Integer. "
            "Fix: pass an integer, e.g. trainer.epochs=10 (the default)",
        ),
        (["trainer.amp=maybe"], "Fix: pass true or false, e.g. trainer.amp=true"),
        (["data.limit=[1,2]"], "data.limit: "),
        (["data=no_such_dataset"], "data=no_such_dataset: no such option. Fix: use one of ['cifar10',"),
        (["mode=half"], "mode=half: no such option. Fix: use one of ['feature_extract', 'full_finetune'"),
        (["backbone=resnet5"], "Fix: did you mean backbone=resnet50? use one of"),
        (["trainer.epokhs=3"], "trainer.epokhs: is not a known key. Fix: did you mean trainer.epochs?"),
        (
            ["data.images_per_clas=3"],
            "data.images_per_clas: is not a known key. Fix: did you mean data.images_per_class?",
        ),
        (
            ["mode.probe_epochs=3"],
            "mode.probe_epochs: not a key of the chosen mode. Fix: it belongs to mode=lp_ft",
        ),
        (["~trainer.epochs"], "trainer.epochs: TrainerConfig (DictConfig) does not support deletion"),
        (["trainer.epochs=[1,2"], "trainer.epochs=[1,2: cannot be parsed"),
        # Every value of a swept axis is checked before the sweep's parent run or first job exists.
        (["-m", "seed=0,1", "optimizer.lr=1e-3,-1"], "optimizer.lr: must be > 0, got -1.0"),
        (["-m", "trainer.epochs=2,three"], "trainer.epochs: Value 'three'"),
        (["-m", "mode=feature_extract,half"], "mode=half: no such option"),
        # A misspelt tuned or replicate key would be silently ignored: refused before the parent run.
        (
            ["-m", "seed=0,1", "sweep.replicates=[seed,data.split_sed]"],
            "sweep.replicates: 'data.split_sed' is not",
        ),
        (["-m", "seed=0,1", "sweep.tune=[optimizer.lrr]"], "sweep.tune: 'optimizer.lrr' is not a key of any"),
    ],
)
def test_hydra_composition_errors_are_one_line_exit_2_and_no_run(
    run_cli, store, tmp_path: Path, capsys, args, line
) -> None:
    """What Hydra reports in a multi-line block (types, names, syntax) is one line here, before any run."""
    flags = ["-m"] if "-m" in args else []
    assert run_cli(*flags, *TINY, *store, *[a for a in args if a != "-m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and line in err[0] and "Fix: " in err[0], err
    assert _no_runs(tmp_path)


def test_a_tuned_key_that_only_the_swept_options_have_is_accepted() -> None:
    """mode.backbone_lr_scale is no key of the default mode (feature_extract), but of every job's."""
    from transferlab.preflight import check_overrides
    from transferlab.schemas import register_configs
    from transferlab.train import CONF_DIR

    register_configs()
    swept = [
        "-m",
        "mode=full_finetune,lp_ft",
        "mode.backbone_lr_scale=0.1,1",
        "sweep.tune=[mode.backbone_lr_scale]",
    ]
    check_overrides(swept, CONF_DIR, "train")  # returns: no SystemExit
    with pytest.raises(SystemExit):
        check_overrides([*swept[:-1], "sweep.tune=[mode.backbone_lr_scal]"], CONF_DIR, "train")
