"""Using a run's model: ``transferlab.predict``, the MLflow pyfunc, ``mlflow models serve`` and the registry.

Real runs of a tiny network on a real image folder (grey and colour, PNG and JPEG, no two the same
size), read back through a real MLflow store; the served model answers on a loopback port.
"""

from __future__ import annotations

import base64
import collections
import csv
import io
import json
import math
import os
import pickle as pickle_module
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from transferlab import model_store, predict, report
from transferlab.data import load_raw, make_splits
from transferlab.schemas import ImageFolderDataConfig

from .conftest import TINY, launch, store_overrides

CLASSES = ("bright", "dark")


def _images(root: Path, per_class: int = 24) -> None:
    """Two classes a network can tell apart after a few steps; sizes, modes and formats all differ."""
    rng = np.random.default_rng(0)
    for name, level in zip(CLASSES, (185, 70), strict=True):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(28, 64)), int(rng.integers(28, 64))
            pixels = np.clip(rng.normal(level, 45, (h, w, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels if i % 3 else pixels[:, :, 0])  # every third one grey
            image.save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")


class Trained:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.data = ImageFolderDataConfig(root=str(self.images))

    def store(self) -> list[str]:
        return [*store_overrides(self.root), f"data.root={self.images}", "data=imagefolder"]

    def run(self, experiment: str, *overrides: str) -> str:
        assert launch(*TINY, *self.store(), f"mlflow.experiment_name={experiment}", *overrides) == 0
        mlflow.set_tracking_uri(self.uri)
        runs = mlflow.search_runs(experiment_names=[experiment], order_by=["start_time DESC"])
        return str(runs.iloc[0]["run_id"])

    def test_split(self) -> tuple[list[Path], np.ndarray]:
        raw = load_raw(self.data, "")
        test = make_splits(raw, self.data).test
        return [Path(raw.sources[i]) for i in test], raw.labels[test]

    def predict(self, *args: str) -> int:
        return predict.main([*args, "--tracking-uri", self.uri])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A full fine-tune whose EMA weights were tested (so predict must read those, not the live ones)."""
    t = Trained(tmp_path_factory.mktemp("predict"))
    _images(t.images)
    t.ema_run = t.run(
        "predict", "mode=full_finetune", "trainer.epochs=3", "trainer.ema_decay=0.9", "optimizer.lr=0.01"
    )
    yield t


def _read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_reproduces_the_runs_own_test_metrics(trained: Trained, capsys) -> None:
    files, labels = trained.test_split()
    listing = trained.root / "test.csv"
    listing.write_text("path,note\n" + "".join(f"{p},x\n" for p in files))
    assert trained.predict(trained.ema_run, str(listing), "--batch-size", "5") == 0
    rows = _read_csv(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(p) for p in files]
    assert list(rows[0]) == ["path", "label", "probability", *(f"prob_{c}" for c in CLASSES), "error"]
    metrics = MlflowClient(trained.uri).get_run(trained.ema_run).data.metrics
    predicted = np.array([CLASSES.index(r["label"]) for r in rows])
    assert (predicted == labels).mean() == metrics["test_accuracy"]
    # The loss depends on every logit: the same weights (the EMA's) and the same pixels, not just labels.
    prob_true = [float(r[f"prob_{CLASSES[y]}"]) for r, y in zip(rows, labels, strict=True)]
    assert -np.mean(np.log(prob_true)) == pytest.approx(metrics["test_loss"], abs=5e-5)
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=2e-6) and float(r["probability"]) == max(probs)


def test_folders_recursively_top_k_and_bad_files_as_rows(trained: Trained, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.open(next((trained.images / "dark").glob(f"*{Path(name).suffix}"))).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: not data
    (folder / ".thumbs").mkdir()
    (folder / ".thumbs" / "c.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    assert trained.predict(trained.ema_run, str(folder), "--top-k", "1", "--out", str(out)) == 1
    assert "1 of 3 file(s) could not be read" in capsys.readouterr().err
    rows = _read_csv(out.read_text())
    assert [Path(r["path"]).name for r in rows] == ["a.png", "notes.txt", "b.jpg"]
    assert list(rows[0]) == ["path", "label", "probability", "label_1", "probability_1", "error"]
    bad = rows[1]
    assert bad["label"] == "" and "not an image Pillow can read (suffix '.txt')" in bad["error"]
    assert all(
        r["label"] in CLASSES and r["label"] == r["label_1"] and not r["error"] for r in (rows[0], rows[2])
    )


def test_the_pyfunc_and_the_served_model_agree_with_predict(trained: Trained, capsys) -> None:
    files, _ = trained.test_split()
    assert trained.predict(trained.ema_run, *map(str, files)) == 0
    expected = _read_csv(capsys.readouterr().out)
    encoded = [p.read_bytes() for p in files]

    mlflow.set_tracking_uri(trained.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{trained.ema_run}/model")
    for column in (encoded, [base64.b64encode(b).decode() for b in encoded]):  # bytes, or base64 text
        frame = model.predict(pd.DataFrame({"image": column}))
        _agree(frame.to_dict("records"), expected)

    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` by name: the venv's own
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained.uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"runs:/{trained.ema_run}/model",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        payload = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(b).decode()] for b in encoded],
            }
        }
        status, body = _post(port, payload)
        assert status == 200, body
        _agree(json.loads(body)["predictions"], expected)
        for bad in (
            {"foo": 1},
            {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}},
            "{",
        ):
            status, body = _post(port, bad)
            assert 400 <= status < 500, (status, body)  # a client error, and the server goes on
        status, _ = _post(port, payload)
        assert status == 200
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _agree(got: list[dict], expected: list[dict[str, str]]) -> None:
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        for c in CLASSES:
            assert g[f"prob_{c}"] == pytest.approx(float(e[f"prob_{c}"]), abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _post(port: int, payload: object) -> tuple[int, str]:
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_registry_alias_moves_and_older_versions_stay(trained: Trained, capsys) -> None:
    uri = ["--tracking-uri", trained.uri, "--no-log"]
    assert report.main(["--experiment", "predict", *uri, "--register", "a/b"]) == 2  # before any report
    assert "--register: 'a/b' cannot be a model name" in capsys.readouterr().err
    assert report.main(["--experiment", "predict", *uri, "--register", "tiny-defects"]) == 0
    assert "alias champion -> version 1" in capsys.readouterr().out
    later = [trained.run("predict_more", f"seed={s}") for s in (0, 1)]
    assert report.main(["--experiment", "predict_more", *uri, "--register", "tiny-defects"]) == 0
    capsys.readouterr()
    client = MlflowClient(trained.uri)
    champion = client.get_model_version_by_alias("tiny-defects", "champion")
    first = client.get_model_version("tiny-defects", "1")
    assert str(champion.version) == "2" and first.run_id == trained.ema_run  # version 1 kept
    runs = {r: client.get_run(r) for r in later}
    best = max(
        later,
        key=lambda r: (runs[r].data.metrics["best_val_accuracy"], -runs[r].data.metrics["best_val_loss"]),
    )
    assert champion.run_id == best
    assert champion.tags["test_accuracy"] == f"{runs[best].data.metrics['test_accuracy']:.6g}"
    assert champion.tags["config_hash"] == runs[best].data.tags["config_hash"]
    assert champion.tags["selected_by"].startswith("best best_val_accuracy of 2 finished run(s)")
    files, _ = trained.test_split()
    assert trained.predict("models:/tiny-defects@champion", str(files[0])) == 0
    by_alias = _read_csv(capsys.readouterr().out)
    assert trained.predict("models:/tiny-defects/2", str(files[0])) == 0
    assert _read_csv(capsys.readouterr().out) == by_alias
    assert trained.predict(best, str(files[0])) == 0
    assert _read_csv(capsys.readouterr().out) == by_alias


def test_register_refuses_runs_trained_on_different_data_unless_one_setting_is_named(
    trained: Trained, capsys
) -> None:
    """Validation accuracies at different data (here 4 training images per class vs all) are no single
    ranking: --register refuses before the report is written or anything registered, and registers
    the best of the setting --setting names."""
    few = trained.run("predict_settings", "data.train_per_class=4")
    full = trained.run("predict_settings")
    capsys.readouterr()  # the training runs' own output
    args = ["--experiment", "predict_settings", "--tracking-uri", trained.uri, "--register", "by-data"]
    assert report.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the report
    assert err.strip().splitlines()[-1] == (
        "error: --register: the reported runs were trained on different data (data.train_per_class: 4, "
        "null), whose validation accuracies are no single ranking. Fix: add --setting "
        "data.train_per_class=4 (repeatable) to register the best of one data setting"
    )
    client = MlflowClient(trained.uri)
    assert client.search_registered_models(filter_string="name='by-data'") == []
    names = {
        r.info.run_name
        for r in client.search_runs([client.get_experiment_by_name("predict_settings").experiment_id])
    }
    assert "report" not in names  # nothing logged either
    assert report.main([*args, "--no-log", "--setting", "data.train_per_class=7"]) == 2
    assert "--setting data.train_per_class=7: no reported run has it (data.train_per_class is 4, null)" in (
        capsys.readouterr().err
    )
    alone = ["--experiment", "predict_settings", "--tracking-uri", trained.uri, "--no-log"]
    assert report.main([*alone, "--setting", "data.train_per_class=4"]) == 2
    assert "error: --setting: only with --register" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report.main([*args, "--setting", "data.train_per_class"])
    assert exit_.value.code == 2 and "is not KEY=VALUE" in capsys.readouterr().err
    for setting, run in (("4", few), ("null", full)):
        assert report.main([*args, "--no-log", "--setting", f"data.train_per_class={setting}"]) == 0
        assert "models:/by-data/" in capsys.readouterr().out
        champion = client.get_model_version_by_alias("by-data", "champion")
        assert champion.run_id == run
        assert champion.tags["selected_by"].endswith(f", data.train_per_class={setting}")


def _forge(trained: Trained, code: Path, extra: dict[str, Path]) -> str:
    """A FINISHED run whose pyfunc model folder holds a foreign code file or an extra file."""
    folder = trained.root / "forge"
    folder.mkdir(exist_ok=True)
    real = model_store.fetch(
        MlflowClient(trained.uri), model_store.resolve(MlflowClient(trained.uri), trained.ema_run), folder
    )
    mlflow.set_tracking_uri(trained.uri)
    experiment = mlflow.get_experiment_by_name("predict").experiment_id
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={**{p.stem: str(p) for p in real.iterdir()}, **{k: str(v) for k, v in extra.items()}},
            pip_requirements=[],  # no inference of them (it would load the model)
            signature=model_store.signature(list(CLASSES)),
        )
    return run.info.run_id


def test_a_model_folder_with_a_pickle_or_foreign_code_is_refused(
    trained: Trained, tmp_path: Path, capsys
) -> None:
    pickle = tmp_path / "extra.pkl"
    pickle.write_bytes(pickle_module.dumps(collections.OrderedDict(a=1)))  # a real pickle of an object
    with_pickle = _forge(trained, model_store.CODE_FILE, {"extra": pickle})
    (tmp_path / "w").mkdir()
    torch_file = tmp_path / "w" / "weights.safetensors"  # a torch.save pickle under the expected name
    torch.save({"head.weight": torch.zeros(2, 2)}, torch_file)
    pickled_weights = _forge(trained, model_store.CODE_FILE, {"weights": torch_file})
    foreign = tmp_path / "model_code.py"
    foreign.write_text(model_store.CODE_FILE.read_text() + "\nimport os  # anything at all\n")
    with_code = _forge(trained, foreign, {})
    image = str(next((trained.images / "dark").glob("*.png")))
    capsys.readouterr()  # what logging the forged models printed
    for run_id, needle in (
        (with_pickle, "artifacts/extra.pkl is not a file transferlab writes"),
        (with_code, "model_code.py is not the file transferlab writes (foreign code)"),
        (pickled_weights, "weights.safetensors: not a safetensors file"),
    ):
        assert trained.predict(run_id, image) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err


def test_sources_without_a_model_are_one_line_and_exit_2(trained: Trained, capsys) -> None:
    image = str(next((trained.images / "dark").glob("*.png")))
    mlflow.set_tracking_uri(trained.uri)
    client = MlflowClient(trained.uri)
    experiment = client.get_experiment_by_name("predict").experiment_id
    failed = client.create_run(experiment)
    client.set_terminated(failed.info.run_id, "FAILED")
    old = client.create_run(experiment)  # finished, but from before runs logged a model
    client.set_terminated(old.info.run_id, "FINISHED")
    cases = {
        "0123456789abcdef0123456789abcdef": "no run '0123456789abcdef0123456789abcdef'",
        failed.info.run_id: "is FAILED: only a finished run has a tested model",
        old.info.run_id: "has no model (logged before runs logged one)",
        "models:/no-such-model@champion": "no registered model version models:/no-such-model@champion",
    }
    for source, needle in cases.items():
        assert trained.predict(source, image) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert trained.predict(trained.ema_run, str(trained.root / "missing.png")) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_runs_log_system_metrics_unless_switched_off(trained: Trained) -> None:
    on = trained.run("system", "mlflow.system_metrics_interval_s=0.2", "trainer.epochs=3")
    off = trained.run("system", "mlflow.system_metrics=false", "mlflow.system_metrics_interval_s=0.2")
    client = MlflowClient(trained.uri)
    assert "system/cpu_utilization_percentage" in client.get_run(on).data.metrics
    assert "system/system_memory_usage_megabytes" in client.get_run(on).data.metrics
    assert not [k for k in client.get_run(off).data.metrics if k.startswith("system/")]
    experiment = client.get_experiment_by_name("system")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    assert not math.isnan(client.get_run(on).data.metrics["test_accuracy"])
