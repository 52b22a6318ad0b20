"""Compatibility: the schemas moved to :mod:`transferlab.schemas` (one module per config group).

``from transferlab.config import TrainConfig, ConfigError, ...`` keeps working for code written
against the earlier layout; new code imports from ``transferlab.schemas``.
"""

from transferlab.schemas import *  # noqa: F403
from transferlab.schemas import __all__  # noqa: F401
