"""Fast paths give the plain path's results (within float tolerance), and the benchmarks' scripts run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transferlab.engine import Runner
from transferlab.schemas import to_typed

from .conftest import TINY, runner_for_config

ROOT = Path(__file__).resolve().parents[1]
# Real ImageNet weights, a convolutional network where channels_last changes the kernels used.
LITE0 = [o for o in TINY if not o.startswith("backbone")] + [
    "backbone=efficientnet_lite0",
    "backbone.image_size=64",
]


def _runner(compose_cfg, *overrides: str) -> Runner:
    cfg = to_typed(compose_cfg(*LITE0, "trainer.feature_cache=false", *overrides))
    return runner_for_config(cfg, "")[0]


# Fine-tuning backpropagates through both layouts (oneDNN builds kernels per layout): minutes on 2 cores.
@pytest.mark.parametrize("mode", ["feature_extract", pytest.param("full_finetune", marks=pytest.mark.slow)])
def test_channels_last_predicts_as_the_plain_layout(compose_cfg, mode: str) -> None:
    plain = _runner(compose_cfg, f"mode={mode}", "trainer.channels_last=false")
    fast = _runner(compose_cfg, f"mode={mode}", "trainer.channels_last=true")
    conv = next(p for p in fast.model.backbone.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # really in NHWC
    everything = torch.arange(len(plain.data.labels))
    with torch.inference_mode():
        plain.model.eval()
        fast.model.eval()
        a = plain.model(plain._inputs(everything))
        b = fast.model(fast._inputs(everything))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    # After a training epoch from the same start the two paths still agree; training amplifies the
    # last-bit differences of other kernels, so the loss agrees to a percent, predictions exactly.
    for runner in (plain, fast):
        optimizer = torch.optim.Adam([p for p in runner.model.parameters() if p.requires_grad], lr=1e-3)
        runner.fit(optimizer, 1, lambda row, epoch: None)
    (_, pa, la), (_, pb, lb) = plain.predict(plain.data.splits.test), fast.predict(fast.data.splits.test)
    assert (pa == pb).mean() >= 0.9 and abs(la - lb) <= 0.02 * abs(la)


def test_gpu_check_imports_without_mlflow() -> None:
    """A bare CUDA machine has torch and timm but often not the tracker (the NVIDIA H100 80GB machine of the 2026-11-26 GPU record, commit bf9371d, had none):
    the GPU check, the engine and the caches must import without MLflow."""
    script = ROOT / "experiments/benchmarks/gpu_check.py"
    code = f"import sys, runpy; sys.modules['mlflow'] = None; runpy.run_path({str(script)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # 2 backbones x 3 loops x 2 epochs: 1-6 minutes on 2 shared cores
def test_gpu_check_smoke_runs_on_cpu(tmp_path: Path) -> None:
    """The GPU check's code paths on CPU, tiny: it appends a table naming both backbones."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments/benchmarks/gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = tmp_path / "record.md"
    record.write_text("# record\n")
    assert module.main(["--device", "cpu", "--quick", "--record", str(record)]) == 0
    text = record.read_text()
    assert text.startswith("# record\n") and "GPU check on CPU" in text and "--quick smoke run" in text
    for backbone in ("resnet18", "efficientnet_lite0"):
        assert f"| {backbone} full fine-tuning, images/s |" in text
    assert "Feature extraction, EfficientNet-Lite0, 1 epochs" in text


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path: Path, capsys) -> None:
    from transferlab import bench

    record = tmp_path / "bench.md"
    assert bench.main(["--limit", "40", "--ft-limit", "40", "--epochs", "2", "--record", str(record)]) == 0
    text = record.read_text()
    for row in (
        "(a) feature extraction",
        "(a) test accuracy",
        "(b) 6-job sweep",
        "(c) full fine-tuning",
        "(d) peak memory",
    ):
        assert row in text
    assert "6 cache hits" not in text and "5 cache hits" in text  # one job computed, five read


@pytest.mark.slow  # inductor compiles C++ for the CPU: minutes on 2 cores
def test_compile_predicts_as_eager(compose_cfg) -> None:
    eager = _runner(compose_cfg, "mode=full_finetune")
    compiled = _runner(compose_cfg, "mode=full_finetune", "trainer.compile=true")
    assert compiled.net is not compiled.model  # the compiled wrapper runs, the plain module is kept
    (_, pa, la), (_, pb, lb) = (
        eager.predict(eager.data.splits.test),
        compiled.predict(compiled.data.splits.test),
    )
    assert (pa == pb).all() and abs(la - lb) <= 1e-3 * abs(la)
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # no _orig_mod. prefixes
