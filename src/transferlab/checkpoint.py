"""Kill and resume: atomic checkpoints keyed by the config, signal handling, every RNG state.

A run writes ``<paths.cache_dir>/checkpoints/<config hash>/checkpoint.pt`` after every epoch
(temporary file + ``os.replace``, so a SIGKILL leaves the previous one whole) and, on SIGTERM or
SIGINT, once more after the current optimizer update. The checkpoint holds the model, the optimizer,
its lr schedule and the EMA weights (``trainer.ema_decay``), the loop's :class:`~transferlab.engine.FitState` (epoch, step, that
epoch's data order and running sums, best state, history), the Python/NumPy/torch/CUDA RNG states
and the Runner's data-order generator, the stage it belongs to and the results of the stages
finished before it (lp_ft's probe: its metrics and head), plus the MLflow run id. Launching the same config again
finds it by the hash, reopens that MLflow run and continues; on CPU the final metrics are the same
bits as those of a run that was never stopped. A run that finishes removes its checkpoint.

Loading uses ``torch.load(weights_only=True)``: tensors and plain containers, never pickled code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

try:
    import fcntl
except ImportError:  # Windows: no flock; one run per config is then the user's to ensure
    fcntl = None  # type: ignore[assignment]

from transferlab import distributed
from transferlab.engine import FitState, Runner, StopRequested
from transferlab.schemas import ConfigError, TrainConfig, config_hash

log = logging.getLogger("transferlab.checkpoint")
FORMAT = 3  # 2: the stage and the results of finished stages; 3: lr schedule, EMA, update count


# Keys that change where things go or how they are shown, not what is computed: left out of the hash
# so that a relaunch (new Hydra output dir, progress bar off) still finds its checkpoint.
# -- RNG states as tensors and plain values (loadable with weights_only=True) ---------------------
def rng_state(runner: Runner) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "runner": runner.generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], runner: Runner) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    runner.generator.set_state(state["runner"])


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Checkpoint:
    """One config's checkpoint file; ``run_id`` is set when there is a run to resume."""

    path: Path
    config_hash: str
    enabled: bool = True
    run_id: str | None = None
    resumed_from: dict[str, int] | None = None  # epoch and step, when resuming
    stage: str | None = None  # the stage the checkpoint was written in, when resuming
    # Results of the stages finished before the current one, by stage name: {"metrics": {...},
    # "head": state dict}. Saved with every checkpoint, so a resume past them still reports them.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- finding ----------------------------------------------------------------------------------
    @classmethod
    def for_config(cls, cfg: TrainConfig, raw: DictConfig) -> Checkpoint:
        """The checkpoint of this config; when ``resume`` and one exists, the run it belongs to."""
        digest = config_hash(cfg)
        ckpt = cls(
            Path(cfg.paths.cache_dir) / "checkpoints" / digest / "checkpoint.pt",
            digest,
            cfg.trainer.checkpoint,
        )
        meta = ckpt._meta() if cfg.resume and ckpt.path.exists() else None
        if cfg.resume_run is not None and (meta is None or meta["run_id"] != cfg.resume_run):
            found = f"it belongs to run {meta['run_id']}" if meta else "there is none"
            raise ConfigError(
                "resume_run",
                f"no checkpoint of run {cfg.resume_run} for this config (hash {digest}; {found})",
                "launch with exactly the run's config (its overrides.json), or drop resume_run",
            )
        if meta is not None and meta["world_size"] != distributed.world().size:
            raise ConfigError(
                "resume",
                f"checkpoint {ckpt.path} was written by a run over {meta['world_size']} process(es), and "
                f"this launch has {distributed.world().size}: the shares of each batch would not match",
                f"relaunch with {meta['world_size']} process(es) (torchrun --nproc_per_node), "
                "or pass resume=false to start a new run",
            )
        if meta is not None:
            ckpt.run_id = meta["run_id"]
            ckpt.resumed_from = {"epoch": meta["epoch"], "step": meta["step"]}
            ckpt.stage, ckpt.finished = meta["stage"], meta["finished"]
        return ckpt

    def done_before_stop(self, stage: str, order: list[str]) -> bool:
        """Did ``stage`` finish before the stop this run resumes from (it comes before the checkpoint's)?"""
        return self.stage is not None and order.index(stage) < order.index(self.stage)

    def _meta(self) -> dict[str, Any] | None:
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file must not block a fresh start
            log.warning("ignoring unreadable checkpoint %s (%s: %s)", self.path, type(exc).__name__, exc)
            return None
        if blob.get("format") != FORMAT:
            # Formats 1 and 2 came before the lr schedule and EMA joined the config, which changed every
            # config hash: only a file copied by hand into a new config's folder lands here.
            log.warning(
                "ignoring checkpoint %s: format %s, this code reads format %d; the run starts over as a "
                "new MLflow run (the stopped one stays as it is)",
                self.path,
                blob.get("format"),
                FORMAT,
            )
            return None
        if blob.get("config_hash") != self.config_hash:
            log.warning("ignoring checkpoint %s: written for another config", self.path)
            return None
        fit = blob["fit"]
        return {
            "run_id": blob["run_id"],
            "epoch": fit["epoch"],
            "step": fit["step"],
            "stage": blob["stage"],
            "finished": blob["finished"],
            "world_size": blob.get("world_size", 1),
        }

    @contextmanager
    def held(self) -> Iterator[None]:
        """One process per config at a time: two would overwrite one checkpoint file in turns.

        An exclusive ``flock`` on ``lock`` beside the checkpoint, taken before the MLflow run starts
        and released by the operating system if the process dies, so a crash never leaves it stuck.
        """
        # No checkpoint to share (or no flock: Windows); under torchrun rank 0 alone writes it.
        if not self.enabled or fcntl is None or not distributed.is_main():
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name("lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                raise ConfigError(
                    "paths.cache_dir",
                    f"this exact config (hash {self.config_hash}) is being trained right now by {owner} "
                    f"(lock {f.name}); a second run would overwrite its checkpoint",
                    "wait for that run to end (the same command then resumes or starts anew), "
                    "or change any setting, e.g. another seed",
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            try:
                yield
            finally:
                if not self.path.exists():  # nothing to resume (failed early, or finished): no leftovers
                    self.remove()
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- saving and restoring ---------------------------------------------------------------------
    def bind(
        self, run_id: str, runner: Runner, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> FitState | None:
        """Attach to the live objects; when resuming, load their states and return the loop's."""
        self.run_id, self._runner, self._optimizer, self._scheduler = run_id, runner, optimizer, scheduler
        if self.resumed_from is None:
            return None
        blob = torch.load(self.path, map_location="cpu", weights_only=True)
        runner.model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        if runner.ema is not None and blob.get("ema") is not None:
            runner.ema.module.load_state_dict(blob["ema"])
        set_rng_state(blob["rng"], runner)
        distributed.set_rng_states(blob.get("rng_ranks"))  # under torchrun: this rank's own generators
        state = FitState(**blob["fit"])
        log.info("resuming run %s at epoch %d step %d from %s", run_id, state.epoch, state.step, self.path)
        self.resumed_from = None  # restored once: a later stage of the same run starts fresh
        return state

    def save(self, state: FitState) -> None:
        if not self.enabled:
            return
        ranks = distributed.rng_states()  # every rank takes part; rank 0 alone writes
        if not distributed.is_main():
            return
        runner = self._runner
        blob = {
            "format": FORMAT,
            "config_hash": self.config_hash,
            "run_id": self.run_id,
            "model": runner.model.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
            "ema": runner.ema.module.state_dict() if runner.ema is not None else None,
            "fit": dict(vars(state)),  # shallow: tensors are saved, not copied
            "rng": rng_state(runner),
            "stage": runner.stage.name if runner.stage is not None else None,
            "finished": self.finished,
            "world_size": distributed.world().size,
            "rng_ranks": ranks,
        }
        atomic_save(blob, self.path)

    def remove(self) -> None:
        """After a finished run: the next launch of this config is a new run, not a resume."""
        if not distributed.is_main():
            return
        self.path.unlink(missing_ok=True)
        self.path.with_name("lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # something else lives there: keep it
            self.path.parent.rmdir()


# -- signals ----------------------------------------------------------------------------------------
class StopSignal:
    """The first SIGTERM/SIGINT asks the loop to stop after its current step; a second one is the
    usual immediate interrupt (KeyboardInterrupt), for a user who really means it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum
        log.warning(
            "%s: finishing the current step, then saving a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )


def _preemption_signal() -> signal.Signals | None:
    """submitit's preemption/timeout signal when its handler is installed (a Slurm job), else None."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signum = getattr(signal, f"SIG{name}", None)
    if signum is None or not callable(signal.getsignal(signum)):
        return None
    return signum


@contextmanager
def stop_signals(ckpt: Checkpoint) -> Iterator[StopSignal]:
    """Install the handlers for the body (main thread only: elsewhere signals are not ours to take).

    A :class:`StopRequested` leaving the body is annotated with the signal, the checkpoint and the run.
    Under submitit (hydra-submitit-launcher) its preemption signal is taken too: the step finishes,
    the checkpoint is saved and the run marked KILLED, *then* submitit's own handler runs, which
    requeues the job through the launcher's ``checkpoint()``; the requeued job has the same config,
    finds this checkpoint and resumes the same MLflow run.
    """
    stop = StopSignal()
    main = threading.current_thread() is threading.main_thread()
    wanted = [signal.SIGTERM, signal.SIGINT]
    preempt = _preemption_signal() if main else None
    if preempt is not None:
        wanted.append(preempt)
    previous = {s: signal.signal(s, stop._handle) for s in wanted} if main else {}
    try:
        yield stop
    except StopRequested as exc:
        exc.signum, exc.checkpoint, exc.run_id = stop.signum, ckpt.path if ckpt.enabled else None, ckpt.run_id
        if preempt is not None and stop.signum == preempt:
            for s, handler in previous.items():
                signal.signal(s, handler)
            previous = {}
            log.warning("preempted: checkpoint saved; handing over to submitit to requeue the job")
            previous_handler = signal.getsignal(preempt)
            previous_handler(preempt, None)  # submitit: requeue, then exit
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_hint(exc: StopRequested) -> str:
    """One line: what stopped, where the checkpoint is, how to continue."""
    name = signal.Signals(exc.signum).name if getattr(exc, "signum", None) else "interrupt"
    where = getattr(exc, "checkpoint", None)
    saved = f"checkpoint {where}" if where else "no checkpoint (trainer.checkpoint=false)"
    return (
        f"{name} {exc} ({saved}; MLflow run {getattr(exc, 'run_id', None)} marked KILLED). "
        "Run the same command again to resume it"
    )


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels for bit-reproducible GPU runs (CPU runs are reproducible without it).

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first call; an op with no deterministic
    implementation then raises instead of silently varying.
    """
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
