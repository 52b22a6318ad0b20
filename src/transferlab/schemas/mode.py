"""``conf/mode/``: where a run sits on the dial, and the stages each mode trains in.

A mode's schema knows its own plan: :meth:`ModeConfig.stages` turns the config into the list of
:class:`Stage` a run fits one after the other (one, or two for ``lp_ft``). What each stage freezes is
decided by :func:`transferlab.modes.freeze`, from the stage alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.schemas.errors import ConfigError, positive

ALL_STAGES = -1  # Stage.trainable_stages: the whole backbone


@dataclass(frozen=True)
class Stage:
    """One fit of a run: what trains, at which learning rates, for how many epochs."""

    name: str
    epochs: int
    first_step: int  # MLflow step of its first epoch (stages follow each other on one axis)
    lr: float  # the head's; backbone groups scale it
    trainable_stages: int  # 0: frozen backbone; ALL_STAGES: all of it; k: the last k stages
    backbone_lr_scale: float
    layer_decay: float | None
    batchnorm: str  # "frozen" or "train"; read only when the backbone trains
    augment: bool = True  # whether the run's augmentation applies (lp_ft's probe: mode.probe_augment)

    @property
    def trains_backbone(self) -> bool:
        return self.trainable_stages != 0

    @property
    def end(self) -> int:
        """The step after its last epoch: the next stage's ``first_step``."""
        return self.first_step + self.epochs


def probe_stage(name: str, epochs: int, first_step: int, lr: float, augment: bool = True) -> Stage:
    """A stage with the backbone frozen: only the head trains. Its backbone knobs are never read
    (a frozen backbone is in eval mode whatever ``batchnorm`` says); they are logged as they were."""
    return Stage(
        name,
        epochs,
        first_step,
        lr,
        0,
        backbone_lr_scale=1.0,
        layer_decay=None,
        batchnorm="train",
        augment=augment,
    )


@dataclass
class ModeConfig:
    """Feature extraction: the backbone is frozen, only the new head trains.

    ``lr`` is the mode's default for ``optimizer.lr``. Each mode has its own schema (below), so
    every key a mode file holds is one its code reads.
    """

    name: str = MISSING
    lr: float = MISSING

    def __post_init__(self) -> None:
        if self.name not in MODE_SCHEMAS:
            raise ConfigError(
                "mode.name", f"unknown mode {self.name!r}", f"use one of {sorted(MODE_SCHEMAS)}"
            )
        schema = MODE_SCHEMAS[self.name]
        if type(self) is not schema:  # e.g. `mode=feature_extract mode.name=partial`
            raise ConfigError(
                "mode.name",
                f"mode {self.name!r} needs the {schema.__name__} schema, this file extends {type(self).__name__}",
                f"choose the mode with mode={self.name} (or start your mode file from its schema)",
            )
        positive("mode.lr", self.lr, "use e.g. 1e-3 for feature extraction, 1e-4 for fine-tuning")

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        """The stages of a run. ``epochs`` (trainer.epochs) counts the stage that trains the backbone:
        lp_ft adds its cheap probe epochs in front, so lp_ft and full_finetune fine-tune equally long."""
        return [probe_stage(self.name, epochs, 0, lr)]


@dataclass
class FinetuneModeConfig(ModeConfig):
    """Full fine-tuning: everything trains, with discriminative learning rates and a BN policy."""

    # Backbone lr = optimizer.lr x backbone_lr_scale (the head keeps optimizer.lr).
    backbone_lr_scale: float = 1.0
    # Layer-wise lr decay (BEiT / timm): each backbone layer below the top runs at layer_decay x the
    # one above it. null: one lr for the whole backbone. When set, biases and norm weights get no
    # weight decay (timm's param_groups_layer_decay convention).
    layer_decay: float | None = None
    # frozen: every BatchNorm stays in eval mode with no gradient (running stats and affine fixed);
    # train: BatchNorm in trained parts updates like any layer.
    batchnorm: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(
            "mode.backbone_lr_scale",
            self.backbone_lr_scale,
            "use e.g. 0.1 for a backbone 10x slower than the head; mode=feature_extract freezes it",
        )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(
                "mode.layer_decay",
                f"must be in (0, 1] or null, got {self.layer_decay}",
                "use e.g. mode.layer_decay=0.75, or null for one backbone lr",
            )
        if self.batchnorm not in ("frozen", "train"):
            raise ConfigError(
                "mode.batchnorm", f"unknown policy {self.batchnorm!r}", "use mode.batchnorm=frozen or train"
            )

    def tuned_stage(self, name: str, epochs: int, first_step: int, lr: float, trainable_stages: int) -> Stage:
        """A stage that trains (part of) the backbone with this mode's lr scale, layer decay and BN policy."""
        return Stage(
            name,
            epochs,
            first_step,
            lr,
            trainable_stages,
            self.backbone_lr_scale,
            self.layer_decay,
            self.batchnorm,
        )

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        return [self.tuned_stage(self.name, epochs, 0, lr, ALL_STAGES)]


@dataclass
class PartialModeConfig(FinetuneModeConfig):
    """Only the last ``trainable_stages`` stages of the backbone train (the stem counts as stage 0)."""

    trainable_stages: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainable_stages < 1:
            raise ConfigError(
                "mode.trainable_stages",
                f"must be >= 1, got {self.trainable_stages}",
                "use 1 or more (mode=feature_extract trains no stage)",
            )

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        return [self.tuned_stage(self.name, epochs, 0, lr, self.trainable_stages)]


@dataclass
class LpFtModeConfig(FinetuneModeConfig):
    """Linear probe (frozen backbone, ``probe_epochs`` at ``probe_lr``), then full fine-tuning from
    that head for ``trainer.epochs`` at ``optimizer.lr`` (Kumar et al., ICLR 2022)."""

    probe_epochs: int = 5
    probe_lr: float = 1.0e-3
    # frozen: the probe head was fit on eval-mode features; BatchNorm in train mode would swap in batch
    # statistics at the first fine-tune step and invalidate it (on ELPV: train loss 0.35 -> 2.60 and
    # val accuracy 0.89 -> 0.31 in the first epoch with `train`, 0.48 / 0.84 with `frozen`).
    batchnorm: str = "frozen"
    # false: the probe trains on the eval crop (so on cached features), as the LP-FT paper fits its
    # probe on fixed features; the run's augmentation starts with the fine-tune stage.
    probe_augment: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe_epochs < 1:
            raise ConfigError(
                "mode.probe_epochs",
                f"must be >= 1, got {self.probe_epochs}",
                "use 1 or more (mode=full_finetune has no probe stage)",
            )
        positive("mode.probe_lr", self.probe_lr, "use e.g. mode.probe_lr=1e-3")

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        probe = probe_stage("probe", self.probe_epochs, 0, self.probe_lr, self.probe_augment)
        return [probe, self.tuned_stage("finetune", epochs, self.probe_epochs, lr, ALL_STAGES)]


# The registry of modes: each name and the schema its config file must extend.
MODE_SCHEMAS: dict[str, type[ModeConfig]] = {
    "feature_extract": ModeConfig,
    "full_finetune": FinetuneModeConfig,
    "partial": PartialModeConfig,
    "lp_ft": LpFtModeConfig,
}
