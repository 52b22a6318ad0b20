"""GPU check: transferlab's fast paths on a CUDA machine, appended to the benchmark record.

python experiments/benchmarks/gpu_check.py                        # on a GPU machine (a few minutes)
python experiments/benchmarks/gpu_check.py --device cpu --quick   # smoke run anywhere (tested)

Measures, through transferlab's own :class:`~transferlab.engine.Runner` on the same random images:
full fine-tuning training images/s of resnet18 (random init: no download) and EfficientNet-Lite0
(bundled ImageNet weights) in fp32/NCHW vs AMP + channels_last (+ pinned memory, non-blocking
copies), next to a plain hand-written loop; the same fast path with ``augment=strong`` (timm's
RandAugment + random erasing on each stored image, in DataLoader workers) against ``augment=none``;
and the feature-extraction speed-up over the seed article's loop (backbone forward every batch,
every epoch). The figures and the GPU's name are
appended to experiments/benchmarks/README.md (or ``--record``).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.backbones import build_backbone
from transferlab.bench import (
    article_feature_extraction,
    augment_option,
    plain_finetune_images_per_s,
    runner_images_per_s,
)
from transferlab.data import PreparedData, Splits, storage_size
from transferlab.engine import Runner
from transferlab.modes import make_model, trainable_parameters
from transferlab.schemas import AugmentConfig, BackboneConfig, FinetuneModeConfig, ModeConfig, TrainerConfig

RECORD = Path(__file__).resolve().parent / "README.md"
BACKBONES = {
    "resnet18": BackboneConfig(name="resnet18", source="torchvision", weights=None),
    "efficientnet_lite0": BackboneConfig(name="efficientnet_lite0", source="bundled", weights="imagenet"),
}


def random_data(n: int, size: int, preprocess) -> PreparedData:  # noqa: ANN001 - a Preprocess
    """Random RGB uint8 images with two classes, stored at the eval resize as transferlab stores
    them: throughput does not depend on what they show."""
    g = torch.Generator().manual_seed(0)
    side = storage_size(preprocess)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    order = np.arange(n)
    train, val, test = order[: int(0.8 * n)], order[int(0.8 * n) : int(0.9 * n)], order[int(0.9 * n) :]
    return PreparedData(
        "random", images, labels, ["a", "b"], Splits(train, val, test), preprocess, "0" * 64, "random"
    )


def _backbone(name: str, size: int):  # noqa: ANN202 - (model with head, preprocess)
    torch.manual_seed(0)
    cfg = BACKBONES[name]
    cfg = BackboneConfig(cfg.name, cfg.source, cfg.weights, image_size=size)
    built = build_backbone(cfg)
    return built.model, built.preprocess


STRONG = augment_option("strong")  # conf/augment/strong.yaml, as a run gets it


def finetune_images_per_s(
    name: str, args: argparse.Namespace, fast: bool, augment: AugmentConfig | None = None
) -> float:
    """Training images/s of transferlab's full fine-tuning: the median of the timed epochs after a warm-up."""
    network, pre = _backbone(name, args.size)
    data = random_data(args.images, args.size, pre)
    (stage,) = FinetuneModeConfig(name="full_finetune", lr=1e-4).stages(1, 1e-4)
    model = make_model(network, data.num_classes)
    trainer = TrainerConfig(
        batch_size=args.batch_size,
        device=args.device,
        amp=fast,
        channels_last=fast,
        pin_memory=fast,
        compile=fast and args.compile,
        progress=False,
        feature_cache=False,
        num_workers=args.workers if augment is not None else 0,
    )
    runner = Runner(model, data, trainer, seed=0, augment=augment)
    runner.enter(stage)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-4)
    return runner_images_per_s(runner, optimizer, args.repeats)


def plain_images_per_s(name: str, args: argparse.Namespace) -> float:
    network, pre = _backbone(name, args.size)
    data = random_data(args.images, args.size, pre)
    device = torch.device(args.device)
    return plain_finetune_images_per_s(data, network, device, args.batch_size, epochs=1 + args.repeats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def feature_extraction_speedup(args: argparse.Namespace) -> tuple[float, float]:
    """(article loop seconds, transferlab seconds) for ``--epochs`` epochs of EfficientNet-Lite0 heads."""
    device = torch.device(args.device)
    network, pre = _backbone("efficientnet_lite0", args.size)
    data = random_data(args.images, args.size, pre)
    start = time.perf_counter()
    article_feature_extraction(data, network, args.epochs, device, args.batch_size)
    _sync(device)
    article = time.perf_counter() - start

    network, _ = _backbone("efficientnet_lite0", args.size)
    (stage,) = ModeConfig(name="feature_extract", lr=1e-3).stages(args.epochs, 1e-3)
    model = make_model(network, data.num_classes)
    trainer = TrainerConfig(
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
        epochs=args.epochs,
        feature_cache=False,
    )
    runner = Runner(model, data, trainer, seed=0)
    runner.enter(stage)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
    start = time.perf_counter()
    runner.fit(optimizer, args.epochs, lambda row, epoch: None)
    runner.evaluate(data.splits.test)
    _sync(device)
    return article, time.perf_counter() - start


def ddp_rows(device: torch.device, quick: bool) -> list[str]:
    """One run over 2 GPUs (torchrun, NCCL) vs one GPU, through experiments/benchmarks/ddp.py (ELPV)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if quick or count < 2:
        return [
            f"DDP (2 GPUs vs 1): not measured, it needs 2 or more CUDA devices (this machine has {count}).",
            "",
        ]
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("ddp.py")),
        "--epochs",
        "3",
        "--train-per-class",
        "256",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return ["DDP (2 GPUs vs 1), `python experiments/benchmarks/ddp.py --epochs 3 --train-per-class 256`:", "",
            (done.stdout if done.returncode == 0 else f"failed: {done.stderr[-2000:]}").strip(), ""]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (smoke test)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script, measures nothing"
    )
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the augmented row")
    parser.add_argument(
        "--record", type=Path, default=RECORD, help=f"markdown file to append to ({RECORD.name})"
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run it on a GPU machine, or --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.workers = min(args.workers, 2)
    # One epoch of 2,048 images lasts well under a second on an H100: time several, keep the median.
    args.images, args.size, args.batch_size, args.epochs, args.repeats = (
        (16, 32, 8, 1, 1) if args.quick else (8192, 224, 128, 10, 3)
    )
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )

    rows = []
    for backbone in BACKBONES:
        plain = plain_images_per_s(backbone, args)
        base = finetune_images_per_s(backbone, args, fast=False)
        fast = finetune_images_per_s(backbone, args, fast=True)
        rows.append(
            f"| {backbone} full fine-tuning, images/s | {plain:.1f} | {base:.1f} | {fast:.1f} | "
            f"{fast / base:.2f}x | {fast / plain:.2f}x |"
        )
        print(rows[-1], flush=True)
    none = finetune_images_per_s("efficientnet_lite0", args, fast=True)
    strong = finetune_images_per_s("efficientnet_lite0", args, fast=True, augment=STRONG)
    augmented = (
        f"efficientnet_lite0 fast path, augment=strong ({args.workers} workers) vs augment=none: "
        f"{strong:.1f} vs {none:.1f} images/s ({strong / none:.2f}x)."
    )
    print(augmented, flush=True)
    article, ours = feature_extraction_speedup(args)
    fast_label = "AMP + channels_last" + (" + compile" if args.compile else "")
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M %Z')}: GPU check on {name}"
        + (" (--quick smoke run: sizes too small to mean anything)" if args.quick else ""),
        "",
        f"`{' '.join(['python experiments/benchmarks/gpu_check.py', *(sys.argv[1:] if argv is None else argv)])}`; "
        f"torch {torch.__version__}, {args.images} random {args.size} px images, batch {args.batch_size}; "
        f"images/s: median of {args.repeats} training epochs after a warm-up epoch.",
        "",
        f"| measurement | plain loop | transferlab fp32 NCHW | transferlab {fast_label} | fast / fp32 | fast / plain |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        augmented,
        "",
        f"Feature extraction, EfficientNet-Lite0, {args.epochs} epochs: the article's loop {article:.1f} s, "
        f"transferlab {ours:.1f} s ({article / ours:.1f}x faster).",
        "",
    ]
    lines += ddp_rows(device, args.quick)
    report = "\n".join(lines)
    print("\n" + report)
    with open(args.record, "a") as fh:
        fh.write("\n" + report)
    print(f"appended to {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
