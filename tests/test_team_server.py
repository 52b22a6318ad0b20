"""A team tracking server for real: PostgreSQL behind ``mlflow server``, parallel sweep jobs and a 2-process
DDP run logging at once.

PostgreSQL comes from the distribution's packages (``.ci/run`` installs them when missing); the test
starts its own cluster as an unprivileged user in a temporary folder, on a loopback port, and stops it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import TINY
from .test_tracking_outage import Server, _free_port

JOBS = ["seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]
EPOCHS = 3


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    return found[-1]


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own: ``postgresql+psycopg://transferlab@127.0.0.1:PORT/mlflow``."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        message = "PostgreSQL is not installed: apt-get install postgresql (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # initdb refuses to run as root: the cluster belongs to the distribution's postgres user then.
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="transferlab-pg-"))
    root.chmod(0o755)
    data, sockets, logs = root / "data", root / "sockets", root / "logs"
    for folder in (data, sockets, logs):
        folder.mkdir()
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)

    def as_owner(*cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if user is not None else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd[0]} failed: {done.stdout}{done.stderr}"

    port = _free_port()
    as_owner(initdb, "-D", str(data), "-U", "transferlab", "--auth=trust", "--no-sync")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off"
    as_owner(pg_ctl, "-D", str(data), "-o", options, "-l", str(logs / "server.log"), "-w", "start")
    try:
        as_owner(
            _bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "transferlab", "mlflow"
        )
        yield f"postgresql+psycopg://transferlab@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.0 and 2.1 alike
    finally:
        as_owner(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _sweep(root: Path, uri: str) -> subprocess.CompletedProcess:
    args = [a for a in TINY if not a.startswith("trainer.epochs")] + [f"trainer.epochs={EPOCHS}"]
    cmd = [sys.executable, "-m", "transferlab.train", "-m", *args, *JOBS, f"mlflow.tracking_uri={uri}",
           f"mlflow.artifact_location={root}/artifacts", f"paths.cache_dir={root}/cache",
           f"hydra.sweep.dir={root}/multirun"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _check_tree(client: MlflowClient, done: subprocess.CompletedProcess) -> None:
    """One FINISHED parent, 4 FINISHED children under it, every per-epoch metric point present once."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (experiment,) = [e for e in client.search_experiments() if e.name == "transferlab"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1", "2", "3"]
    for run in children:
        for key in ("train_loss", "val_loss", "val_accuracy", "lr_head"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(EPOCHS)), (run.info.run_name, key, steps)
        assert "test_accuracy" in run.data.metrics


def _rank_logs(folder: Path) -> str:
    """The end of each rank's stderr (torchrun --log-dir): the interleaved log shows only the last to fail."""
    files = sorted(folder.glob("*/attempt_*/*/stderr.log"))
    return "\n".join(f"== rank {f.parent.name}: {f}\n{f.read_text()[-2500:]}" for f in files)


@pytest.mark.slow  # about 2 min: a PostgreSQL cluster, an MLflow server and a 4-job sweep; CI runs it
@pytest.mark.guarantee
def test_four_parallel_jobs_and_a_ddp_run_log_into_a_postgresql_backed_server(
    postgres: str, tmp_path: Path
) -> None:
    """The 4-job sweep and, at the same time, one 2-process torchrun run (rank 0 logs it)."""
    server = Server(tmp_path, backend=postgres, workers=2)
    server.start()
    ddp_root = tmp_path / "ddp"
    ddp_root.mkdir()
    args = [a for a in TINY if not a.startswith("trainer.epochs")] + [f"trainer.epochs={EPOCHS}"]
    # Each rank's output in a file of its own as well: a failure shows why every rank stopped.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--log-dir={ddp_root}/ranks", "--tee=3", "-m", "transferlab.train", *args, "mode=full_finetune",
           f"mlflow.tracking_uri={server.url}",
           f"mlflow.artifact_location={ddp_root}/artifacts", f"paths.cache_dir={ddp_root}/cache",
           f"hydra.run.dir={ddp_root}/run"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = ddp_root / "torchrun.log"
    with open(log, "w") as out:  # a file, not a pipe: nothing reads it until the sweep is done
        ddp = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        client = MlflowClient(server.url)
        _check_tree(client, _sweep(tmp_path, server.url))
        assert ddp.wait(timeout=600) == 0, _rank_logs(ddp_root / "ranks") or log.read_text()[-3000:]
        (experiment,) = [e for e in client.search_experiments() if e.name == "transferlab"]
        (run,) = [
            r for r in client.search_runs([experiment.experiment_id]) if "sweep.role" not in r.data.tags
        ]
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        for key in ("train_loss", "val_loss", "val_accuracy"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(EPOCHS)), (key, steps)
    finally:
        if ddp.poll() is None:
            ddp.kill()
        server.stop()


@pytest.mark.slow  # about 1 min; `make test-slow` (not a guarantee: the README reports what SQLite held)
def test_four_parallel_jobs_log_into_the_default_sqlite_store(tmp_path: Path) -> None:
    """The same sweep on the default store, a SQLite file that 4 processes write at once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _check_tree(MlflowClient(uri), _sweep(tmp_path, uri))
