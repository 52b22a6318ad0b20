"""Installed package versions: part of the reproducibility record and of every cache key.

Its own module, not ``tracking``'s, so that the caches, the engine and the GPU check import
without MLflow (a bare CUDA machine running ``gpu_check.py`` needs none of the tracker).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "hydra-core",
    "omegaconf",
    "mlflow",
    "numpy",
    "scikit-learn",
    "pillow",
    "transferlab",
)


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (and Python's): for the reproducibility record and cache keys."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
