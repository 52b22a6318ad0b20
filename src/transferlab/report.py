"""The ablation report: read a sweep back from MLflow, aggregate over seeds, test fine-tune vs frozen.

python -m transferlab.report --experiment elpv_fe_vs_ft     # every run of the experiment (all its sweeps)
python -m transferlab.report --parent-run RUN_ID            # one sweep (its MLflow parent run)

Groups the runs by the swept axes and writes mean ± std and n per group, each mode minus
feature_extract and, where the random-init control ran, pretrained minus random init, both paired by
seed (``transferlab.report_stats`` computes them). Markdown (printed), LaTeX and
CSV, and PNG plots (``transferlab.report_render``), in ``--out`` and as artifacts under ``report/``: of
the parent run for ``--parent-run``; of a new run named ``report`` (tag ``sweep.role=report``) for
``--experiment``, since an experiment can hold several sweeps (a widened sweep is a second parent).

With ``--register NAME`` the selected run's model becomes a new version of the registered model NAME,
tagged with its test metrics, config hash, experiment and parent run, and the alias ``champion`` moves
to it (older versions stay): ``python -m transferlab.predict models:/NAME@champion ...`` uses it. The
run is the finished run with the best ``best_val_<trainer.monitor>``: validation decides, never test.

Bad input exits 2 with one line naming the fix; a sweep with no FINISHED job exits 1 after listing
its failures.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient

from transferlab.report_axes import axis_value, broadcast_base, hidden_axes, recipe_axes
from transferlab.report_render import (
    compare,
    display_diffs,
    display_tables,
    failures_section,
    latex,
    markdown,
    plot_bars,
    plot_curves,
    write_report,
)
from transferlab.report_select import check_selection, with_test_cis
from transferlab.report_select import select as select_configs
from transferlab.report_stats import (
    BASE,
    DIAL,
    METRICS,
    PAIRED,
    RANDOM_INIT,
    SHIFTED,
    WEIGHTS,
    Analysis,
    Reference,
    ReportError,
    Selection,
    analyse,
    cost_columns,
    dedupe,
    paired,
    pretraining,
    runs_frame,
    select_experiment,
    select_parent,
    summary,
)
from transferlab.schemas import default_tracking_uri, repo_root
from transferlab.sweep import ROLE

if TYPE_CHECKING:
    import pandas as pd

# What ``from transferlab import report`` offered before the split into report_stats and report_render.
__all__ = [
    "BASE",
    "DIAL",
    "METRICS",
    "PAIRED",
    "RANDOM_INIT",
    "WEIGHTS",
    "Analysis",
    "Reference",
    "ReportError",
    "Selection",
    "analyse",
    "axis_value",
    "broadcast_base",
    "cost_columns",
    "build",
    "compare",
    "dedupe",
    "default_tracking_uri",
    "display_diffs",
    "display_tables",
    "failures_section",
    "hidden_axes",
    "latex",
    "main",
    "markdown",
    "paired",
    "plot_bars",
    "plot_curves",
    "pretraining",
    "publish",
    "recipe_axes",
    "runs_frame",
    "select_experiment",
    "select_parent",
    "summary",
    "write_report",
]


def _check_store(uri: str) -> None:
    """A missing SQLite file would be created empty by MLflow: say so instead."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(
            f"--tracking-uri: no MLflow store at {uri.removeprefix('sqlite:///')}. "
            "Fix: run a sweep first, or pass --tracking-uri sqlite:////path/to/mlflow.db"
        )


def prepare(
    selection: Selection, select: str | None = None, tune: Sequence[str] = ()
) -> tuple[Analysis, list[str]]:
    """The analysis of the selection's FINISHED runs, and the ids of the runs it reports.

    ``select``: a validation metric; per arm only the tuned values (``tune``, else the sweep's
    ``sweep.tune``) with its best mean over replicates are reported (:mod:`transferlab.report_select`).
    """
    finished, failed = dedupe(selection.runs)
    tuned = list(tune) or list(selection.tuned)
    # One sweep's replicate may be another's tuned key (merged over an experiment's sweeps): tuned wins.
    replicates = [r for r in selection.replicates if r not in tuned] if select else selection.replicates
    extra = hidden_axes(finished, selection.axes, replicates)
    axes = [*selection.axes, *extra]
    failed_df = runs_frame(failed, axes, replicates=replicates)
    if not finished:
        raise ReportError(
            f"{selection.title}: none of its {len(selection.runs)} run(s) FINISHED, nothing to average."
            f"{failures_section(failed_df)}\n\nFix: read the errors above, fix them, and re-launch the sweep "
            "(it reruns only what did not finish)",
            code=1,
        )
    df = runs_frame(finished, axes, [select] if select else [], replicates)
    if select is None:
        return analyse(df, failed_df, axes, extra, replicates), df["run_id"].tolist()
    check_selection(df, select, tuned, axes)
    arms = [a for a in axes if a not in (*replicates, *tuned)]
    _check_candidates(df, failed_df, [*arms, *tuned])
    chosen_runs, choices = select_configs(df, arms, tuned, select)
    analysis = analyse(
        chosen_runs,
        failed_df,
        [a for a in axes if a not in tuned],
        [e for e in extra if e not in tuned],
        replicates,
    )
    shifted = [m for m in SHIFTED if m in chosen_runs and chosen_runs[m].notna().any()]  # data.shift_*
    analysis.selection = with_test_cis(choices, chosen_runs, arms, [*PAIRED, *shifted])
    analysis.tuned = tuned
    return analysis, chosen_runs["run_id"].tolist()


def _check_candidates(df: pd.DataFrame, failed: pd.DataFrame, keys: list[str]) -> None:
    """A tuned configuration none of whose runs FINISHED would leave its arm choosing among fewer
    values than the sweep tried (an arm whose runs all failed would vanish): one line, nothing written."""
    if not len(failed):
        return
    done = set(df[keys].astype(str).itertuples(index=False, name=None))
    # A job that failed before its run logged its config (axes "?") names no configuration: listed
    # among the failures, it cannot block a choice that its own re-launch has since made possible.
    known = failed[~(failed[keys].astype(str) == "?").any(axis=1)]
    lost = [c for c in known[keys].astype(str).itertuples(index=False, name=None) if c not in done]
    if lost:
        shown = ", ".join(f"{k}={v}" for k, v in zip(keys, lost[0], strict=True))
        raise ReportError(
            f"--select: {len(set(lost))} tuned configuration(s) have no FINISHED run, only FAILED, KILLED or "
            f"RUNNING ones ({shown}"
            f"{' and more' if len(set(lost)) > 1 else ''}), so their arm would choose among fewer values "
            "than were tried. Fix: re-launch the sweep (it reruns only what did not finish), or delete "
            "the failed run(s) in MLflow to choose among the others"
        )


def build(
    client: MlflowClient,
    selection: Selection,
    out: Path,
    references: Sequence[Reference] = (),
    select: str | None = None,
    tune: Sequence[str] = (),
) -> str:
    """Write every table and plot into ``out``; return the Markdown report (see :func:`prepare`)."""
    analysis, _ = prepare(selection, select, tune)
    return write_report(client, selection.title, analysis, out, references)


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
    parser.add_argument(
        "--select",
        metavar="METRIC",
        default=None,
        help="per arm, keep only the tuned values with the best mean of this val_*/best_val_* metric",
    )
    parser.add_argument(
        "--tune",
        metavar="KEY[,KEY...]",
        default=None,
        help="the tuned axes for --select (default: the sweep's sweep.tune)",
    )
    parser.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="register the best-on-validation run's model as a new version of NAME, alias champion",
    )
    parser.add_argument(
        "--setting",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --register: choose among the runs whose param KEY is VALUE (one data setting); repeatable",
    )
    args = parser.parse_args(argv)

    uri = args.tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout the report
    try:
        if args.register is not None and (not args.register.strip() or re.search(r"[/@:]", args.register)):
            raise ReportError(
                f"--register: {args.register!r} cannot be a model name in models:/NAME@champion. "
                "Fix: use letters, digits, '-', '_' or '.', e.g. --register elpv-defects"
            )
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
        if args.tune is not None and args.select is None:
            raise ReportError("--tune: only with --select. Fix: add e.g. --select best_val_accuracy")
        tune = [k.strip() for k in args.tune.split(",") if k.strip()] if args.tune else []
        analysis, reported = prepare(selection, args.select, tune)
        if args.setting and not args.register:
            raise ReportError("--setting: only with --register. Fix: add --register NAME, or drop --setting")
        candidates = register_candidates(selection, reported, args.setting) if args.register else []
        text = write_report(client, selection.title, analysis, out, args.reference)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(text)
    print(f"files: {out}")
    if not args.no_log:
        run_id = publish(client, selection, out)
        print(f"logged under report/ of MLflow run {run_id}")
    if args.register:
        return register_best(client, selection, args.register, candidates, args.select, args.setting)
    return 0


# data.* keys that leave the training, validation and test images as they are: how they are read, and
# the extra shifted test set (data.shift_*), which adds columns, not a different ranking.
_NOT_TRAINING_DATA = ("data.cache", "data.download", "data.shift_cell_type", "data.shift_root")


def _setting(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. data.cell_type=mono")
    return key.strip(), value.strip()


def register_candidates(selection: Selection, reported: list[str], settings: list[tuple[str, str]]) -> list:
    """The runs ``--register`` chooses among: those the report shows, at one data setting.

    Validation accuracies at different data (mono cells vs all, 10 images per class vs all) are no
    single ranking (the same rule as the report's reference row), so runs that differ in a ``data.*``
    param other than a replicate are refused before anything is written, unless ``--setting`` picks one.
    """
    from transferlab.schemas.identity import LATER_DEFAULTS

    def param(run, key: str) -> str:  # a key added later is absent from older runs: its default
        default = LATER_DEFAULTS.get(key, "(unset)")
        return run.data.params.get(key, "null" if default is None else str(default))  # as log_params

    by_id = {r.info.run_id: r for r in selection.runs}
    runs = [by_id[run_id] for run_id in reported]  # prepare's FINISHED runs, deduplicated already
    for key, value in settings:
        kept = [r for r in runs if param(r, key) == value]
        if not kept:
            seen = ", ".join(sorted({param(r, key) for r in runs}))
            raise ReportError(
                f"--setting {key}={value}: no reported run has it ({key} is {seen}). Fix: use one of those"
            )
        runs = kept
    keys = sorted(
        k for k in {k for r in runs for k in r.data.params}
        if k.startswith("data.") and k not in selection.replicates and k not in _NOT_TRAINING_DATA
    )  # fmt: skip
    differ = {k: sorted({param(r, k) for r in runs}) for k in keys}
    differ = {k: v for k, v in differ.items() if len(v) > 1}
    if differ:
        shown = "; ".join(f"{k}: {', '.join(v)}" for k, v in differ.items())
        key, values = next(iter(differ.items()))
        raise ReportError(
            f"--register: the reported runs were trained on different data ({shown}), whose validation "
            f"accuracies are no single ranking. Fix: add --setting {key}={values[0]} (repeatable) to "
            "register the best of one data setting"
        )
    return runs


def register_best(
    client: MlflowClient,
    selection: Selection,
    name: str,
    finished: list,
    select: str | None,
    settings: Sequence[tuple[str, str]] = (),
) -> int:
    """``--register NAME``: of the runs the report shows (with ``--select``, the configurations chosen
    on validation) at one data setting (:func:`register_candidates`), the best on validation, as the
    new champion version of NAME."""
    from transferlab import model_store
    from transferlab.schemas import ConfigError

    best = model_store.best_run(finished)
    monitor = best.data.params.get("trainer.monitor", "accuracy")
    scope = f"the configurations chosen by --select {select}" if select else "finished run(s)"
    why = f"best best_val_{monitor} of {len(finished)} {scope} of {selection.title}"
    why += "".join(f", {k}={v}" for k, v in settings)
    try:
        version = model_store.register(client, best, name, why)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    value = best.data.metrics.get(f"best_val_{monitor}", float("nan"))
    print(
        f"registered run {best.info.run_id} (best_val_{monitor}={value:.4f}, the {why}) as "
        f"models:/{name}/{version.version}; alias {model_store.ALIAS} -> version {version.version}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
