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


# Keys added after runs were logged, at the value that means "not used": left out of the identity, so
# a config that does not use them keeps the config hash (sweep resume, checkpoints) and the
# decoded-input cache key it had before they existed.
LATER_DEFAULTS: dict[str, Any] = {
    "data.folds": None,
    "data.fold": 0,
    "data.train_per_class": None,
    "trainer.sync_batchnorm": False,
    "data.shift_cell_type": None,
    "data.shift_root": None,
    "trainer.dist_backend": "auto",
}


def drop_later_defaults(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``tree`` (a copy) without the :data:`LATER_DEFAULTS` keys that hold their default; ``prefix``:
    where ``tree`` sits in the root config (``"data."`` for a data config alone)."""
    tree = copy.deepcopy(tree)
    for dotted, default in LATER_DEFAULTS.items():
        if not dotted.startswith(prefix):
            continue
        *parents, leaf = dotted.removeprefix(prefix).split(".")
        node = tree
        for key in parents:
            node = node.get(key, {})
        if leaf in node and node[leaf] == default:
            node.pop(leaf)
    return tree


def semantic_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config tree without :data:`NOT_SEMANTIC` keys (and Hydra's own node)."""
    tree = drop_later_defaults(tree)
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
