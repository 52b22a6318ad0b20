"""The MLflow UI, in a real browser: an experiment transferlab made opens on its runs table, sweeps as
parent runs with their jobs, not on MLflow 3's GenAI overview.

``slow``: needs Debian's ``chromium`` (``apt-get install chromium``; skipped without it), a real
``mlflow server`` on a loopback port and a real two-job sweep. Run with ``make test-slow`` or
``pytest -m slow tests/test_ui.py``; it writes a screenshot of what the page shows first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from transferlab.tracking import ui_link

from .conftest import TINY, launch, store_overrides
from .test_predict import _free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)"),
]
# What the machine's closed network needs (background fetches of Google's hosts are refused).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=30000",  # let the page's own requests to the server finish before dumping
]


def _browser(url: str, *what: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *what, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return done.stdout


def test_an_experiment_opens_on_its_runs_with_the_sweep_tree(tmp_path: Path) -> None:
    store = store_overrides(tmp_path)
    code = launch("-m", *TINY, *store, "mlflow.experiment_name=ui_check", "sweep.name=ui-sweep", "seed=0,1")
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("ui_check")
    runs = mlflow.search_runs([experiment.experiment_id])
    children = runs[runs["tags.sweep.role"] != "parent"]["tags.mlflow.runName"].tolist()
    assert len(children) == 2

    port = _free_port()
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        # The address every run, sweep and `make demo` prints for the experiment: its runs table, the
        # sweep's parent run in it (its jobs under its expander).
        url = ui_link(base, experiment.experiment_id)
        dom = _browser(url, "--dump-dom")
        (tmp_path / "experiment.html").write_text(dom)
        _browser(url, f"--screenshot={tmp_path / 'experiment.png'}")
        print(f"screenshots and pages under {tmp_path}")
        assert "ui-sweep" in dom and "<strong>3</strong> matching runs" in dom, "not the runs table first"
        # The parent's own address: its jobs listed as child runs.
        parent = runs[runs["tags.sweep.role"] == "parent"].iloc[0]["run_id"]
        page = _browser(ui_link(base, experiment.experiment_id, parent), "--dump-dom")
        (tmp_path / "parent.html").write_text(page)
        assert all(name in page for name in children), children
        # Without the view in the address, MLflow 3.17 opens the GenAI overview (what the link avoids).
        plain = _browser(f"{base}/#/experiments/{experiment.experiment_id}", "--dump-dom")
        (tmp_path / "plain.html").write_text(plain)
        print("plain address shows the runs table:", "matching runs" in plain)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
