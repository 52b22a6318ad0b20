"""Where a run sits on the dial between feature extraction and full fine-tuning.

A mode decides two things, explicitly and in one place: which parameters get gradients, and which
modules run in train mode. "Frozen" here means bit-identical: a frozen module has no gradients
*and* stays in eval mode, so BatchNorm running statistics are never updated (the seed article's
loop calls ``model.train()`` on the whole model and silently changes them).

The dial, as config (``conf/mode/``):

- ``feature_extract``: the backbone is frozen, only the new head trains.
- ``partial``: the last ``mode.trainable_stages`` stages of the backbone train, the rest is frozen.
- ``lp_ft``: a linear probe (``feature_extract`` for ``mode.probe_epochs``), then everything trains
  from that head (Kumar et al., ICLR 2022).
- ``full_finetune``: everything trains.

A run is a list of :class:`Stage` (one, or two for ``lp_ft``); ``enter_stage`` sets gradients and
returns the resolved :class:`Mode` the engine trains with. Stages of a backbone (stem, ResNet
``layer1..4``, EfficientNet ``blocks.N``, ViT ``blocks.N``) come from timm's own ``group_matcher``
for timm models and from the model's structure for torchvision ones.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.backbones import TransferModel, split_head
from transferlab.config import ConfigError, FinetuneModeConfig, LpFtModeConfig, ModeConfig, PartialModeConfig


@dataclass(frozen=True)
class Mode:
    """What the engine needs: does any backbone parameter train, and what stays in eval mode."""

    name: str
    trains_backbone: bool
    # Backbone submodules kept in eval mode while the rest trains (frozen stages, frozen BatchNorm).
    eval_modules: tuple[str, ...] = ()
    # Labels of the backbone stages that train (for the log); () when the backbone is frozen.
    trainable: tuple[str, ...] = ()


# The registry of mode names (config validation reads it). Each entry is the mode at its most
# trained; ``enter_stage`` resolves what actually trains in each stage of a run.
MODES: dict[str, Mode] = {
    "feature_extract": Mode("feature_extract", trains_backbone=False),
    "partial": Mode("partial", trains_backbone=True),
    "lp_ft": Mode("lp_ft", trains_backbone=True),
    "full_finetune": Mode("full_finetune", trains_backbone=True),
}
ALL_STAGES = -1  # Stage.trainable_stages: the whole backbone
# timm's matcher suffix for "belongs to the group before" (timm.models._manipulate.MATCH_PREV_GROUP).
MATCH_PREV_GROUP = (99999,)


@dataclass(frozen=True)
class Stage:
    """One fit of a run: what trains, at which learning rates, for how many epochs."""

    name: str
    epochs: int
    first_step: int  # MLflow step of its first epoch (stages follow each other on one axis)
    lr: float  # the head's; backbone groups scale it
    trainable_stages: int  # 0: frozen backbone; ALL_STAGES: all of it; k: the last k stages
    backbone_lr_scale: float = 1.0
    layer_decay: float | None = None
    batchnorm: str = "train"

    @property
    def trains_backbone(self) -> bool:
        return self.trainable_stages != 0

    @property
    def end(self) -> int:
        """The step after its last epoch: the next stage's ``first_step``."""
        return self.first_step + self.epochs


def schedule(cfg: ModeConfig, epochs: int, lr: float) -> list[Stage]:
    """The stages of a run. ``epochs`` (trainer.epochs) counts the stage that trains the backbone:
    lp_ft adds its cheap probe epochs in front, so lp_ft and full_finetune fine-tune equally long."""
    if not isinstance(cfg, FinetuneModeConfig):
        return [Stage(cfg.name, epochs, 0, lr, trainable_stages=0)]
    tuning = {
        "backbone_lr_scale": cfg.backbone_lr_scale,
        "layer_decay": cfg.layer_decay,
        "batchnorm": cfg.batchnorm,
    }
    if isinstance(cfg, PartialModeConfig):
        return [Stage(cfg.name, epochs, 0, lr, cfg.trainable_stages, **tuning)]
    if isinstance(cfg, LpFtModeConfig):
        probe = Stage("probe", cfg.probe_epochs, 0, cfg.probe_lr, trainable_stages=0)
        return [probe, Stage("finetune", epochs, cfg.probe_epochs, lr, ALL_STAGES, **tuning)]
    return [Stage(cfg.name, epochs, 0, lr, ALL_STAGES, **tuning)]


# -- stages of a backbone -------------------------------------------------------------------------
Matcher = dict[str, Any] | Callable[[str], tuple[float, ...]]


def _trunk(backbone: nn.Module) -> list[str]:
    """The stage modules of a torchvision network, input to output.

    ResNet-style ``layer1..N``; otherwise the children of the Sequential/ModuleList holding the most
    parameters: ``features`` (MobileNet, EfficientNet, ConvNeXt, VGG, Swin), ``encoder.layers`` (ViT).
    """
    layers = [name for name, _ in backbone.named_children() if re.fullmatch(r"layer\d+", name)]
    if len(layers) >= 2:
        return layers
    best, best_size = None, 0
    for name, module in backbone.named_modules():
        if name and isinstance(module, nn.Sequential | nn.ModuleList) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise TypeError(f"cannot find the stages of {type(backbone).__name__}: no layerN or block sequence")
    container = backbone.get_submodule(best)
    return [
        f"{best}.{child}" for child, m in container.named_children() if next(m.parameters(), None) is not None
    ]


def structural_matcher(backbone: nn.Module, coarse: bool) -> Callable[[str], tuple[float, ...]]:
    """A timm-style group matcher from the network's structure (for models without ``group_matcher``).

    Parameters before the first stage are the stem; those after the last (a final norm or 1x1 conv)
    join the last stage, as timm's matchers do (``MATCH_PREV_GROUP``). ``coarse=False`` splits a
    stage that is a sequence of blocks into its blocks (the layers of layer-wise lr decay).
    """
    trunk = _trunk(backbone)
    ordinals: dict[str, tuple[float, ...]] = {}
    inside = False
    for name, _ in backbone.named_parameters():
        for i, prefix in enumerate(trunk):
            if name.startswith(prefix + "."):
                inside = True
                stage = backbone.get_submodule(prefix)
                block = name[len(prefix) + 1 :].split(".")[0]
                children = [child for child, _ in stage.named_children()]
                blocks = isinstance(stage, nn.Sequential | nn.ModuleList) and len(children) > 1
                ordinals[name] = (1, i) if coarse or not blocks else (1, i, children.index(block))
                break
        else:
            ordinals[name] = (1, len(trunk) - 1, *MATCH_PREV_GROUP) if inside else (0,)
    return ordinals.__getitem__


def group_matcher(backbone: nn.Module, coarse: bool) -> Matcher:
    """timm's own matcher where the model has one, else the structural one."""
    if hasattr(backbone, "group_matcher"):
        matcher = backbone.group_matcher(coarse=coarse)
        if isinstance(matcher, dict):
            # Parameters no rule matches (a neck such as fc_norm) join the last stage rather than
            # forming a stage of their own, so the stage count does not depend on the head.
            return {**matcher, "_rest": [(r"", MATCH_PREV_GROUP)]}
        return matcher
    return structural_matcher(backbone, coarse)


@dataclass(frozen=True)
class BackboneStages:
    labels: list[str]  # e.g. "conv1+bn1", "layer1", ..., "blocks.6+conv_head+bn2"
    params: list[list[str]]  # parameter names of each stage


def _labels(backbone: nn.Module, groups: list[list[str]]) -> list[str]:
    """Name each group by its largest whole modules (``layer1``, ``blocks.11+norm``)."""
    group_of = {n: g for g, names in enumerate(groups) for n in names}
    owner: dict[str, str] = {}
    for mname, module in backbone.named_modules():
        names = [f"{mname}.{n}" for n, _ in module.named_parameters()] if mname else []
        if names and not any(n in owner for n in names) and len({group_of[n] for n in names}) == 1:
            owner.update(dict.fromkeys(names, mname))
    return ["+".join(dict.fromkeys(owner.get(n, n) for n in names)) for names in groups]


def find_stages(backbone: nn.Module) -> BackboneStages:
    """The stages of a headless backbone, input to output (stem first)."""
    grouped = group_parameters(backbone, group_matcher(backbone, coarse=True))
    groups = [grouped[k] for k in sorted(grouped)]
    return BackboneStages(_labels(backbone, groups), groups)


def check_stages(cfg: ModeConfig, network: nn.Module, backbone_name: str) -> None:
    """Pre-flight for ``mode=partial``: the backbone has at least ``trainable_stages`` stages."""
    if isinstance(cfg, PartialModeConfig):
        # On a headless copy: what enter_stage will see (a head can look like a stage container).
        stages = find_stages(split_head(copy.deepcopy(network))[0])
        if cfg.trainable_stages > len(stages.labels):
            raise ConfigError(
                "mode.trainable_stages",
                f"{backbone_name} has {len(stages.labels)} stages ({', '.join(stages.labels)}), "
                f"got {cfg.trainable_stages}",
                f"use 1..{len(stages.labels)}, or mode=full_finetune to train them all",
            )


# -- freezing ------------------------------------------------------------------------------------
def freeze_backbone(backbone: nn.Module, mode: Mode) -> None:
    """Set ``requires_grad`` on the backbone. Called *before* the new head exists."""
    backbone.requires_grad_(mode.trains_backbone)


def make_model(network: nn.Module, mode: Mode, num_classes: int) -> TransferModel:
    """Freeze first, then swap the head: the new head arrives trainable, sized to the classes."""
    backbone, width = split_head(network)
    freeze_backbone(backbone, mode)
    return TransferModel(backbone, nn.Linear(width, num_classes))


def _frozen_modules(backbone: nn.Module) -> list[str]:
    """The largest submodules with parameters of which none trains: they run in eval mode."""
    frozen: list[str] = []
    for name, module in backbone.named_modules():
        if any(name.startswith(f + ".") for f in frozen):
            continue
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params):
            frozen.append(name)
    return frozen


def enter_stage(model: TransferModel, stage: Stage) -> Mode:
    """Set which backbone parameters train in this stage; return the resolved :class:`Mode`.

    Starts from a frozen backbone every time, so a stage's state never depends on the one before.
    """
    backbone = model.backbone
    backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    trainable: tuple[str, ...] = ()
    if stage.trainable_stages == ALL_STAGES:
        backbone.requires_grad_(True)
        trainable = ("all",)
    elif stage.trainable_stages > 0:
        stages = find_stages(backbone)
        if stage.trainable_stages > len(stages.labels):  # check_stages catches this before the run
            raise ConfigError(
                "mode.trainable_stages",
                f"the backbone has {len(stages.labels)} stages, got {stage.trainable_stages}",
                f"use 1..{len(stages.labels)}",
            )
        params = dict(backbone.named_parameters())
        for names in stages.params[-stage.trainable_stages :]:
            for name in names:
                params[name].requires_grad_(True)
        trainable = tuple(stages.labels[-stage.trainable_stages :])
    batchnorms = [name for name, m in backbone.named_modules() if isinstance(m, _BatchNorm)]
    if stage.trains_backbone and stage.batchnorm == "frozen":
        for name in batchnorms:
            backbone.get_submodule(name).requires_grad_(False)
    trains_backbone = any(p.requires_grad for p in backbone.parameters())
    eval_modules = _frozen_modules(backbone) if trains_backbone else []
    if trains_backbone and stage.batchnorm == "frozen":  # also BN without affine parameters
        eval_modules += [
            n for n in batchnorms if not any(n == f or n.startswith(f + ".") for f in eval_modules)
        ]
    return Mode(stage.name, trains_backbone, tuple(eval_modules), trainable if trains_backbone else ())


def set_train_mode(model: TransferModel, mode: Mode) -> None:
    """``model.train()`` for the parts that learn; frozen parts (or all of the backbone) stay in eval."""
    model.train()
    if not mode.trains_backbone:
        model.backbone.eval()
    for name in mode.eval_modules:
        model.backbone.get_submodule(name).eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only these reach the optimizer (the article's ``filter(lambda p: p.requires_grad, ...)``)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, predicate: Callable[[nn.Parameter], bool] = lambda p: True) -> int:
    return sum(p.numel() for p in model.parameters() if predicate(p))
