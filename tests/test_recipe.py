"""The fine-tuning recipe: lr schedules, augmentation of the stored image, mixup, EMA, accumulation,
clipping, early stopping and label smoothing, each against an independent reference or invariant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from transferlab.backbones import build_backbone
from transferlab.data import eval_crop, prepare, preprocess_image
from transferlab.engine import FitState, training_batches
from transferlab.modes import make_model
from transferlab.schedule import build_scheduler
from transferlab.schemas import (
    AdamConfig,
    AugmentConfig,
    BackboneConfig,
    SchedulerConfig,
    StepSchedulerConfig,
    SyntheticDataConfig,
    TrainerConfig,
)

from .conftest import make_runner, runs_in, store_overrides

# -- schedules ----------------------------------------------------------------------------------------

LR, RATIO, UPDATES_PER_EPOCH, EPOCHS = 1e-3, 0.1, 5, 4


def _two_groups() -> torch.optim.Optimizer:
    """A head and a backbone group at a tenth of its lr, as transferlab.optim builds them."""
    head, backbone = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD(
        [
            {"name": "head", "params": [head], "lr": LR, "lr_scale": 1.0},
            {"name": "backbone", "params": [backbone], "lr": LR, "lr_scale": RATIO},
        ]
    )


def _applied(cfg: SchedulerConfig) -> list[tuple[float, float]]:
    """(head lr, backbone lr) each update of a stage runs at, stepping as the engine does."""
    optimizer = _two_groups()
    scheduler = build_scheduler(cfg, optimizer, EPOCHS, UPDATES_PER_EPOCH)
    seen = []
    for update in range(1, EPOCHS * UPDATES_PER_EPOCH + 1):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]))
        optimizer.step()
        scheduler.step_update(num_updates=update)
    return seen


def _torch_reference(cfg: SchedulerConfig, warmup: int) -> list[float]:
    """The head's lr per update from torch's own schedulers (an independent implementation)."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    after = EPOCHS * UPDATES_PER_EPOCH - warmup
    if cfg.name == "cosine":
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=after, eta_min=cfg.min_lr)
    elif cfg.name == "linear":
        decay = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, cfg.min_lr / LR, total_iters=after)
    elif cfg.name == "step":
        decay = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=int(cfg.decay_epochs * UPDATES_PER_EPOCH), gamma=cfg.decay_rate
        )
    else:
        decay = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    warm = [cfg.warmup_lr + k * (LR - cfg.warmup_lr) / warmup for k in range(warmup)]
    values = []
    for _ in range(after):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        decay.step()
    return warm + values


@pytest.mark.parametrize(
    "cfg",
    [
        SchedulerConfig(name="constant", warmup_epochs=1, warmup_lr=1e-5),
        SchedulerConfig(name="cosine", warmup_epochs=0.5, min_lr=1e-5),
        SchedulerConfig(name="cosine"),
        SchedulerConfig(name="linear", warmup_epochs=1, min_lr=2e-4),
        StepSchedulerConfig(warmup_epochs=1, decay_epochs=1, decay_rate=0.5),
    ],
    ids=["constant-warmup", "cosine-half-epoch-warmup", "cosine", "linear-warmup", "step-warmup"],
)
def test_schedule_matches_torchs_and_keeps_group_ratios(cfg: SchedulerConfig) -> None:
    warmup = round(cfg.warmup_epochs * UPDATES_PER_EPOCH)
    applied = _applied(cfg)
    assert [h for h, _ in applied] == pytest.approx(_torch_reference(cfg, warmup), rel=1e-9, abs=1e-15)
    # Every group follows with its own ratio, warmup and floor included (timm's lr_scale).
    assert all(b == pytest.approx(h * RATIO, rel=1e-12) for h, b in applied)
    if cfg.name != "constant":  # a decaying schedule reaches its floor by the stage's end
        assert applied[-1][0] < applied[warmup][0]


def test_warmup_counts_whole_updates_and_decays_within_the_stage() -> None:
    """0.5 epoch of 5 updates rounds to 2 (round half to even), and the last update is near min_lr."""
    applied = _applied(SchedulerConfig(name="cosine", warmup_epochs=0.5, min_lr=1e-5))
    assert applied[0][0] == 0.0 and applied[1][0] == pytest.approx(LR / 2) and applied[2][0] == LR
    assert applied[-1][0] == pytest.approx(1e-5 + 0.5 * (LR - 1e-5) * (1 + math.cos(math.pi * 17 / 18)))


# -- augmentation --------------------------------------------------------------------------------------


def _data(image_size: int = 32):  # noqa: ANN202
    built = build_backbone(
        BackboneConfig(name="test_efficientnet", source="timm", weights=None, image_size=image_size)
    )
    data = prepare(
        SyntheticDataConfig(num_classes=2, images_per_class=12, image_size=48), built.preprocess, ""
    )
    return built, data


def _runner(augment: AugmentConfig | None, workers: int = 0, **trainer):  # noqa: ANN003, ANN202
    built, data = _data()
    torch.manual_seed(0)
    model = make_model(built.model, data.num_classes)
    cfg = TrainerConfig(batch_size=4, progress=False, num_workers=workers, **trainer)
    stage = _finetune_stage()
    return make_runner(model, data, cfg, 7, augment, stage), model


def _finetune_stage():  # noqa: ANN202
    from transferlab.schemas import FinetuneModeConfig

    return FinetuneModeConfig(name="full_finetune", lr=1e-3).stages(1, 1e-3)[-1]


def _epoch_inputs(runner, epoch: int = 0) -> list[torch.Tensor]:  # noqa: ANN001
    state = FitState(epoch=epoch)
    state.order = torch.from_numpy(runner.data.splits.train)[
        torch.randperm(len(runner.data.splits.train), generator=runner.generator)
    ]
    state.seeds = torch.randint(0, 2**62, (len(state.order),), generator=runner.generator)
    batches = training_batches(torch.arange(len(state.order)), runner.cfg.batch_size)
    return list(runner._train_inputs(state, batches))


STRONG = AugmentConfig(
    name="strong", crop="random_resized", hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25
)


def test_the_stored_image_is_the_eval_resize_and_its_centre_the_eval_crop() -> None:
    """Square sources (ELPV is 300 x 300): the eval crop of the store is resize-then-crop, bit for bit."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    built, _ = _data(image_size=64)
    pre = built.preprocess
    assert pre.resize > pre.crop
    cell = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    stored = preprocess_image(cell, pre)
    assert stored.shape == (1, pre.resize, pre.resize)
    old = TF.center_crop(
        TF.resize(
            torch.from_numpy(cell)[None],
            [pre.resize],
            interpolation=InterpolationMode(pre.interpolation),
            antialias=True,
        ),
        [pre.crop, pre.crop],
    )
    assert torch.equal(eval_crop(stored[None], pre)[0], old)


@pytest.mark.parametrize(("height", "width"), [(375, 500), (500, 375), (301, 257)])
def test_a_non_square_image_stores_a_square_whose_centre_is_the_eval_crop(height: int, width: int) -> None:
    """A resize that leaves an odd margin (235 -> 224, timm's crop_pct 0.95): the square is placed so that
    its centre crop is the eval transform's own, pixel for pixel (two centre crops in a row would not be)."""
    from torchvision.transforms import v2

    from transferlab.backbones import Preprocess

    pre = Preprocess(resize=235, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    photo = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    stored = preprocess_image(photo, pre)
    assert stored.shape == (3, 235, 235)
    theirs = v2.Compose([v2.Resize(235, antialias=True), v2.CenterCrop(224)])(
        torch.from_numpy(photo).permute(2, 0, 1)
    )
    assert torch.equal(eval_crop(stored[None], pre)[0], theirs)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_augmentation_is_seeded_per_image_whatever_the_workers(workers: int) -> None:
    base, _ = _runner(STRONG, workers=0)
    other, _ = _runner(STRONG, workers=workers)
    first, again = _epoch_inputs(base), _epoch_inputs(other)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # It augments: not the eval crop, and another epoch (next seeds) gives other images.
    plain = [base._inputs(torch.arange(4))]
    assert not torch.equal(first[0], plain[0])
    assert not any(torch.equal(a, b) for a, b in zip(first, _epoch_inputs(base, 1), strict=True))
    # The run's own random streams are left alone (dropout draws from the global generator).
    state = torch.get_rng_state()
    _epoch_inputs(base)
    assert torch.equal(torch.get_rng_state(), state)


def test_augmentation_never_touches_validation_or_test() -> None:
    augmented, model = _runner(STRONG)
    plain, plain_model = _runner(None)
    plain_model.load_state_dict(model.state_dict())
    idx = torch.from_numpy(augmented.data.splits.val)
    assert torch.equal(augmented._inputs(idx), plain._inputs(idx))
    for split in (augmented.data.splits.val, augmented.data.splits.test):
        assert np.array_equal(augmented.predict(split)[1], plain.predict(split)[1])
        assert augmented.predict(split)[2] == plain.predict(split)[2]


def test_flip_is_the_eval_crop_mirrored() -> None:
    runner, _ = _runner(AugmentConfig(name="flip", hflip=0.5))
    state_inputs = _epoch_inputs(runner)[0]
    order = torch.from_numpy(runner.data.splits.train)
    runner.generator.manual_seed(7)
    order = order[torch.randperm(len(order), generator=runner.generator)][:4]
    plain = runner._inputs(order)
    for got, want in zip(state_inputs, plain, strict=True):
        assert torch.allclose(got, want, atol=1e-6) or torch.allclose(got, want.flip(-1), atol=1e-6)


# -- the loop options ----------------------------------------------------------------------------------


def _fit(runner, model, epochs: int = 2, **kw):  # noqa: ANN001, ANN003, ANN202
    from transferlab.optim import param_groups

    optimizer = instantiate(AdamConfig(lr=1e-2))(param_groups(model, runner.stage, 0.0))
    scheduler = build_scheduler(SchedulerConfig(), optimizer, epochs, runner.updates_per_epoch())
    return runner.fit(optimizer, epochs, lambda row, step: None, scheduler=scheduler, **kw), optimizer


def test_accumulation_updates_once_per_window() -> None:
    runner, model = _runner(None, accumulate_steps=3)
    # 16 training images in batches of 4: 4 batches, windows of 3 and 1.
    assert len(runner.data.splits.train) == 16 and runner.updates_per_epoch() == 2
    steps = []
    original = torch.optim.Adam.step

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.append(1)
        return original(self, *a, **k)

    torch.optim.Adam.step = counted
    try:
        _fit(runner, model, epochs=1)
    finally:
        torch.optim.Adam.step = original
    assert len(steps) == 2


def test_ema_weights_are_validated_kept_and_tested() -> None:
    runner, model = _runner(None, ema_decay=0.5)
    fit, _ = _fit(runner, model, epochs=2)
    assert runner.ema is not None
    runner.load_best(fit)
    assert runner.ema is None  # the kept (EMA) weights are now the model's, which is tested
    best = next(row for row in fit.history if row["epoch"] == fit.best_epoch)
    assert runner.evaluate(runner.data.splits.val)[0]["loss"] == best["val_loss"]  # validated = tested
    for key, value in model.state_dict().items():
        assert torch.equal(value, fit.best_state[key].to(value.device)), key
    live, live_model = _runner(None)
    live_fit, _ = _fit(live, live_model, epochs=2)
    assert any(not torch.equal(fit.best_state[k], live_fit.best_state[k]) for k in fit.best_state)


def test_grad_clip_bounds_the_update() -> None:
    clipped, model = _runner(None, grad_clip_norm=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    free, free_model = _runner(None)
    from transferlab.optim import param_groups

    for runner, m in ((clipped, model), (free, free_model)):
        optimizer = torch.optim.SGD(param_groups(m, runner.stage, 0.0), lr=1.0)
        for g in optimizer.param_groups:
            g["lr"] = 1.0
        runner.train_epoch(optimizer, FitState(), lambda: False)
    weights = [n for n, _ in model.named_parameters()]  # BatchNorm's running statistics move anyway
    moved = max((model.state_dict()[k] - before[k]).abs().max().item() for k in weights)
    free_moved = max((free_model.state_dict()[k] - before[k]).abs().max().item() for k in weights)
    assert moved <= 4 * 1e-6 + 1e-9 < free_moved  # 4 updates of norm <= 1e-6 at lr 1


def test_early_stopping_stops_after_patience() -> None:
    runner, model = _runner(None, early_stop_patience=1, monitor="loss")
    fit, _ = _fit(runner, model, epochs=30)
    assert fit.stopped_early_at is not None
    assert fit.stopped_early_at == fit.best_epoch + 1 == len(fit.history) - 1


def test_label_smoothing_changes_the_loss() -> None:
    smooth, model = _runner(None, label_smoothing=0.3)
    plain, plain_model = _runner(None)
    a = smooth.train_epoch(torch.optim.SGD(model.parameters(), lr=0.0), FitState(), lambda: False)
    b = plain.train_epoch(torch.optim.SGD(plain_model.parameters(), lr=0.0), FitState(), lambda: False)
    assert a["train_loss"] > b["train_loss"]


def test_mixup_drops_an_odd_last_image_and_uses_soft_targets() -> None:
    assert [len(b) for b in training_batches(torch.arange(11), 4, even=True)] == [4, 4, 2]
    assert [len(b) for b in training_batches(torch.arange(9), 4, even=True)] == [4, 4]
    runner, model = _runner(AugmentConfig(name="mix", mixup_alpha=0.8, cutmix_alpha=1.0), label_smoothing=0.1)
    fit, _ = _fit(runner, model, epochs=1)
    assert math.isfinite(fit.history[0]["train_loss"])


# -- bad input: one line, exit 2, before compute and before any MLflow run ------------------------------

FAST = ["data=synthetic", "backbone=timm", "backbone.name=test_efficientnet", "backbone.weights=null"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["scheduler=bogus"], "scheduler"),
        (["scheduler=cosine", "scheduler.warmup_epochs=3", "trainer.epochs=3"], "scheduler.warmup_epochs"),
        (["mode=lp_ft", "mode.probe_epochs=1", "scheduler.warmup_epochs=1"], "scheduler.warmup_epochs"),
        (["scheduler.min_lr=1"], "scheduler.min_lr"),
        (["scheduler=step", "scheduler.decay_rate=2"], "scheduler.decay_rate"),
        (["trainer.accumulate_steps=0"], "trainer.accumulate_steps"),
        (["trainer.ema_decay=1.5"], "trainer.ema_decay"),
        (["trainer.ema_decay=0"], "trainer.ema_decay"),
        (["trainer.label_smoothing=1.0"], "trainer.label_smoothing"),
        (["trainer.grad_clip_norm=0"], "trainer.grad_clip_norm"),
        (["trainer.early_stop_patience=0"], "trainer.early_stop_patience"),
        (["augment=bogus"], "augment"),
        (["augment.mixup_alpha=-1"], "augment.mixup_alpha"),
        (["augment.scale=[0.5,1.5]"], "augment.scale"),
        (["augment.scale=[0.5]"], "augment.scale"),
        (["augment.crop=random"], "augment.crop"),
        (["augment.auto_augment=bogus-m9"], "augment.auto_augment"),
        (["augment.auto_augment=original-mstd0.5x"], "augment.auto_augment"),  # parsed by timm itself
        (["augment.auto_augment=rand-m9-mstd0.5", "augment.hflip=2"], "augment.hflip"),
        (["augment.mixup_alpha=0.8", "trainer.batch_size=5"], "trainer.batch_size"),
        (["data.augment=true"], "data.augment"),
    ],
)
def test_bad_recipe_input_is_one_line_and_no_run(run_cli, capsys, tmp_path: Path, override, key) -> None:  # noqa: ANN001
    assert run_cli(*FAST, *override, *store_overrides(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert "Fix:" in err[0] or "did you mean" in err[0], err
    assert not (tmp_path / "mlflow.db").exists() or runs_in(tmp_path).empty


def test_each_lp_ft_stage_warms_up_and_decays_on_its_own(run_cli, tmp_path: Path) -> None:
    """lp_ft under cosine: the probe decays to its floor, then the fine-tune stage starts its own schedule."""
    from mlflow import MlflowClient

    args = [*FAST, "mode=lp_ft", "mode.probe_epochs=2", "trainer.epochs=2", "trainer.progress=false"]
    assert run_cli(*args, "scheduler.min_lr=0", *store_overrides(tmp_path)) == 0
    run_id = runs_in(tmp_path).iloc[0]["run_id"]
    lrs = [
        m.value for m in sorted(MlflowClient().get_metric_history(run_id, "lr_head"), key=lambda m: m.step)
    ]
    # Logged after each epoch: the lr of the next update. Probe: half-way, then its end (0); fine-tune:
    # its own half-way (at its own lr, 1e-4), then its end.
    assert lrs[1] == lrs[3] == 0.0
    assert 0 < lrs[0] <= 1e-3 and 0 < lrs[2] <= 1e-4 and lrs[2] != lrs[0]


def test_randaugment_at_full_magnitude_survives_current_pillow() -> None:
    """rand-m10-inc1 posterizes to 0 bits, which Pillow >= 12 refuses: transferlab keeps timm's old meaning."""
    from PIL import Image

    from transferlab.augment import build_train_transform, seeded
    from transferlab.backbones import Preprocess

    pre = Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    cfg = AugmentConfig(name="x", auto_augment="rand-m10-n4-inc1")  # 4 ops, always at magnitude 10
    transform = build_train_transform(cfg, pre)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8))
    for seed in range(200):  # posterize is one of 15 ops: drawn in most of these
        with seeded(seed):
            assert transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "augment", [None, AugmentConfig(name="flip", hflip=0.5)], ids=["cached-features", "live"]
)
def test_ema_of_a_frozen_backbone_averages_the_head(augment) -> None:  # noqa: ANN001
    """feature_extract with EMA: the average covers the head alone (on cached features or live), and is what is kept."""
    from transferlab.schemas import ModeConfig

    built, data = _data()
    torch.manual_seed(0)
    model = make_model(built.model, data.num_classes)
    stage = ModeConfig(name="feature_extract", lr=1e-2).stages(1, 1e-2)[-1]
    cfg = TrainerConfig(batch_size=4, progress=False, ema_decay=0.9, feature_cache=False)
    runner = make_runner(model, data, cfg, 7, augment, stage)
    assert runner.ema is not None and set(runner.ema.module.state_dict()) == set(model.head.state_dict())
    fit, _ = _fit(runner, model, epochs=2)
    assert set(fit.best_state) == set(model.head.state_dict())
    assert not torch.equal(
        fit.best_state["weight"], model.head.weight.detach()
    )  # averaged, not the live head
    runner.load_best(fit)
    assert torch.equal(model.head.weight.detach(), fit.best_state["weight"])
