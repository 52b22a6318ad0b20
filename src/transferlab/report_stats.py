"""The report's numbers: read a sweep's runs back from MLflow, group them, aggregate over seeds, pair.

Groups the runs by the swept axes (``sweep.axes`` of the parent runs; ``seed`` is the replicate),
and computes mean ± std and n of test accuracy, balanced accuracy, macro-F1, wall time and trainable
parameters; each mode minus feature_extract per combination of the other axes, with a paired
t-test over seeds (``scipy.stats.ttest_rel``, pairs matched by seed); where the random-init control
ran (``backbone.weights=null``), pretrained minus random init, paired the same way.

Runs of one group that differ in a key nobody swept (two sweeps into one experiment, at
``trainer.epochs=3`` and ``=6``) are never averaged together: that key becomes an axis, said above the
table; where feature extraction ran with one value of it, every other value is paired with that one
(never across ``backbone.weights``: the control is paired with its pretrained twin instead). Which
keys those are, and which are each mode's own recipe: :mod:`transferlab.report_axes`.

Each config (tag ``config_hash``) counts once: its newest FINISHED run. Configs with no FINISHED run
are listed as failed, never averaged in.

Only numbers here: ``transferlab.report_render`` writes them out, ``transferlab.report`` is the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from transferlab.report_axes import (
    BASE,
    RANDOM_INIT,
    REPLICATES,
    WEIGHTS,
    axis_value,
    broadcast_base,
    recipe_axes,
)
from transferlab.report_ci import ci95, holm
from transferlab.sweep import CONFIG_HASH, ROLE

# metric -> (column header, scale, decimals)
METRICS: dict[str, tuple[str, float, int]] = {
    "best_val_accuracy": ("val acc (%)", 100.0, 2),  # what chooses (the reference row, --select)
    "test_accuracy": ("test acc (%)", 100.0, 2),
    "test_balanced_accuracy": ("bal. acc (%)", 100.0, 2),
    "test_macro_f1": ("macro-F1 (%)", 100.0, 2),
    # The same model on a shifted test set (data.shift_cell_type), beside the in-distribution columns.
    "shift_test_accuracy": ("shifted test acc (%)", 100.0, 2),
    "shift_test_balanced_accuracy": ("shifted bal. acc (%)", 100.0, 2),
    "wall_time_s": ("wall time (s)", 1.0, 1),
    # Cost from scratch, apart from the caches (see cost_columns): the loop without the frozen-feature
    # pass, the pass itself once per group (from the runs that computed it), and the two added.
    "train_time_s": ("train time (s)", 1.0, 1),
    "feature_pass_s": ("feature pass, once (s)", 1.0, 1),
    "from_scratch_s": ("from scratch (s)", 1.0, 1),
    "trainable_params": ("trainable params", 1.0, 0),
}
# Derived here from what a run logged, never read from it.
DERIVED = ("train_time_s", "feature_pass_s", "from_scratch_s")
PAIRED = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1")
SHIFTED = ("shift_test_accuracy", "shift_test_balanced_accuracy")  # shown only when some run has them
DIAL = ("partial", "lp_ft", "full_finetune")  # the order of the dial: least to most of the backbone trained


class ReportError(Exception):
    """Bad input or nothing to report: one line for the user, and the exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Selection:
    """The runs one report covers, and where its artifacts go."""

    title: str
    experiment_id: str
    axes: list[str]
    runs: list[Run]
    parent_run_id: str | None = None  # None: a report over a whole experiment
    notes: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)  # the sweep's sweep.tune (``--tune`` overrides it)
    replicates: list[str] = field(default_factory=lambda: list(REPLICATES))  # its sweep.replicates


def _role(run: Run) -> str | None:
    return run.data.tags.get(ROLE)


def _axes_of(parent: Run) -> list[str]:
    return list(json.loads(parent.data.tags.get("sweep.axes", "[]")))


def _reused_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Runs a re-launched sweep skipped (already FINISHED under an earlier parent): still its results."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent.info.run_id, "sweep_jobs.json", tmp)
        except (MlflowException, OSError):  # the sweep is still running, or was interrupted
            return []
        records = json.loads(Path(path).read_text())["jobs"]
    ids = [r["run_id"] for r in records if r["status"] == "skipped" and r.get("run_id")]
    return [client.get_run(i) for i in ids]


def select_parent(client: MlflowClient, run_id: str) -> Selection:
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        raise ReportError(
            f"--parent-run: no run {run_id!r} in this store. "
            "Fix: copy the id the sweep printed (`report: python -m transferlab.report --parent-run ...`) "
            "or use --experiment NAME"
        ) from None
    if _role(parent) != "parent":
        hint = parent.data.tags.get(MLFLOW_PARENT_RUN_ID)
        fix = f"pass its parent, --parent-run {hint}" if hint else "pass the id of a sweep's parent run"
        raise ReportError(f"--parent-run: run {run_id} is not a sweep's parent run. Fix: {fix}")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'"
    )
    runs = list(children) + _reused_runs(client, parent)
    name = parent.data.tags.get("sweep.name", parent.info.run_name or run_id)
    return Selection(
        name, parent.info.experiment_id, _axes_of(parent), runs, parent_run_id=run_id,
        tuned=_tuned_of(parent), replicates=_replicates_of(parent),
    )  # fmt: skip


def select_experiment(client: MlflowClient, name: str) -> Selection:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"--experiment: no experiment {name!r} in this store. Fix: use one of {known}")
    runs = client.search_runs([experiment.experiment_id], max_results=50000)
    parents = [r for r in runs if _role(r) == "parent"]
    axes: list[str] = []
    tuned: list[str] = []
    replicates: list[str] = []  # every sweep's (a key one sweep repeats over is never compared)
    for parent in sorted(parents, key=lambda r: r.info.start_time):
        axes += [a for a in _axes_of(parent) if a not in axes]
        tuned += [a for a in _tuned_of(parent) if a not in tuned]
        replicates += [a for a in _replicates_of(parent) if a not in replicates]
    jobs = [r for r in runs if _role(r) not in ("parent", "report")]
    return Selection(
        name, experiment.experiment_id, axes, jobs, tuned=tuned, replicates=replicates or list(REPLICATES)
    )


def _replicates_of(parent: Run) -> list[str]:
    """The keys the sweep declared as replicates (``sweep.replicates``; sweeps logged before it
    existed: the default ones)."""
    return list(json.loads(parent.data.tags.get("sweep.replicates", "null")) or REPLICATES)


def _tuned_of(parent: Run) -> list[str]:
    """The keys the sweep declared as tuned (``sweep.tune``): chosen on validation by ``--select``."""
    return list(json.loads(parent.data.tags.get("sweep.tune", "[]")))


def dedupe(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """Per config hash, the newest FINISHED run; configs without one are the failures."""
    by_config: dict[str, list[Run]] = {}
    for run in runs:
        by_config.setdefault(run.data.tags.get(CONFIG_HASH) or run.info.run_id, []).append(run)
    finished, failed = [], []
    for group in by_config.values():
        group.sort(key=lambda r: r.info.start_time, reverse=True)
        done = [r for r in group if r.info.status == "FINISHED"]
        (finished if done else failed).append(done[0] if done else group[0])
    return finished, failed


def runs_frame(
    runs: list[Run], axes: list[str], extra: Sequence[str] = (), replicates: Sequence[str] = REPLICATES
) -> pd.DataFrame:
    """One row per run: its axes, seed, status and metrics (``extra``: more logged metrics, e.g. the
    ``--select`` metric), and its ``replicate``: the values of the swept ``replicates``."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name}
        row |= {a: axis_value(run, a) for a in axes if a != "seed"}
        row["seed"] = int(run.data.params.get("seed", -1))
        # What pairs two arms' runs: the same seed, split seed and fold (those of them that were swept).
        row["replicate"] = ",".join(
            [f"seed={row['seed']}", *(f"{a}={row[a]}" for a in replicates if a != "seed" and a in axes)]
        )
        row["status"] = run.info.status
        row |= {m: run.data.metrics.get(m, math.nan) for m in METRICS if m not in DERIVED}
        row |= cost_columns(run.data.metrics)
        row |= {m: run.data.metrics.get(m, math.nan) for m in extra if m not in row}
        row["error"] = run.data.tags.get("error", "")
        rows.append(row)
    return pd.DataFrame(rows)


def cost_columns(metrics: dict[str, float]) -> dict[str, float]:
    """A run's cost apart from the frozen-feature pass, and that pass where this run paid for it.

    A feature-extraction run's wall time depends on who filled the feature cache: the first run of a
    sweep pays the backbone pass, the others load its result in a second (``wall_time_s`` 55.5 ± 92.6 s
    over three seeds). ``train_time_s`` is the run without the pass (or its loading);
    ``feature_pass_s`` the pass, from a run that computed it (a cache miss, or the cache off), 0 for
    a run without a frozen-feature pass, and unknown (NaN) for a run that read it from the cache.
    """
    wall = metrics.get("wall_time_s", math.nan)
    extract = metrics.get("feature_extract_s", 0.0)
    hit = metrics.get("feature_cache_hit")  # absent: no on-disk feature cache was used
    paid = extract if extract > 0 and hit != 1.0 else (0.0 if extract == 0 else math.nan)
    return {"train_time_s": wall - extract, "feature_pass_s": paid}


def summary(df: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """mean, std (over seeds, ddof=1) and n per group and metric, as numbers.

    ``from_scratch_s``: a group's mean train time plus its feature pass once (the pass is shared by
    the seeds of a group, which differ only in the head's training); its std is the train time's.
    """
    keys = groups or ["_all"]  # nothing swept but seeds: one group
    measured = [m for m in METRICS if m != "from_scratch_s"]
    stats = df.assign(_all="all").groupby(keys, sort=True)[measured].agg(["mean", "std", "count"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats = stats.reset_index().drop(columns=[c for c in ("_all",) if c in keys])
    stats.insert(len(groups), "n", stats[f"{next(iter(METRICS))}_count"].astype(int))
    stats["from_scratch_s_mean"] = stats["train_time_s_mean"] + stats["feature_pass_s_mean"]
    stats["from_scratch_s_std"] = stats["train_time_s_std"]
    # t-based 95 % confidence intervals of the means over replicates (transferlab.report_select.ci95).
    for metric in (m for m in METRICS if m in PAIRED or m == "best_val_accuracy"):
        cis = df.assign(_all="all").groupby(keys, sort=True)[metric].apply(lambda v: ci95(v.tolist()))
        stats[f"{metric}_ci95_low"] = [c[0] for c in cis]
        stats[f"{metric}_ci95_high"] = [c[1] for c in cis]
    return stats.drop(columns=[c for c in stats.columns if c.endswith("_count")])


def _paired_stats(part: pd.DataFrame, axis: str, treated: str, base: str) -> dict[str, Any]:
    """``treated`` - ``base`` along ``axis`` within ``part``, matched by seed (``ttest_rel``), with the
    t-based 95 % CI of the mean difference."""
    from scipy.stats import ttest_rel

    row: dict[str, Any] = {"n_pairs": 0}
    if treated != base and {treated, base} <= set(part[axis]):
        # dropna=False: a metric one side never logged stays a NaN column (its pairs drop), not a KeyError.
        wide = part.pivot_table(
            index="replicate" if "replicate" in part.columns else "seed",  # a frame of seeds alone
            columns=axis,
            values=list(PAIRED),
            aggfunc="first",
            dropna=False,
        )
        # Only this pair's columns: a seed another value lacks must not drop this pair.
        pairs = wide[[(m, x) for m in PAIRED for x in (treated, base)]].dropna()
        row["n_pairs"] = len(pairs)
    for metric in PAIRED:
        if row["n_pairs"] == 0:
            row |= {f"{metric}_diff_mean": math.nan, f"{metric}_diff_std": math.nan}
            row |= {f"{metric}_diff_ci95_low": math.nan, f"{metric}_diff_ci95_high": math.nan}
            row |= {f"{metric}_t": math.nan, f"{metric}_p": math.nan}
            continue
        treated_v, base_v = pairs[(metric, treated)].to_numpy(), pairs[(metric, base)].to_numpy()
        diff = treated_v - base_v
        row[f"{metric}_diff_mean"] = float(diff.mean())
        row[f"{metric}_diff_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
        row[f"{metric}_diff_ci95_low"], row[f"{metric}_diff_ci95_high"] = ci95(diff.tolist())
        with warnings.catch_warnings():  # n < 2 or identical differences: no test, NaN
            warnings.simplefilter("ignore")
            test = ttest_rel(treated_v, base_v) if len(diff) > 1 else None
        row[f"{metric}_t"] = float(test.statistic) if test is not None else math.nan
        row[f"{metric}_p"] = float(test.pvalue) if test is not None else math.nan
    return row


def _by_other_axes(df: pd.DataFrame, others: list[str]):  # noqa: ANN202 - (key tuple, frame) pairs
    for key, part in df.groupby(others, sort=True) if others else [((), df)]:
        yield (key if isinstance(key, tuple) else (key,)), part


def paired(df: pd.DataFrame, groups: list[str]) -> pd.DataFrame | None:
    """Each mode - BASE per combination of the other axes, paired by seed (``ttest_rel``).

    One row per (other axes, mode) where that mode ran; ``n_pairs`` = 0 where BASE did not.
    """
    if "mode" not in groups or BASE not in set(df["mode"]):
        return None
    present = set(df["mode"]) - {BASE}
    treated_modes = [m for m in DIAL if m in present] + sorted(present - set(DIAL))
    if not treated_modes:
        return None
    others = [g for g in groups if g != "mode"]
    rows = []
    for key, part in _by_other_axes(df, others):
        for treated in (m for m in treated_modes if m in set(part["mode"])):
            row: dict[str, Any] = dict(zip(others, key, strict=True)) | {"mode": treated}
            rows.append(row | _paired_stats(part, "mode", treated, BASE))
    return with_holm(pd.DataFrame(rows))


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """``<metric>_p_holm``: Holm–Bonferroni over the table's rows, one family per metric (raw p kept)."""
    for metric in PAIRED:
        table[f"{metric}_p_holm"] = holm(table[f"{metric}_p"].tolist())
    return table


def pretraining(df: pd.DataFrame, groups: list[str]) -> pd.DataFrame | None:
    """Pretrained - random init (``backbone.weights=null``, the control) per combination of the other
    axes where both ran, paired by seed: what the pretrained weights are worth, mode by mode.

    A control with no pretrained twin is one row with ``backbone.weights=null`` and ``n_pairs`` = 0.
    """
    if WEIGHTS not in groups or RANDOM_INIT not in set(df[WEIGHTS]):
        return None
    others = [g for g in groups if g != WEIGHTS]
    rows = []
    for key, part in _by_other_axes(df, others):
        if RANDOM_INIT not in set(part[WEIGHTS]):
            continue
        # No pretrained twin: the control's own row, with no pairs (the report names it).
        for weights in sorted(set(part[WEIGHTS]) - {RANDOM_INIT}) or [RANDOM_INIT]:
            row: dict[str, Any] = dict(zip(others, key, strict=True)) | {WEIGHTS: weights}
            rows.append(row | _paired_stats(part, WEIGHTS, weights, RANDOM_INIT))
    return with_holm(pd.DataFrame(rows)) if rows else None


@dataclass(frozen=True)
class Reference:
    """A published test accuracy to set the table beside, e.g. Deitsch et al. 2019's 88.42 %."""

    label: str
    value: float  # a fraction, like the logged metrics

    @classmethod
    def parse(cls, text: str) -> Reference:
        label, _, value = text.rpartition("=")
        try:
            percent = float(value)
        except ValueError:
            percent = math.nan
        if not label.strip() or not 0 <= percent <= 100:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not LABEL=PERCENT; e.g. --reference 'VGG-19, Deitsch et al. 2019=88.42'"
            )
        return cls(label.strip(), percent / 100)


@dataclass
class Analysis:
    """Every table of one report, as numbers (``analyse``); ``report_render`` writes them out."""

    groups: list[str]  # the axes but the seed: what one row of the summary is
    extra: list[str]  # the hidden axes: not swept, but differ between runs of one group
    runs: pd.DataFrame  # the FINISHED runs, one row each (``runs_frame``)
    failed: pd.DataFrame  # the configs without a FINISHED run: listed, never averaged in
    stats: pd.DataFrame  # ``summary``
    diffs: pd.DataFrame | None  # ``paired``: each mode - BASE
    gains: pd.DataFrame | None  # ``pretraining``: pretrained - random init
    pair_notes: list[str]  # one sentence per hidden axis ``broadcast_base`` paired with BASE's one value
    # --select: one row per arm, its tuned values chosen on validation (report_select.select), and the
    # tuned axes; None / [] for a report of every configuration.
    selection: pd.DataFrame | None = None
    tuned: list[str] = field(default_factory=list)
    # Hidden axes that each mode's recipe decides at every setting (``recipe_axes``): columns of
    # ``stats`` beside the groups, never a grouping or pairing key.
    recipe: list[str] = field(default_factory=list)
    replicates: list[str] = field(default_factory=lambda: list(REPLICATES))  # averaged over, paired by


def analyse(
    df: pd.DataFrame,
    failed: pd.DataFrame,
    axes: list[str],
    extra: list[str],
    replicates: Sequence[str] = REPLICATES,
) -> Analysis:
    """The summary and the paired tables of the FINISHED runs ``df`` (``runs_frame``) over ``axes``."""
    groups = [a for a in axes if a not in replicates]
    recipe = recipe_axes(df, groups, extra)
    groups = [g for g in groups if g not in recipe]
    stats = summary(df, groups)
    if recipe:  # one value per group (recipe_axes), shown after the group's axes
        stats = stats.merge(df.groupby(groups, sort=True)[recipe].first().reset_index(), on=groups)
        stats = stats[[*groups, *recipe, *(c for c in stats.columns if c not in (*groups, *recipe))]]
    hidden = [e for e in extra if e not in recipe]
    pairable, pair_notes = broadcast_base(df, hidden) if "mode" in groups else (df, [])
    diffs = paired(pairable, groups)
    gains = pretraining(df, groups)
    return Analysis(
        groups,
        hidden,
        df,
        failed,
        stats,
        diffs,
        gains,
        pair_notes,
        recipe=recipe,
        replicates=list(replicates),
    )
