"""Provenance: the code, command, weights, data and packages behind a run, recorded so its numbers can
be trusted and rerun (``reproducibility.json``, git tags)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import torch

from transferlab.distributed import rank_zero_only
from transferlab.tracking import log_new_metrics
from transferlab.versions import package_versions

_log = logging.getLogger("transferlab.provenance")


@functools.cache  # once per process: a sweep's later jobs run the code loaded at its start, not a newer HEAD
def git_state(root: str) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit or "unknown", "dirty": str(dirty).lower()}


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "transferlab.train", *sys.argv[1:]])


def cpu_record() -> dict[str, str]:
    """The CPU as far as it can change the bits. torch picks its CPU kernels by instruction set, and a
    fine-tuning run on an AVX-512 CPU and on an AVX2 one differ from the first epoch, while a frozen
    backbone's features do not (experiments/elpv_protocol_long/README.md, "Two machines in step 1")."""
    model = platform.processor()
    try:  # platform.processor() is only "x86_64" on Linux; the model name is in /proc/cpuinfo
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@rank_zero_only
def log_reproducibility(cfg: Any, built: Any, data: Any, counts: dict[str, int]) -> None:
    """Everything needed to trust and rerun the numbers; never environment variables."""
    git = git_state(cfg.paths.root_dir)
    record = {
        "git": git,
        "seed": cfg.seed,
        "command": command_line(),
        "weights": {"source": built.weight_source, "sha256": built.weight_sha256},
        "preprocess": dataclasses.asdict(built.preprocess),
        "dataset": {
            "name": data.name,
            "source": data.source,
            "fingerprint": data.fingerprint,
            "classes": data.classes,
            "splits": data.splits.sizes(),
            "skipped_images": len(getattr(data, "skipped", [])),
        },
        "packages": package_versions(),
        "platform": {
            "system": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            **cpu_record(),
        },
        "parameters": counts,
    }
    # A run resumed by other code than it started with: its epochs come from both; say so, keep both.
    # (Only our own tags count: MLflow sets mlflow.source.git.commit itself at a run's start.)
    tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    resumed = "weights.source" in tags  # set below by an earlier launch of this run
    logged = tags.get("git.commits") or (tags.get("mlflow.source.git.commit") if resumed else None)
    history = logged.split(",") if logged else []
    if history and history[-1] != git["commit"]:
        _log.warning(
            "resuming a run started at commit %s with the code at commit %s: its epochs come from both "
            "(tag git.commits); for one code version, launch with resume=false",
            history[-1][:12],
            git["commit"][:12],
        )
    if not history or history[-1] != git["commit"]:
        history.append(git["commit"])
    # The first launch's record stays; each later code version gets its own.
    mlflow.log_dict(
        record, f"reproducibility-code{len(history)}.json" if len(history) > 1 else "reproducibility.json"
    )
    skipped = getattr(data, "skipped", [])
    if skipped:  # data.on_bad_image=skip: which files were left out, and why
        mlflow.log_dict([{"path": b.path, "problem": b.problem} for b in skipped], "skipped_images.json")
    # Once per run: a resume reads the same images, and a second point would be a duplicate.
    log_new_metrics({"skipped_images": len(skipped)})
    mlflow.set_tags(
        {
            "mlflow.source.git.commit": git["commit"],
            "git.commits": ",".join(history),
            "git.dirty": git["dirty"],
            "weights.source": built.weight_source,
            "weights.sha256": built.weight_sha256 or "none",
            "dataset.fingerprint": data.fingerprint,
            # A tag, to group or filter runs by it in the UI: runs from different kinds may differ.
            "platform.cpu_capability": record["platform"]["cpu_capability"],
        }
    )
