"""The tracking server may fail: a real ``mlflow server`` on loopback, stopped mid-run, started again."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from .conftest import TINY
from .test_resume import ARGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_fast_before_compute(run_cli, store, tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert run_cli(*TINY, *store, f"mlflow.tracking_uri={url}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: mlflow.tracking_uri: cannot reach {url}") and "Fix: start" in err[-1]
    assert not (tmp_path / "cache" / "checkpoints").exists()  # no compute, nothing written


class Server:
    """``mlflow server`` on 127.0.0.1 only, with its store in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--default-artifact-root", str(self.root / "server-artifacts")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start within 240 s")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc = None


def _train(root: Path, server: Server, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = root / f"{name}-{time.monotonic_ns()}.log"
    args = [a for a in ARGS if not a.startswith("trainer.epochs")]
    cmd = [sys.executable, "-m", "transferlab.train", *args, "trainer.epochs=4", f"mlflow.tracking_uri={server.url}",
           f"mlflow.experiment_name={name}", f"mlflow.artifact_location={root}/artifacts",
           f"paths.cache_dir={root}/cache-{name}", f"hydra.run.dir={root}/logs/{name}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT), log


def _steps(client: MlflowClient, experiment: str) -> tuple[str, list[int], str]:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")})
    return run.info.status, steps, run.info.run_id


@pytest.mark.slow
def test_an_outage_mid_run_loses_no_metric_and_a_long_one_stops_with_the_checkpoint_kept(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path)
    server.start()
    client = MlflowClient(server.url)
    patient, patient_log = _train(tmp_path, server, "patient", "mlflow.max_outage_s=900")
    brief, brief_log = _train(tmp_path, server, "brief", "mlflow.max_outage_s=5", "seed=4")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the first epoch of each reached the server
            try:
                if all(_steps(client, n)[1] for n in ("patient", "brief")):
                    break
            except Exception:  # noqa: BLE001 - runs not created yet
                pass
            time.sleep(0.5)
        server.stop()
        # "brief" gives up after 5 s without the server: one line, exit 2, its checkpoint kept.
        assert brief.wait(timeout=600) == 2
        last = brief_log.read_text().strip().splitlines()[-1]
        assert re.match(r"error: mlflow\.tracking_uri: tracking server unreachable for \d+ s", last), last
        assert list((tmp_path / "cache-brief" / "checkpoints").glob("*/checkpoint.pt"))
        # "patient" trains on through the outage, keeping its metrics.
        assert patient.poll() is None or "keeping metrics" in patient_log.read_text()
        server.start()
        assert patient.wait(timeout=600) == 0, patient_log.read_text()[-3000:]
        assert "keeping metrics" in patient_log.read_text()
        status, steps, _ = _steps(client, "patient")
        assert status == "FINISHED" and steps == [0, 1, 2, 3]
        # The same command resumes "brief" in its own run and replays what it kept.
        _, _, brief_id = _steps(client, "brief")
        again, again_log = _train(tmp_path, server, "brief", "mlflow.max_outage_s=5", "seed=4")
        assert again.wait(timeout=600) == 0, again_log.read_text()[-3000:]
        status, steps, run_id = _steps(client, "brief")
        assert status == "FINISHED" and steps == [0, 1, 2, 3] and run_id == brief_id
    finally:
        for proc in (patient, brief):
            if proc.poll() is None:
                proc.kill()
        if server.proc is not None:
            server.stop()
