"""Where a run sits on the dial between feature extraction and full fine-tuning, and what that freezes.

:func:`freeze` is the one place that decides which parameters get gradients and which modules run
in train mode, from a :class:`~transferlab.schemas.mode.Stage` alone. "Frozen" here means
bit-identical: a frozen module has no gradients *and* stays in eval mode, so BatchNorm running
statistics are never updated (the seed article's loop calls ``model.train()`` on the whole model and
silently changes them).

The dial, as config (``conf/mode/``, schemas in :mod:`transferlab.schemas.mode`):

- ``feature_extract``: the backbone is frozen, only the new head trains.
- ``partial``: the last ``mode.trainable_stages`` stages of the backbone train, the rest is frozen.
- ``lp_ft``: a linear probe (``feature_extract`` for ``mode.probe_epochs``), then everything trains
  from that head (Kumar et al., ICLR 2022).
- ``full_finetune``: everything trains.

A mode's schema lists the stages of a run (``cfg.mode.stages(epochs, lr)``: one, or two for
``lp_ft``). Stages of a backbone (stem, ResNet ``layer1..4``, EfficientNet ``blocks.N``, ViT
``blocks.N``) come from timm's own ``group_matcher`` for timm models and from the model's structure
for torchvision ones.
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
from transferlab.schemas import ALL_STAGES, ConfigError, ModeConfig, Stage

# timm's matcher suffix for "belongs to the group before" (timm.models._manipulate.MATCH_PREV_GROUP).
MATCH_PREV_GROUP = (99999,)


@dataclass(frozen=True)
class Trainable:
    """What :func:`freeze` decided for a stage, for the engine and the log."""

    trains_backbone: bool
    # Backbone submodules kept in eval mode while the rest trains (frozen stages, frozen BatchNorm).
    eval_modules: tuple[str, ...] = ()
    # Labels of the backbone stages that train (for the log); () when the backbone is frozen.
    trainable: tuple[str, ...] = ()


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
    """Pre-flight: the backbone has as many stages as any stage of the mode trains (``mode=partial``)."""
    wanted = max((stage.trainable_stages for stage in cfg.stages(1, cfg.lr)), default=0)
    if wanted > 0:
        # On a headless copy: what freeze will see (a head can look like a stage container).
        stages = find_stages(split_head(copy.deepcopy(network))[0])
        if wanted > len(stages.labels):
            raise ConfigError(
                "mode.trainable_stages",
                f"{backbone_name} has {len(stages.labels)} stages ({', '.join(stages.labels)}), got {wanted}",
                f"use 1..{len(stages.labels)}, or mode=full_finetune to train them all",
            )


# -- freezing ------------------------------------------------------------------------------------
def make_model(network: nn.Module, num_classes: int) -> TransferModel:
    """Swap the network's classifier for a new head sized to the classes (what trains: :func:`freeze`)."""
    backbone, width = split_head(network)
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


def _set_gradients(backbone: nn.Module, stage: Stage) -> tuple[str, ...]:
    """``requires_grad`` on the backbone for this stage; returns the labels of the stages that train."""
    backbone.requires_grad_(False)  # from frozen every time: a stage never depends on the one before
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
    if stage.trains_backbone and stage.batchnorm == "frozen":
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                module.requires_grad_(False)
    return trainable


def freeze(model: TransferModel, stage: Stage) -> Trainable:
    """Decide what trains in ``stage``: set gradients *and* train/eval mode, and say what was set.

    The head always trains. Backbone parameters get gradients per ``stage.trainable_stages``;
    ``stage.batchnorm=frozen`` takes BatchNorm out of training. Then the model is put in train mode
    except the parts with nothing to train (all of a frozen backbone, frozen stages, frozen BatchNorm),
    which stay in eval mode. The engine calls this at the start of every training epoch (evaluation
    puts the whole model in eval mode) and decides nothing itself.
    """
    backbone = model.backbone
    model.head.requires_grad_(True)
    labels = _set_gradients(backbone, stage)
    trains_backbone = any(p.requires_grad for p in backbone.parameters())
    eval_modules = _frozen_modules(backbone) if trains_backbone else []
    if trains_backbone and stage.batchnorm == "frozen":  # also BN without affine parameters
        batchnorms = [name for name, m in backbone.named_modules() if isinstance(m, _BatchNorm)]
        eval_modules += [
            n for n in batchnorms if not any(n == f or n.startswith(f + ".") for f in eval_modules)
        ]
    model.train()
    if not trains_backbone:
        backbone.eval()
    for name in eval_modules:
        backbone.get_submodule(name).eval()
    return Trainable(trains_backbone, tuple(eval_modules), labels if trains_backbone else ())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only these reach the optimizer (the article's ``filter(lambda p: p.requires_grad, ...)``)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, predicate: Callable[[nn.Parameter], bool] = lambda p: True) -> int:
    return sum(p.numel() for p in model.parameters() if predicate(p))
