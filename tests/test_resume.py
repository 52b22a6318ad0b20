"""Kill and resume: real signals sent to a real training process, then the same command again.

The resumed run must be the same MLflow run and end with the same bits as a run never stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from transferlab.checkpoint import Checkpoint
from transferlab.engine import FitState
from transferlab.schemas import to_typed
from transferlab.tracking import is_bookkeeping  # timing and cache use: differ between launches

from .conftest import metric_histories, runs_in, store_overrides

# Enough steps per epoch that a signal lands mid-epoch; small enough for a few seconds per epoch.
ARGS = [
    "data=synthetic",
    "data.images_per_class=20",
    "data.image_size=32",
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "backbone.weights=null",
    "backbone.image_size=32",
    "mode=full_finetune",
    "trainer.epochs=5",
    "trainer.batch_size=4",
    "trainer.progress=false",
    "seed=3",
]


def _launch(root: Path, *extra: str) -> subprocess.Popen:
    log = open(root / f"train-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab.train", *ARGS, *store_overrides(root), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.05)


def _checkpoint(root: Path) -> Path | None:
    found = list((root / "cache" / "checkpoints").glob("*/checkpoint.pt"))
    return found[0] if found else None


def _final_metrics(root: Path) -> tuple[dict[str, float], dict[str, list[float]], str, str]:
    """The one training run's final metrics, every per-epoch history, status and id (timing and cache
    bookkeeping aside; a sweep's parent aside). Each history has exactly one value per step."""
    runs = runs_in(root)
    if "tags.sweep.role" in runs.columns:
        runs = runs[runs["tags.sweep.role"] == "job"]
    assert len(runs) == 1
    run = runs.iloc[0]
    client = MlflowClient()
    final = {
        c.removeprefix("metrics."): run[c]
        for c in runs.columns
        if c.startswith("metrics.") and not is_bookkeeping(c.removeprefix("metrics.")) and pd.notna(run[c])
    }
    history = {
        key: [value for _, value in points]
        for key, points in metric_histories(client, run["run_id"]).items()
        if not (len(points) == 1 and points[0][0] == 0 and key in final)  # a final metric, compared above
    }
    assert {"train_loss", "val_loss", "val_accuracy", "lr_head"} <= set(history)
    return final, history, run["status"], run["run_id"]


def _stop_when(root: Path, ready, signum: int = signal.SIGTERM) -> threading.Thread:
    """SIGTERM this process once ``ready(checkpoint blob)`` holds (the run's main thread handles it)."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            path = _checkpoint(root)
            try:
                if path is not None and ready(torch.load(path, weights_only=True)):
                    break
            except (OSError, RuntimeError, EOFError):  # replaced while being read: look again
                pass
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def _stopped_mid_epoch(root: Path, batches: int) -> dict:
    """The checkpoint a stop left: written inside an epoch (some of its batches trained, not all)."""
    saved = torch.load(_checkpoint(root), weights_only=True)
    assert 0 < saved["fit"]["step"] < batches, saved["fit"]["step"]
    return saved


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert _launch(root).wait(timeout=600) == 0
    return _final_metrics(root)


def test_sigterm_in_process_then_resume_gives_the_same_bits(
    tmp_path: Path, run_cli, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast variant: a real SIGTERM to this process (the run's main thread handles it).

    The resume runs as if the code had moved to another commit meanwhile: the run keeps both.
    """
    base, stopped = tmp_path / "base", tmp_path / "stopped"
    args = [a for a in ARGS if not a.startswith("trainer.epochs")] + ["trainer.epochs=3"]
    assert run_cli(*args, *store_overrides(base)) == 0
    want = _final_metrics(base)

    watcher = _stop_when(stopped, lambda blob: True)  # once the first epoch's checkpoint exists
    assert run_cli(*args, *store_overrides(stopped)) == 128 + signal.SIGTERM
    watcher.join()
    _stopped_mid_epoch(stopped, BATCHES)
    err = capsys.readouterr().err
    assert re.search(r"stopped: SIGTERM stopped after epoch \d+ step \d+ \(checkpoint .*checkpoint.pt", err)
    assert runs_in(stopped).iloc[0]["status"] == "KILLED"
    started_at = runs_in(stopped).iloc[0]["tags.mlflow.source.git.commit"]
    later = {"commit": "f" * 40, "dirty": "false"}
    monkeypatch.setattr("transferlab.provenance.git_state", lambda root: later)
    assert run_cli(*args, *store_overrides(stopped)) == 0
    got = _final_metrics(stopped)
    assert got[2] == "FINISHED" and got[3] == runs_in(stopped).iloc[0]["run_id"]
    assert got[:2] == want[:2]
    run = MlflowClient().get_run(got[3])
    assert run.data.tags["git.commits"] == f"{started_at},{'f' * 40}"
    assert run.data.tags["mlflow.source.git.commit"] == "f" * 40
    assert "its epochs come from both" in capsys.readouterr().out  # Hydra's log handler: stdout
    first = MlflowClient().download_artifacts(got[3], "reproducibility.json", str(tmp_path))
    second = MlflowClient().download_artifacts(got[3], "reproducibility-code2.json", str(tmp_path))
    assert json.loads(Path(first).read_text())["git"]["commit"] == started_at
    assert json.loads(Path(second).read_text())["git"] == later


LP_FT = [a for a in ARGS if not a.startswith(("trainer.epochs", "mode="))]
LP_FT += ["mode=lp_ft", "mode.probe_epochs=4", "trainer.epochs=2"]
BATCHES = 7  # 27 training images in batches of 4 (the last batch of 3)


@pytest.mark.parametrize(
    ("stage", "extra"),
    [("probe", ["augment=flip", "mode.probe_augment=true"]), ("finetune", [])],
    ids=["stopped-in-probe-augmented", "stopped-in-finetune"],
)
def test_lp_ft_stopped_in_either_stage_resumes_whole(
    tmp_path: Path, run_cli, stage: str, extra: list[str]
) -> None:
    """A resumed lp_ft run ends with the metrics, histories and artifacts of one never stopped.

    Stopped in the probe (augmented, so its epochs run the frozen backbone live) or in the
    fine-tune stage, after the probe's metrics and head were computed: both must still be there.
    """
    base, stopped = tmp_path / "base", tmp_path / "stopped"
    assert run_cli(*LP_FT, *extra, *store_overrides(base)) == 0
    want = _final_metrics(base)
    assert {"probe_test_accuracy", "probe_best_val_accuracy", "test_accuracy"} <= set(want[0])

    first = 1 if stage == "probe" else 5  # the checkpoint after probe epoch 0 / fine-tune epoch 0
    watcher = _stop_when(stopped, lambda blob: blob["fit"]["epoch"] >= first)
    assert run_cli(*LP_FT, *extra, *store_overrides(stopped)) == 128 + signal.SIGTERM
    watcher.join()
    saved = _stopped_mid_epoch(stopped, BATCHES)
    assert run_cli(*LP_FT, *extra, *store_overrides(stopped)) == 0
    got = _final_metrics(stopped)
    assert got[2] == "FINISHED" and got[3] == saved["run_id"]
    assert got[0] == want[0]  # the same metric set, bit for bit: probe_* and test_* alike
    assert got[1] == want[1]  # every per-epoch history, probe and fine-tune steps
    assert saved["stage"] == stage  # where it stopped
    assert ("probe" in saved["finished"]) is (stage == "finetune")  # the probe's results travel with it
    # Its costs too: the probe's feature pass (none when augmented) is reported as by a run never stopped.
    costs = [runs_in(root).iloc[0] for root in (base, stopped)]
    assert [c["metrics.feature_extract_s"] > 0 for c in costs] == [stage == "finetune"] * 2
    assert [c.get("metrics.feature_cache_hit") for c in costs] == [
        costs[0].get("metrics.feature_cache_hit")
    ] * 2
    heads, names = [], []
    for root, run in ((base, want[3]), (stopped, got[3])):
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        heads.append(Path(client.download_artifacts(run, "probe_head.pt", str(root / "dl"))).read_bytes())
        names.append({f.path for f in client.list_artifacts(run)})
    assert heads[0] == heads[1]
    assert names[0] <= names[1]  # every artifact of the uninterrupted run (a resume adds its records)


@pytest.mark.slow
@pytest.mark.guarantee
def test_sigterm_then_sigkill_then_resume_gives_the_same_bits(tmp_path: Path, uninterrupted) -> None:
    # 1. SIGTERM once the first epoch's checkpoint exists: finish the step, save, KILLED, exit 143.
    proc = _launch(tmp_path)
    _wait_for(lambda: _checkpoint(tmp_path) is not None, proc, "first checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    out = Path(proc.stdout.name if proc.stdout else "").read_text() if proc.stdout else ""
    runs = runs_in(tmp_path)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "KILLED"
    assert "interrupted: stopped after epoch" in runs.iloc[0]["tags.error"]
    saved = torch.load(_checkpoint(tmp_path), weights_only=True)
    assert saved["run_id"] == runs.iloc[0]["run_id"] and saved["fit"]["epoch"] >= 1
    del out

    # 2. The same command resumes the same run; SIGKILL it (no handler runs) after its next epoch.
    ckpt = _checkpoint(tmp_path)
    before = ckpt.stat().st_mtime_ns
    proc = _launch(tmp_path)
    _wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != before, proc, "a resumed epoch")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert runs_in(tmp_path).iloc[0]["status"] == "RUNNING"  # a hard kill cannot say goodbye

    # 3. Again: it continues from the last epoch's checkpoint and finishes the same run.
    assert _launch(tmp_path).wait(timeout=600) == 0
    final, history, status, run_id = _final_metrics(tmp_path)
    assert status == "FINISHED" and run_id == saved["run_id"]
    assert runs_in(tmp_path).iloc[0]["tags.resumes"] == "2"
    want_final, want_history, _, _ = uninterrupted
    assert history == want_history  # every epoch logged, with the same values
    assert final == want_final  # bit for bit, test metrics included
    assert _checkpoint(tmp_path) is None  # finished: the next launch starts a new run


@pytest.mark.slow
@pytest.mark.guarantee
def test_sigint_is_a_graceful_stop_too(tmp_path: Path, uninterrupted) -> None:
    proc = _launch(tmp_path)
    _wait_for(lambda: _checkpoint(tmp_path) is not None, proc, "first checkpoint")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT
    assert runs_in(tmp_path).iloc[0]["status"] == "KILLED"
    assert _launch(tmp_path).wait(timeout=600) == 0
    final, history, status, _ = _final_metrics(tmp_path)
    assert status == "FINISHED" and (final, history) == uninterrupted[:2]


def test_a_second_signal_stops_at_once_without_the_graceful_save(tmp_path: Path) -> None:
    """The first SIGTERM asks for a stop after the step; a second, right behind it, interrupts at once:
    no checkpoint is written for the stop (the last epoch's stays), the run ends KILLED saying so."""
    # One step of about a second per epoch (27 images of 160 px in one batch), so the second signal,
    # sent as soon as the first one's warning is logged, lands inside the step that the first let run on.
    slow = ("trainer.epochs", "trainer.batch_size", "data.image_size", "backbone.image_size")
    args = [a for a in ARGS if not a.startswith(slow)]
    args += ["trainer.epochs=50", "trainer.batch_size=32", "data.image_size=160", "backbone.image_size=160"]
    log = tmp_path / "train.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab.train", *args, *store_overrides(tmp_path)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    _wait_for(lambda: _checkpoint(tmp_path) is not None, proc, "first checkpoint")
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while "send it again to stop at once" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) not in (0, 128 + signal.SIGTERM)  # not the graceful exit code
    text = log.read_text()
    assert "KeyboardInterrupt: second SIGTERM" in text and "stopped: SIGTERM" not in text
    saved = torch.load(_checkpoint(tmp_path), weights_only=True)
    assert saved["fit"]["step"] == 0  # the epoch-end checkpoint: nothing was saved mid-epoch
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "KILLED" and run["tags.error"] == "interrupted: second SIGTERM"


def test_the_same_config_twice_at_once_fails_the_second_before_its_run(
    tmp_path: Path, run_cli, compose_cfg, capsys
) -> None:
    """Two processes on one config would overwrite one checkpoint: the second stops, saying why."""
    args = [*ARGS, "trainer.epochs=1", *store_overrides(tmp_path)]
    ckpt = Checkpoint.for_config(to_typed(compose_cfg(*args)), None)
    with ckpt.held():  # the first run, still training (a lock held on another open file, as by a process)
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert f"error: paths.cache_dir: this exact config (hash {ckpt.config_hash}) is being trained" in err
        assert f"by pid {os.getpid()}" in err and "Fix: wait for that run to end" in err
        assert not (tmp_path / "mlflow.db").exists() or runs_in(tmp_path).empty
    assert run_cli(*args) == 0  # the lock is gone with its holder
    assert not ckpt.path.parent.exists()  # finished: checkpoint, lock and folder removed


def _statuses(root: Path) -> dict[str, str]:
    runs = runs_in(root)
    return dict(zip(runs["run_id"], runs["status"], strict=True))


def test_resume_false_starts_a_new_run_and_resume_run_must_match(tmp_path: Path, run_cli, capsys) -> None:
    """In-process, with a checkpoint really left by a stop: a wrong resume_run is refused, the
    matching one resumes that run, a finished run leaves no checkpoint, resume=false starts anew."""
    args = [*ARGS, "trainer.epochs=3", *store_overrides(tmp_path)]
    watcher = _stop_when(tmp_path, lambda blob: True)
    assert run_cli(*args) == 128 + signal.SIGTERM
    watcher.join()
    (stopped,) = _statuses(tmp_path)
    assert run_cli(*args, "resume_run=0123abcd") == 2
    assert "resume_run: no checkpoint of run 0123abcd for this config" in capsys.readouterr().err
    assert run_cli(*args, f"resume_run={stopped}") == 0
    assert _statuses(tmp_path) == {stopped: "FINISHED"}  # the same run, resumed
    assert _checkpoint(tmp_path) is None  # finished runs leave no checkpoint
    # A checkpoint present and resume=false: a new run; the stopped one stays as it was.
    watcher = _stop_when(tmp_path, lambda blob: True)
    assert run_cli(*args) == 128 + signal.SIGTERM
    watcher.join()
    second = next(r for r, s in _statuses(tmp_path).items() if s == "KILLED")
    # The checkpoint outlives its store (mlflow.db replaced, or the run deleted): one line, exit 2.
    elsewhere = [a if not a.startswith("mlflow.tracking_uri=") else f"{a}.other" for a in args]
    assert run_cli(*elsewhere) == 2
    err = capsys.readouterr().err
    assert f"error: resume: this config's checkpoint continues MLflow run {second}, which " in err
    assert "does not have (the store was replaced, or the run deleted). Fix: pass resume=false" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.delete_run(second)
    assert run_cli(*args) == 2 and "has deleted" in capsys.readouterr().err
    client.restore_run(second)
    assert run_cli(*args, "resume=false") == 0
    statuses = _statuses(tmp_path)
    assert len(statuses) == 3 and statuses[second] == "KILLED" and statuses[stopped] == "FINISHED"
    assert list(statuses.values()).count("FINISHED") == 2


def test_checkpoint_state_roundtrips_with_weights_only(tmp_path: Path) -> None:
    """Every field of the loop state and the RNG states survive torch.load(weights_only=True)."""
    from transferlab.checkpoint import atomic_save

    state = FitState(epoch=2, step=3, order=torch.arange(5), totals={"loss": 1.5, "seen": 4}, best_value=0.5)
    atomic_save({"fit": dict(vars(state)), "py": __import__("random").getstate()}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert FitState(**back["fit"]).order.tolist() == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_nan_loss_fails_the_run_with_the_step_or_is_skipped(run_cli, store, tmp_path: Path, capsys) -> None:
    """An absurd learning rate blows the head up: FAILED naming the step, or skipped and counted."""
    from .conftest import TINY

    nan = [*TINY, *store, "optimizer=sgd", "optimizer.lr=1e38", "trainer.epochs=2"]
    assert run_cli(*nan) == 1
    assert re.search(
        r"NonFiniteLossError: training loss is (nan|inf) at epoch \d+ step \d+", capsys.readouterr().err
    )
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FAILED" and re.match(
        r"NonFiniteLossError: .* at epoch \d+ step \d+", run["tags.error"]
    )
    assert run_cli(*nan, "trainer.on_nan=skip", "mlflow.experiment_name=skip") == 0
    skipped = runs_in(tmp_path, "skip").iloc[0]
    assert skipped["status"] == "FINISHED" and skipped["metrics.skipped_nonfinite_batches"] > 0


def _submitit_task(root: Path) -> int | None:
    """The pid of submitit's task process (``python -m submitit.core._submit FOLDER``) under ``root``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or it ended meanwhile
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if "submitit.core._submit" in args and any(a.startswith(str(root)) for a in args):
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.guarantee
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the task process in /proc")
def test_a_preempted_submitit_job_requeues_and_resumes_the_same_run(
    tmp_path: Path, run_cli, uninterrupted
) -> None:
    """Real submitit (hydra/launcher=submitit_local): USR2 to the job's process, as Slurm preempts.

    Our handler finishes the step, checkpoints and marks the run KILLED; submitit's handler then
    checkpoints the launcher and exits with its requeue code; submitit's controller starts the job
    again, which resumes the same MLflow run from the checkpoint and ends bit-identical to a run never
    stopped. (timeout_min=60: submitit counts a signal in the last 20 % as a timeout, not preemption.)
    """

    def preempt() -> None:
        deadline = time.monotonic() + 300
        while (
            _checkpoint(tmp_path) is None or _submitit_task(tmp_path) is None
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = _submitit_task(tmp_path)
        if pid is not None:
            os.kill(pid, signal.SIGUSR2)

    sender = threading.Thread(target=preempt, daemon=True)
    sender.start()
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=60"]
    assert run_cli("-m", *ARGS, *store_overrides(tmp_path), *launcher) == 0
    sender.join(timeout=5)
    logs = "".join(p.read_text() for p in tmp_path.glob("logs/multirun/.submitit/*/*_log.*"))
    assert "preempted: checkpoint saved; handing over to submitit" in logs
    assert "Requeued job" in logs
    final, history, status, run_id = _final_metrics(tmp_path)
    runs = runs_in(tmp_path)
    assert status == "FINISHED" and runs[runs["run_id"] == run_id].iloc[0]["tags.resumes"] == "1"
    want_final, want_history, _, _ = uninterrupted
    assert history == want_history and final == want_final


def test_submitit_preemption_saves_first_then_hands_over(tmp_path: Path, run_cli) -> None:
    """Under submitit, USR2 means preempted: our step/checkpoint/KILLED first, then submitit's handler.

    The handler here stands in for submitit's ``checkpoint_and_try_requeue`` (which requeues through
    hydra-submitit-launcher's ``checkpoint()`` and exits); a real Slurm preemption is not tested.
    """
    seen: dict[str, object] = {}

    def submitit_handler(signum: int, frame: object) -> None:
        seen["checkpoint"] = _checkpoint(tmp_path) is not None
        seen["status"] = runs_in(tmp_path).iloc[0]["status"]
        raise SystemExit(0)  # submitit's _exit() after requeueing

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:

        def preempt() -> None:
            deadline = time.monotonic() + 300
            while _checkpoint(tmp_path) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR2)

        threading.Thread(target=preempt, daemon=True).start()
        run_cli(
            *[a for a in ARGS if not a.startswith("trainer.epochs")],
            "trainer.epochs=3",
            *store_overrides(tmp_path),
        )
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == {"checkpoint": True, "status": "KILLED"}
    saved = torch.load(_checkpoint(tmp_path), weights_only=True)
    assert saved["run_id"] == runs_in(tmp_path).iloc[0]["run_id"]


# Every piece of the recipe that carries state across steps: the schedule's position, the EMA
# weights, per-image augmentation and batch mixing seeds, an accumulation window, worker processes.
RECIPE = [
    "scheduler=cosine",
    "scheduler.warmup_epochs=0.5",
    "scheduler.min_lr=1e-6",
    "trainer.ema_decay=0.9",
    "augment=strong",
    "augment.mixup_alpha=0.8",
    "augment.cutmix_alpha=1.0",
    "trainer.label_smoothing=0.1",
    "trainer.accumulate_steps=2",
    "trainer.grad_clip_norm=1.0",
    "trainer.num_workers=2",
]


def test_the_fine_tuning_recipe_resumes_mid_epoch_bit_identical(tmp_path: Path, run_cli) -> None:
    """Cosine + warmup + EMA + mixup/cutmix + RandAugment + 2 workers, stopped mid-epoch by SIGTERM."""
    base, stopped = tmp_path / "base", tmp_path / "stopped"
    args = [a for a in ARGS if not a.startswith("trainer.epochs")] + ["trainer.epochs=2", *RECIPE]
    assert run_cli(*args, *store_overrides(base)) == 0
    want = _final_metrics(base)

    watcher = _stop_when(stopped, lambda blob: True)  # once the first epoch's checkpoint exists
    assert run_cli(*args, *store_overrides(stopped)) == 128 + signal.SIGTERM
    watcher.join()
    saved = _stopped_mid_epoch(stopped, BATCHES)
    assert saved["fit"]["step"] % 2 == 0  # a stop waits for the accumulation window's update
    assert saved["ema"] is not None and saved["scheduler"] is not None and saved["fit"]["updates"] > 4
    assert saved["fit"]["seeds"] is not None
    assert run_cli(*args, *store_overrides(stopped)) == 0
    got = _final_metrics(stopped)
    assert got[2] == "FINISHED"
    assert got[:2] == want[:2]
    assert len(set(want[1]["lr_head"])) == 2  # the schedule moved the lr between the epochs
