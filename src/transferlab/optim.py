"""Parameter groups: discriminative learning rates for the head, the backbone and its layers.

The optimizer (``cfg.optimizer``, a ``_partial_`` leaf) is called with a list of groups instead of
a flat parameter list. Each group carries its ``lr``, ``lr_scale`` (its ratio to the head) and
``initial_lr`` (the stage's lr), which timm's schedulers scale (``lr = schedule x lr_scale``, :mod:`transferlab.schedule`: the
ratios hold through warmup and decay), a ``weight_decay`` where it differs from the optimizer's, and a
``name`` that torch keeps in ``optimizer.param_groups`` for the log. Ratios:

- ``head``: 1 (``optimizer.lr``, ``Stage.lr``).
- ``backbone``: ``mode.backbone_lr_scale``, or with ``mode.layer_decay`` one group per layer and
  decay class, ``backbone_lr_scale x layer_decay ** (top - layer)``. timm models get their groups
  from ``timm.optim.param_groups_layer_decay`` (layers from the model's own ``group_matcher``);
  torchvision models the same formula over the structural layers of :mod:`transferlab.modes`.
"""

from __future__ import annotations

from typing import Any

from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn

from transferlab.backbones import TransferModel
from transferlab.modes import group_matcher
from transferlab.schemas import Stage

ParamGroup = dict[str, Any]


def _no_weight_decay(backbone: nn.Module) -> set[str]:
    """Parameters a timm model declares exempt from weight decay (position embeddings, cls token)."""
    names = getattr(backbone, "no_weight_decay", None)
    return set(names()) if callable(names) else set()


def layer_decay_groups(
    backbone: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: frozenset[str] = frozenset(),
) -> list[ParamGroup]:
    """timm's ``param_groups_layer_decay`` for any backbone: same layer scales, same decay rule
    (no weight decay for 1-D tensors: biases and norm weights), layers from :func:`group_matcher`."""
    layer_of = group_parameters(backbone, group_matcher(backbone, coarse=False), reverse=True)
    top = max(layer_of.values())
    groups: dict[str, ParamGroup] = {}
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name in no_weight_decay)
        layer = layer_of.get(name, top)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key,
            {
                "lr_scale": layer_decay ** (top - layer),
                "weight_decay": weight_decay if decay else 0.0,
                "params": [],
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _backbone_layer_groups(backbone: nn.Module, weight_decay: float, layer_decay: float) -> list[ParamGroup]:
    if hasattr(backbone, "group_matcher"):  # a timm model: timm's own helper
        return param_groups_layer_decay(
            backbone,
            weight_decay=weight_decay,
            no_weight_decay_list=_no_weight_decay(backbone),
            layer_decay=layer_decay,
        )
    return layer_decay_groups(backbone, weight_decay, layer_decay)


def param_groups(model: TransferModel, stage: Stage, weight_decay: float) -> list[ParamGroup]:
    """The trainable parameters of ``model`` in this stage, grouped by learning-rate ratio."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups: list[ParamGroup] = [_group("head", head, stage.lr, 1.0)]
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    if not trainable:
        return groups
    base = stage.backbone_lr_scale
    if stage.layer_decay is None:
        return [*groups, _group("backbone", trainable, stage.lr, base)]
    param_name = {id(p): n for n, p in model.backbone.named_parameters()}
    exempt = _no_weight_decay(model.backbone)
    for group in _backbone_layer_groups(model.backbone, weight_decay, stage.layer_decay):
        scale = group.pop("lr_scale")
        first = group["params"][0]
        decay = "no_decay" if first.ndim <= 1 or param_name[id(first)] in exempt else "decay"
        label = _layer_label(param_name[id(first)])
        name = f"backbone.{label}.{decay}"
        groups.append({**group, **_group(name, group["params"], stage.lr, base * scale)})
    return groups


def _group(name: str, params: list, lr: float, scale: float) -> ParamGroup:
    """A group at its own lr (``lr x scale``, right without a schedule too), with the stage's lr as
    ``initial_lr`` and ``scale`` as ``lr_scale``: what timm's schedulers scale (they keep an initial_lr)."""
    return {"name": name, "params": params, "lr": lr * scale, "initial_lr": lr, "lr_scale": scale}


def _layer_label(param_name: str) -> str:
    """``blocks.3.1.conv_pw.weight`` -> ``blocks.3.1``: where a layer group starts, for the log."""
    parts = param_name.split(".")[:-1]
    return ".".join(parts[:3]) if parts else param_name


def describe(model: TransferModel, groups: list[ParamGroup]) -> list[dict[str, Any]]:
    """Groups as plain data for the log: name, peak lr, weight decay, size and the tensors in each."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {
            "name": g["name"],
            # The stage's lr x the group's ratio: the peak a schedule reaches.
            "lr": g["initial_lr"] * g["lr_scale"] if "initial_lr" in g else g["lr"],
            "lr_scale": g.get("lr_scale", 1.0),
            "weight_decay": g.get("weight_decay", "optimizer default"),
            "num_params": sum(p.numel() for p in g["params"]),
            "tensors": [names[id(p)] for p in g["params"]],
        }
        for g in groups
    ]
