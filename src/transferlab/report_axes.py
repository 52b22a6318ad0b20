"""Which keys a report groups by: the swept axes, the hidden ones, and each mode's own recipe.

An experiment that collects several sweeps has runs that differ in keys nobody swept (a relaunch at
``trainer.epochs=6``; one sweep per mode, each with its own schedule and augmentation). Such keys
are never averaged over (:func:`hidden_axes` makes them axes). A hidden key that the mode decides
at every setting is that mode's recipe (:func:`recipe_axes`): shown, never a pairing key, so the
arms are compared at equal data and backbone, each with its own recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from mlflow.entities import Run

from transferlab.schemas import NOT_SEMANTIC
from transferlab.schemas.sweep import REPLICATES
from transferlab.sweep import NAME_ORDER

# Replicates: runs that differ only in these are averaged (and paired by them), never compared; a
# sweep may declare others (sweep.replicates, read back as Selection.replicates).
BASE = "feature_extract"  # every other mode is reported as its difference to this one
WEIGHTS, RANDOM_INIT = "backbone.weights", "null"  # the random-init control is paired against pretrained
# What the arms are compared at, never part of an arm's recipe: the data, the backbone, the device.
SETTINGS = ("data", "backbone", "trainer.device")


def axis_value(run: Run, axis: str) -> str:
    """A group's option by its ``name`` (``backbone.name``), else the param, else the choice tag."""
    params, tags = run.data.params, run.data.tags
    for key in (f"{axis}.name", axis):
        if key in params:
            return params[key]
    return tags.get(f"choice.{axis}", "?")


def _semantic_params(run: Run, replicates: Sequence[str] = REPLICATES) -> dict[str, str]:
    """The params that decide what a run computes: not where it is logged, not the derived stage.*."""
    return {
        k: v
        for k, v in run.data.params.items()
        if k not in replicates
        and not k.startswith("stage.")
        and not any(k == n or k.startswith(f"{n}.") for n in NOT_SEMANTIC)
    }


def hidden_axes(runs: list[Run], axes: list[str], replicates: Sequence[str] = REPLICATES) -> list[str]:
    """Params that differ between runs of one group: never averaged together, so they become axes.

    An experiment that collects several sweeps (a relaunch with ``trainer.epochs=6``, a sweep with
    another lr) would otherwise average two protocols into one mean ± std.
    """
    every = [_semantic_params(run, replicates) for run in runs]
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for run, params in zip(runs, every, strict=True):
        key = tuple(axis_value(run, a) for a in axes if a not in replicates)
        groups.setdefault(key, []).append(params)
    varying: list[str] = []
    for params in groups.values():
        keys = sorted(set().union(*params))
        varying += [k for k in keys if len({p.get(k, "∅") for p in params}) > 1 and k not in varying]
    # A group option that varies (mode=lp_ft and mode=partial) is one axis, not one per key: its
    # name and every key of it that the name decides (mode.lr, mode.batchnorm, ...). A key of the
    # group that varies on its own (lp_ft at mode.probe_epochs=5 and 50) stays an axis.
    collapsed: list[str] = []
    for key in varying:
        group = key.partition(".")[0]
        decided = f"{group}.name" in varying and _decided_by(every, key, f"{group}.name")
        collapsed += [a for a in ([group] if decided else [key]) if a not in collapsed]
    covered = set(axes) | {f"{a}.name" for a in axes}
    return [k for k in collapsed if k not in covered]


def _decided_by(params: list[dict[str, str]], key: str, by: str) -> bool:
    """Whether every run with one value of ``by`` has one value of ``key``."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(p.get(by, "∅"), p.get(key, "∅")) == p.get(key, "∅") for p in params)


def recipe_axes(df: pd.DataFrame, groups: list[str], extra: Sequence[str]) -> list[str]:
    """The hidden axes that are each mode's own recipe: decided by the mode at each setting.

    E.g. feature extraction trains 30 epochs without augmentation and fine-tuning 8 with it, at every
    training-set size: ``trainer.epochs`` and ``augment`` separate no runs that the mode and the
    setting (``data.*``, ``backbone.*``, ``trainer.device``) do not, so they are shown beside each
    row but never pair or split anything; the arms are compared at equal settings, each with its
    recipe. A hidden key that varies within one mode and setting (lp_ft at 3 and at 6 epochs) is
    no recipe: it stays an axis, paired by ``broadcast_base``. Swept axes are never recipe.
    """
    if "mode" not in groups:
        return []
    settings = ["mode", *(g for g in groups if any(g == s or g.startswith(f"{s}.") for s in SETTINGS))]
    candidates = [e for e in extra if e in groups and e not in settings]
    frame = df.astype({g: str for g in [*settings, *candidates]})
    return [key for key in candidates if (frame.groupby(settings)[key].nunique() <= 1).all()]


def broadcast_base(df: pd.DataFrame, axes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Where BASE ran with one value of a hidden axis, pair every other value with it.

    E.g. feature extraction ran 10 epochs, lp_ft 3 and 6: both lp_ft rows are paired with the one
    feature-extraction protocol. Returns the frame to pair and a note per broadcast axis.
    """
    notes = []
    # Never across the weights: random-init fine-tuning minus pretrained feature extraction would
    # mix two factors; the control is compared with its pretrained twin (``pretraining``) instead.
    for axis in (a for a in axes if a not in (WEIGHTS, "mode")):  # mode: hidden where one sweep ran per mode
        base_values = set(df.loc[df["mode"] == BASE, axis])
        others = set(df[axis]) - base_values
        if len(base_values) != 1 or not others:
            continue
        (value,) = base_values
        base = df[df["mode"] == BASE]
        df = pd.concat([df, *(base.assign(**{axis: v}) for v in sorted(others))], ignore_index=True)
        notes.append(f"{BASE} ran with {_shown(axis, value)} only: every other {axis} is paired with it.")
    return df, notes


def _shown(axis: str, value: object) -> str:
    """A group's option bare (``efficientnet_lite0``), any other key as ``key=value``."""
    return str(value) if axis in NAME_ORDER else f"{axis}={value}"
