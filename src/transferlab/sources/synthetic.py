"""``data=synthetic``: tiny generated gratings, one orientation per class, for tests and smoke runs.

Generated in memory as fast as a cache could load them, so they have no identity (never cached).
"""

from __future__ import annotations

import math

import numpy as np

from transferlab.schemas import SyntheticDataConfig
from transferlab.sources.base import RawDataset, Source

SCHEMA = SyntheticDataConfig


def synthetic_images(cfg: SyntheticDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a grating at angle k*pi/K with a random phase and noise: learnable, not trivial."""
    rng = np.random.default_rng(cfg.split_seed)
    size, k = cfg.image_size, cfg.num_classes
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels = [], []
    for label in range(k):
        angle = math.pi * label / k
        for _ in range(cfg.images_per_class):
            phase = rng.uniform(0, 2 * math.pi)
            wave = np.sin(2 * math.pi * 4 * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
            rgb = np.stack([wave, wave * 0.5, -wave], axis=-1) + rng.normal(0, 0.3, (size, size, 3))
            images.append(np.clip((rgb + 1.5) / 3 * 255, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def load(cfg: SyntheticDataConfig, data_dir: str = "", cache_dir: str | None = None) -> RawDataset:
    images, labels = synthetic_images(cfg)
    return RawDataset(
        "synthetic",
        lambda i: images[i],
        labels,
        [f"class_{c}" for c in range(cfg.num_classes)],
        f"synthetic://{cfg.num_classes}x{cfg.images_per_class}@{cfg.image_size}px",
    )


SOURCE = Source(load)
