"""Every option of every config group composes and validates; bad settings fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from transferlab.schemas import (
    MODE_SCHEMAS,
    AdamConfig,
    ConfigError,
    ElpvDataConfig,
    ImageFolderDataConfig,
    SGDConfig,
    SyntheticDataConfig,
    TrainConfig,
    to_typed,
)

from .conftest import CONF_DIR

# Options that need one more key to be complete (the rest compose as they are).
NEEDS = {
    ("backbone", "timm"): ["backbone.name=resnet18"],
    ("backbone", "torchvision"): ["backbone.name=resnet18"],
    ("data", "hf"): ["data.path=beans"],
}


def options() -> list[tuple[str, str]]:
    # experiment / hparams_search are `@package _global_` deltas (each also runs in tests/test_sweep.py).
    groups = ["backbone", "mode", "optimizer", "scheduler", "augment", "data", "trainer", "mlflow", "paths"]
    groups += ["sweep", "experiment"]
    groups += ["hparams_search"]
    return [(g, p.stem) for g in groups for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), options(), ids=lambda v: str(v))
def test_every_option_composes_and_validates(compose_cfg, tmp_path: Path, group: str, option: str) -> None:
    extra = list(NEEDS.get((group, option), []))
    if (group, option) == ("data", "imagefolder"):
        extra.append(f"data.root={tmp_path}")
    cfg = to_typed(compose_cfg(f"{group}={option}", *extra))
    assert isinstance(cfg, TrainConfig)
    if group in ("backbone", "mode", "data", "scheduler", "augment"):
        node = getattr(cfg, group)
        assert node.name == (option if group != "backbone" or (group, option) not in NEEDS else "resnet18")


def test_default_is_the_embedded_job(compose_cfg) -> None:
    cfg = to_typed(compose_cfg())
    assert (cfg.backbone.name, cfg.backbone.source, cfg.backbone.weights) == (
        "efficientnet_lite0",
        "bundled",
        "imagenet",
    )
    assert isinstance(cfg.data, ElpvDataConfig) and cfg.data.test_fraction == 0.25
    assert isinstance(cfg.optimizer, AdamConfig)
    # Absolute store at the repository root, whatever the working directory.
    assert cfg.mlflow.tracking_uri == f"sqlite:///{CONF_DIR.parent}/mlflow.db"


@pytest.mark.parametrize(
    ("mode", "recipe"),
    [
        ("feature_extract", ("constant", "none")),
        ("full_finetune", ("cosine", "standard")),
        ("partial", ("cosine", "standard")),
        ("lp_ft", ("cosine", "standard")),
    ],
)
def test_each_mode_chooses_its_recipe_and_the_command_line_wins(compose_cfg, mode: str, recipe) -> None:  # noqa: ANN001
    cfg = to_typed(compose_cfg(f"mode={mode}"))
    assert (cfg.scheduler.name, cfg.augment.name) == recipe
    if recipe[0] == "cosine":
        assert cfg.scheduler.warmup_epochs == 0.5
    cfg = to_typed(compose_cfg(f"mode={mode}", "scheduler=step", "augment=flip", "scheduler.decay_rate=0.5"))
    assert (cfg.scheduler.name, cfg.augment.name, cfg.scheduler.decay_rate) == ("step", "flip", 0.5)
    # An experiment's own choice wins over the mode's (elpv_fe_vs_ft pins the bare loop it measured).
    cfg = to_typed(compose_cfg("experiment=elpv_fe_vs_ft", f"mode={mode}"))
    assert (cfg.scheduler.name, cfg.augment.name) == ("constant", "none")


@pytest.mark.parametrize(("mode", "lr"), [("feature_extract", 1e-3), ("full_finetune", 1e-4)])
def test_learning_rate_follows_the_mode(compose_cfg, mode: str, lr: float) -> None:
    """Gotcha: full fine-tuning wants a ~10x lower learning rate than a frozen-backbone head."""
    for optimizer in ("adam", "adamw", "sgd"):
        cfg = to_typed(compose_cfg(f"mode={mode}", f"optimizer={optimizer}"))
        assert cfg.optimizer.lr == lr
    assert to_typed(compose_cfg(f"mode={mode}", "optimizer.lr=0.02")).optimizer.lr == 0.02


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.monitor=auc", "trainer.monitor"),
        ("data.test_fraction=1.5", "data.test_fraction"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("data.limit=2", "data.limit"),
        ("data.labels=three", "data.labels"),
        ("data.cell_type=cdte", "data.cell_type"),
        ("backbone.image_size=8", "backbone.image_size"),
        ("mlflow.experiment_name=' '", "mlflow.experiment_name"),
        ("sweep.name=' '", "sweep.name"),
    ],
)
def test_range_checks_name_the_key(compose_cfg, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_typed(compose_cfg(override))
    assert info.value.key == key
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["mode=partial", "mode.trainable_stages=0"], "mode.trainable_stages"),
        (["mode=lp_ft", "mode.probe_epochs=0"], "mode.probe_epochs"),
        (["mode=lp_ft", "mode.probe_lr=0"], "mode.probe_lr"),
        (["mode=full_finetune", "mode.backbone_lr_scale=0"], "mode.backbone_lr_scale"),
        (["mode=partial", "mode.layer_decay=1.5"], "mode.layer_decay"),
        (["mode=lp_ft", "mode.batchnorm=eval"], "mode.batchnorm"),
        (["mode=feature_extract", "mode.name=partial"], "mode.name"),  # partial's keys are missing
        (["mode=partial", "mode.name=full_finetune"], "mode.name"),  # trainable_stages would be unread
    ],
)
def test_mode_checks_name_the_key(compose_cfg, overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_typed(compose_cfg(*overrides))
    assert info.value.key == key and "Fix:" in str(info.value)


def test_mode_keys_belong_to_their_modes(compose_cfg) -> None:
    """Airtight: a key a mode does not read is refused at compose time, naming the key."""
    with pytest.raises(ConfigCompositionException):
        compose_cfg("mode=feature_extract", "mode.layer_decay=0.75")  # nothing to decay
    with pytest.raises(ConfigCompositionException):
        compose_cfg("mode=full_finetune", "mode.trainable_stages=2")  # a partial-only key
    with pytest.raises(ConfigCompositionException):
        compose_cfg("mode=partial", "mode.probe_epochs=2")  # an lp_ft-only key
    cfg = to_typed(compose_cfg("mode=lp_ft", "mode.layer_decay=0.7"))
    assert (cfg.mode.probe_epochs, cfg.mode.probe_lr, cfg.optimizer.lr) == (5, 1e-3, 1e-4)
    assert (cfg.mode.layer_decay, cfg.mode.batchnorm) == (0.7, "frozen")
    assert to_typed(compose_cfg("mode=full_finetune")).mode.batchnorm == "train"  # the baseline unchanged


def test_imagefolder_requires_root(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"data.root: is required"):
        to_typed(compose_cfg("data=imagefolder"))


def test_schema_rejects_unknown_keys_and_wrong_types(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("trainer.epoch=3")  # misspelt key
    assert "Key 'epoch' not in 'TrainerConfig'" in str(info.value.__cause__)
    with pytest.raises(
        ConfigError, match=r"trainer.epoch: is not a known key. Fix: did you mean trainer.epochs"
    ):
        to_typed(compose_cfg("+trainer.epoch=3"))  # `+` opens Hydra's struct mode; the schema still refuses
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("trainer.epochs=three")
    assert isinstance(info.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException, match="backbone/resnet19"):
        compose_cfg("backbone=resnet19")


def test_optimizer_schemas_are_per_option(compose_cfg) -> None:
    assert isinstance(to_typed(compose_cfg("optimizer=sgd")).optimizer, SGDConfig)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("optimizer=sgd", "optimizer.betas=[0.9,0.99]")  # SGD has no betas
    assert isinstance(to_typed(compose_cfg("data=synthetic")).data, SyntheticDataConfig)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("data=synthetic", "data.cell_type=mono")  # an ELPV-only key


def test_imagefolder_schema(compose_cfg, tmp_path: Path) -> None:
    cfg = to_typed(compose_cfg("data=imagefolder", f"data.root={tmp_path}"))
    assert isinstance(cfg.data, ImageFolderDataConfig) and cfg.data.root == str(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transferlab.train", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_help_and_cfg_job(run_cli, capsys) -> None:
    """What a Hydra user types first: --help lists groups and public keys; --cfg job prints the config.

    ``--help`` through a real ``python -m transferlab.train``; the others in-process (same entrypoint).
    """
    helped = _cli("--help")
    assert helped.returncode == 0
    for text in (
        "backbone: ",
        "efficientnet_lite0",
        "mode: feature_extract,",
        "mode.trainable_stages",
        "optimizer.lr",
        "data.limit",
        "mlflow.experiment_name",
    ):
        assert text in helped.stdout, text
    mode_line = next(line for line in helped.stdout.splitlines() if line.startswith("mode: "))
    assert set(MODE_SCHEMAS) <= set(mode_line.removeprefix("mode: ").split(", "))
    capsys.readouterr()
    assert run_cli("--cfg", "job", "mode=full_finetune") == 0
    shown = capsys.readouterr().out
    assert "name: full_finetune" in shown and "lr: ${mode.lr}" in shown
    assert run_cli("--shell-completion", "install=bash") == 0
    assert "complete" in capsys.readouterr().out
