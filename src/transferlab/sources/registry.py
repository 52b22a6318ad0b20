"""The dataset sources by config schema: ``data.load_raw`` and the input cache look them up here.

A new source is one schema (:mod:`transferlab.schemas.data`), one module here providing ``SCHEMA``
and ``SOURCE`` (a :class:`~transferlab.sources.base.Source`), one YAML file under ``conf/data/``, and
its line in the tuple below.
"""

from __future__ import annotations

from transferlab.schemas import ConfigError, DataConfig
from transferlab.sources import elpv, imagefolder, synthetic
from transferlab.sources import torchvision as torchvision_sets
from transferlab.sources.base import Source

SOURCES: dict[type[DataConfig], Source] = {
    module.SCHEMA: module.SOURCE for module in (elpv, imagefolder, torchvision_sets, synthetic)
}


def source_for(cfg: DataConfig) -> Source:
    """The source of a data config, by its exact schema (a subclass is a source of its own)."""
    try:
        return SOURCES[type(cfg)]
    except KeyError:
        raise ConfigError(
            "data",
            f"no loader for {type(cfg).__name__}",
            "choose data=elpv, imagefolder, synthetic or a torchvision set",
        ) from None
