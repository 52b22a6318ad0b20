"""The report's rendering: Markdown and LaTeX tables, captions, PNG plots, and the files they go to.

Writes the numbers of ``transferlab.report_stats`` into a folder: Markdown (``report.md``, also
printed), LaTeX (``report.tex``, booktabs, safe for pdflatex's default input encoding), CSV
(``runs.csv``, ``summary.csv``, ``paired.csv``, ``pretraining.csv``) and PNG plots (test accuracy and
wall time per group, validation curves per mode). Groups with nothing to pair with are named once,
not printed as rows of dashes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from transferlab.report_axes import _shown
from transferlab.report_stats import (
    BASE,
    METRICS,
    PAIRED,
    RANDOM_INIT,
    SHIFTED,
    WEIGHTS,
    Analysis,
    Reference,
)

# What the cost columns mean, under the summary table.
COSTS = (
    "Costs: wall time depends on which run filled the feature cache (the first pays the frozen "
    "backbone's pass, the others load it). train time = wall time − the feature pass or its loading; "
    "feature pass, once = the pass as timed by the runs that computed it (– where every run read it "
    "from the cache); from scratch = mean train time + the pass once, what the arm costs on its own."
)


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
        if metric in SHIFTED and stats[f"{metric}_mean"].isna().all():  # no shifted test set
            continue
        table[header] = [
            _cell(m, s, metric, pm)
            for m, s in zip(stats[f"{metric}_mean"], stats[f"{metric}_std"], strict=True)
        ]
        if metric == "test_accuracy" and f"{metric}_ci95_low" in stats:  # the headline's CI; all: summary.csv
            scale = METRICS[metric][1]
            table["95 % CI (test acc)"] = [
                "–" if math.isnan(lo) else f"[{lo * scale:.2f}, {hi * scale:.2f}]"
                for lo, hi in zip(stats[f"{metric}_ci95_low"], stats[f"{metric}_ci95_high"], strict=True)
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
        scale = METRICS[metric][1]
        table[f"95 % CI ({short})"] = [
            "–" if math.isnan(lo) else f"[{lo * scale:+.2f}, {hi * scale:+.2f}]"
            for lo, hi in zip(
                diffs[f"{metric}_diff_ci95_low"], diffs[f"{metric}_diff_ci95_high"], strict=True
            )
        ]
        table[f"p Holm ({short})"] = [_num(p, ".3g") for p in diffs[f"{metric}_p_holm"]]
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
    ax.set_title(f"{header}: mean ± std over replicates")
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


EFFICIENCY = "data.train_per_class"  # the data-efficiency axis: training images per class


def efficiency_curves(stats: pd.DataFrame, groups: list[str]) -> dict[str, pd.DataFrame]:
    """Per arm (every group axis but ``data.train_per_class``): N, mean test accuracy and its 95 % CI,
    N ascending; the runs with every training image (``null``) as N = NaN, drawn apart. An arm that
    never ran with fewer images (the shift setting beside the curve) is no curve."""
    others = [g for g in groups if g != EFFICIENCY]
    frame = stats.assign(_n=pd.to_numeric(stats[EFFICIENCY], errors="coerce"))
    columns = ["_n", "test_accuracy_mean", "test_accuracy_ci95_low", "test_accuracy_ci95_high"]
    curves = {}
    for _, part in frame.groupby(others, sort=True) if others else [((), frame)]:
        if part["_n"].notna().any():
            curves[_label(part.iloc[0], others)] = part.sort_values("_n")[columns].reset_index(drop=True)
    return curves


def plot_efficiency(stats: pd.DataFrame, groups: list[str], path: Path) -> dict[str, pd.DataFrame]:
    """The crossover plot: test accuracy (mean, 95 % CI band) against training images per class, one line
    per arm, log axis; an arm's runs on every training image as a dashed line. Returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = efficiency_curves(stats, groups)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        sized = curve.dropna(subset=["_n"])
        (line,) = ax.plot(sized["_n"], sized["test_accuracy_mean"] * 100, marker="o", label=label)
        ax.fill_between(
            sized["_n"],
            sized["test_accuracy_ci95_low"] * 100,
            sized["test_accuracy_ci95_high"] * 100,
            alpha=0.2,
            color=line.get_color(),
        )
        for value in curve.loc[curve["_n"].isna(), "test_accuracy_mean"]:
            ax.axhline(value * 100, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log")
    sizes = sorted({float(n) for c in curves.values() for n in c["_n"].dropna()})
    ax.set_xticks(sizes, [f"{n:g}" for n in sizes])  # the Ns run, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training images per class (data.train_per_class; dashed: all)")
    ax.set_ylabel("test acc (%)")
    ax.set_title("Data efficiency: mean and 95 % CI over replicates")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def plot_curves(client: MlflowClient, df: pd.DataFrame, groups: list[str], path: Path) -> None:
    """Validation accuracy per epoch, one panel per mode, mean ± std over replicates per other group."""
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


def _split_unpaired(diffs: pd.DataFrame, groups: list[str], text: str) -> tuple[pd.DataFrame, str]:
    """The rows with pairs, and one sentence naming the groups without any."""
    unpaired = [_label(row, groups) for _, row in diffs[diffs["n_pairs"] == 0].iterrows()]
    return diffs[diffs["n_pairs"] > 0], f" {text}: {'; '.join(unpaired)}." if unpaired else ""


def compare(stats: pd.DataFrame, groups: list[str], references: Sequence[Reference]) -> pd.DataFrame:
    """Each reference against the group with the best mean **validation** accuracy here (its test
    accuracy is then read, never used to choose; groups without a validation number are not chosen).

    One best group per data setting (the ``data`` and ``data.*`` axes): validation accuracies of other cells or
    of fewer training images are no single ranking (elpv_protocol's 81 monocrystalline validation
    images would otherwise "beat" the 197 of the full set), and a reference was measured at one of
    them, which the reader matches by the ``setting`` column.
    """
    settings = [g for g in groups if g == "data" or g.startswith("data.")]  # data=... or data.<key>
    arms = [g for g in groups if g not in settings]
    parts = [part for _, part in stats.groupby(settings, sort=True, dropna=False)] if settings else [stats]
    bests = []
    for part in parts:
        ranked = part.dropna(subset=["best_val_accuracy_mean"])
        bests.append(
            (ranked if len(ranked) else part)
            .sort_values("best_val_accuracy_mean", ascending=False, kind="stable")
            .iloc[0]
        )
    rows = []
    for ref in references:
        for best in bests:
            mean, std = best["test_accuracy_mean"], best["test_accuracy_std"]
            low = best.get("test_accuracy_ci95_low", math.nan)
            high = best.get("test_accuracy_ci95_high", math.nan)
            row = {"reference": ref.label, "test acc (%)": f"{ref.value * 100:.2f}"}
            if settings:
                row["setting"] = _label(best, settings)
            row |= {
                "best group here (on validation)": _label(best, arms),
                "its val acc (%)": _cell(
                    best["best_val_accuracy_mean"], best["best_val_accuracy_std"], "best_val_accuracy", "±"
                ),
                "its test acc (%)": _cell(mean, std, "test_accuracy", "±") + f" (n={int(best['n'])})",
                "95 % CI (%)": "–" if math.isnan(low) else f"[{low * 100:.2f}, {high * 100:.2f}]",
                "difference (pp)": f"{(mean - ref.value) * 100:+.2f}",
            }
            rows.append(row)
    return pd.DataFrame(rows)


def failures_section(failed: pd.DataFrame) -> str:
    """The section listing the runs without a FINISHED result; "" where there are none."""
    if failed.empty:
        return ""
    listing = failed[["run_name", "status", "error"]].copy()
    listing["error"] = [e.replace("|", "/").replace("\n", " ")[:200] for e in listing["error"]]
    return f"\n\n## Not averaged in: {len(failed)} run(s) without a FINISHED result\n\n{markdown(listing)}"


def write_report(
    client: MlflowClient, title: str, analysis: Analysis, out: Path, references: Sequence[Reference] = ()
) -> str:
    """Write every table and plot of ``analysis`` into ``out``; return the Markdown report."""
    groups, extra, df, stats = analysis.groups, analysis.extra, analysis.runs, analysis.stats
    diffs, gains, pair_notes = analysis.diffs, analysis.gains, analysis.pair_notes
    shown = [*groups, *analysis.recipe]
    if analysis.selection is not None:  # the chosen tuned values beside each arm
        shown = [*shown, *analysis.tuned]
        stats = (
            stats.merge(analysis.selection[[*groups, *analysis.tuned]], on=groups, how="left")
            if groups
            else (stats.assign(**{k: analysis.selection.iloc[0][k] for k in analysis.tuned}))
        )
    table, tex_table = display_tables(stats, shown, "±"), display_tables(stats, shown, r"$\pm$")

    out.mkdir(parents=True, exist_ok=True)
    pd.concat([df, analysis.failed]).to_csv(out / "runs.csv", index=False)
    stats.to_csv(out / "summary.csv", index=False)
    tex = [latex(tex_table, f"{title}: mean ± std over replicates (n runs).")]
    grouped = f"{len(df)} FINISHED run(s) grouped by {', '.join(groups) or '(nothing swept)'}"
    if extra:
        grouped += f" ({', '.join(extra)}: not swept, but differ between runs of one group)"
    if analysis.recipe:
        grouped += (
            f"; {', '.join(analysis.recipe)}: each mode's own recipe at each setting, shown, never "
            "paired on (the modes are compared at equal settings, each with its recipe)"
        )
    # The replicates averaged over (and paired by): the seed, and the others where swept.
    replicates = ", ".join(["seed", *(r for r in analysis.replicates if r != "seed" and r in df.columns)])
    parts = [
        f"# {title}",
        f"{grouped}; replicates: {replicates}; mean ± std (sample std over replicates) and n; the "
        "t-based 95 % CI of the mean test accuracy (of every mean: `summary.csv`).",
        markdown(table),
        COSTS,
    ]
    if analysis.selection is not None:
        analysis.selection.to_csv(out / "selection.csv", index=False)
        metric = next(c for c in analysis.selection.columns if c.endswith("_mean") and "val_" in c)
        parts.insert(
            2,
            f"Selected on validation: per arm, the {', '.join(analysis.tuned)} with the best mean "
            f"{metric.removesuffix('_mean')} over the replicates all its candidates ran (of `candidates` "
            "configurations; test metrics chose nothing); only those runs are in the tables. Chosen values "
            "and test 95 % CIs: `selection.csv`.",
        )
        edges = analysis.selection[analysis.selection["grid_edge"].astype(bool)]
        if len(edges):
            arms = [c for c in analysis.groups if c in edges.columns]
            named = "; ".join(
                f"{' · '.join(str(r[a]) for a in arms) or 'all'}: {r['grid_edge']}"
                for _, r in edges.iterrows()
            )
            parts.insert(
                3, f"At a grid edge (the best may lie past the grid: extend it, on validation): {named}."
            )
    how = (
        "Mean ± std of the per-replicate differences in percentage points, their t-based 95 % confidence "
        "interval; p Holm: the two-sided paired t-test's p (`scipy.stats.ttest_rel`) adjusted by "
        "Holm–Bonferroni over the table's rows, per metric (raw p in the CSV); – where fewer than two pairs."
    )
    if diffs is not None:
        diffs.to_csv(out / "paired.csv", index=False)
        # A group with no feature_extract twin (the random-init control: a frozen random backbone is
        # not run) is named once rather than printed as a row of dashes.
        shown, note = _split_unpaired(diffs, groups, f"No {BASE} run (with a seed in common) to pair with")
        note = "".join(f" {n}" for n in pair_notes) + note
        header = f"mode − {BASE}"
        parts += [f"## Each mode − {BASE}, paired by replicate ({replicates})", how + note]
        if len(shown):
            parts.append(markdown(display_diffs(shown, groups, "mode", header, "±")))
            caption = f"Each mode minus {BASE}, paired by replicate (ttest_rel).{note}"
            tex.append(latex(display_diffs(shown, groups, "mode", header, r"$\pm$"), caption))
    if gains is not None:
        gains.to_csv(out / "pretraining.csv", index=False)
        shown, note = _split_unpaired(gains, groups, "No pretrained twin (with a seed in common) for")
        header = f"{WEIGHTS} − {RANDOM_INIT}"
        parts += [
            f"## Pretrained − random init ({WEIGHTS}={RANDOM_INIT}), paired by replicate ({replicates})",
            how + " The same config but for the weights: what pretraining is worth." + note,
        ]
        if len(shown):
            parts.append(markdown(display_diffs(shown, groups, WEIGHTS, header, "±")))
            caption = f"Pretrained minus random initialisation ({WEIGHTS}={RANDOM_INIT}), paired by replicate.{note}"
            tex.append(latex(display_diffs(shown, groups, WEIGHTS, header, r"$\pm$"), caption))
    if references:
        parts += [
            "## Published references (test accuracy)",
            "The group beside them is the best on validation accuracy (mean best_val_accuracy), per data "
            "setting where the data axes differ (their validation sets differ); its test accuracy is read "
            "after that choice.",
            markdown(compare(stats, groups, references)),
        ]
    if EFFICIENCY in groups:
        parts.append(
            "Data efficiency: `data_efficiency.png` plots test accuracy (mean, 95 % CI band) against "
            "training images per class for each arm, on a log axis."
        )
    text = "\n\n".join(parts) + failures_section(analysis.failed) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.tex").write_text("\n\n".join(tex))
    if EFFICIENCY in groups:
        plot_efficiency(stats, groups, out / "data_efficiency.png")
    plot_bars(stats, groups, "test_accuracy", out / "test_accuracy.png", references)
    plot_bars(stats, groups, "wall_time_s", out / "wall_time.png")
    plot_curves(client, df, groups, out / "val_curves.png")
    return text
