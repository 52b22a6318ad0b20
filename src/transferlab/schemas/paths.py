"""``conf/paths/``: every folder a run reads or writes (the YAML holds them all, as interpolations)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING
