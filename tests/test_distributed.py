"""One run over two processes: real ``torchrun`` with gloo on the CPU, a real store, real signals.

A 2-process run of ``trainer.batch_size=B`` trains on the same global batches as one process of
``2B``: DDP averages the two shares' gradients, which is the global batch's mean gradient (up to the
order of float sums). On a network without BatchNorm (``test_vit``: LayerNorm) the two runs then give
the same metrics within float rounding; the tolerance below is stated for that case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from .conftest import metric_histories, store_overrides

pytestmark = [pytest.mark.slow, pytest.mark.guarantee]

# test_vit (LayerNorm, 160 px) fully fine-tuned: every parameter's gradient goes through the all-reduce.
VIT = [
    "data=synthetic",
    "data.images_per_class=60",
    "data.image_size=160",
    "backbone=timm",
    "backbone.name=test_vit",
    "backbone.weights=null",
    "mode=full_finetune",
    "optimizer.lr=0.001",
    "trainer.epochs=3",
    "trainer.progress=false",
]
# Within float rounding of one process (different summation order of the same gradients).
TOLERANCE = 1e-4


def torchrun(root: Path, *overrides: str, nproc: int = 2, wait: bool = True):  # noqa: ANN201
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "transferlab.train",
        *store_overrides(root),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(root / f"torchrun-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - kept by the caller
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if not wait:
        return proc, Path(log.name)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, Path(log.name).read_text()


def only_run(root: Path):  # noqa: ANN201
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transferlab"], output_format="list")
    assert len(runs) == 1, [r.info.status for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The reference 2-process run, uninterrupted: batch 8 per process, 16 per update."""
    root = tmp_path_factory.mktemp("ddp")
    rc, out = torchrun(root, *VIT, "trainer.batch_size=8")
    assert rc == 0, out[-3000:]
    return root, only_run(root)


def test_two_processes_give_one_run_that_matches_one_process_with_the_global_batch(
    ddp_run, tmp_path: Path, run_cli
) -> None:
    root, run = ddp_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    m = run.data.metrics
    assert (m["world_size"], m["effective_batch_size"], m["global_batch_size"]) == (2, 8, 16)
    assert not (root / "cache" / "checkpoints").exists() or not any(
        (root / "cache" / "checkpoints").rglob("*.pt")
    )

    assert run_cli(*store_overrides(tmp_path), *VIT, "trainer.batch_size=16") == 0  # one process
    single = only_run(tmp_path)
    assert single.data.tags["world_size"] == "1"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    ddp_hist = metric_histories(client, run.info.run_id)
    one_hist = metric_histories(mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), single.info.run_id)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [s for s, _ in ddp_hist[key]] == [0, 1, 2]
        for (_, a), (_, b) in zip(ddp_hist[key], one_hist[key], strict=True):
            assert a == pytest.approx(b, abs=TOLERANCE), key
    # Validation and test are the whole splits (gathered), not rank 0's share.
    for key in ("test_accuracy", "test_loss", "best_val_accuracy"):
        assert m[key] == pytest.approx(single.data.metrics[key], abs=TOLERANCE), key


def test_sigterm_stops_every_rank_and_a_relaunch_resumes_the_same_run_bit_for_bit(
    ddp_run, tmp_path: Path, run_cli
) -> None:
    _, reference = ddp_run
    overrides = [*VIT, "trainer.batch_size=8"]
    proc, log = torchrun(tmp_path, *overrides, wait=False)
    ckpts = tmp_path / "cache" / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(ckpts.rglob("checkpoint.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to both ranks
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc != 0, out[-3000:]
    assert "stopped: SIGTERM" in out, out[-3000:]
    stopped = only_run(tmp_path)
    assert stopped.info.status == "KILLED"
    (ckpt,) = ckpts.rglob("checkpoint.pt")
    blob = torch.load(ckpt, weights_only=True)
    assert blob["world_size"] == 2 and blob["rng_ranks"].shape[0] == 2

    # The same config on one process: the shares would not match; refused before any compute.
    assert run_cli(*store_overrides(tmp_path), *overrides) == 2
    assert only_run(tmp_path).info.status == "KILLED"

    rc, out = torchrun(tmp_path, *overrides)
    assert rc == 0, out[-3000:]
    resumed = only_run(tmp_path)
    assert resumed.info.run_id == stopped.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumes"] == "1"
    # Bit for bit the uninterrupted 2-process run: every epoch's values and the final metrics.
    ref_client = mlflow.MlflowClient(f"sqlite:///{ddp_run[0]}/mlflow.db")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert metric_histories(client, resumed.info.run_id) == metric_histories(
        ref_client, reference.info.run_id
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.dist_backend=nccl", "trainer.dist_backend"),  # NCCL on a CPU machine
        ("trainer.sync_batchnorm=true", "trainer.sync_batchnorm"),  # SyncBatchNorm has no CPU kernel
        ("mlflow.tracking_uri=http://127.0.0.1:9", "mlflow.tracking_uri"),  # nothing listens there
    ],
)
def test_bad_input_under_torchrun_is_one_line_and_every_rank_exits(
    tmp_path: Path, override: str, key: str
) -> None:
    start = time.monotonic()
    rc, out = torchrun(
        tmp_path,
        "data=synthetic",
        "backbone=timm",
        "backbone.name=test_efficientnet",
        "backbone.weights=null",
        "trainer.progress=false",
        "mlflow.max_outage_s=2",
        override,
    )
    assert rc != 0
    assert f"error: {key}:" in out, out[-3000:]
    assert time.monotonic() - start < 90  # no rank left waiting for the others
    db = tmp_path / "mlflow.db"
    if db.exists():  # refused before any run was started
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_lp_ft_over_two_processes_shares_the_frozen_feature_pass_and_its_cache(
    tmp_path: Path, run_cli
) -> None:
    """The probe's frozen-feature pass is split across the ranks by whole batches and stored once by
    rank 0: a one-process run of the same per-process batch then finds it (same key, same features)."""
    lp_ft = [*VIT, "mode=lp_ft", "mode.probe_epochs=2", "trainer.epochs=1"]
    ddp_root, one_root = tmp_path / "ddp", tmp_path / "one"
    ddp_root.mkdir()
    rc, out = torchrun(ddp_root, *lp_ft, "trainer.batch_size=8")
    assert rc == 0, out[-3000:]
    ddp = only_run(ddp_root)
    assert ddp.info.status == "FINISHED"
    assert ddp.data.metrics["feature_cache_hit"] == 0.0  # computed here, by both ranks, stored once
    assert len(list((ddp_root / "cache" / "features").glob("*.safetensors"))) == 1

    assert run_cli(*store_overrides(one_root), *lp_ft, "trainer.batch_size=16") == 0
    one = only_run(one_root)
    for key in (
        "probe_best_val_accuracy",
        "probe_test_accuracy",
        "probe_test_loss",
        "test_loss",
        "test_accuracy",
    ):
        assert ddp.data.metrics[key] == pytest.approx(one.data.metrics[key], abs=TOLERANCE), key

    # One process at the per-process batch, on the 2-process run's cache: a hit on its entry.
    same_cache = [*store_overrides(one_root / "again"), f"paths.cache_dir={ddp_root}/cache"]
    assert run_cli(*same_cache, *lp_ft, "trainer.batch_size=8") == 0
    again = only_run(one_root / "again")
    assert again.data.metrics["feature_cache_hit"] == 1.0


def test_a_submitit_job_of_two_tasks_is_one_ddp_run(tmp_path: Path) -> None:
    """``hydra/launcher=slurm_ddp``'s mechanics without a cluster: submitit's local executor starts a
    job of two tasks; each reads its rank from the job (TorchDistributedEnvironment), one run is logged."""
    cmd = [sys.executable, "-m", "transferlab.train", "-m", "data=synthetic", "backbone=timm",
           "backbone.name=test_efficientnet", "backbone.weights=null", "trainer.epochs=2",
           "trainer.batch_size=8", "trainer.progress=false", "mode=full_finetune",
           "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "seed=0",
           *[o for o in store_overrides(tmp_path) if not o.startswith("hydra.run")]]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["transferlab"], output_format="list")
    (job,) = [r for r in runs if r.data.tags.get("sweep.role") == "job"]
    assert job.info.status == "FINISHED" and job.data.tags["world_size"] == "2"
    assert job.data.metrics["global_batch_size"] == 16
    assert "1 finished, 0 failed" in done.stdout + done.stderr


def test_a_sweep_inside_torchrun_is_refused_before_any_run(tmp_path: Path) -> None:
    rc, out = torchrun(tmp_path, "-m", "seed=0,1", "data=synthetic")
    assert rc != 0
    assert "error: --multirun: a sweep inside torchrun" in out, out[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
