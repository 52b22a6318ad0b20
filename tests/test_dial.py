"""Golden tests for the dial between feature extraction and full fine-tuning.

partial, lp_ft, discriminative learning rates and the BatchNorm policy, on one tiny network of each
family: timm ResNet / EfficientNet / ViT test models and torchvision's ResNet-18 (random init).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_layer_decay
from torch import nn

from transferlab import model_store
from transferlab.backbones import build_backbone, split_head
from transferlab.data import prepare
from transferlab.engine import Runner
from transferlab.modes import count_parameters, find_stages, freeze, make_model
from transferlab.optim import layer_decay_groups, param_groups
from transferlab.schemas import (
    MODE_SCHEMAS,
    AdamConfig,
    BackboneConfig,
    FinetuneModeConfig,
    LpFtModeConfig,
    ModeConfig,
    PartialModeConfig,
    SyntheticDataConfig,
    TrainerConfig,
)

from .conftest import CONF_DIR, TINY, make_runner, runs_in

NUM_CLASSES = 3
BACKBONES = {
    "test_resnet": BackboneConfig(name="test_resnet", source="timm", weights=None, image_size=32),
    "test_efficientnet": BackboneConfig(name="test_efficientnet", source="timm", weights=None, image_size=32),
    "test_vit": BackboneConfig(name="test_vit", source="timm", weights=None),  # fixed 160 px input
    "resnet18": BackboneConfig(name="resnet18", source="torchvision", weights=None, image_size=32),
}
# Golden: each family's stages, input to output, and the parameters in each (they partition the backbone).
STAGES = {
    "test_resnet": (
        ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"],
        [7472, 18560, 36384, 42432, 267840],
    ),
    "test_efficientnet": (
        ["conv_stem+bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4+conv_head+bn2"],
        [696, 3488, 10928, 24064, 14184, 45836],
    ),
    "test_vit": (
        ["cls_token+pos_embed+patch_embed", *(f"blocks.{i}" for i in range(5)), "blocks.5+norm"],
        [55744, 41728, 41728, 41728, 41728, 41728, 41856],
    ),
    "resnet18": (
        ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"],
        [9536, 147968, 525568, 2099712, 8393728],
    ),
}
HEAD = {"test_resnet": 96, "test_efficientnet": 256, "test_vit": 64, "resnet18": 512}  # feature width


def _mode(name: str, **kw) -> ModeConfig:
    schema = {
        "feature_extract": ModeConfig,
        "full_finetune": FinetuneModeConfig,
        "partial": PartialModeConfig,
        "lp_ft": LpFtModeConfig,
    }[name]
    assert MODE_SCHEMAS[name] is schema
    return schema(name=name, lr=1e-2, **kw)


def _model(backbone: str, seed: int = 0):
    torch.manual_seed(seed)
    built = build_backbone(BACKBONES[backbone])
    return make_model(built.model, NUM_CLASSES), built


def _runner(model, built, stage, seed: int = 0) -> Runner:
    data = prepare(SyntheticDataConfig(num_classes=NUM_CLASSES, images_per_class=12), built.preprocess, "")
    return make_runner(model, data, TrainerConfig(epochs=1, batch_size=8, progress=False), seed, False, stage)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _in(name: str, label: str) -> bool:
    """Is tensor ``name`` part of the stage labelled ``label`` (``layer4``, ``blocks.5+norm``)?"""
    return any(name == part or name.startswith(part + ".") for part in label.split("+"))


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_stages_are_found_by_name_and_partition_the_backbone(backbone: str) -> None:
    model, _ = _model(backbone)
    stages = find_stages(model.backbone)
    labels, sizes = STAGES[backbone]
    params = dict(model.backbone.named_parameters())
    assert stages.labels == labels
    assert [sum(params[n].numel() for n in names) for names in stages.params] == sizes
    assert sum(sizes) == count_parameters(model.backbone)  # every tensor in exactly one stage
    for label, names in zip(stages.labels, stages.params, strict=True):
        assert all(_in(n, label) for n in names), label  # the label says which modules


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_trainable_parameter_counts_per_mode(backbone: str) -> None:
    model, _ = _model(backbone)
    _, sizes = STAGES[backbone]
    head = HEAD[backbone] * NUM_CLASSES + NUM_CLASSES
    total = head + sum(sizes)
    bn = sum(p.numel() for m in model.backbone.modules() if _is_bn(m) for p in m.parameters())
    expected = {
        ("feature_extract", ()): head,
        ("partial", (("trainable_stages", 1),)): head + sizes[-1],
        ("partial", (("trainable_stages", 2),)): head + sizes[-2] + sizes[-1],
        ("full_finetune", ()): total,
        ("full_finetune", (("batchnorm", "frozen"),)): total - bn,
    }
    for (name, options), count in expected.items():
        (stage,) = _mode(name, **dict(options)).stages(1, 1e-2)
        mode = freeze(model, stage)
        assert count_parameters(model, lambda p: p.requires_grad) == count, (name, options)
        assert mode.trains_backbone is (name != "feature_extract")
    probe, finetune = _mode("lp_ft").stages(1, 1e-4)  # BatchNorm frozen by default in lp_ft
    freeze(model, probe)
    assert count_parameters(model, lambda p: p.requires_grad) == head
    freeze(model, finetune)
    assert count_parameters(model, lambda p: p.requires_grad) == total - bn
    freeze(model, _mode("lp_ft", batchnorm="train").stages(1, 1e-4)[1])
    assert count_parameters(model, lambda p: p.requires_grad) == total
    if backbone == "test_vit":
        assert bn == 0  # no BatchNorm: the policy has nothing to freeze
    else:
        assert bn > 0


@pytest.mark.parametrize(
    ("backbone", "batchnorm"), [(b, "train") for b in BACKBONES] + [("resnet18", "frozen")]
)
def test_partial_changes_exactly_the_chosen_stages(backbone: str, batchnorm: str) -> None:
    """With batchnorm=frozen on resnet18: timm's random init zeroes each block's last BN weight, and
    a frozen zero there would (correctly) stop every gradient into the block; torchvision's does not."""
    model, built = _model(backbone)
    (stage,) = _mode("partial", trainable_stages=2, batchnorm=batchnorm).stages(1, 1e-2)
    mode = freeze(model, stage)
    labels = STAGES[backbone][0]
    assert mode.trainable == tuple(labels[-2:])
    runner = _runner(model, built, stage)
    optimizer = instantiate(AdamConfig(lr=1e-2))(param_groups(model, stage, 0.0))
    before = _snapshot(model.backbone)

    freeze(model, stage)  # what the engine does every epoch
    for name, module in model.backbone.named_modules():
        if name and next(module.parameters(recurse=False), None) is not None:
            trains = any(_in(name, label) for label in labels[-2:]) and not (
                batchnorm == "frozen" and _is_bn(module)
            )
            assert module.training is trains, name

    runner.fit(optimizer, 1, lambda row, step: None)
    after = model.backbone.state_dict()
    bn_names = {n for n, m in model.backbone.named_modules() if _is_bn(m)}
    for key, tensor in after.items():
        in_trained = any(_in(key, label) for label in labels[-2:])
        is_bn = key.rsplit(".", 1)[0] in bn_names
        if not in_trained or (is_bn and batchnorm == "frozen"):
            assert torch.equal(tensor, before[key]), key  # frozen: weights and BN statistics bit-identical
        elif key.endswith(("weight", "running_mean")) and tensor.is_floating_point():
            assert not torch.equal(tensor, before[key]), key  # every trained weight moved


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])  # timm BatchNormAct2d, BatchNorm2d
def test_batchnorm_frozen_means_eval_mode_and_no_gradient(backbone: str) -> None:
    model, built = _model(backbone)
    (stage,) = _mode("full_finetune", batchnorm="frozen").stages(1, 1e-2)
    freeze(model, stage)
    optimizer = instantiate(AdamConfig(lr=1e-2))(param_groups(model, stage, 0.0))
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    bns = {n: m for n, m in model.backbone.named_modules() if _is_bn(m)}
    assert bns and all(id(p) not in optimized for m in bns.values() for p in m.parameters())
    freeze(model, stage)
    assert not any(m.training for m in bns.values())
    assert model.backbone.training  # the rest trains
    before = _snapshot(model.backbone)
    _runner(model, built, stage).fit(optimizer, 1, lambda row, step: None)
    after = model.backbone.state_dict()
    for key in after:
        owner = key.rsplit(".", 1)[0]
        if owner in bns:
            assert torch.equal(after[key], before[key]), key  # affine and running stats fixed
    assert any(not torch.equal(after[k], before[k]) for k in after if "conv" in k and k.endswith("weight"))


def test_batchnorm_train_updates_running_statistics() -> None:
    model, built = _model("test_resnet")
    (stage,) = _mode("full_finetune", batchnorm="train").stages(1, 1e-2)
    freeze(model, stage)
    before = _snapshot(model.backbone)
    optimizer = instantiate(AdamConfig(lr=1e-2))(param_groups(model, stage, 0.0))
    _runner(model, built, stage).fit(optimizer, 1, lambda row, step: None)
    changed = [
        k
        for k, v in model.backbone.state_dict().items()
        if "running_mean" in k and not torch.equal(v, before[k])
    ]
    assert len(changed) == sum(1 for m in model.backbone.modules() if _is_bn(m))


def _lrs(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in groups:
        for p in group["params"]:
            assert names[id(p)] not in out  # no tensor in two groups
            out[names[id(p)]] = group["lr"]  # its own lr (a schedule scales it from there)
    return out


@pytest.mark.parametrize("backbone", ["test_vit", "resnet18"])
def test_backbone_lr_scale_and_layer_decay(backbone: str) -> None:
    model, _ = _model(backbone)
    (stage,) = _mode("full_finetune", backbone_lr_scale=0.1).stages(1, 1e-3)
    freeze(model, stage)
    lrs = _lrs(model, param_groups(model, stage, 0.0))
    assert set(lrs) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {lr for n, lr in lrs.items() if n.startswith("head.")} == {1e-3}
    assert all(lr == pytest.approx(1e-4) for n, lr in lrs.items() if n.startswith("backbone."))

    (stage,) = _mode("full_finetune", backbone_lr_scale=0.1, layer_decay=0.5).stages(1, 1e-3)
    groups = param_groups(model, stage, 0.05)
    lrs = _lrs(model, groups)
    # The top layer runs at lr x backbone_lr_scale; each layer below at half the one above.
    first, last = (
        ("backbone.cls_token", "backbone.norm.weight")
        if backbone == "test_vit"
        else (
            "backbone.conv1.weight",
            "backbone.layer4.1.bn2.weight",
        )
    )
    layers = 7 if backbone == "test_vit" else 9  # stem + 6 blocks; stem + 8 BasicBlocks
    assert lrs[last] == pytest.approx(1e-4)
    assert lrs[first] == pytest.approx(1e-4 * 0.5 ** (layers - 1))
    assert lrs["head.weight"] == 1e-3
    assert len({round(lr, 12) for n, lr in lrs.items() if n.startswith("backbone.")}) == layers
    decays = {g["name"]: g["weight_decay"] for g in groups if g["name"] != "head"}
    assert all(wd == 0.0 for name, wd in decays.items() if name.endswith(".no_decay"))
    assert any(wd == 0.05 for name, wd in decays.items() if name.endswith(".decay"))


def test_structural_layer_decay_matches_timms_helper() -> None:
    """The torchvision fallback is timm's formula: on a timm model both give the same groups."""
    model, _ = _model("test_vit")
    backbone = model.backbone
    ours = layer_decay_groups(backbone, 0.05, 0.7, frozenset(backbone.no_weight_decay()))
    timms = param_groups_layer_decay(
        backbone, weight_decay=0.05, no_weight_decay_list=backbone.no_weight_decay(), layer_decay=0.7
    )

    def per_tensor(groups: list[dict]) -> dict[int, tuple[float, float]]:
        return {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}

    assert per_tensor(ours) == per_tensor(timms)


def test_partial_with_layer_decay_optimizes_only_the_trained_stages() -> None:
    model, _ = _model("test_efficientnet")
    (stage,) = _mode("partial", trainable_stages=1, layer_decay=0.8).stages(1, 1e-3)
    freeze(model, stage)
    lrs = _lrs(model, param_groups(model, stage, 0.0))
    assert set(lrs) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(
        n.startswith(("head.", "backbone.blocks.4.", "backbone.conv_head", "backbone.bn2")) for n in lrs
    )


def test_torchvision_structures() -> None:
    """Stages from torchvision's structure: MobileNet ``features``, ViT ``encoder.layers``."""
    mobilenet, _ = split_head(torchvision.models.mobilenet_v3_small(weights=None))
    stages = find_stages(mobilenet)
    assert stages.labels[0] == "features.0" and stages.labels[-1] == "features.12+classifier"
    assert len(stages.labels) == 13
    vit, _ = split_head(
        torchvision.models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
        )
    )
    assert find_stages(vit).labels == [
        "class_token+conv_proj+encoder.pos_embedding",
        "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1",
        "encoder.layers.encoder_layer_2+encoder.ln",
    ]


# -- end to end -----------------------------------------------------------------------------------
def _artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(tmp_path)))


def test_lp_ft_probe_head_equals_a_feature_extraction_run(run_cli, store, tmp_path: Path) -> None:
    """The probe stage *is* feature extraction: same seed, epochs and schedule, the same head, bit for bit
    (a constant lr for both, so the lrs logged per epoch are the stages' own)."""
    assert run_cli(*TINY, *store, "mode=feature_extract", "trainer.epochs=3", "seed=5") == 0
    lp_ft = ["mode=lp_ft", "mode.probe_epochs=3", "trainer.epochs=1", "scheduler=constant", "augment=none"]
    assert run_cli(*TINY, *store, *lp_ft, "seed=5") == 0
    runs = runs_in(tmp_path).set_index("params.mode.name")
    client = MlflowClient()
    fe, lp = runs.loc["feature_extract"], runs.loc["lp_ft"]
    assert fe["status"] == lp["status"] == "FINISHED"

    fe_state = model_store.load_weights(client, fe["run_id"], tmp_path / "fe")
    probe = torch.load(_artifact(client, lp["run_id"], "probe_head.pt", tmp_path / "lp"), weights_only=True)
    for key, tensor in probe.items():
        assert torch.equal(tensor, fe_state[f"head.{key}"]), key
    assert lp["metrics.probe_test_accuracy"] == fe["metrics.test_accuracy"]
    assert lp["metrics.probe_best_val_accuracy"] == fe["metrics.best_val_accuracy"]

    # One run, one step axis: probe epochs 0-2, the fine-tune epoch 3, the stage on every step.
    history = {
        m: client.get_metric_history(lp["run_id"], m) for m in ("val_loss", "stage", "lr_head", "lr_backbone")
    }
    assert [m.step for m in history["val_loss"]] == [0, 1, 2, 3]
    assert [m.value for m in history["stage"]] == [0, 0, 0, 1]
    assert [m.value for m in history["lr_head"]] == [1e-3, 1e-3, 1e-3, 1e-4]
    assert [m.value for m in history["lr_backbone"]] == [0.0, 0.0, 0.0, 1e-4]
    fe_val = [m.value for m in client.get_metric_history(fe["run_id"], "val_loss")]
    assert [m.value for m in history["val_loss"]][:3] == fe_val
    assert (lp["params.stage.probe.steps"], lp["params.stage.finetune.steps"]) == ("0-2", "3-3")
    assert (
        lp["params.stage.probe.trainable"] == "head only" and lp["params.stage.finetune.trainable"] == "all"
    )
    bn_frozen = int(lp["params.stage.finetune.eval_modules"])  # lp_ft freezes BatchNorm by default
    assert bn_frozen > 0 and lp["metrics.trainable_params"] < lp["metrics.total_params"]
    assert lp["metrics.best_epoch"] == 3  # the tested model comes from the fine-tune stage
    assert "stage" not in client.get_run(fe["run_id"]).data.metrics  # single-stage runs: no stage metric


def test_partial_run_logs_its_stages_and_param_groups(run_cli, store, tmp_path: Path) -> None:
    args = ["backbone.name=test_resnet", "mode=partial", "mode.trainable_stages=2", "mode.layer_decay=0.5"]
    assert run_cli(*TINY, *store, *args, "mode.backbone_lr_scale=0.1") == 0
    run = runs_in(tmp_path).iloc[0]
    assert run["params.stage.partial.trainable"] == "layer3,layer4"
    assert run["params.mode.layer_decay"] == "0.5" and run["params.mode.backbone_lr_scale"] == "0.1"
    # test_resnet: one block per layer, so two layers train: lr 1e-5 (layer4) and 5e-6 (layer3).
    assert run["params.stage.partial.lr_backbone"] == "5e-06..1e-05"
    record = json.loads(_artifact(MlflowClient(), run["run_id"], "stages/partial.json", tmp_path).read_text())
    assert record["trainable_stages"] == ["layer3", "layer4"]
    groups = {g["name"]: g for g in record["param_groups"]}
    assert groups["head"]["lr"] == 1e-4
    tensors = [t for g in record["param_groups"] for t in g["tensors"]]
    assert all(t.startswith(("head.", "backbone.layer3.", "backbone.layer4.")) for t in tensors)
    assert sum(g["num_params"] for g in record["param_groups"]) == run["metrics.trainable_params"]


def test_too_many_stages_is_one_clear_line_and_no_run(run_cli, store, tmp_path: Path, capsys) -> None:
    code = run_cli(*TINY, *store, "backbone.name=test_resnet", "mode=partial", "mode.trainable_stages=6")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: mode.trainable_stages: test_resnet has 5 stages (conv1+bn1, layer1")
    assert "Fix: use 1..5" in err[-1]
    assert len(runs_in(tmp_path)) == 0


def _experiment(name: str) -> str:
    """``experiment=NAME``, or ``+experiment=NAME`` while the root defaults list has no experiment slot."""
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    slot = any(isinstance(d, DictConfig) and "experiment" in d for d in defaults)
    return f"{'' if slot else '+'}experiment={name}"


def test_the_elpv_dial_experiment_composes_and_runs_a_tiny_step(run_cli, store, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[_experiment("elpv_dial")], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params.mode.split(",")) == set(MODE_SCHEMAS)
    assert params.backbone.split(",") == [f"efficientnet_lite{i}" for i in range(3)]
    assert params.seed == "0,1,2" and cfg.data.name == "elpv" and cfg.mlflow.experiment_name == "elpv_dial"
    # One tiny step of its most involved arm, on generated data (the command line wins).
    overrides = [*TINY, *store, "mlflow.experiment_name=transferlab", "mode=lp_ft", "mode.probe_epochs=1"]
    assert run_cli(_experiment("elpv_dial"), *overrides, "trainer.epochs=1") == 0
    assert runs_in(tmp_path).iloc[0]["status"] == "FINISHED"
