"""The ablation report: read a sweep back from MLflow, aggregate over seeds, test fine-tune vs frozen.

python -m transferlab.report --experiment elpv_fe_vs_ft     # every run of the experiment (all its sweeps)
python -m transferlab.report --parent-run RUN_ID            # one sweep (its MLflow parent run)

Groups the runs by the swept axes (``sweep.axes`` of the parent runs; ``seed`` is the replicate),
and writes mean ± std and n of test accuracy, balanced accuracy, macro-F1, wall time and trainable
parameters; each mode minus feature_extract per combination of the other axes, with a paired
t-test over seeds (``scipy.stats.ttest_rel``, pairs matched by seed); where the random-init control
ran (``backbone.weights=null``), pretrained minus random init, paired the same way. Groups with nothing
to pair with are named once, not printed as rows of dashes. Markdown (printed), LaTeX and
CSV, and PNG plots, in ``--out`` and as artifacts under ``report/``: of the parent run for
``--parent-run``; of a new run named ``report`` (tag ``sweep.role=report``) for ``--experiment``,
since an experiment can hold several sweeps (a widened sweep is a second parent).

Runs of one group that differ in a key nobody swept (two sweeps into one experiment, at
``trainer.epochs=3`` and ``=6``) are never averaged together: that key becomes an axis, said above the
table; where feature extraction ran with one value of it, every other value is paired with that one
(never across ``backbone.weights``: the control is paired with its pretrained twin instead).

Each config (tag ``config_hash``) counts once: its newest FINISHED run. Configs with no FINISHED run
are listed as failed, never averaged in. Bad input exits 2 with one line naming the fix; a sweep
with no FINISHED job exits 1 after listing its failures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from transferlab.config import NOT_SEMANTIC, repo_root
from transferlab.sweep import CONFIG_HASH, NAME_ORDER, ROLE

# metric -> (column header, scale, decimals)
METRICS: dict[str, tuple[str, float, int]] = {
    "test_accuracy": ("test acc (%)", 100.0, 2),
    "test_balanced_accuracy": ("bal. acc (%)", 100.0, 2),
    "test_macro_f1": ("macro-F1 (%)", 100.0, 2),
    "wall_time_s": ("wall time (s)", 1.0, 1),
    "trainable_params": ("trainable params", 1.0, 0),
}
PAIRED = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1")
BASE = "feature_extract"  # every other mode is reported as its difference to this one
DIAL = ("partial", "lp_ft", "full_finetune")  # the order of the dial: least to most of the backbone trained
WEIGHTS, RANDOM_INIT = "backbone.weights", "null"  # the random-init control is paired against pretrained


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


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root()}/mlflow.db"


def _check_store(uri: str) -> None:
    """A missing SQLite file would be created empty by MLflow: say so instead."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(
            f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}. "
            "Fix: run a sweep first, or pass --tracking-uri sqlite:////path/to/mlflow.db"
        )


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
    return Selection(name, parent.info.experiment_id, _axes_of(parent), runs, parent_run_id=run_id)


def select_experiment(client: MlflowClient, name: str) -> Selection:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"--experiment: no experiment {name!r} in this store. Fix: use one of {known}")
    runs = client.search_runs([experiment.experiment_id], max_results=50000)
    parents = [r for r in runs if _role(r) == "parent"]
    axes: list[str] = []
    for parent in sorted(parents, key=lambda r: r.info.start_time):
        axes += [a for a in _axes_of(parent) if a not in axes]
    jobs = [r for r in runs if _role(r) not in ("parent", "report")]
    return Selection(name, experiment.experiment_id, axes, jobs)


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


def axis_value(run: Run, axis: str) -> str:
    """A group's option by its ``name`` (``backbone.name``), else the param, else the choice tag."""
    params, tags = run.data.params, run.data.tags
    for key in (f"{axis}.name", axis):
        if key in params:
            return params[key]
    return tags.get(f"choice.{axis}", "?")


def _semantic_params(run: Run) -> dict[str, str]:
    """The params that decide what a run computes: not where it is logged, not the derived stage.*."""
    return {
        k: v
        for k, v in run.data.params.items()
        if k != "seed"
        and not k.startswith("stage.")
        and not any(k == n or k.startswith(f"{n}.") for n in NOT_SEMANTIC)
    }


def hidden_axes(runs: list[Run], axes: list[str]) -> list[str]:
    """Params that differ between runs of one group: never averaged together, so they become axes.

    An experiment that collects several sweeps (a relaunch with ``trainer.epochs=6``, a sweep with
    another lr) would otherwise average two protocols into one mean ± std.
    """
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for run in runs:
        key = tuple(axis_value(run, a) for a in axes if a != "seed")
        groups.setdefault(key, []).append(_semantic_params(run))
    varying: list[str] = []
    for params in groups.values():
        keys = sorted(set().union(*params))
        varying += [k for k in keys if len({p.get(k, "∅") for p in params}) > 1 and k not in varying]
    # A group option that varies (mode=lp_ft and mode=partial) is one axis, not one per key.
    covered = set(axes) | {f"{a}.name" for a in axes}
    return [k for k in varying if k not in covered]


def broadcast_base(df: pd.DataFrame, axes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Where BASE ran with one value of a hidden axis, pair every other value with it.

    E.g. feature extraction ran 10 epochs, lp_ft 3 and 6: both lp_ft rows are paired with the one
    feature-extraction protocol. Returns the frame to pair and a note per broadcast axis.
    """
    notes = []
    # Never across the weights: random-init fine-tuning minus pretrained feature extraction would
    # mix two factors; the control is compared with its pretrained twin (``pretraining``) instead.
    for axis in (a for a in axes if a != WEIGHTS):
        base_values = set(df.loc[df["mode"] == BASE, axis])
        others = set(df[axis]) - base_values
        if len(base_values) != 1 or not others:
            continue
        (value,) = base_values
        base = df[df["mode"] == BASE]
        df = pd.concat([df, *(base.assign(**{axis: v}) for v in sorted(others))], ignore_index=True)
        notes.append(f"{BASE} ran with {_shown(axis, value)} only: every other {axis} is paired with it.")
    return df, notes


def runs_frame(runs: list[Run], axes: list[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name}
        row |= {a: axis_value(run, a) for a in axes if a != "seed"}
        row["seed"] = int(run.data.params.get("seed", -1))
        row["status"] = run.info.status
        row |= {m: run.data.metrics.get(m, math.nan) for m in METRICS}
        row["error"] = run.data.tags.get("error", "")
        rows.append(row)
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """mean, std (over seeds, ddof=1) and n per group and metric, as numbers."""
    keys = groups or ["_all"]  # nothing swept but seeds: one group
    stats = df.assign(_all="all").groupby(keys, sort=True)[list(METRICS)].agg(["mean", "std", "count"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats = stats.reset_index().drop(columns=[c for c in ("_all",) if c in keys])
    stats.insert(len(groups), "n", stats[f"{next(iter(METRICS))}_count"].astype(int))
    return stats.drop(columns=[c for c in stats.columns if c.endswith("_count")])


def _paired_stats(part: pd.DataFrame, axis: str, treated: str, base: str) -> dict[str, Any]:
    """``treated`` - ``base`` along ``axis`` within ``part``, matched by seed (``ttest_rel``)."""
    from scipy.stats import ttest_rel

    row: dict[str, Any] = {"n_pairs": 0}
    if treated != base and {treated, base} <= set(part[axis]):
        # dropna=False: a metric one side never logged stays a NaN column (its pairs drop), not a KeyError.
        wide = part.pivot_table(
            index="seed", columns=axis, values=list(PAIRED), aggfunc="first", dropna=False
        )
        # Only this pair's columns: a seed another value lacks must not drop this pair.
        pairs = wide[[(m, x) for m in PAIRED for x in (treated, base)]].dropna()
        row["n_pairs"] = len(pairs)
    for metric in PAIRED:
        if row["n_pairs"] == 0:
            row |= {f"{metric}_diff_mean": math.nan, f"{metric}_diff_std": math.nan}
            row |= {f"{metric}_t": math.nan, f"{metric}_p": math.nan}
            continue
        treated_v, base_v = pairs[(metric, treated)].to_numpy(), pairs[(metric, base)].to_numpy()
        diff = treated_v - base_v
        row[f"{metric}_diff_mean"] = float(diff.mean())
        row[f"{metric}_diff_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
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
    return pd.DataFrame(rows)


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
    return pd.DataFrame(rows) if rows else None


def _cell(mean: float, std: float, metric: str, pm: str) -> str:
    _, scale, decimals = METRICS[metric]
    if math.isnan(mean):
        return "–"
    if metric == "trainable_params":
        text = f"{mean:,.0f}"
        return text if math.isnan(std) or std == 0 else f"{text} {pm} {std:,.0f}"
    text = f"{mean * scale:.{decimals}f}"
    return text if math.isnan(std) else f"{text} {pm} {std * scale:.{decimals}f}"


def _num(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else format(value, fmt)


def display_tables(stats: pd.DataFrame, groups: list[str], pm: str) -> pd.DataFrame:
    """The summary table as strings, ``pm`` being ``±`` (Markdown) or ``$\\pm$`` (LaTeX)."""
    table = stats[groups + ["n"]].copy()
    for metric, (header, _, _) in METRICS.items():
        table[header] = [
            _cell(m, s, metric, pm)
            for m, s in zip(stats[f"{metric}_mean"], stats[f"{metric}_std"], strict=True)
        ]
    return table


def display_diffs(diffs: pd.DataFrame, groups: list[str], axis: str, header: str, pm: str) -> pd.DataFrame:
    """A paired table (``paired`` or ``pretraining``) as strings, ``axis`` shown as ``header``."""
    others = [g for g in groups if g != axis]
    table = diffs[others + [axis, "n_pairs"]].rename(columns={axis: header})
    for metric in PAIRED:
        short = METRICS[metric][0].split(" (")[0]
        table[f"Δ {short} (pp)"] = [
            "–" if math.isnan(m) else _cell(m, s, metric, pm)
            for m, s in zip(diffs[f"{metric}_diff_mean"], diffs[f"{metric}_diff_std"], strict=True)
        ]
        table[f"p ({short})"] = [_num(p, ".3g") for p in diffs[f"{metric}_p"]]
    return table


def markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


_LATEX_SPECIAL = re.compile(r"([_%&#{}])")


def _tex_text(text: str) -> str:
    # U+2212 and the middle dot are not in pdflatex's default input encoding.
    return _LATEX_SPECIAL.sub(r"\\\1", text).replace("−", "$-$").replace("·", r"$\cdot$")


def latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs table; cells already carry ``$\\pm$``, so only names are escaped."""
    escaped = df.copy()
    escaped.columns = [_tex_text(str(c)).replace("Δ", r"$\Delta$") for c in df.columns]
    for col in escaped.columns:
        escaped[col] = [_tex_text(str(v)).replace("–", "--") for v in escaped[col]]
    caption = _tex_text(caption).replace("±", r"$\pm$")
    return escaped.to_latex(index=False, escape=False, caption=caption, column_format="l" * len(df.columns))


def _shown(axis: str, value: object) -> str:
    """A group's option bare (``efficientnet_lite0``), any other key as ``key=value``."""
    return str(value) if axis in NAME_ORDER else f"{axis}={value}"


def _label(row: pd.Series, axes: list[str]) -> str:
    return " · ".join(_shown(a, row[a]) for a in axes) or "all"


def plot_bars(
    stats: pd.DataFrame, groups: list[str], metric: str, path: Path, references: Sequence[Reference] = ()
) -> None:
    """Mean ± std per group: categories = the non-mode axes, one bar per mode; references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, scale, _ = METRICS[metric]
    others = [g for g in groups if g != "mode"]
    modes = list(dict.fromkeys(stats["mode"])) if "mode" in groups else [None]
    cats = list(dict.fromkeys(_label(r, others) for _, r in stats.iterrows()))
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(cats) + 2) + (2.5 if references else 0), 4))
    for i, mode in enumerate(modes):
        part = stats if mode is None else stats[stats["mode"] == mode]
        where = {_label(r, others): r for _, r in part.iterrows()}
        means = [where[c][f"{metric}_mean"] * scale if c in where else np.nan for c in cats]
        stds = [np.nan_to_num(where[c][f"{metric}_std"] * scale) if c in where else 0 for c in cats]
        xs = np.arange(len(cats)) + (i - (len(modes) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=mode or metric)
    for ref, style in zip(references, ("--", ":", "-.", (0, (5, 1))), strict=False):
        ax.axhline(
            ref.value * scale,
            color="0.3",
            linestyle=style,
            linewidth=1,
            label=f"{ref.label}: {ref.value:.2%}",
        )
    # One axis per line: long labels (backbone · weights · epochs) stay under their own bars.
    ax.set_xticks(np.arange(len(cats)), [c.replace(" · ", "\n") for c in cats], fontsize="small")
    ax.set_ylabel(header)
    ax.set_title(f"{header}: mean ± std over seeds")
    if scale == 100.0:  # percentages: zoom to the bars (differences of a point are what matters)
        lows = [
            (r[f"{metric}_mean"] - np.nan_to_num(r[f"{metric}_std"])) * scale for _, r in stats.iterrows()
        ]
        floor = max(0.0, math.floor(min(lows + [r.value * scale for r in references]) / 5) * 5 - 5)
        ax.set_ylim(bottom=floor)
        ax.set_ylabel(f"{header}, axis from {floor:g}")
    if modes != [None] or references:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(client: MlflowClient, df: pd.DataFrame, groups: list[str], path: Path) -> None:
    """Validation accuracy per epoch, one panel per mode, mean ± std over seeds per other group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    others = [g for g in groups if g != "mode"]
    modes = sorted(set(df["mode"])) if "mode" in groups else ["all"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        part = df if mode == "all" else df[df["mode"] == mode]
        for label, runs in part.groupby(others, sort=False) if others else [("all", part)]:
            curves = []
            for run_id in runs["run_id"]:
                history = client.get_metric_history(run_id, "val_accuracy")
                curves.append(pd.Series({m.step: m.value for m in history}, dtype=float))
            if not curves:
                continue
            table = pd.concat(curves, axis=1).sort_index() * 100
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
            values = label if isinstance(label, tuple) else (label,)
            name = " · ".join(_shown(a, v) for a, v in zip(others, values, strict=False)) or "all"
            ax.plot(mean.index + 1, mean, marker="o", label=f"{name} (n={table.shape[1]})")
            ax.fill_between(mean.index + 1, mean - std, mean + std, alpha=0.2)
        ax.set_title(mode)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build(client: MlflowClient, selection: Selection, out: Path, references: Sequence[Reference] = ()) -> str:
    """Write every table and plot into ``out``; return the Markdown report."""
    finished, failed = dedupe(selection.runs)
    extra = hidden_axes(finished, selection.axes)
    axes = [*selection.axes, *extra]
    groups = [a for a in axes if a != "seed"]
    failed_df = runs_frame(failed, axes)
    failures = ""
    if failed:
        listing = failed_df[["run_name", "status", "error"]].copy()
        listing["error"] = [e.replace("|", "/").replace("\n", " ")[:200] for e in listing["error"]]
        failures = (
            f"\n\n## Not averaged in: {len(failed)} run(s) without a FINISHED result\n\n{markdown(listing)}"
        )
    if not finished:
        raise ReportError(
            f"{selection.title}: none of its {len(selection.runs)} run(s) FINISHED, nothing to average."
            f"{failures}\n\nFix: read the errors above, fix them, and re-launch the sweep "
            "(it reruns only what did not finish)",
            code=1,
        )
    df = runs_frame(finished, axes)
    stats = summary(df, groups)
    pairable, pair_notes = broadcast_base(df, extra) if "mode" in groups else (df, [])
    diffs = paired(pairable, groups)
    gains = pretraining(df, groups)
    table, tex_table = display_tables(stats, groups, "±"), display_tables(stats, groups, r"$\pm$")

    out.mkdir(parents=True, exist_ok=True)
    pd.concat([df, failed_df]).to_csv(out / "runs.csv", index=False)
    stats.to_csv(out / "summary.csv", index=False)
    tex = [latex(tex_table, f"{selection.title}: mean ± std over seeds (n runs).")]
    grouped = f"{len(finished)} FINISHED run(s) grouped by {', '.join(groups) or '(nothing swept)'}"
    if extra:
        grouped += f" ({', '.join(extra)}: not swept, but differ between runs of one group)"
    parts = [f"# {selection.title}", f"{grouped}; mean ± std (sample std over seeds) and n.", markdown(table)]
    how = (
        "Mean ± std of the per-seed differences in percentage points; p: two-sided paired t-test "
        "(`scipy.stats.ttest_rel`), – where fewer than two pairs."
    )
    if diffs is not None:
        diffs.to_csv(out / "paired.csv", index=False)
        # A group with no feature_extract twin (the random-init control: a frozen random backbone is
        # not run) is named once rather than printed as a row of dashes.
        shown, note = _split_unpaired(diffs, groups, f"No {BASE} run (with a seed in common) to pair with")
        note = "".join(f" {n}" for n in pair_notes) + note
        header = f"mode − {BASE}"
        parts += [f"## Each mode − {BASE}, paired by seed", how + note]
        if len(shown):
            parts.append(markdown(display_diffs(shown, groups, "mode", header, "±")))
            caption = f"Each mode minus {BASE}, paired by seed (ttest_rel).{note}"
            tex.append(latex(display_diffs(shown, groups, "mode", header, r"$\pm$"), caption))
    if gains is not None:
        gains.to_csv(out / "pretraining.csv", index=False)
        shown, note = _split_unpaired(gains, groups, "No pretrained twin (with a seed in common) for")
        header = f"{WEIGHTS} − {RANDOM_INIT}"
        parts += [
            f"## Pretrained − random init ({WEIGHTS}={RANDOM_INIT}), paired by seed",
            how + " The same config but for the weights: what pretraining is worth." + note,
        ]
        if len(shown):
            parts.append(markdown(display_diffs(shown, groups, WEIGHTS, header, "±")))
            caption = (
                f"Pretrained minus random initialisation ({WEIGHTS}={RANDOM_INIT}), paired by seed.{note}"
            )
            tex.append(latex(display_diffs(shown, groups, WEIGHTS, header, r"$\pm$"), caption))
    if references:
        parts += ["## Published references (test accuracy)", markdown(compare(stats, groups, references))]
    text = "\n\n".join(parts) + failures + "\n"
    (out / "report.md").write_text(text)
    (out / "report.tex").write_text("\n\n".join(tex))
    plot_bars(stats, groups, "test_accuracy", out / "test_accuracy.png", references)
    plot_bars(stats, groups, "wall_time_s", out / "wall_time.png")
    plot_curves(client, df, groups, out / "val_curves.png")
    return text


def _split_unpaired(diffs: pd.DataFrame, groups: list[str], text: str) -> tuple[pd.DataFrame, str]:
    """The rows with pairs, and one sentence naming the groups without any."""
    unpaired = [_label(row, groups) for _, row in diffs[diffs["n_pairs"] == 0].iterrows()]
    return diffs[diffs["n_pairs"] > 0], f" {text}: {'; '.join(unpaired)}." if unpaired else ""


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


def compare(stats: pd.DataFrame, groups: list[str], references: Sequence[Reference]) -> pd.DataFrame:
    """Each reference against the group with the best mean test accuracy here."""
    best = stats.loc[stats["test_accuracy_mean"].idxmax()]
    mean, std = best["test_accuracy_mean"], best["test_accuracy_std"]
    return pd.DataFrame(
        {
            "reference": ref.label,
            "test acc (%)": f"{ref.value * 100:.2f}",
            "best group here": _label(best, groups),
            "its test acc (%)": _cell(mean, std, "test_accuracy", "±") + f" (n={int(best['n'])})",
            "difference (pp)": f"{(mean - ref.value) * 100:+.2f}",
        }
        for ref in references
    )


def publish(client: MlflowClient, selection: Selection, out: Path) -> str:
    """Log ``out`` under ``report/``: to the parent run, or to a new ``report`` run of the experiment."""
    if selection.parent_run_id is not None:
        client.log_artifacts(selection.parent_run_id, str(out), "report")
        return selection.parent_run_id
    run = client.create_run(
        selection.experiment_id,
        run_name="report",
        tags={ROLE: "report", "report.runs": str(len(selection.runs))},
    )
    client.log_artifacts(run.info.run_id, str(out), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "report"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferlab.report",
        description="Aggregate a sweep's MLflow runs over seeds: tables (Markdown, LaTeX, CSV), "
        "a paired fine-tune vs feature-extraction test, and plots.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every run of this MLflow experiment (parents and reports aside)")
    which.add_argument("--parent-run", help="one sweep: the id of its MLflow parent run")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or <repo>/mlflow.db"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: logs/reports/<name>")
    parser.add_argument("--no-log", action="store_true", help="write files only, log nothing to MLflow")
    parser.add_argument(
        "--reference",
        type=Reference.parse,
        action="append",
        default=[],
        metavar="LABEL=PERCENT",
        help="a published test accuracy to compare with (table row and a line in the plot); repeatable",
    )
    args = parser.parse_args(argv)

    uri = args.tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout the report
    try:
        _check_store(uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        if args.parent_run:
            selection = select_parent(client, args.parent_run)
        else:
            selection = select_experiment(client, args.experiment)
        if not selection.runs:
            what = f"experiment {args.experiment!r}" if args.experiment else f"parent run {args.parent_run}"
            raise ReportError(
                f"{what} has no sweep jobs. Fix: run a sweep into it, e.g. "
                "python -m transferlab.train -m experiment=elpv_fe_vs_ft"
            )
        out = args.out or Path(repo_root()) / "logs" / "reports" / _slug(selection.title)
        text = build(client, selection, out, args.reference)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(text)
    print(f"files: {out}")
    if not args.no_log:
        run_id = publish(client, selection, out)
        print(f"logged under report/ of MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
