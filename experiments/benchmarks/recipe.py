"""What the fine-tuning recipe costs: training images/s with ``augment=strong`` against ``augment=none``.

python experiments/benchmarks/recipe.py                 # ELPV, EfficientNet-Lite0, about 3 minutes on 2 cores
python experiments/benchmarks/recipe.py --quick         # a tiny random-init network: checks the script

Both arms run transferlab's own full fine-tuning loop (:class:`~transferlab.engine.Runner`) over the
same training images and model in one process: the baseline is the un-augmented eval crop, the other
arms timm's RandAugment (rand-m9-mstd0.5-inc1), random-resized crops, flips and random erasing applied
to each stored image, in the training process (``trainer.num_workers=0``, the default) and in
DataLoader worker processes (``--workers``, 2 by default). Each arm: one warm-up epoch, then the median
images/s of ``--repeats`` epochs. Target on the project's 2-core CPU: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from transferlab.backbones import build_backbone
from transferlab.bench import augment_option, runner_images_per_s
from transferlab.engine import Runner
from transferlab.inputs import prepare_cached
from transferlab.modes import make_model, trainable_parameters
from transferlab.schemas import (
    AugmentConfig,
    BackboneConfig,
    ElpvDataConfig,
    FinetuneModeConfig,
    TrainerConfig,
)
from transferlab.schemas.root import repo_root

STRONG = augment_option("strong")  # conf/augment/strong.yaml, as a run gets it


def images_per_s(args: argparse.Namespace, augment: AugmentConfig | None, workers: int = 0) -> float:
    torch.manual_seed(0)
    if args.quick:
        backbone = BackboneConfig(name="test_efficientnet", source="timm", weights=None, image_size=64)
    else:
        backbone = BackboneConfig(name="efficientnet_lite0", source="bundled", weights="imagenet")
    built = build_backbone(backbone)
    root = repo_root()
    data, _ = prepare_cached(
        ElpvDataConfig(limit=args.images), built.preprocess, f"{root}/data", f"{root}/.cache"
    )
    model = make_model(built.model, data.num_classes)
    trainer = TrainerConfig(batch_size=32, progress=False, feature_cache=False, num_workers=workers)
    runner = Runner(model, data, trainer, seed=0, augment=augment)
    runner.enter(FinetuneModeConfig(name="full_finetune", lr=1e-4).stages(1, 1e-4)[-1])
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-4)
    return runner_images_per_s(runner, optimizer, args.repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-init network: checks the script")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the augmented arm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.images = 40 if args.quick else 160  # data.limit: 115 training images, 4 batches of 32
    plain = images_per_s(args, None)
    in_process = images_per_s(args, STRONG)
    workers = images_per_s(args, STRONG, args.workers)
    cpu = platform.processor() or platform.machine()
    print(
        f"full fine-tuning, {'test_efficientnet (quick)' if args.quick else 'efficientnet_lite0'}, ELPV "
        f"data.limit={args.images}, batch 32, {torch.get_num_threads()} threads on {cpu}: augment=none "
        f"{plain:.1f} images/s; augment=strong in-process {in_process:.1f} images/s (ratio "
        f"{in_process / plain:.2f}), with {args.workers} workers {workers:.1f} images/s (ratio "
        f"{workers / plain:.2f}); target >= 0.9"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
