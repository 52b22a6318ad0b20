"""The dataset sources by config schema: ``data.load_raw`` and the input cache look them up here.

A new source is one schema in :mod:`transferlab.schemas.data` (with its ``DATA_SCHEMAS`` entry, which
names it in Hydra's ConfigStore), one module in this package providing ``SCHEMA`` and ``SOURCE`` (a
:class:`~transferlab.sources.base.Source`), its line in the tuple below, and one YAML file under
``conf/data/`` (tests/test_data.py checks that every schema has a source).
"""

from __future__ import annotations

from transferlab.schemas import ConfigError, DataConfig
from transferlab.sources import elpv, hf, imagefolder, synthetic
from transferlab.sources import torchvision as torchvision_sets
from transferlab.sources.base import Source

SOURCES: dict[type[DataConfig], Source] = {
    module.SCHEMA: module.SOURCE for module in (elpv, imagefolder, torchvision_sets, synthetic, hf)
}


def source_for(cfg: DataConfig) -> Source:
    """The source of a data config: its schema's, or the nearest registered base schema's."""
    for schema in type(cfg).__mro__:
        if schema in SOURCES:
            return SOURCES[schema]
    raise ConfigError(
        "data",
        f"no loader for {type(cfg).__name__}",
        "choose data=elpv, imagefolder, hf, synthetic or a torchvision set",
    )
