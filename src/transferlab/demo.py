"""The main job (`make demo`): feature extraction vs full fine-tuning on ELPV, bundled EfficientNet-Lite0.

Runs ``transferlab.train`` once per mode, exactly as a user would, then reads both runs back from
MLflow and prints the comparison. Budget: under 15 minutes on a 2-core CPU, at the weights' own
224 px input. Feature extraction computes each image's features once, so 30 head epochs cost
seconds; full fine-tuning backpropagates through the whole network (~11 images/s on 2 cores), so
it gets 3 epochs. Each mode runs with its own recipe (its config group defaults): feature extraction
a constant lr on cached features, full fine-tuning the recipe every fine-tuning reference uses, a
cosine decay per update after a half-epoch warmup and random-resized crops + flips of the stored
image (``scheduler=cosine augment=standard``). Extra arguments are passed to both runs (e.g.
``trainer.device=cuda``).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import mlflow

from transferlab.schemas import repo_root
from transferlab.tracking import ui_link

EXPERIMENT = "demo_elpv_fe_vs_ft"
MODES = {"feature_extract": 30, "full_finetune": 3}  # mode -> epochs (each with its mode's recipe)
COLUMNS = [
    ("mode", "mode"),
    ("recipe", "recipe"),
    ("epochs", "epochs"),
    ("test acc", "test_accuracy"),
    ("bal. acc", "test_balanced_accuracy"),
    ("macro-F1", "test_macro_f1"),
    ("trainable params", "trainable_params"),
    ("wall time", "wall_time_s"),
]


def markdown_table(rows: list[dict[str, object]]) -> str:
    def cell(key: str, value: object) -> str:
        if key == "trainable_params":
            return f"{int(value):,}"  # type: ignore[call-overload]
        if key == "wall_time_s":
            return f"{float(value):.0f} s"  # type: ignore[arg-type]
        if isinstance(value, float):
            return f"{100 * value:.2f} %"
        return str(value)

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, row[k]) for _, k in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(extra: list[str]) -> int:
    batch = uuid.uuid4().hex[:8]  # tags this demo's two runs
    started = time.perf_counter()
    for mode, epochs in MODES.items():
        cmd = [
            sys.executable,
            "-m",
            "transferlab.train",
            f"mode={mode}",
            f"trainer.epochs={epochs}",
            f"mlflow.experiment_name={EXPERIMENT}",
            f"mlflow.run_name=demo-{batch}-{mode}",
            *extra,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"demo: the {mode} run failed (see above)", file=sys.stderr)
            return 1
    root = repo_root()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string=f"attributes.run_name LIKE 'demo-{batch}-%'"
    )
    rows = []
    for mode, epochs in MODES.items():
        run = runs[runs["tags.mode"] == mode].iloc[0]
        recipe = f"{run['tags.choice.scheduler']} lr, augment={run['tags.choice.augment']}"
        rows.append(
            {
                "mode": mode,
                "recipe": recipe,
                "epochs": epochs,
                **{k: run[f"metrics.{k}"] for _, k in COLUMNS[3:]},
            }
        )
    device = runs["tags.device"].iloc[0]
    print(
        f"\nELPV (binary, stratified 75/25 split), EfficientNet-Lite0 (bundled ImageNet weights), 224 px, {device}\n"
    )
    print(markdown_table(rows))
    print(
        f"\nDemo took {time.perf_counter() - started:.0f} s. Published: fine-tuned VGG-19 88.42 %, SVM 82.44 % "
        "(Deitsch et al. 2019)."
    )
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    print(f"See the runs: make ui, then open {ui_link('sqlite:', experiment)} (experiment '{EXPERIMENT}').")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
