"""One run over two processes (torchrun, gloo) against one process, same data and global batch.

python experiments/benchmarks/ddp.py                  # full fine-tuning, EfficientNet-Lite0, ELPV subset
python experiments/benchmarks/ddp.py --epochs 1 --train-per-class 32   # shorter

Baseline, in the same command: one process (``python -m transferlab.train``, torch's default threads:
every core) with ``trainer.batch_size=2B``; against it ``torchrun --standalone --nproc_per_node=2`` with
``trainer.batch_size=B`` (one thread per process: torchrun's OMP_NUM_THREADS=1). Both train on the
same global batches of the same images from the same seed. Printed: training images/s (the runs'
``images_per_s``, mean over epochs, all processes together), wall time, and the final metrics side by
side. A first, unmeasured run fills the decoded-input cache both read. On a CPU machine the two processes share its cores, so this measures the overhead of the
all-reduce and the sharded evaluation, not a speed-up; on GPUs (one process per GPU) it is the speed-up.
BatchNorm statistics are per process (SyncBatchNorm is GPU-only), so the metrics may differ a little.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def launch(cmd: list[str], root: Path, overrides: list[str]) -> float:
    store = [
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        f"mlflow.artifact_location={root}/artifacts",
        f"hydra.run.dir={root}/hydra",
        "trainer.progress=false",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, "-m", "transferlab.train", *store, *overrides], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - start


def result(root: Path) -> dict[str, float]:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    speeds = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_s")]
    return {**run.data.metrics, "images_per_s": statistics.mean(speeds)}


def device() -> str:
    import torch  # the runs pick the same way (trainer.device=auto); each DDP process takes one GPU

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (one per process)"
    return "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=64, help="training images per class (ELPV)")
    ap.add_argument("--batch", type=int, default=16, help="per process; one process gets twice this")
    args = ap.parse_args()
    common = [
        "mode=full_finetune",
        "optimizer.lr=0.0003",
        f"trainer.epochs={args.epochs}",
        f"data.train_per_class={args.train_per_class}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        one, two, warm = Path(tmp) / "one", Path(tmp) / "two", Path(tmp) / "warm"
        one.mkdir(), two.mkdir(), warm.mkdir()
        # Unmeasured: fills the decoded-input cache (paths.cache_dir) that both measured runs then read.
        launch([sys.executable], warm, ["trainer.epochs=1", f"data.train_per_class={args.train_per_class}"])
        wall_one = launch([sys.executable], one, [*common, f"trainer.batch_size={2 * args.batch}"])
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        wall_two = launch(torchrun, two, [*common, f"trainer.batch_size={args.batch}"])
        a, b = result(one), result(two)
    print(
        f"Full fine-tuning, EfficientNet-Lite0 (bundled weights), ELPV with {args.train_per_class} training "
        f"images per class, {args.epochs} epoch(s), global batch {2 * args.batch}; device: {device()}."
    )
    print("| | one process | two processes (torchrun, gloo) | two / one |")
    print("|---|---|---|---|")
    print(
        f"| training images/s | {a['images_per_s']:.1f} | {b['images_per_s']:.1f} | {b['images_per_s'] / a['images_per_s']:.2f}x |"
    )
    print(f"| wall time, start to exit | {wall_one:.0f} s | {wall_two:.0f} s | {wall_two / wall_one:.2f}x |")
    for key in ("best_val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_loss"):
        print(f"| {key} | {a[key]:.4f} | {b[key]:.4f} | {b[key] - a[key]:+.4f} |")


if __name__ == "__main__":
    main()
