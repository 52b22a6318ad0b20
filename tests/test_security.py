"""Security: no full pickles loaded, no environment copied into MLflow, the UI on loopback only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import TINY, runs_in

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_torch_load_is_weights_only() -> None:
    """A static check over src/: ``torch.load`` always with ``weights_only=True``; no pickle module."""
    calls = 0
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path}: imports pickle"
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno}: {ast.unparse(node)}"
    assert calls >= 2  # bundled weights and checkpoints


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
