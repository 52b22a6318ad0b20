"""Selection on validation, and the statistics a reviewer asks for beside mean ± std.

``--select METRIC`` (a logged ``val_*`` or ``best_val_*`` metric): the swept axes split into the
**tuned** ones (``--tune KEY,...``, or the sweep's ``sweep.tune``), the **replicates** (``seed``,
``data.split_seed``, ``data.fold``, or the sweep's ``sweep.replicates``) and
the **arms** (everything else: mode, backbone, weights, augment, ...). Per arm, the tuned values whose
mean METRIC over replicates is best are chosen, and only that configuration's runs are reported. Test
metrics are never read on the way: :func:`select` sees only the arm, tuned and METRIC columns.

A choice at the edge of its grid (the lowest or highest value tried, strictly better than the next
one inside) is flagged in ``grid_edge``: the best may lie past the grid, and ``transferlab.replicate``
refuses to replicate it until the grid is extended (Kornblith et al. 2019 extend such grids).

``selection.csv`` gives each chosen configuration's test means with t-based 95 % confidence intervals
(:mod:`transferlab.report_ci`), computed from the chosen runs after the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from transferlab.report_ci import ci95
from transferlab.report_stats import ReportError

LOWER_IS_BETTER = ("loss",)  # a selection metric ending so is minimised


def check_selection(df: pd.DataFrame, metric: str, tuned: list[str], axes: list[str]) -> None:
    """Bad input for ``--select``/``--tune``: one line naming the fix, before anything is written."""
    if not metric.startswith(("val_", "best_val_")):
        raise ReportError(
            f"--select: {metric!r} is not a validation metric. Fix: use a val_* or best_val_* metric, "
            "e.g. --select best_val_accuracy (test metrics never choose anything)"
        )
    if metric not in df.columns or df[metric].isna().all():
        raise ReportError(
            f"--select: no run logged {metric!r}. Fix: use a metric the runs logged, e.g. "
            "--select best_val_accuracy"
        )
    unswept = [k for k in tuned if k not in axes]
    if unswept:
        raise ReportError(
            f"--tune: {unswept[0]!r} was not swept (swept: {', '.join(axes) or 'nothing'}). "
            "Fix: name a swept key, e.g. --tune optimizer.lr"
        )
    if not tuned:
        raise ReportError(
            "--select: no tuned axis (the sweep declared none). Fix: name them, e.g. --tune optimizer.lr"
        )


def select(
    df: pd.DataFrame, arms: list[str], tuned: list[str], metric: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per arm, the tuned values with the best mean ``metric`` over the replicates every candidate has.

    Candidates are compared on equal terms: only on the replicates (seed, split seed, fold) that all
    of the arm's tuned configurations ran, i.e. the tuning sweep's; runs that replicate the winner
    afterwards (``transferlab.replicate``) never move the choice. Returns the runs of the chosen
    configurations (all their replicates) and one row per arm (arm axes, chosen tuned values, ``n``
    runs, ``<metric>_mean`` over those ``n`` runs like every other mean of the row,
    ``<metric>_selection_mean`` on the compared replicates, the number that chose, ``selected_on``
    their number, ``candidates``, ``grid_edge``: see :func:`grid_edges`).
    Only the arm, tuned, replicate and ``metric`` columns are read, so no test metric can change what
    is chosen. Ties: more compared runs, then the smaller tuned values (by number where numeric).
    """
    sign = 1.0 if metric.endswith(LOWER_IS_BETTER) else -1.0
    replicate = "replicate" if "replicate" in df.columns else "seed"
    view = df[[*arms, *tuned, metric, replicate]].copy()
    view[tuned] = view[tuned].astype(str)
    rows = []
    keep = pd.Series(False, index=df.index)
    for arm, part in view.groupby(arms, sort=True, dropna=False) if arms else [((), view)]:
        label = ", ".join(
            f"{a}={v}" for a, v in zip(arms, arm if isinstance(arm, tuple) else (arm,), strict=True)
        )
        measured = part.dropna(subset=[metric])
        per_config = measured.groupby(tuned, sort=True)[replicate].agg(set)
        common = set.intersection(*per_config) if len(per_config) else set()
        if not common:
            raise ReportError(
                f"--select: arm {label or 'all'} has no replicate at which every tuned configuration "
                f"finished and logged {metric!r}. Fix: let its tuning runs finish (re-launch the sweep)"
            )
        configs = (
            measured[measured[replicate].isin(common)]
            .groupby(tuned, sort=True)[metric]
            .agg(["mean", "count"])
        )
        configs = configs.reset_index().assign(_key=lambda c: sign * c["mean"])
        # Ties: the smaller value by number where it is one ("3e-05" before "0.0001"), not as text.
        numbers = {f"_number_{k}": pd.to_numeric(configs[k], errors="coerce") for k in tuned}
        order = ["_key", "count", *(x for k in tuned for x in (f"_number_{k}", k))]
        configs = configs.assign(**numbers).sort_values(
            order, ascending=[True, False, *[True] * 2 * len(tuned)], kind="stable", na_position="last"
        )
        best = configs.iloc[0]
        chosen = dict(zip(arms, arm if isinstance(arm, tuple) else (arm,), strict=True))
        chosen |= {k: best[k] for k in tuned}
        mask = pd.Series(True, index=df.index)
        for key, value in chosen.items():
            mask &= df[key].astype(str) == str(value) if key in tuned else df[key] == value
        keep |= mask
        rows.append(
            {
                **chosen,
                "n": int(mask.sum()),
                f"{metric}_mean": float(df.loc[mask, metric].mean()),
                f"{metric}_selection_mean": float(best["mean"]),
                "selected_on": len(common),
                "candidates": len(configs),
                "grid_edge": "; ".join(grid_edges(configs, best, tuned)),
            }  # fmt: skip
        )
    return df[keep], pd.DataFrame(rows)


def grid_edges(configs: pd.DataFrame, best: pd.Series, tuned: list[str]) -> list[str]:
    """The numeric tuned axes on which ``best`` is the lowest or highest value tried (the other tuned
    values held at the choice) and strictly better than the next value inside: the best may lie past
    the grid. A tie broken towards the edge is no such evidence. ``configs``: :func:`select`'s table
    (``_key``, smaller is better, and ``_number_<key>``)."""
    edges = []
    for key in tuned:
        line = configs
        for other in tuned:
            if other != key:
                line = line[line[other] == best[other]]
        line = line.dropna(subset=[f"_number_{key}"]).sort_values(f"_number_{key}")
        if len(line) < 2 or math.isnan(best[f"_number_{key}"]):
            continue
        numbers = line[f"_number_{key}"].tolist()
        for at, inside, word in ((0, 1, "lowest"), (len(numbers) - 1, len(numbers) - 2, "highest")):
            # 1e-12: means of the same numbers summed in another order may differ in the last bit.
            if numbers[at] == best[f"_number_{key}"] and best["_key"] < line["_key"].iloc[inside] - 1e-12:
                edges.append(f"{key}={best[key]} is the {word} tried, better than {line[key].iloc[inside]}")
    return edges


def with_test_cis(
    choices: pd.DataFrame, selected: pd.DataFrame, arms: list[str], metrics: Sequence[str]
) -> pd.DataFrame:
    """``selection.csv``'s test columns: each chosen configuration's mean and 95 % CI per test metric
    (computed after the choice, from the chosen runs only)."""
    out = choices.copy()
    for metric in metrics:
        means, lows, highs = [], [], []
        for _, row in choices.iterrows():
            mask = pd.Series(True, index=selected.index)
            for key in arms:
                mask &= selected[key] == row[key]
            # NaN where a run did not log the metric (shift_test_* outside the shift arms): skipped,
            # and an arm without it gets NaN, not numpy's "mean of empty slice" warning.
            values = [v for v in selected.loc[mask, metric].tolist() if not math.isnan(v)]
            low, high = ci95(values)
            means.append(float(np.mean(values)) if values else math.nan)
            lows.append(low)
            highs.append(high)
        out[f"{metric}_mean"], out[f"{metric}_ci95_low"], out[f"{metric}_ci95_high"] = means, lows, highs
    return out
