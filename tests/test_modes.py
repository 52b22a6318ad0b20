"""Golden tests for the transfer logic and the seed article's gotchas, on a tiny BatchNorm network."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from transferlab.backbones import build_backbone
from transferlab.data import prepare
from transferlab.engine import training_batches
from transferlab.modes import count_parameters, freeze, make_model, trainable_parameters
from transferlab.schemas import (
    MODE_SCHEMAS,
    AdamConfig,
    BackboneConfig,
    Stage,
    SyntheticDataConfig,
    TrainerConfig,
)

from .conftest import make_runner


def _stage(mode_name: str) -> Stage:
    """The stage that trains the most of ``mode_name`` (its last), at the mode's defaults."""
    return MODE_SCHEMAS[mode_name](name=mode_name, lr=1e-2).stages(1, 1e-2)[-1]


def _setup(mode_name: str, augment: bool = False, num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    built = build_backbone(
        BackboneConfig(name="test_efficientnet", source="timm", weights=None, image_size=32)
    )
    data = prepare(
        SyntheticDataConfig(num_classes=num_classes, images_per_class=12),
        built.preprocess,
        "",
    )
    model = make_model(built.model, data.num_classes)
    trainer = TrainerConfig(epochs=2, batch_size=8, progress=False)
    runner = make_runner(model, data, trainer, seed, augment, _stage(mode_name))
    lr = 1e-2  # large enough that a step visibly moves every trained tensor
    optimizer = instantiate(AdamConfig(lr=lr))(trainable_parameters(model))
    return model, optimizer, runner, data


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("augment", [False, True], ids=["cached-features", "live-backbone"])
def test_feature_extraction_leaves_the_backbone_bit_identical(augment: bool) -> None:
    """Frozen means bit-identical: weights *and* BatchNorm running statistics, on both code paths."""
    model, optimizer, runner, _ = _setup("feature_extract", augment=augment)
    backbone_before, head_before = _snapshot(model.backbone), _snapshot(model.head)
    assert any("running_mean" in k for k in backbone_before)  # the test network has BatchNorm
    runner.fit(optimizer, 2, lambda row, step: None)
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[key]), key
    assert not torch.equal(model.head.weight, head_before["weight"])
    assert runner.frozen_features is (not augment)


def test_the_articles_loop_would_change_batchnorm() -> None:
    """The bug we guard against: model.train() on a 'frozen' backbone updates its running stats."""
    model, _, runner, data = _setup("feature_extract")
    before = _snapshot(model.backbone)
    model.train()  # what the article's loop does every epoch
    with torch.no_grad():
        model(runner._inputs(torch.arange(8)))
    assert any(
        not torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items() if "running" in k
    )


def test_trainable_parameters_equal_the_head_and_reach_the_optimizer() -> None:
    """Gotchas: the new head trains whatever the stage freezes; only trainable params go to the optimizer."""
    model, optimizer, _, data = _setup("feature_extract", num_classes=3)
    assert model.head.out_features == data.num_classes == 3  # sized from the data, never typed
    assert all(p.requires_grad for p in model.head.parameters())
    assert count_parameters(model, lambda p: p.requires_grad) == count_parameters(model.head)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.head.parameters()}


def test_full_finetune_trains_everything() -> None:
    model, optimizer, runner, _ = _setup("full_finetune")
    before = _snapshot(model.backbone)
    assert count_parameters(model, lambda p: p.requires_grad) == count_parameters(model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    runner.fit(optimizer, 1, lambda row, step: None)
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any("conv" in k and k.endswith("weight") for k in changed)
    assert any("running_mean" in k for k in changed)  # BN trains in full fine-tuning


def test_train_mode_keeps_a_frozen_backbone_in_eval() -> None:
    model, _, _, _ = _setup("feature_extract")
    freeze(model, _stage("feature_extract"))
    assert model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    freeze(model, _stage("full_finetune"))
    assert all(m.training for m in model.modules())


def test_inference_runs_in_eval_mode_and_is_deterministic() -> None:
    """Gotcha: model.eval() for inference, so BatchNorm and dropout do not wobble the numbers."""
    model, optimizer, runner, data = _setup("full_finetune")
    runner.fit(optimizer, 1, lambda row, step: None)
    freeze(model, _stage("full_finetune"))  # leave it in train mode on purpose
    before = _snapshot(model)
    first = runner.predict(data.splits.test)
    assert not model.training
    second = runner.predict(data.splits.test)
    assert (first[1] == second[1]).all() and first[2] == second[2]
    for key, tensor in model.state_dict().items():  # prediction never touches BN statistics
        assert torch.equal(tensor, before[key]), key


def test_same_seed_same_numbers_on_cpu() -> None:
    results = []
    for _ in range(2):
        model, optimizer, runner, data = _setup("full_finetune", seed=3)
        fit = runner.fit(optimizer, 2, lambda row, step: None)
        timeless = [
            {k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in fit.history
        ]
        results.append((timeless, _snapshot(model)))
    assert results[0][0] == results[1][0]
    for key, tensor in results[0][1].items():
        assert torch.equal(tensor, results[1][1][key]), key


def test_best_checkpoint_is_restored() -> None:
    model, optimizer, runner, _ = _setup("feature_extract")
    fit = runner.fit(optimizer, 3, lambda row, step: None)
    runner.load_best(fit)
    for key, tensor in model.head.state_dict().items():
        assert torch.equal(tensor, fit.best_state[key])


def test_a_last_batch_of_one_image_does_not_crash_batchnorm() -> None:
    """17 training images in batches of 8 would leave one image, which BatchNorm cannot train on."""
    torch.manual_seed(0)
    built = build_backbone(
        BackboneConfig(name="test_efficientnet", source="timm", weights=None, image_size=32)
    )
    data = prepare(SyntheticDataConfig(num_classes=2, images_per_class=16), built.preprocess, "")
    data.splits.train = data.splits.train[:17]
    assert len(data.splits.train) == 17
    model = make_model(built.model, data.num_classes)
    runner = make_runner(
        model, data, TrainerConfig(batch_size=8, progress=False), 0, False, _stage("full_finetune")
    )
    optimizer = instantiate(AdamConfig(lr=1e-3))(trainable_parameters(model))
    fit = runner.fit(optimizer, 1, lambda row, step: None)
    assert fit.history[0]["train_accuracy"] * 17 == round(fit.history[0]["train_accuracy"] * 17)
    assert [len(b) for b in training_batches(torch.arange(17), 8)] == [8, 9]
    assert [len(b) for b in training_batches(torch.arange(16), 8)] == [8, 8]
