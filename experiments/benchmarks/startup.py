"""How fast the entrypoint answers without compute: a bad setting refused, ``--help`` printed.

python experiments/benchmarks/startup.py            # 3 runs each, medians, on this machine

Baseline, in the same command: the heavy imports a run needs (torch, timm, torchvision, MLflow,
scikit-learn: ``import transferlab.train``), which the entrypoint paid before it could refuse anything.
Each case is a fresh interpreter (``python -m transferlab.train ...``), as a user types it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = {
    "bad setting (trainer.batch_size=0)": ["-m", "transferlab.train", "trainer.batch_size=0"],
    "misspelt key (trainer.epoch=3)": ["-m", "transferlab.train", "trainer.epoch=3"],
    "--help": ["-m", "transferlab.train", "--help"],
    "--cfg job": ["-m", "transferlab.train", "--cfg", "job"],
}
BASELINE = ["-c", "import transferlab.train"]


def seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(repeats: int = 3) -> None:
    base = seconds(BASELINE, repeats)
    print(f"| case | median of {repeats} | vs `import transferlab.train` ({base:.2f} s) | target |")
    print("|---|---|---|---|")
    for name, args in CASES.items():
        took = seconds(args, repeats)
        print(f"| {name} | {took:.2f} s | {took / base:.2f}x | <= 3 s: {'met' if took <= 3 else 'NOT met'} |")


if __name__ == "__main__":
    main()
