"""The tracking server may fail: a real ``mlflow server`` on loopback, stopped mid-run, started again."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient

from transferlab.resilient import SPOOL, EpochLog

from .conftest import TINY, metric_histories, store_overrides
from .test_resume import ARGS, _checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http://", "postgresql+psycopg://transferlab@"])
def test_an_unreachable_server_fails_fast_before_compute(
    run_cli, store, tmp_path: Path, capsys, scheme: str
) -> None:
    """An MLflow server, or a PostgreSQL store (whose engine MLflow retries for ~100 s on its own)."""
    url = f"{scheme}127.0.0.1:{_free_port()}" + (
        "/mlflow" if "postgresql" in scheme else ""
    )  # nothing listens
    start = time.monotonic()
    assert run_cli(*TINY, *store, f"mlflow.tracking_uri={url}") == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: mlflow.tracking_uri: cannot reach {url}") and "Fix: start" in err[-1]
    assert not (tmp_path / "cache" / "checkpoints").exists()  # no compute, nothing written


class Server:
    """``mlflow server`` on 127.0.0.1 only, with its store in a temporary folder (or ``backend``, e.g. a
    PostgreSQL URL), and 1 worker (``workers``)."""

    def __init__(self, root: Path, backend: str | None = None, workers: int = 1) -> None:
        self.root, self.port = root, _free_port()
        self.backend = backend or f"sqlite:///{root}/server.db"
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers), "--backend-store-uri", self.backend,
               "--default-artifact-root", str(self.root / "server-artifacts")]  # fmt: skip
        # A session of its own: stop() ends the server's uvicorn and job-queue children with it.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start within 240 s")

    def stop(self) -> None:
        if self.proc is None:  # already stopped (a test's finally after its own stop)
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # uvicorn's graceful shutdown waits for requests in flight, and a client frozen mid-request
            # (the mid-run outage test's SIGSTOP) never finishes its own: the server goes the hard way,
            # as a crashed one would (SQLite keeps what was committed).
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None


def _train(root: Path, uri: str, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = root / f"{name}-{time.monotonic_ns()}.log"
    args = [a for a in ARGS if not a.startswith("trainer.epochs")]
    cmd = [sys.executable, "-m", "transferlab.train", *args, "trainer.epochs=4", f"mlflow.tracking_uri={uri}",
           f"mlflow.experiment_name={name}", f"mlflow.artifact_location={root}/artifacts",
           f"paths.cache_dir={root}/cache-{name}", f"hydra.run.dir={root}/logs/{name}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT), log


def _steps(client: MlflowClient, experiment: str) -> tuple[str, list[int], str]:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")})
    return run.info.status, steps, run.info.run_id


def _histories(client: MlflowClient, experiment: str) -> dict[str, list[tuple[int, float]]]:
    """The experiment's one run's metrics (:func:`metric_histories`: one value per step, or it fails)."""
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return metric_histories(client, run.info.run_id)


def test_a_replayed_spool_sends_each_kept_value_once_and_drops_epochs_to_train_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume replays only its own run's values of epochs its checkpoint holds; a second replay of
    values already sent adds nothing (the store keeps one row per key, value, timestamp and step)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("spool")).info.run_id
    rows = [
        {"run_id": run_id, "key": "val_loss", "value": 0.5, "timestamp": 1000, "step": 0},
        {"run_id": run_id, "key": "val_loss", "value": 0.4, "timestamp": 2000, "step": 1},
        {"run_id": run_id, "key": "val_loss", "value": 0.3, "timestamp": 3000, "step": 2},  # not checkpointed
        {"run_id": "another", "key": "val_loss", "value": 9.0, "timestamp": 1000, "step": 0},
    ]
    spool = tmp_path / "ckpt" / SPOOL
    spool.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # EpochLog's client: the run's store
    for _ in range(2):  # the second time: as if killed after sending, before the spool was removed
        spool.write_text("".join(json.dumps(r) + "\n" for r in rows))
        EpochLog(run_id, spool.parent, resume_step=2)
        assert not spool.exists()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_loss"))
    assert history == [(0, 0.5), (1, 0.4)]


def test_a_spool_left_by_a_run_that_is_not_continued_goes_to_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer.checkpoint=false: a run stopped on the outage limit is not resumed, the next launch is a
    new run. The old run's kept epochs were trained, so they are sent to it, not dropped; a spool row
    of a run that no longer exists is dropped with a warning and the new run starts."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("spool")
    stopped = client.create_run(experiment).info.run_id
    client.set_terminated(stopped, "FAILED")  # as the outage limit leaves it
    fresh = client.create_run(experiment).info.run_id
    rows = [
        {"run_id": stopped, "key": "val_loss", "value": 0.5, "timestamp": 1000, "step": 0},
        {"run_id": stopped, "key": "val_loss", "value": 0.4, "timestamp": 2000, "step": 1},
        {"run_id": "gone", "key": "val_loss", "value": 9.0, "timestamp": 1000, "step": 0},
    ]
    spool = tmp_path / "ckpt" / SPOOL
    spool.parent.mkdir()
    spool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    EpochLog(fresh, spool.parent, resume_step=None)
    assert not spool.exists()
    assert sorted((m.step, m.value) for m in client.get_metric_history(stopped, "val_loss")) == [
        (0, 0.5),
        (1, 0.4),
    ]
    assert client.get_metric_history(fresh, "val_loss") == []


def test_final_metrics_and_the_model_are_logged_once_whatever_is_retried(
    run_cli, store, compose_cfg, tmp_path: Path
) -> None:
    """A retry of the final log after a send that reached the server (or a resumed run logging its
    results again) adds no second ``test_*`` point and no second model: the same calls, made again in
    the finished run, change nothing. A resume's second look at the decoded-input cache adds no
    second ``input_cache_hit`` point either."""
    import types

    import mlflow
    import numpy as np

    from transferlab import model_store, tracking
    from transferlab.backbones import Preprocess
    from transferlab.schemas import to_typed

    assert run_cli(*TINY, *store) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    before = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    (first,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    finals = {k: v for k, v in run.data.metrics.items() if len(before[k]) == 1 and before[k][0].step == 0}
    assert {"test_accuracy", "best_val_accuracy", "total_params"} <= finals.keys()
    with mlflow.start_run(run_id=run.info.run_id):
        labels = np.array([0, 1])
        tracking.log_results({k: v + 1 for k, v in finals.items()}, labels, labels, ["a", "b"], "cpu")
        for _ in range(2):  # a key the run has not got is logged, once
            tracking.log_new_metrics({"fresh": 1.0})
        cfg = to_typed(compose_cfg(*TINY, *store))
        for hit in (False, True):  # the first launch decoded the images, its resume read them back
            lookup = types.SimpleNamespace(hit=hit, seconds=2.0 if hit else 30.0)
            tracking.log_cache_use(cfg, trains_backbone=True, augmented=False, inputs=lookup)
        pre = Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
        again = model_store.log_model({}, "", ["a", "b"], pre, torch.zeros(3, 8, 8))
    new = ["fresh", "input_cache_hit", "input_load_s"]
    after = {k: client.get_metric_history(run.info.run_id, k) for k in [*run.data.metrics, *new]}
    assert [[(m.step, m.value) for m in after.pop(k)] for k in new] == [[(0, 1.0)], [(0, 0.0)], [(0, 30.0)]]
    assert after == before  # not one point more, and the first values stay
    assert [m.model_id for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])] == [
        first.model_id
    ]
    assert again == first.model_uri


@pytest.mark.slow  # about 20 s (a real server started twice): CI runs it with the guarantees
@pytest.mark.guarantee
def test_stage_boundary_logging_waits_out_an_outage(tmp_path: Path) -> None:
    """What a run logs between lp_ft's stages (the probe's head, the next stage's params and lrs) goes
    through the same retry as the epochs: a server down at that moment and back within
    mlflow.max_outage_s costs a wait, not the run. (Before: a traceback, the run FAILED.)"""
    import types

    import mlflow

    from transferlab import resilient, tracking
    from transferlab.modes import Trainable
    from transferlab.schemas import MlflowConfig

    server = Server(tmp_path)
    server.start()
    try:
        resilient.configure(
            MlflowConfig(tracking_uri=server.url, artifact_location=str(tmp_path), max_outage_s=120)
        )
        mlflow.set_tracking_uri(server.url)
        experiment = MlflowClient(server.url).create_experiment("boundary")
        stage = types.SimpleNamespace(name="finetune", epochs=2, first_step=2, lr=0.01)
        groups = [{"name": "head", "lr": 0.01}, {"name": "backbone", "lr": 0.001}]
        counts = {"trainable_params": 10}
        with mlflow.start_run(experiment_id=experiment) as run:
            server.stop()
            restart = threading.Timer(3.0, server.start)
            restart.start()
            try:
                tracking.log_state_dict({"w": torch.ones(2)}, "probe_head.pt")  # train.finished_results
                log_epoch = tracking.log_stage(stage, Trainable(True), groups, counts, 1, 2)  # fit_stage
                log_epoch({"val_loss": 0.5}, 2)
            finally:
                restart.join()
        client = MlflowClient(server.url)
        done = client.get_run(run.info.run_id)
        assert done.data.params["stage.finetune.lr_head"] == "0.01"
        assert done.data.metrics["stage"] == 1.0
        assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".pt")] == [
            "probe_head.pt"
        ]
    finally:
        server.stop()


@pytest.mark.slow  # about 15-25 s (a real server): CI runs it with the guarantees
@pytest.mark.guarantee
@pytest.mark.parametrize("ending", ["failed", "finished"])
def test_a_run_ending_while_the_server_is_down_is_ended_and_its_system_metrics_stop(
    tmp_path: Path, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's end_run forgets the run, then calls the server, then stops the run's system-metrics
    sampler. With the server down, a failing run's sampler lived on, logged into the run once the
    server was back and gave the resumed run two values at one step (a flaky duplicate ``system/*``
    point in CI); a finishing run's retried end_run ended nothing and left the run RUNNING."""
    import mlflow
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor as samplers

    from transferlab import resilient, tracking
    from transferlab.schemas import MlflowConfig

    monkeypatch.setattr(resilient, "_max_outage_s", resilient._max_outage_s)  # set by configure below
    server = Server(tmp_path)
    server.start()
    restart = threading.Timer(3.0, server.start)  # "finished": back within mlflow.max_outage_s
    try:
        cfg = MlflowConfig(
            tracking_uri=server.url, artifact_location=str(tmp_path), max_outage_s=1 if ending == "failed" else 120,
            system_metrics=True, system_metrics_interval_s=0.2,
        )  # fmt: skip
        resilient.configure(cfg)
        mlflow.set_tracking_uri(server.url)
        experiment = MlflowClient(server.url).create_experiment("sampler")
        raises = pytest.raises(RuntimeError, match="the training failed")
        expected = raises if ending == "failed" else contextlib.nullcontext()
        with expected, tracking.mlflow_run(experiment, "r", {}, system_metrics=cfg) as run:
            thread = samplers[run.info.run_id]._process  # MLflow's sampling thread
            assert thread is not None and thread.is_alive()
            server.stop()
            if ending == "failed":
                raise RuntimeError("the training failed")
            restart.start()
        assert run.info.run_id not in samplers and mlflow.active_run() is None
        thread.join(timeout=30)  # finish() joined it already; the timeout only bounds a failure
        assert not thread.is_alive()
        if ending == "finished":
            assert MlflowClient(server.url).get_run(run.info.run_id).info.status == "FINISHED"
    finally:
        if restart.is_alive() or restart.finished.is_set():
            restart.join()
        server.stop()


@pytest.mark.slow  # about 60 s (a real server started twice): CI runs it with the guarantees
@pytest.mark.guarantee
def test_a_run_stopped_by_the_outage_limit_mid_training_resumes_with_one_value_per_step(
    tmp_path: Path, run_cli
) -> None:
    """The outage limit runs out at an epoch's end, mid-training (mlflow.max_outage_s=0.001: the second
    failed send). That epoch's checkpoint is written before the send, so the resume does not train it
    again: every metric has one value per step, equal to a run that saw no outage."""
    base, stopped = tmp_path / "base", tmp_path / "stopped"
    assert run_cli(*ARGS, *store_overrides(base)) == 0
    server = Server(tmp_path)
    server.start()
    where = [*store_overrides(stopped), f"mlflow.tracking_uri={server.url}", "mlflow.max_outage_s=0.001"]

    def stop_after_the_first_epoch() -> None:
        deadline = time.monotonic() + 300
        while _checkpoint(stopped) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        server.stop()

    watcher = threading.Thread(target=stop_after_the_first_epoch, daemon=True)
    watcher.start()
    try:
        assert run_cli(*ARGS, *where) == 2  # stopped by the limit
        watcher.join()
        saved = torch.load(_checkpoint(stopped), weights_only=True)
        assert 1 < saved["fit"]["epoch"] < 5 and saved["fit"]["step"] == 0  # mid-training, at an epoch's end
        assert (_checkpoint(stopped).parent / SPOOL).exists()
        server.start()
        assert run_cli(*ARGS, *where) == 0
        client = MlflowClient(server.url)
        assert _histories(client, "transferlab") == _histories(
            MlflowClient(f"sqlite:///{base}/mlflow.db"), "transferlab"
        )
    finally:
        if server.proc is not None:
            server.stop()


@pytest.mark.slow
@pytest.mark.guarantee
def test_an_outage_mid_run_loses_no_metric_and_a_long_one_stops_with_the_checkpoint_kept(
    tmp_path: Path,
) -> None:
    """Every metric key ends with exactly one value per step, equal (steps and values) to a run that
    never saw an outage: for the run that rides it out and for the one stopped by it and resumed."""
    # Their own experiment names (so their own caches and checkpoints) and their own stores: two
    # processes creating one new SQLite store at once race on its schema migration.
    local = {name: f"sqlite:///{tmp_path}/reference-{name}.db" for name in REFERENCE}
    references = {
        name: _train(tmp_path, local[name], f"{name}-reference", *extra)[0]
        for name, extra in REFERENCE.items()
    }
    server = Server(tmp_path)
    server.start()
    client = MlflowClient(server.url)
    patient, patient_log = _train(tmp_path, server.url, "patient", "mlflow.max_outage_s=900")
    brief, brief_log = _train(tmp_path, server.url, "brief", *REFERENCE["brief"])
    try:
        # Each is frozen (SIGSTOP) as soon as its first epoch's checkpoint is written, the server is
        # stopped once both are, then both go on: however busy the machine, each still has epochs to
        # send while the server is gone. (Waiting for their metrics on the server instead let "brief",
        # whose epochs take well under a second, finish before the stop on a loaded CI machine.)
        frozen: set[str] = set()
        deadline = time.monotonic() + 600
        while len(frozen) < 2 and time.monotonic() < deadline:
            for name, proc in (("patient", patient), ("brief", brief)):
                log = (patient_log, brief_log)[name == "brief"]
                assert proc.poll() is None, (
                    f"{name} ended before its first checkpoint: {log.read_text()[-3000:]}"
                )
                saved = tmp_path / f"cache-{name}" / "checkpoints"
                if name not in frozen and list(saved.glob("*/checkpoint.pt")):
                    os.kill(proc.pid, signal.SIGSTOP)
                    frozen.add(name)
            time.sleep(0.01)
        assert len(frozen) == 2, "no first checkpoint within 600 s"
        server.stop()
        for proc in (patient, brief):
            os.kill(proc.pid, signal.SIGCONT)
        # "brief" gives up after 5 s without the server: one line, exit 2, its checkpoint kept.
        assert brief.wait(timeout=600) == 2
        last = brief_log.read_text().strip().splitlines()[-1]
        assert re.match(r"error: mlflow\.tracking_uri: tracking server unreachable for \d+ s", last), last
        assert list((tmp_path / "cache-brief" / "checkpoints").glob("*/checkpoint.pt"))
        assert list((tmp_path / "cache-brief" / "checkpoints").glob(f"*/{SPOOL}"))  # the spool survives
        # "patient" trains on through the outage, keeping its metrics.
        assert patient.poll() is None or "keeping metrics" in patient_log.read_text()
        server.start()
        assert patient.wait(timeout=600) == 0, patient_log.read_text()[-3000:]
        assert "keeping metrics" in patient_log.read_text()
        status, steps, _ = _steps(client, "patient")
        assert status == "FINISHED" and steps == [0, 1, 2, 3]
        # The same command resumes "brief" in its own run and replays what it kept.
        _, _, brief_id = _steps(client, "brief")
        again, again_log = _train(tmp_path, server.url, "brief", *REFERENCE["brief"])
        assert again.wait(timeout=600) == 0, again_log.read_text()[-3000:]
        status, steps, run_id = _steps(client, "brief")
        assert status == "FINISHED" and steps == [0, 1, 2, 3] and run_id == brief_id
        assert all(proc.wait(timeout=600) == 0 for proc in references.values())
        for name in ("patient", "brief"):
            reference = _histories(MlflowClient(local[name]), f"{name}-reference")
            assert _histories(client, name) == reference, name
    finally:
        for proc in (patient, brief, *references.values()):
            if proc.poll() is None:
                proc.kill()
        if server.proc is not None:
            server.stop()


# The two runs of the outage test, as launched; each is run once more without an outage to compare.
REFERENCE = {"patient": ["mlflow.max_outage_s=900"], "brief": ["mlflow.max_outage_s=5", "seed=4"]}
