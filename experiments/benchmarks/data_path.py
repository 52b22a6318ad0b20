"""The data path that streams from disk: a run's own memory against the dataset's size, and decode workers.

python experiments/benchmarks/data_path.py            # 5,000 and 20,000 generated images (~15 min on 2 cores)
python experiments/benchmarks/data_path.py --quick    # 200 and 800 images: checks the script
python experiments/benchmarks/data_path.py --only g   # the decode workers alone (5,000 images)

Generates a folder of JPEG photos (two classes, 320 x 256 px, smooth random content), then measures in
one command:

- (f) peak anonymous resident memory (``RssAnon`` of ``/proc/<pid>/status``, sampled every 50 ms) of a
  feature-extraction run (``python -m transferlab.train``, a fresh cache, so it decodes the folder into
  the store first) on N images against 4N images, same backbone at 224 px. File-backed pages of the
  memory-mapped store are page cache the kernel can drop, not the run's own memory, so they are not
  counted; the run's own memory should not grow with the dataset (target: under 300 MB apart).
- (g) the first decode of the N-image folder into the store with 2 worker processes against 1
  (``trainer.num_workers``; target >= 1.7x on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

BACKBONE = [
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "backbone.weights=null",
    "backbone.image_size=224",
]


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs in two class folders: low-resolution noise, upsampled (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 256), Image.BILINEAR)
        image.save(root / ("a" if i % 2 else "b") / f"{i:06d}.jpg", quality=90)
    return root


def link_subset(source: Path, target: Path, n: int) -> Path:
    """The first n/2 images of each class of ``source`` as hard links (no second copy on disk)."""
    files = [f for c in ("a", "b") for f in sorted((source / c).glob("*.jpg"))[: n // 2]]
    for f in files:
        dest = target / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dest)
    return target


def rss_anon_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+)", text).group(1)) / 1024


def peak_rss_anon(cmd: list[str], log: Path) -> tuple[float, float, int, str]:
    """Run ``cmd``; (peak RssAnon in MB, seconds, return code, what the run was doing then: its last
    log line before the peak), sampled every 50 ms."""
    peak, peak_at = 0.0, 0.0
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_at
            while not done.is_set():
                with contextlib.suppress(OSError, AttributeError):  # the process has just ended
                    now = rss_anon_mb(proc.pid)
                    if now > peak:
                        peak, peak_at = now, time.time()
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    return peak, time.perf_counter() - start, rc, phase_at(log, peak_at)


def phase_at(log: Path, when: float) -> str:
    """The message of the run's last log line (``[date time,ms][logger][LEVEL] - message``) before ``when``."""
    last = "before its first log line"
    for line in log.read_text().splitlines():
        found = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\[[^]]*\]\[\w+\] - (.*)", line)
        if not found:
            continue
        stamp = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000
        if stamp > when:
            break
        last = found.group(3)
    return re.sub(r"/\S+", "<path>", last)[:90]


def train_cmd(root: Path, folder: Path, tag: str, workers: int = 0, epochs: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transferlab.train",
        "data=imagefolder",
        f"data.root={folder}",
        *BACKBONE,
        "mode=feature_extract",
        f"trainer.epochs={epochs}",
        f"trainer.num_workers={workers}",
        "trainer.progress=false",
        "trainer.batch_size=64",
        f"paths.cache_dir={root / ('cache-' + tag)}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"hydra.run.dir={root / ('out-' + tag)}",
    ]


def decode_seconds(log: Path) -> float:
    found = re.search(r"decoded \d+ images in ([\d.]+) s", log.read_text())
    if not found:
        raise SystemExit(f"no decode line in {log}: see it for the run's error")
    return float(found.group(1))


def run_logged(cmd: list[str], log: Path) -> bool:
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(log.read_text()[-3000:])
    return rc == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 and 800 images: checks the script")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--only", choices=("f", "g"), help="one of the two measurements")
    args = parser.parse_args(argv)
    n = 200 if args.quick else args.images
    lines = []
    with tempfile.TemporaryDirectory(prefix="tl-datapath-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        if args.only == "g":
            small = make_folder(root / f"images-{n}", n)
            print(f"generated {n} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            large = make_folder(root / f"images-{4 * n}", 4 * n)
            small = link_subset(large, root / f"images-{n}", n)
            print(f"generated {4 * n} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
            peaks = {}
            for tag, folder in ((f"{n}", small), (f"{4 * n}", large)):
                log = root / f"run-{tag}.log"
                peak, seconds, rc, phase = peak_rss_anon(train_cmd(root, folder, tag), log)
                if rc != 0:
                    print(log.read_text()[-3000:])
                    return 1
                peaks[tag] = peak
                print(
                    f"feature extraction on {tag} images: peak RssAnon {peak:.0f} MB ({seconds:.0f} s), "
                    f"reached after: {phase}",
                    flush=True,
                )
            p1, p4 = peaks[f"{n}"], peaks[f"{4 * n}"]
            lines.append(
                f"- (f) peak RssAnon of a feature-extraction run (test_efficientnet at 224 px, fresh cache): "
                f"{n} images {p1:.0f} MB, {4 * n} images {p4:.0f} MB: {p4 - p1:+.0f} MB for {3 * n} more images "
                f"(target < 300 MB; an in-memory store would add about {3 * n * 3 * 256 * 256 / 2**20:.0f} MB)"
            )
        if args.only != "f":
            if args.only == "g" and not run_logged(train_cmd(root, small, f"{n}"), root / f"run-{n}.log"):
                return 1
            one = decode_seconds(root / f"run-{n}.log")  # that run decoded in-process
            if not run_logged(train_cmd(root, small, f"{n}-w2", workers=2), root / "run-w2.log"):
                return 1
            two = decode_seconds(root / "run-w2.log")
            lines.append(
                f"- (g) first decode of {n} images: 1 process {one:.1f} s, 2 workers {two:.1f} s: "
                f"{one / two:.2f}x (target >= 1.7x)"
            )
    cpu = platform.processor() or platform.machine()
    flags = " --quick" * args.quick + (f" --only {args.only}" if args.only else "")
    print(f"\n`python experiments/benchmarks/data_path.py{flags}` on {os.cpu_count()} cores ({cpu}):")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
