"""Security: no full pickles loaded, no environment copied into MLflow, the UI on loopback only."""

from __future__ import annotations

import ast
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow import MlflowClient

from transferlab.backbones import WeightsUnavailableError, build_backbone, load_tensors
from transferlab.checkpoint import Checkpoint
from transferlab.schemas import BackboneConfig, to_typed

from .conftest import TINY, runs_in

SRC = Path(__file__).resolve().parents[1] / "src"


class Payload:
    """A pickle whose loading runs a shell command (what a crafted .pth in a shared cache would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": Payload(marker)}, path)
    with zipfile.ZipFile(path) as archive:  # the payload is live: plain unpickling would run it
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pickle.loads(archive.read(name))
    assert marker.exists()
    marker.unlink()
    return path


def test_a_crafted_pth_in_torchvisions_hub_cache_is_refused_and_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's own weights.get_state_dict() would unpickle this file (weights_only=False)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "code-ran"
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = _crafted(tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url), marker)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(BackboneConfig(name="resnet18", source="torchvision", weights="DEFAULT"))
    assert not marker.exists()
    message = str(info.value)
    assert (
        str(cached) in message and "refused without unpickling" in message and f"delete {cached}" in message
    )


def test_a_crafted_file_in_the_hf_cache_is_refused_and_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    marker = tmp_path / "code-ran"
    _crafted(repo / "snapshots" / ("0" * 40) / "pytorch_model.bin", marker)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(BackboneConfig(name="test_efficientnet", source="timm", weights="pretrained"))
    assert not marker.exists()
    assert "refused without unpickling" in str(info.value) and "delete the model's folder" in str(info.value)


def test_crafted_weights_and_checkpoint_files_are_never_run(
    tmp_path: Path, run_cli, store, compose_cfg
) -> None:
    """The bundled-weights loader refuses; a crafted checkpoint is ignored (a fresh run), unexecuted."""
    marker = tmp_path / "code-ran"
    with pytest.raises(WeightsUnavailableError, match="refused without unpickling"):
        load_tensors(_crafted(tmp_path / "weights.pth", marker), "test weights")
    assert not marker.exists()
    args = [*TINY, *store, "trainer.epochs=1"]
    ckpt = Checkpoint.for_config(to_typed(compose_cfg(*args)), None)
    _crafted(ckpt.path, marker)
    assert run_cli(*args) == 0
    assert not marker.exists() and len(runs_in(tmp_path)) == 1


def test_no_pickle_module_in_src() -> None:
    """Nothing of ours imports pickle (or its kin): every load is weights_only or safetensors."""
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path}: imports pickle"


def test_no_environment_variable_reaches_mlflow(run_cli, store, tmp_path: Path, monkeypatch) -> None:
    secret = "s3cr3t-Token-0xDEADBEEF"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert run_cli(*TINY, *store, "trainer.epochs=1") == 0
    run = runs_in(tmp_path).iloc[0]
    assert secret not in run.to_string()  # params, tags, metrics
    client = MlflowClient()
    folder = Path(client.download_artifacts(run["run_id"], "", str(tmp_path / "dl")))
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt"):
            assert secret not in path.read_text(), path


@pytest.mark.parametrize("target", ["ui"])
def test_make_ui_binds_loopback(target: str) -> None:
    makefile = (SRC.parent / "Makefile").read_text()
    line = next(li for li in makefile.splitlines() if li.startswith("\t") and "mlflow ui" in li)
    assert "--host 127.0.0.1" in line and "0.0.0.0" not in makefile
