"""A run's identity: the config hash over the keys that change what is computed.

Sweep resume (skip a FINISHED config), checkpoints (one per config) and ``transferlab.reproduce``
compare configs through this module alone.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

# Where and how a run is recorded, resumed or shown, not what it computes: the config hash (sweep
# resume, checkpoints) and `transferlab.reproduce` ignore these keys.
NOT_SEMANTIC = (
    "paths",
    "mlflow",
    "sweep",
    "resume",
    "resume_run",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.checkpoint",
)


def semantic_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config tree without :data:`NOT_SEMANTIC` keys (and Hydra's own node)."""
    tree = copy.deepcopy(tree)
    tree.pop("hydra", None)
    for dotted in NOT_SEMANTIC:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return tree


def config_hash(cfg: Any) -> str:
    """16 hex digits of sha256 over the semantic config (a typed root config) as canonical JSON."""
    text = json.dumps(semantic_config(dataclasses.asdict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
