"""The overrides' check runs in a forked child beside the entrypoint's heavy imports (real processes,
real signals): a run does not wait for it, a refusal still ends the process at once with exit 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import CONF_DIR, TINY, store_overrides

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the check runs first, not beside, there")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    # 60 s: far past any refusal here; a process still sleeping then was never told of its refusal.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_a_slow_refusal_does_not_hold_up_the_process_and_still_ends_it_with_exit_2() -> None:
    done = _python(
        """
        import sys, time
        from transferlab.preflight import check_beside

        def refuse():
            time.sleep(2)  # a check slower than the caller's next step
            print("error: trainer.batch_size: must be >= 1, got 0. Fix: use e.g. 32", file=sys.stderr)
            sys.exit(2)

        start = time.perf_counter()
        wait = check_beside(refuse)
        print(f"returned after {time.perf_counter() - start:.2f} s", flush=True)
        time.sleep(120)  # stands for the imports of torch, timm and MLflow
        print("not reached")
        """
    )
    assert done.returncode == 2, done
    returned = float(done.stdout.split()[2])
    assert returned < 1.0 and "not reached" not in done.stdout, done.stdout  # it did not wait
    assert done.stderr.strip().splitlines() == [
        "error: trainer.batch_size: must be >= 1, got 0. Fix: use e.g. 32"
    ]


def test_the_entrypoint_refuses_a_bad_override_from_beside_its_imports() -> None:
    done = _python(
        f"""
        import time
        from pathlib import Path
        from transferlab.preflight import answer_without_compute

        wait = answer_without_compute(["trainer.batch_size=0"], Path({str(CONF_DIR)!r}), "train")
        print("returned", flush=True)  # before the verdict: the check runs beside
        time.sleep(120)
        print("not reached")
        """
    )
    assert done.returncode == 2 and done.stdout == "returned\n", done
    assert done.stderr.strip().splitlines() == [
        "error: trainer.batch_size: must be >= 1, got 0. Fix: use e.g. 32"
    ]


def test_python_m_train_refuses_a_bad_late_sweep_value_in_one_line_and_starts_no_run(tmp_path: Path) -> None:
    """The real entrypoint, whose check runs beside its imports: refused before any run or parent run."""
    argv = ["-m", *TINY, *store_overrides(tmp_path), "seed=0,1", "optimizer.lr=1e-3,-1"]
    done = subprocess.run(
        [sys.executable, "-m", "transferlab.train", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: optimizer.lr: must be > 0, got -1.0. Fix: "), err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "logs").exists()


def test_the_entrypoint_waits_for_a_verdict_that_comes_after_its_imports(tmp_path: Path) -> None:
    """The imports done already (a warm interpreter), the check slower than them: the entrypoint
    must wait for its verdict before Hydra starts the run, which creates the job's log folder."""
    argv = [*TINY, *store_overrides(tmp_path), "trainer.batch_size=0"]
    done = _python(
        f"""
        import os, runpy, sys, time
        from pathlib import Path
        import transferlab.train  # the heavy imports, paid here: the entrypoint's own take no time
        from transferlab import preflight

        del sys.modules["transferlab.train"]  # run afresh as __main__ below, its imports cached

        beside, parent = preflight.check_beside, os.getpid()

        def slow_beside(check):
            def slow():
                Path({str(tmp_path / "beside")!r}).write_text(str(os.getpid() != parent))
                time.sleep(3)  # the verdict comes long after the imports
                check()
            return beside(slow)

        preflight.check_beside = slow_beside
        sys.argv = ["train", *{argv!r}]
        runpy.run_module("transferlab.train", run_name="__main__", alter_sys=True)
        print("not reached")
        """
    )
    assert (tmp_path / "beside").read_text() == "True"  # the check did run in the forked child
    assert done.returncode == 2 and "not reached" not in done.stdout, done
    assert done.stderr.strip().splitlines() == [
        "error: trainer.batch_size: must be >= 1, got 0. Fix: use e.g. 32"
    ], done.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "mlflow.db").exists()


def test_good_overrides_pass_and_nothing_is_printed_twice() -> None:
    """Output buffered before the fork is flushed first: otherwise the child would print it again."""
    done = _python(
        f"""
        from pathlib import Path
        from transferlab.preflight import answer_without_compute

        print("before")  # block-buffered: stdout is a pipe
        wait = answer_without_compute(["trainer.epochs=2", "mode=lp_ft"], Path({str(CONF_DIR)!r}), "train")
        wait()
        print("after")
        """
    )
    assert done.returncode == 0 and done.stdout == "before\nafter\n", done


def test_a_check_that_crashes_or_is_killed_stops_the_run_with_its_code() -> None:
    done = _python(
        """
        import os, signal
        from transferlab.preflight import check_beside

        check_beside(lambda: os.kill(os.getpid(), signal.SIGKILL))()
        print("not reached")
        """
    )
    assert done.returncode == 128 + 9 and done.stdout == "", done
    done = _python(
        """
        from transferlab.preflight import check_beside

        def crash():
            raise RuntimeError("a bug in the check")

        check_beside(crash)()
        print("not reached")
        """
    )
    assert done.returncode == 1 and done.stdout == "" and "RuntimeError: a bug in the check" in done.stderr, (
        done
    )
