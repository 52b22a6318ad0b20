"""``conf/augment/``: train-time augmentation of the stored source image, and mixing of batches.

Per-image pieces (crop, flips, RandAugment, random erasing) run on each training image with a
seed of its own (drawn with the epoch's data order), so the same seed gives the same crops whatever
``trainer.num_workers`` is, and a resumed epoch repeats them. Validation and test images always get
the weights' eval transform (resize, centre crop). Mixup / CutMix mix the batch (timm's ``Mixup``).
Any augmentation makes a frozen backbone run live on every batch: its features are no longer fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transferlab.schemas.errors import ConfigError

CROPS = ("center", "random_resized")


def _unit(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(key, f"must be in [0, 1], got {value}", f"use a probability, e.g. {key}=0.5")


@dataclass
class AugmentConfig:
    name: str = "none"
    # center: the eval crop of the stored image; random_resized: timm's RandomResizedCrop of the
    # stored image (the eval resize, uncropped) to the backbone's input size.
    crop: str = "center"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area, random_resized
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])  # aspect, random_resized
    hflip: float = 0.0  # probabilities
    vflip: float = 0.0
    # timm's string form: rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, v0 / original (AutoAugment).
    auto_augment: str | None = None
    color_jitter: float = 0.0  # brightness, contrast, saturation factor (timm skips it under auto_augment)
    re_prob: float = 0.0  # random erasing (timm's RandomErasing, on the normalised image)
    re_mode: str = "pixel"
    re_count: int = 1
    mixup_alpha: float = 0.0  # > 0: mixup with Beta(alpha, alpha) weights (timm.data.Mixup)
    cutmix_alpha: float = 0.0  # > 0: cutmix
    mixup_prob: float = 1.0  # of a batch being mixed at all
    mixup_switch_prob: float = 0.5  # with both on: of cutmix rather than mixup

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError("augment.crop", f"unknown crop {self.crop!r}", f"use one of {list(CROPS)}")
        for key, pair, upper in (("scale", self.scale, 1.0), ("ratio", self.ratio, None)):
            ok = len(pair) == 2 and 0 < pair[0] <= pair[1] and (upper is None or pair[1] <= upper)
            if not ok:
                where = "within (0, 1]" if upper else "of positive numbers"
                raise ConfigError(
                    f"augment.{key}",
                    f"must be a pair [low, high] {where} with low <= high, got {list(pair)}",
                    f"use e.g. augment.{key}=[{'0.08,1.0' if upper else '0.75,1.333'}]",
                )
        for key in ("hflip", "vflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            _unit(f"augment.{key}", getattr(self, key))
        for key in ("mixup_alpha", "cutmix_alpha", "color_jitter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}", f"must be >= 0, got {getattr(self, key)}", "use 0 (off)")
        if self.re_mode not in ("const", "rand", "pixel"):
            raise ConfigError("augment.re_mode", f"unknown mode {self.re_mode!r}", "use const, rand or pixel")
        if self.re_count < 1:
            raise ConfigError("augment.re_count", f"must be >= 1, got {self.re_count}", "use 1")
        if self.auto_augment is not None:
            _check_auto_augment(self.auto_augment)

    @property
    def per_image(self) -> bool:
        """Whether any piece changes a training image from epoch to epoch."""
        return (
            self.crop == "random_resized"
            or self.hflip > 0
            or self.vflip > 0
            or self.auto_augment is not None
            or self.color_jitter > 0
            or self.re_prob > 0
        )

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0

    @property
    def active(self) -> bool:
        return self.per_image or self.mixes


def _check_auto_augment(spec: str) -> None:
    """timm's policy strings, checked by their first word (timm parses the rest when it builds them)."""
    head = spec.split("-")[0]
    if head not in ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a"):
        raise ConfigError(
            "augment.auto_augment",
            f"unknown policy {spec!r}",
            "use timm's string form, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, or null",
        )
