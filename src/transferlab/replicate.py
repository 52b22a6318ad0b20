"""Replicate the winners: each arm's configuration chosen on validation, launched on more replicates.

python -m transferlab.replicate --experiment elpv_protocol --select best_val_accuracy seed=1,2
python -m transferlab.replicate --experiment elpv_protocol --select best_val_accuracy seed=1,2 hydra/launcher=joblib
python -m transferlab.replicate --experiment elpv_protocol --select best_val_accuracy data.fold=1,2,3,4 --dry-run

The second half of "tune, then replicate": the tuning sweep ran every tuned value at one replicate
(``sweep.tune``); this command reads, per arm, the values ``python -m transferlab.report --select``
chooses (:func:`transferlab.report.prepare`, validation only), takes the overrides one of that
configuration's runs was launched with (its ``overrides.json``) without its replicate keys (``seed``,
``data.split_seed``, ``data.fold``), and launches ``python -m transferlab.train -m`` with them and the
replicate overrides given here (a replicate key not given keeps the values the chosen runs had): one sweep (one MLflow parent run) per arm, in the same experiment,
through any launcher the extra overrides name. The commands come from MLflow, never typed by hand;
a relaunch skips every job that already FINISHED, like any sweep. ``--dry-run`` prints them only.

Exit status: 0 when every arm's sweep finished; 1 when one did not; 2 for bad input, before any launch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from transferlab.report import _check_store, default_tracking_uri, prepare
from transferlab.report_stats import ReportError, select_experiment
from transferlab.tracking import OVERRIDES_TAG

# Overrides of a logged job that say where it ran or which replicate it was, not what the arm is.
DROPPED = (
    "hydra.",
    "mlflow.run_name=",
    "mlflow.tracking_uri=",
    "mlflow.experiment_name=",
    "sweep.name=",
    "resume",
)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def arm_overrides(logged: Sequence[str], replaced: set[str]) -> list[str]:
    """A chosen run's overrides without the replicate keys given anew (``replaced``) and its run-local
    settings (a replicate key it fixed and nobody replaces, say ``data.split_seed=7``, stays)."""
    return [o for o in logged if _key(o) not in replaced and not o.lstrip("+~").startswith(DROPPED)]


def launched_with(client: MlflowClient, run_id: str) -> dict:
    """A run's overrides: its ``overrides`` tag (a store copied without its artifacts has it), else
    its ``overrides.json`` (runs logged before 2026-12-02 have no tag)."""
    tag = client.get_run(run_id).data.tags.get(OVERRIDES_TAG)
    if tag is not None:
        return {"overrides": json.loads(tag)}
    try:
        present = {f.path for f in client.list_artifacts(run_id)}
    except (OSError, MlflowException):
        present = set()
    if "overrides.json" not in present:
        raise ReportError(
            f"run {run_id} has no overrides tag and its overrides.json cannot be read (its artifacts "
            "are not in this store). Fix: run this where the store's artifacts are, or relaunch its tuning sweep"
        )
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "overrides.json", tmp)).read_text())


def commands(
    client: MlflowClient,
    experiment: str,
    select: str,
    tune: Sequence[str],
    extra: Sequence[str],
    allow_edge: bool = False,
) -> list[list[str]]:
    """One ``python -m transferlab.train -m ...`` per arm, from the runs ``--select`` chose; the store
    the tuning sweep is read from is the store the replicates go to. A choice at its grid's edge is
    refused unless ``allow_edge``: its replicates would be spent on a value the grid did not bracket."""
    selection = select_experiment(client, experiment)
    if not selection.runs:
        raise ReportError(f"experiment {experiment!r} has no sweep jobs. Fix: run the tuning sweep first")
    if not any(_key(o) in selection.replicates for o in extra):
        raise ReportError(
            f"no replicate among the overrides {list(extra)}. Fix: name the new replicates, "
            f"e.g. seed=1,2 (replicates: {', '.join(selection.replicates)})"
        )
    analysis, _ = prepare(selection, select, tune)
    assert analysis.selection is not None
    arms = list(analysis.groups)
    edges = analysis.selection[analysis.selection["grid_edge"].astype(bool)]
    if len(edges) and not allow_edge:
        row = edges.iloc[0]
        label = " · ".join(f"{a}={row[a]}" for a in arms) or "all"
        raise ReportError(
            f"arm {label}: {row['grid_edge']} on {select}, so its best may lie past the grid "
            f"({len(edges)} arm(s) so). Fix: extend the grid past it (a tuning run at the next value), "
            "or pass --allow-edge to replicate the choice as it is"
        )
    chosen = analysis.runs.set_index("run_id")
    out = []
    for _, row in analysis.selection.iterrows():
        mask = (chosen[arms] == row[arms]).all(axis=1) if arms else chosen.index == chosen.index
        run_id = sorted(chosen.index[mask])[0]  # any of the arm's chosen runs: they differ in replicates only
        logged = launched_with(client, run_id)
        label = " · ".join(f"{a}={row[a]}" for a in arms) or "all"
        # Replicate keys not named here keep the values the chosen runs had (seed=1 after a tuning
        # sweep over data.fold=0,1 runs seed 1 on both folds).
        named = {_key(o) for o in extra}
        kept = [
            f"{rep}={','.join(sorted({str(v) for v in chosen.loc[mask, rep]}))}"
            for rep in selection.replicates
            if rep not in named and rep in chosen.columns
        ]
        out.append(
            [
                sys.executable, "-m", "transferlab.train", "-m",
                *arm_overrides(logged.get("overrides", []), named | {_key(o) for o in kept}),
                f"mlflow.tracking_uri={client.tracking_uri}",
                f"mlflow.experiment_name={experiment}",
                f"sweep.name={json.dumps(f'replicate {label}', ensure_ascii=False)}",  # quoted: Hydra's grammar
                *kept,
                *extra,
            ]
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None, launch: Callable[[list[str]], int] | None = None) -> int:
    """``launch``: how one command runs (default: a subprocess); returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m transferlab.replicate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", required=True, help="the MLflow experiment of the tuning sweep")
    parser.add_argument("--select", required=True, metavar="METRIC", help="a val_* or best_val_* metric")
    parser.add_argument(
        "--tune", default=None, metavar="KEY[,KEY...]", help="default: the sweep's sweep.tune"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or <repo>/mlflow.db"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, launch nothing")
    parser.add_argument(
        "--allow-edge", action="store_true", help="replicate choices at their grid's edge too"
    )
    parser.add_argument("overrides", nargs="+", help="the replicates (seed=1,2 ...) and launcher overrides")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        _check_store(uri)
        tune = [k.strip() for k in args.tune.split(",") if k.strip()] if args.tune else []
        planned = commands(
            MlflowClient(uri), args.experiment, args.select, tune, args.overrides, args.allow_edge
        )
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    failed = 0
    for command in planned:
        print("$ " + shlex.join(["python", *command[1:]]), flush=True)
        if not args.dry_run:
            failed += (launch or (lambda c: subprocess.run(c).returncode))(command) != 0
    if failed:
        print(f"{failed} of {len(planned)} arm sweep(s) did not finish; relaunch this command to resume")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
