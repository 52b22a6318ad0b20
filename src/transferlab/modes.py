"""Where a run sits on the dial between feature extraction and full fine-tuning.

A mode decides two things, explicitly and in one place: which parameters get gradients, and which
modules run in train mode. "Frozen" here means bit-identical: a frozen backbone has no gradients
*and* stays in eval mode, so BatchNorm running statistics are never updated (the seed article's
loop calls ``model.train()`` on the whole model and silently changes them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from transferlab.backbones import TransferModel


@dataclass(frozen=True)
class Mode:
    name: str
    trains_backbone: bool


MODES: dict[str, Mode] = {
    "feature_extract": Mode("feature_extract", trains_backbone=False),
    "full_finetune": Mode("full_finetune", trains_backbone=True),
}


def freeze_backbone(backbone: nn.Module, mode: Mode) -> None:
    """Set ``requires_grad`` on the backbone. Called *before* the new head exists."""
    backbone.requires_grad_(mode.trains_backbone)


def set_train_mode(model: TransferModel, mode: Mode) -> None:
    """``model.train()`` for the parts that learn; a frozen backbone stays in eval mode."""
    model.train()
    if not mode.trains_backbone:
        model.backbone.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only these reach the optimizer (the article's ``filter(lambda p: p.requires_grad, ...)``)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, predicate: Callable[[nn.Parameter], bool] = lambda p: True) -> int:
    return sum(p.numel() for p in model.parameters() if predicate(p))
