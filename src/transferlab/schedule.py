"""Learning-rate schedules per optimizer update, from timm's scheduler factory.

Every parameter group carries ``lr`` = the stage's (head) lr and ``lr_scale`` = its ratio to the head
(:mod:`transferlab.optim`); timm's schedulers set ``lr = value x lr_scale`` for each group, so one
schedule drives them all and the ratios hold at every step (warmup and ``min_lr`` included). The
schedule is stepped after each optimizer update with the stage's update count, the convention of timm's
``train.py`` (``step_update(num_updates)``): update ``k`` (0-based) runs at the schedule's value at ``k``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import create_scheduler_v2

from transferlab.schemas import SchedulerConfig, StepSchedulerConfig

# timm's name for each schedule: linear is its polynomial decay with power 1.
_TIMM_NAMES = {"constant": "constant", "cosine": "cosine", "step": "step", "linear": "poly"}


def warmup_updates(cfg: SchedulerConfig, updates_per_epoch: int) -> int:
    """``warmup_epochs`` in whole optimizer updates (a fractional epoch rounds to the nearest update)."""
    return round(cfg.warmup_epochs * updates_per_epoch)


def build_scheduler(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int
) -> Any:
    """A timm scheduler over one stage: ``epochs`` x ``updates_per_epoch`` updates, warmup first.

    The warmup is a prefix: the decay runs over the updates after it, so the stage's last update is at
    the schedule's end whatever the warmup (timm's ``warmup_prefix=True``). Building it sets every
    group's lr to its value at update 0.
    """
    total = epochs * updates_per_epoch
    # The schema checked warmup < the stage in epochs; in whole updates it may round up to all of it
    # (one update per epoch): keep at least one update of decay, as timm needs.
    warmup = min(warmup_updates(cfg, updates_per_epoch), total - 1)
    extra: dict[str, Any] = {}
    if isinstance(cfg, StepSchedulerConfig):
        extra = {"decay_epochs": cfg.decay_epochs * updates_per_epoch, "decay_rate": cfg.decay_rate}
    if cfg.name == "linear":
        extra = {"decay_rate": 1.0}  # the polynomial's power
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=_TIMM_NAMES[cfg.name],
        num_epochs=total - warmup,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=warmup,
        warmup_prefix=True,
        step_on_epochs=False,
        updates_per_epoch=1,  # counts are in updates already
        **extra,
    )
    return scheduler


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr_head`` and ``lr_backbone`` (its largest group; 0 when frozen) as they are now."""
    groups = optimizer.param_groups
    head = next((g for g in groups if g.get("name") == "head"), groups[0])  # unnamed: the first
    backbone = [g["lr"] for g in groups if g is not head]
    return {"lr_head": float(head["lr"]), "lr_backbone": float(max(backbone, default=0.0))}
