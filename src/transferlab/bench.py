"""`make bench`: transferlab against the seed article's loop and a plain PyTorch loop, side by side.

python -m transferlab.bench                      # ELPV, data.limit=160: 7 min on 2 idle CPU cores (start-up dominates)
python -m transferlab.bench --full               # all 2,624 ELPV images: 30 min there; the reference figures
python -m transferlab.bench --record experiments/benchmarks/README.md   # also append the table there

Every contender runs as its own fresh process on the same images (decoded once into a shared input
cache first), one after another, so wall times include start-up and data loading alike and peak
memory is each process's own maximum resident set (``wait4``). What is compared:

(a) the article's feature-extraction loop (freeze, swap head, Adam 1e-3, ``model.train()`` every
    epoch, backbone forward on every batch) vs ``transferlab.train mode=feature_extract``, 10 epochs
    each, the feature cache cold: wall time and test accuracy;
(b) a 6-job sweep (2 learning rates x 3 seeds, Hydra multirun) vs the single run of (a);
(c) full fine-tuning images/s of ``transferlab.train`` vs a plain hand-written loop, same model and data;
(d) peak memory of (a)'s two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from transferlab.backbones import build_backbone
from transferlab.data import PreparedData, eval_crop, normalize
from transferlab.engine import select_device
from transferlab.inputs import prepare_cached
from transferlab.schemas import AugmentConfig, BackboneConfig, ElpvDataConfig, repo_root

BACKBONE = BackboneConfig(name="efficientnet_lite0", source="bundled", weights="imagenet")


def _backbone_cfg(args: argparse.Namespace) -> BackboneConfig:
    return BackboneConfig(BACKBONE.name, BACKBONE.source, BACKBONE.weights, image_size=args.image_size)


TARGETS = {"a": 8.0, "b": 1.5, "c": 1.0}


# ---------------------------------------------------------------------------------------------
# The contenders that are not transferlab (run in child processes, or imported by gpu_check.py)


def _swap_head(model: nn.Module, num_classes: int) -> None:
    """The article's head swap: "ResNets use .fc, many others use .classifier"."""
    name = "fc" if isinstance(getattr(model, "fc", None), nn.Linear) else "classifier"
    setattr(model, name, nn.Linear(getattr(model, name).in_features, num_classes))


def article_feature_extraction(
    data: PreparedData, model: nn.Module, epochs: int, device: torch.device, batch_size: int = 32
) -> float:
    """The seed article's loop, as printed there; returns test accuracy. ``model`` has its ImageNet head.

    The article feeds a DataLoader of already-transformed images; here the loader yields the same
    uint8 images every transferlab run sees, normalised per batch as the weights expect (the
    article's "preprocess inputs the way the model expects"). It never decodes a PNG per epoch,
    which only flatters the article's side.
    """
    num_classes = data.num_classes
    # Freeze the entire backbone.
    for p in model.parameters():
        p.requires_grad = False
    # Swap in a fresh head — trainable by default.
    _swap_head(model, num_classes)
    model.to(device)
    optimizer = optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    train = torch.from_numpy(data.splits.train)
    train_loader = DataLoader(
        TensorDataset(eval_crop(data.images[train], data.preprocess), data.labels[train]),
        batch_size=batch_size,
        shuffle=True,
    )
    for _epoch in range(epochs):
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            images = normalize(images, data.preprocess)
            optimizer.zero_grad()
            outputs = model(images)
            loss = loss_fn(outputs, labels)
            loss.backward()
            optimizer.step()
    model.eval()  # the article's last gotcha
    test = torch.from_numpy(data.splits.test)
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(
            TensorDataset(eval_crop(data.images[test], data.preprocess), data.labels[test]),
            batch_size=batch_size,
        ):
            outputs = model(normalize(images.to(device), data.preprocess))
            correct += (outputs.argmax(1).cpu() == labels).sum().item()
    return correct / len(test)


def augment_option(name: str) -> AugmentConfig:
    """``conf/augment/<name>.yaml`` as its schema: a benchmark measures the option a run gets."""
    node = OmegaConf.load(Path(repo_root()) / "conf" / "augment" / f"{name}.yaml")
    node.pop("defaults", None)
    return AugmentConfig(**OmegaConf.to_container(node))


def runner_images_per_s(runner: Any, optimizer: optim.Optimizer, repeats: int) -> float:
    """Training images/s of a Runner's epochs: one warm-up epoch (allocator, kernels, workers, compile),
    then the median of ``repeats`` epochs."""
    from transferlab.engine import FitState

    never = lambda: False  # noqa: E731 - no stop signal in a benchmark
    runner.train_epoch(optimizer, FitState(epoch=0), never)
    rates = [
        runner.train_epoch(optimizer, FitState(epoch=e), never)["images_per_s"] for e in range(1, 1 + repeats)
    ]
    return statistics.median(rates)


def plain_finetune_images_per_s(
    data: PreparedData, model: nn.Module, device: torch.device, batch_size: int = 32, epochs: int = 2
) -> float:
    """Full fine-tuning written as anyone would by hand; training images/s, the median over the
    epochs after the first (which warms up kernels and allocators, as transferlab's first does)."""
    _swap_head(model, data.num_classes)
    model.to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    train = torch.from_numpy(data.splits.train)
    loader = DataLoader(
        TensorDataset(eval_crop(data.images[train], data.preprocess), data.labels[train]),
        batch_size=batch_size,
        shuffle=True,
    )
    rates: list[float] = []
    for _epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for images, labels in loader:
            images, labels = normalize(images.to(device), data.preprocess), labels.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(train) / (time.perf_counter() - start))
    return statistics.median(rates[1:] or rates)


def _child(args: argparse.Namespace) -> None:
    """Entry point of the article / plain child processes: one result as JSON on ``--out``."""
    start = time.perf_counter()  # after the imports, as transferlab's wall_time_s metric
    torch.manual_seed(0)
    data = _data(args)
    model = build_backbone(_backbone_cfg(args)).model
    device = select_device("auto")  # the device transferlab.train picks with trainer.device=auto
    if args.role == "article":
        result = {"test_accuracy": article_feature_extraction(data, model, args.epochs, device)}
    else:
        result = {"images_per_s": plain_finetune_images_per_s(data, model, device)}
    result["in_process_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(result))


def _data(args: argparse.Namespace, limit: int | None = None) -> PreparedData:
    cfg = ElpvDataConfig(limit=args.limit if limit is None else limit)
    pre = build_backbone(_backbone_cfg(args)).preprocess
    data, _ = prepare_cached(cfg, pre, args.work, args.cache_dir)
    return data


# ---------------------------------------------------------------------------------------------
# Measuring processes


@dataclass
class Measured:
    wall_s: float
    peak_rss_mb: float


def run_measured(cmd: list[str], log: Path) -> Measured:
    """Run ``cmd`` to completion; its wall time and its own peak resident memory (not its parent's)."""
    print("$", " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    with open(log, "ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench: {' '.join(cmd[1:4])} failed (exit {proc.returncode}); log tail:\n{tail}")
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    return Measured(wall, rss)


def _train_cmd(work: Path, cache_dir: Path, *overrides: str, multirun: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transferlab.train",
        *(["-m"] if multirun else []),
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.artifact_location={work}/artifacts",
        "mlflow.experiment_name=bench",
        f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={work}/logs",
        f"hydra.run.dir={work}/logs/run",
        f"hydra.sweep.dir={work}/logs/multirun",
        "trainer.progress=false",
        *overrides,
    ]


def _metrics(work: Path, run_name: str) -> list[dict[str, float]]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bench"], filter_string=f"attributes.run_name = '{run_name}'")
    return [{k[8:]: v for k, v in row.items() if k.startswith("metrics.")} for _, row in runs.iterrows()]


def bench(args: argparse.Namespace) -> str:
    work = Path(args.work)
    cache_dir = Path(args.cache_dir)
    log = work / "bench.log"
    limit = "null" if args.limit is None else str(args.limit)
    size = "null" if args.image_size is None else str(args.image_size)
    backbone_args = ["backbone=efficientnet_lite0", f"backbone.image_size={size}"]
    data_args = ["data=elpv", f"data.limit={limit}", *backbone_args]
    child = [
        sys.executable,
        "-m",
        "transferlab.bench",
        "--child",
        "--work",
        str(work),
        "--cache-dir",
        str(cache_dir),
    ]
    child += ["--limit", limit if args.limit is not None else "0", "--epochs", str(args.epochs)]
    child += [] if args.image_size is None else ["--image-size", str(args.image_size)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    # Decode once for everyone (both sides then read the same uint8 tensor from the input cache).
    data = _data(args)
    # The tracking store exists before anything is timed, as a user's does: creating an SQLite
    # store runs MLflow's schema migrations (3-6 s here), a one-time cost the article's loop,
    # which logs nothing, never pays either.
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{work}/mlflow.db").search_experiments()
    ft_data = _data(args, args.ft_limit)
    sizes = data.splits.sizes()

    # (a) + (d): the article's loop vs transferlab, feature cache cold.
    article = run_measured([*child, "--role", "article", "--out", str(work / "article.json")], log)
    article_json = json.loads((work / "article.json").read_text())
    article_acc, article_in = article_json["test_accuracy"], article_json["in_process_s"]
    shutil.rmtree(cache_dir / "features", ignore_errors=True)
    fe_args = [*data_args, "mode=feature_extract", f"trainer.epochs={args.epochs}"]
    ours = run_measured(_train_cmd(work, cache_dir, *fe_args, "mlflow.run_name=fe"), log)
    (fe,) = _metrics(work, "fe")

    # (b): six jobs over one frozen backbone; the cache starts cold again.
    shutil.rmtree(cache_dir / "features", ignore_errors=True)
    sweep_args = [*fe_args, "optimizer.lr=1e-3,3e-3", "seed=0,1,2", "mlflow.run_name=sweep"]
    sweep = run_measured(_train_cmd(work, cache_dir, *sweep_args, multirun=True), log)
    sweep_runs = _metrics(work, "sweep")
    assert len(sweep_runs) == 6, f"expected 6 sweep runs, found {len(sweep_runs)}"
    hits = sum(int(r.get("feature_cache_hit", 0)) for r in sweep_runs)

    # (c): full fine-tuning throughput on the same images: the second of two epochs on each side.
    ft_limit = ["--limit", str(args.ft_limit)]
    run_measured([*child, *ft_limit, "--role", "plain", "--out", str(work / "plain.json")], log)
    plain_ips = json.loads((work / "plain.json").read_text())["images_per_s"]
    # The bare loop, as the plain one is: the recipe's own cost is experiments/benchmarks/recipe.py's.
    ft_args = ["data=elpv", f"data.limit={args.ft_limit}", *backbone_args, "mode=full_finetune"]
    ft_args += ["scheduler=constant", "augment=none"]
    run_measured(_train_cmd(work, cache_dir, *ft_args, "trainer.epochs=2", "mlflow.run_name=ft"), log)
    (ft,) = _metrics(work, "ft")  # MLflow's latest value: the second epoch's images/s
    total = time.perf_counter() - started

    speedup = article.wall_s / ours.wall_s
    # The same without interpreter start-up and imports: the article's data+model+loop+test vs the
    # MLflow run's own wall_time_s (data, model, features, head epochs, test and all logging).
    speedup_in = article_in / fe["wall_time_s"]
    sweep_ratio = sweep.wall_s / ours.wall_s
    ft_ratio = ft["images_per_s"] / plain_ips
    acc_gap = 100 * (fe["test_accuracy"] - article_acc)

    def mark(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [
        (
            f"(a) feature extraction, {args.epochs} epochs: wall time",
            f"{article.wall_s:.0f} s (article)",
            f"{ours.wall_s:.0f} s",
            f"{speedup:.1f}x faster",
            ">= 8x",
            mark(speedup >= TARGETS["a"]),
        ),
        (
            "(a) same, after imports (in-process time)",
            f"{article_in:.0f} s (article)",
            f"{fe['wall_time_s']:.0f} s (run's wall_time_s)",
            f"{speedup_in:.1f}x faster",
            ">= 8x",
            mark(speedup_in >= TARGETS["a"]),
        ),
        (
            "(a) test accuracy",
            f"{100 * article_acc:.2f} %",
            f"{100 * fe['test_accuracy']:.2f} %",
            f"{acc_gap:+.2f} points",
            "within 1 point",
            mark(abs(acc_gap) <= 1.0),
        ),
        (
            "(b) 6-job sweep (2 lr x 3 seeds) vs 1 run",
            f"{ours.wall_s:.0f} s (1 run)",
            f"{sweep.wall_s:.0f} s (6 jobs, {hits} cache hits)",
            f"{sweep_ratio:.2f}x the single run",
            "<= 1.5x",
            mark(sweep_ratio <= TARGETS["b"]),
        ),
        (
            "(c) full fine-tuning, training images/s",
            f"{plain_ips:.2f} (plain loop)",
            f"{ft['images_per_s']:.2f}",
            f"{ft_ratio:.2f}x",
            ">= 1.0x",
            mark(ft_ratio >= TARGETS["c"]),
        ),
        (
            "(d) peak memory (max RSS), feature extraction",
            f"{article.peak_rss_mb:.0f} MB (article)",
            f"{ours.peak_rss_mb:.0f} MB",
            f"{ours.peak_rss_mb / article.peak_rss_mb:.2f}x",
            "report",
            "-",
        ),
    ]
    header = ["comparison", "baseline", "transferlab", "ratio", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    cmd = "python -m transferlab.bench " + " ".join(args.argv)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at the end"
    )
    extract = fe.get("feature_extract_s", float("nan"))
    notes = (
        f"ELPV binary, data.limit={limit} ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test), "
        f"EfficientNet-Lite0 (bundled ImageNet weights) at {data.preprocess.crop} px, batch 32, {select_device('auto').type}. "
        f"(a) transferlab spent {extract:.0f} s extracting features; the article's loop ran the backbone over "
        f"{args.epochs} x {sizes['train']} training images. (c) data.limit={args.ft_limit} "
        f"({ft_data.splits.sizes()['train']} training images), images/s of the second of two epochs. Bench took {total / 60:.1f} min."
    )
    return "\n".join(
        [
            f"### {time.strftime('%Y-%m-%d %H:%M %Z')}: `{cmd.strip()}`",
            "",
            f"Machine: {machine}.",
            "",
            notes,
            "",
            *lines,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transferlab.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--limit", type=int, default=160, help="ELPV images used (default 160; 0 or --full: all)"
    )
    parser.add_argument("--full", action="store_true", help="use all 2,624 ELPV images")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs in (a) and (b) (default 10)")
    parser.add_argument("--image-size", type=int, help="backbone.image_size (default: the weights' own)")
    parser.add_argument("--ft-limit", type=int, default=48, help="ELPV images for (c) (default 48)")
    parser.add_argument("--record", type=Path, help="append the table to this markdown file")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["article", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    if args.full or args.limit == 0:
        args.limit = None
    if args.child:
        _child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="transferlab-bench-") as tmp:
        args.work, args.cache_dir = tmp, str(Path(tmp) / "cache")
        report = bench(args)
    print("\n" + report)
    print("Ratios are measured side by side in this one run; on a shared machine only they are comparable.")
    if args.record:
        with open(args.record, "a") as fh:
            fh.write("\n" + report)
        print(f"appended to {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
