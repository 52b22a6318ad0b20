"""How fast the entrypoint answers without compute (a bad setting refused, ``--help`` printed), and a
run's fixed cost: process start to its first optimizer update, caches warm.

python experiments/benchmarks/startup.py            # 3 runs each, medians, on this machine

Baseline, in the same command: the heavy imports a run needs (torch, timm, torchvision, MLflow,
scikit-learn: ``import transferlab.train``), which the entrypoint paid before it could refuse anything.
Each case is a fresh interpreter (``python -m transferlab.train ...``), as a user types it. The fixed
cost is the run's own ``startup_s`` metric, read back from MLflow, of the default run (feature
extraction, ELPV, EfficientNet-Lite0) for one epoch with the decoded-input and frozen-feature caches
warm (a first, unmeasured run fills them in ``paths.cache_dir`` when they are cold). Beside it, the
same run started as before 2026-12-07: the overrides' check (composing the config) first, then the
imports, where the entrypoint now checks in a forked child while it imports.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "bad setting (trainer.batch_size=0)": ["-m", "transferlab.train", "trainer.batch_size=0"],
    "misspelt key (trainer.epoch=3)": ["-m", "transferlab.train", "trainer.epoch=3"],
    "--help": ["-m", "transferlab.train", "--help"],
    "--cfg job": ["-m", "transferlab.train", "--cfg", "job"],
}
BASELINE = ["-c", "import transferlab.train"]
# A run as it started before 2026-12-07: the overrides' check in this process first, then the
# imports. The same entrypoint, with its check-beside replaced by the check itself.
SERIAL = [
    "-c",
    "import runpy; from transferlab import preflight; "
    "preflight.check_beside = lambda check: (check(), lambda: None)[1]; "
    "runpy.run_module('transferlab.train', run_name='__main__', alter_sys=True)",
]
RUN = ["-m", "transferlab.train"]


def seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_startup(repeats: int, launch: list[str]) -> tuple[float, float]:
    """Median ``startup_s`` and wall time of the default run, one epoch, caches warm."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        store = [
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"mlflow.artifact_location={tmp}/artifacts",
            f"hydra.run.dir={tmp}/hydra",
            "trainer.epochs=1",
            "trainer.progress=false",
        ]
        walls = []
        for i in range(repeats + 1):  # the first fills the caches if they are cold
            start = time.perf_counter()
            subprocess.run([sys.executable, *launch, *store], capture_output=True, check=True)
            if i:
                walls.append(time.perf_counter() - start)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        runs = mlflow.search_runs(experiment_names=["transferlab"], order_by=["start_time ASC"])
        warm = runs.iloc[1:]
        assert (warm["metrics.input_cache_hit"] == 1).all() and (warm["metrics.feature_cache_hit"] == 1).all()
        return float(warm["metrics.startup_s"].median()), statistics.median(walls)


def main(repeats: int = 3) -> None:
    base = seconds(BASELINE, repeats)
    print(f"| case | median of {repeats} | vs `import transferlab.train` ({base:.2f} s) | target |")
    print("|---|---|---|---|")
    for name, args in CASES.items():
        took = seconds(args, repeats)
        print(f"| {name} | {took:.2f} s | {took / base:.2f}x | <= 3 s: {'met' if took <= 3 else 'NOT met'} |")
    for name, launch in (("", RUN), (" (the check first, as before 2026-12-07)", SERIAL)):
        startup, wall = run_startup(repeats, launch)
        print(
            f"| a run's fixed cost{name}: start to first update (`startup_s`), caches warm | {startup:.2f} s | "
            f"{startup / base:.2f}x | < 8 s: {'met' if startup < 8 else 'NOT met'} |"
        )
        print(
            f"| the same runs{name}, start to exit (1 epoch, test, log, model) | {wall:.2f} s | {wall / base:.2f}x | |"
        )


if __name__ == "__main__":
    main()
