"""A tracking server that may fail: fail fast at the start, lose nothing in the middle.

* Start: MLflow's HTTP client retries a refused connection 7 times with exponential back-off
  (minutes). For an ``http(s)://`` store we lower that to one retry and ``mlflow.request_timeout_s``
  per request, unless the user set ``MLFLOW_HTTP_REQUEST_*`` themselves, so an unreachable server
  is reported by ``setup_experiment`` within seconds, before any compute.
* During the run: per-epoch metrics go through :class:`EpochLog`, exactly once per step whatever
  fails when. An epoch's values are first written to a spool file beside the checkpoint, then the
  epoch's checkpoint is written, then the values are sent (``publish``). When a send fails with a
  transient error (no connection, timeout, HTTP 5xx) the values keep their original timestamps and
  steps, stay in the spool, and training goes on; each later epoch retries, and the end of the run
  waits (back-off) until all are sent.
* A longer outage than ``mlflow.max_outage_s`` ends the run with one clear line, after the epoch's
  checkpoint: the checkpoint and the spool stay, and the same command resumes the run after that
  epoch and replays the spool once the server is back. A resume drops spooled values of the epochs
  its checkpoint does not hold (they are trained and logged again), and a replay of values already
  sent is harmless: a SQL store keeps one row per (key, value, timestamp, step).

MLflow's own asynchronous logging (``log_metrics(synchronous=False)``) was not used: it does not
survive an outage longer than its retries, and its queue lives only in the process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from transferlab.distributed import is_main
from transferlab.schemas import ConfigError, MlflowConfig

log = logging.getLogger("transferlab.resilient")
T = TypeVar("T")
SPOOL = "pending_metrics.jsonl"
BATCH = 1000  # MLflow's log_batch limit on metrics per call
# Set by configure(): how long a blocking send may keep retrying.
_max_outage_s = 600.0
_checkpointed = True  # set by resumable()


class TrackingOutageError(ConfigError):
    """The tracking server stayed unreachable longer than ``mlflow.max_outage_s``."""


def configure(cfg: MlflowConfig) -> None:
    """Short HTTP retries for a remote store (the user's own MLFLOW_HTTP_REQUEST_* win)."""
    global _max_outage_s
    _max_outage_s = cfg.max_outage_s
    if cfg.tracking_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.request_timeout_s))))


def reach_database(uri: str, timeout_s: float) -> None:
    """A database store (``postgresql+psycopg://``, ``mysql://``, ...): one connection attempt first.

    MLflow's own engine retries a refused connection for about 100 s (ten back-offs, no setting);
    a server that is down is then one line in seconds, like an unreachable ``http://`` server.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("postgresql", "mysql", "mssql"):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    args = {"connect_timeout": max(1, round(timeout_s))} if scheme in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def transient(exc: BaseException) -> bool:
    """No connection, a timeout or a server error: worth retrying. A 4xx is a bug: raise it."""
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500 or "failed with" in str(exc)
    return False


def resumable(checkpointed: bool) -> None:
    """Whether this run writes checkpoints (``trainer.checkpoint``): the outage line says what a rerun does."""
    global _checkpointed
    _checkpointed = checkpointed


def _outage_error(since: float, detail: str) -> TrackingOutageError:
    then = (
        "the run resumes from its checkpoint and the kept metrics are replayed"
        if _checkpointed
        else "with trainer.checkpoint=false it trains again as a new run, after sending the kept "
        "metrics to this one"
    )
    return TrackingOutageError(
        "mlflow.tracking_uri",
        f"tracking server unreachable for {time.monotonic() - since:.0f} s (mlflow.max_outage_s="
        f"{_max_outage_s:g}); {detail}",
        f"start the server again and rerun the same command: {then}",
    )


def retry(call: Callable[[], T], what: str) -> T:
    """``call()`` with exponential back-off (1 s .. 30 s) while it fails transiently, up to the limit."""
    since, delay = None, 1.0
    while True:
        try:
            result = call()
        except Exception as exc:
            if not transient(exc):
                raise
            if since is None:
                since = time.monotonic()
                log.warning("tracking server unreachable (%s); retrying %s", type(exc).__name__, what)
            if time.monotonic() - since + delay > _max_outage_s:
                raise _outage_error(since, f"could not {what}") from exc
            time.sleep(delay)
            delay = min(30.0, delay * 2)
        else:
            if since is not None:
                log.warning("tracking server back after %.0f s; %s done", time.monotonic() - since, what)
            return result


def batches(metrics: list[Metric]) -> list[list[Metric]]:
    """``metrics`` in pieces MLflow's ``log_batch`` takes."""
    return [metrics[start : start + BATCH] for start in range(0, len(metrics), BATCH)]


class EpochLog:
    """The ``log(row, epoch)`` callback of the training loop: never blocks on a dead server.

    ``resume_step``: the epoch a resumed run's checkpoint continues at; spooled values of that
    step and later are dropped (that epoch is trained and logged again).
    """

    def __init__(self, run_id: str, spool_dir: Path, resume_step: int | None = None) -> None:
        self.client = MlflowClient()
        self.run_id = run_id
        self.spool = spool_dir / SPOOL
        self.pending: list[Metric] = []
        self.outage_since: float | None = None
        if (
            self.spool.exists() and is_main()
        ):  # under torchrun rank 0 logs, and keeps the spool  # left by a run that stopped during an outage: replay it first
            rows = [json.loads(line) for line in self.spool.read_text().splitlines() if line]
            own = [r for r in rows if r.get("run_id") == run_id]
            keep = [r for r in own if resume_step is None or r["step"] < resume_step]
            if len(keep) < len(own):
                log.info("dropping %d kept value(s) of epochs this run trains again", len(own) - len(keep))
            # Another run's values (it stopped on the outage limit and this launch does not continue
            # it, e.g. trainer.checkpoint=false): its epochs were trained, so they go to that run.
            self._send_to_their_runs([r for r in rows if r.get("run_id") != run_id])
            self.pending = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in keep]
            self._write_spool()  # what is left: sent elsewhere never goes again if what follows fails
            log.info("replaying %d metric value(s) kept during an outage", len(self.pending))
            self.flush(block=True)
            # All of it sent or dropped (flush() removes the spool only when it sent something).
            self.spool.unlink(missing_ok=True)

    def _send_to_their_runs(self, rows: list[dict]) -> None:
        by_run: dict[str, list[Metric]] = {}
        for r in rows:
            by_run.setdefault(r.get("run_id") or "", []).append(
                Metric(r["key"], r["value"], r["timestamp"], r["step"])
            )
        for other, metrics in by_run.items():
            try:
                for batch in batches(metrics):
                    retry(
                        lambda batch=batch, other=other: self.client.log_batch(
                            other, metrics=batch, synchronous=True
                        ),
                        f"send {len(batch)} value(s) kept for run {other}",
                    )
            except MlflowException as exc:  # deleted meanwhile, or a spool row without a run id
                log.warning(
                    "dropping %d kept value(s) of run %r: %s", len(metrics), other, str(exc).splitlines()[0]
                )
            else:
                log.info("sent %d value(s) kept for run %s, which stopped on an outage", len(metrics), other)

    def __call__(self, row: dict[str, float], step: int) -> None:
        """Record an epoch's values: on disk at once, sent by :meth:`publish` after the checkpoint."""
        if not is_main():
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in row.items()]
        self._write_spool()

    def publish(self) -> None:
        """Send what is pending without blocking; past ``mlflow.max_outage_s`` of outage, stop the run."""
        self.flush(block=False)

    def flush(self, block: bool = True) -> None:
        """Send what is pending; ``block``: wait (with back-off) until sent or the limit is reached."""
        if not self.pending:
            return
        if block:
            retry(lambda: self._send(), f"send {len(self.pending)} kept metric value(s)")
            return
        try:
            self._send()
        except Exception as exc:
            if not transient(exc):
                raise
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning(
                    "tracking server unreachable: keeping metrics in %s, training goes on", self.spool
                )
            if time.monotonic() - self.outage_since > _max_outage_s:
                raise _outage_error(
                    self.outage_since, f"{len(self.pending)} metric value(s) kept in {self.spool}"
                ) from exc

    def _send(self) -> None:
        while self.pending:
            batch = self.pending[:BATCH]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self.pending[: len(batch)]
            if self.pending:  # a later batch may fail: the spool keeps only what was not sent
                self._write_spool()
        if self.outage_since is not None:
            log.warning(
                "tracking server back after %.0f s: kept metrics sent", time.monotonic() - self.outage_since
            )
            self.outage_since = None
        self.spool.unlink(missing_ok=True)

    def _write_spool(self) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_suffix(".tmp")
        rows = [
            {"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            for m in self.pending
        ]
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.spool)
