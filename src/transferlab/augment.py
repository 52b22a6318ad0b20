"""Train-time augmentation: timm's transforms on each stored image, seeded per image; timm's Mixup.

The stored image is the weights' eval resize, uncropped (:mod:`transferlab.data`). A training image
goes through timm's ImageNet train pipeline (``transforms_imagenet_train``: RandomResizedCrop to the
input size, flips, RandAugment / AutoAugment, colour jitter, ToTensor, Normalize with the weights'
mean and std, RandomErasing), or with ``augment.crop=center`` the eval crop in place of the random
one. Each image is transformed under a seed of its own, drawn with the epoch's data order: what an
image becomes depends on (seed, epoch, its place in the epoch) only, not on the worker that ran it
nor on whether the epoch was resumed. Validation and test never pass through here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, auto_augment
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision import transforms

from transferlab.backbones import Preprocess
from transferlab.schemas import AugmentConfig, ConfigError

Transform = Callable[[Image.Image], torch.Tensor]


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: object) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning a black image, as it did before Pillow 12.

    RandAugment's ``inc1`` policies map magnitude 10 (m9 + magnitude noise reaches it) to 0 bits;
    Pillow >= 12 refuses 0 (``bits must be between or equal to 1 and 8``) and the run would crash
    in a DataLoader worker mid-epoch. timm 1.0.31 passes it through unchanged.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


# timm looks its ops up in this table when it builds a policy: every posterize variant goes through the above.
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def build_train_transform(cfg: AugmentConfig, pre: Preprocess) -> Transform:
    """The per-image training transform of ``cfg`` for a backbone whose eval transform is ``pre``.

    Raises :class:`ConfigError` for a policy string timm cannot parse, so it is called before a run starts.
    """
    try:  # only the policy string is parsed here: the other keys were checked by the schema
        primary, secondary, final = transforms_imagenet_train(
            img_size=pre.crop,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            color_jitter=cfg.color_jitter or None,
            auto_augment=cfg.auto_augment,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
            re_prob=cfg.re_prob,
            re_mode=cfg.re_mode,
            re_count=cfg.re_count,
            separate=True,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(
            "augment.auto_augment",
            f"timm cannot build {cfg.auto_augment!r} ({type(exc).__name__}: {exc})",
            "use timm's string form, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or v0",
        ) from None
    if cfg.crop == "center":  # the eval crop (the same pixels validation sees), then the flips
        flips = [transforms.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []
        flips += [transforms.RandomVerticalFlip(cfg.vflip)] if cfg.vflip > 0 else []
        primary = transforms.Compose([transforms.CenterCrop(pre.crop), *flips])
    return transforms.Compose([primary, secondary, final])


def check_policy(cfg: AugmentConfig) -> None:
    """Bad input before anything is loaded: build the pipeline for a stand-in input size (the policy
    string is all that can fail, and it does not depend on the backbone)."""
    if cfg.per_image:
        build_train_transform(cfg, Preprocess(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy and torch's global generators seeded for a block, and put back after it.

    timm's transforms and Mixup draw from the global generators; the run's own streams (dropout,
    the data order) must not see them.
    """
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # The CPU generator only (torch.manual_seed would reseed the GPU's too, which dropout draws
        # from there and fork_rng(devices=[]) would not put back).
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A stored (C, H, W) uint8 image as RGB (grey replicated, as the eval path does)."""
    array = image.numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


class AugmentedImages(torch.utils.data.Dataset):
    """Training images by (index, seed): the stored image through ``transform`` under its seed."""

    def __init__(self, images: torch.Tensor, transform: Transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        with seeded(seed):
            return self.transform(to_pil(self.images[index]))


def build_mixup(cfg: AugmentConfig, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix (batch mode) with the run's label smoothing in its soft targets."""
    if not cfg.mixes:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
