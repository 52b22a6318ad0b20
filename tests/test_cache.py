"""The on-disk caches: reuse across runs, recompute on any key change, never load a bad entry silently."""

from __future__ import annotations

import errno
import hashlib
import logging
import multiprocessing
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab import cache, inputs
from transferlab.backbones import build_backbone
from transferlab.cache import FeatureCache, TensorStore
from transferlab.data import prepare
from transferlab.engine import Runner
from transferlab.inputs import prepare_cached
from transferlab.schemas import to_typed

from .conftest import TINY, runner_for_config, runs_in

# Real ImageNet weights (bundled, offline) at 32 px: the key must not depend on the seed then.
PRETRAINED = [
    *(o for o in TINY if not o.startswith("backbone")),
    "backbone=efficientnet_lite0",
    "backbone.image_size=32",
]


@pytest.fixture
def make_runner(compose_cfg, tmp_path: Path) -> Callable[..., tuple[Runner, FeatureCache]]:
    """Build a run's runner as train() does, with the feature cache under tmp_path/cache."""

    def _make(*overrides: str) -> tuple[Runner, FeatureCache]:
        cfg = to_typed(compose_cfg(*overrides))
        return runner_for_config(cfg, str(tmp_path), tmp_path / "cache")

    return _make


def _features(features: FeatureCache, runner: Runner) -> torch.Tensor:
    """What Runner.fit asks the cache for: the frozen backbone's output for every image."""
    return features.features(
        runner.model.backbone, runner.data, runner.compute_identity(), runner.extract_features
    )


def _hit(make_runner: Callable[..., tuple[Runner, FeatureCache]], *overrides: str) -> bool:
    runner, features = make_runner(*overrides)
    _features(features, runner)
    assert features.lookup is not None
    return features.lookup.hit


def test_what_the_key_holds(make_runner) -> None:
    assert not _hit(make_runner, *PRETRAINED)
    # Not in the key: the head's training (lr, optimizer, seed, epochs) and the split.
    assert _hit(make_runner, *PRETRAINED, "seed=3", "optimizer=sgd", "optimizer.lr=0.1", "trainer.epochs=5")
    assert _hit(make_runner, *PRETRAINED, "data.split_seed=42", "data.val_fraction=0.2")
    # In it: anything that changes the backbone's input or its weights or the arithmetic.
    assert not _hit(make_runner, *PRETRAINED, "backbone.image_size=48")
    assert not _hit(make_runner, *PRETRAINED, "data.images_per_class=12")
    assert not _hit(make_runner, *PRETRAINED, "trainer.channels_last=false")
    assert not _hit(make_runner, *PRETRAINED, "trainer.batch_size=16")
    # Random init depends on the seed, and so do its features.
    assert not _hit(make_runner, *TINY, "seed=0")
    assert _hit(make_runner, *TINY, "seed=0", "optimizer.lr=0.01")
    assert not _hit(make_runner, *TINY, "seed=1")


def test_cached_features_equal_computed_ones(make_runner) -> None:
    runner, features = make_runner(*PRETRAINED)
    computed = runner.extract_features()
    assert torch.equal(_features(features, runner), computed)  # miss: stored
    runner, features = make_runner(*PRETRAINED, "seed=5")
    assert torch.equal(_features(features, runner), computed) and features.lookup.hit


def _entry(tmp_path: Path) -> Path:
    (entry,) = (tmp_path / "cache" / "features").glob("*.safetensors")
    return entry


@pytest.mark.parametrize("damage", ["truncated", "old_format", "wrong_shape", "other_key"])
def test_a_bad_entry_is_logged_and_rebuilt(make_runner, tmp_path: Path, caplog, damage: str) -> None:
    runner, features = make_runner(*PRETRAINED)
    # A copy: the entry is read memory-mapped, and this test damages the file in place.
    good = _features(features, runner).clone()
    entry = _entry(tmp_path)
    header = {"format": str(cache.CACHE_FORMAT), "key": "{}", "meta": "{}"}
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "old_format":
        save_file({"features": good}, entry, metadata={**header, "format": "0"})
    else:
        key = cache.feature_key(runner.model.backbone, features.built, runner.data, runner.compute_identity())
        rows = good[:-1] if damage == "wrong_shape" else good
        stored = key if damage == "wrong_shape" else {**key, "format": -1}
        save_file(
            {"features": rows}, entry, metadata={**header, "key": cache.json.dumps(stored, sort_keys=True)}
        )

    caplog.set_level(logging.WARNING, logger="transferlab.cache")
    runner, features = make_runner(*PRETRAINED)
    rebuilt = _features(features, runner).cpu()
    assert not features.lookup.hit and torch.equal(rebuilt, good)
    assert "unusable" in caplog.text and entry.name in caplog.text
    runner, features = make_runner(*PRETRAINED)
    _features(features, runner)
    assert features.lookup.hit  # the rebuilt entry is good


def _partial_then_full_disk(tensors, filename, metadata=None) -> None:  # noqa: ANN001 - save_file's
    Path(filename).write_bytes(b"\x00" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_fails_the_run_clearly_and_keeps_nothing(
    run_cli, store, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(cache, "save_file", _partial_then_full_disk)
    assert run_cli(*TINY, *store) == 2
    err = capsys.readouterr().err
    assert "paths.cache_dir" in err and "no space left on device" in err and "Fix:" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FAILED" and "no space left" in run["tags.error"]


def test_runs_log_the_cache(run_cli, store, tmp_path: Path) -> None:
    assert run_cli(*PRETRAINED, *store, "seed=0") == 0
    assert run_cli(*PRETRAINED, *store, "seed=1", "optimizer.lr=3e-3", "trainer.epochs=1") == 0
    assert (
        run_cli(
            *PRETRAINED,
            *store,
            "seed=1",
            "optimizer.lr=3e-3",
            "trainer.epochs=1",
            "trainer.feature_cache=false",
        )
        == 0
    )
    assert run_cli(*PRETRAINED, *store, "augment=flip", "trainer.epochs=1") == 0
    runs = runs_in(tmp_path).sort_values("start_time").reset_index()
    assert list(runs["metrics.feature_cache_hit"][:2]) == [0.0, 1.0]
    assert all(runs["metrics.feature_extract_s"][:3] >= 0)
    assert list(runs["tags.feature_cache"][:2]) == ["on", "on"]
    assert runs["tags.feature_cache"][2].startswith("off: trainer.feature_cache=false")
    assert runs["tags.feature_cache"][3].startswith("off: augment=flip")
    # A cached run is the run: bit-identical to one that computed its features in memory.
    for key in ("test_loss", "test_accuracy", "best_val_loss"):
        assert runs[f"metrics.{key}"][1] == runs[f"metrics.{key}"][2], key


# -- parallel jobs -----------------------------------------------------------------------------


def _job(root: str, counter: str, queue) -> None:  # noqa: ANN001 - a multiprocessing queue
    def compute() -> tuple[dict[str, torch.Tensor], dict]:
        with open(counter, "a") as fh:
            fh.write("computed\n")
        import time

        time.sleep(1.0)  # long enough that the other job asks while this one computes
        return {"x": torch.arange(1000, dtype=torch.float32)}, {}

    lookup = TensorStore(root, "features").get_or_compute({"k": 1}, compute, lambda t, m: None)
    queue.put((lookup.hit, float(lookup.tensors["x"].sum())))


def test_parallel_jobs_compute_an_entry_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    counter = tmp_path / "computed.txt"
    jobs = [ctx.Process(target=_job, args=(str(tmp_path), str(counter), queue)) for _ in range(3)]
    for job in jobs:
        job.start()
    results = [queue.get(timeout=120) for _ in jobs]
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    assert counter.read_text().count("computed") == 1
    assert sorted(hit for hit, _ in results) == [False, True, True]
    assert len({total for _, total in results}) == 1
    assert [p.suffix for p in (tmp_path / "features").iterdir() if p.suffix != ".lock"] == [".safetensors"]


# -- decoded inputs ----------------------------------------------------------------------------


def _image_folder(root: Path, per_class: int = 10) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_decoded_inputs_are_cached_per_source_and_preprocessing(compose_cfg, tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    cfg = to_typed(compose_cfg(*TINY, "data=imagefolder", f"data.root={root}"))
    pre = build_backbone(cfg.backbone).preprocess
    cache_dir = str(tmp_path / "cache")

    plain = prepare(cfg.data, pre, "")
    first, lookup = prepare_cached(cfg.data, pre, "", cache_dir)
    assert lookup is not None and not lookup.hit
    again, lookup = prepare_cached(cfg.data, pre, "", cache_dir)
    assert lookup is not None and lookup.hit
    for data in (first, again):  # the same PreparedData as decoding it here
        assert torch.equal(data.images, plain.images) and torch.equal(data.labels, plain.labels)
        assert data.fingerprint == plain.fingerprint and data.classes == plain.classes
        assert all(
            np.array_equal(getattr(data.splits, s), getattr(plain.splits, s))
            for s in ("train", "val", "test")
        )

    # Another selection or another file on disk: decoded anew.
    cfg_limited = to_typed(compose_cfg(*TINY, "data=imagefolder", f"data.root={root}", "data.limit=16"))
    assert not prepare_cached(cfg_limited.data, pre, "", cache_dir)[1].hit
    Image.fromarray(np.zeros((40, 52, 3), dtype=np.uint8)).save(root / "cat" / "0.png")
    changed, lookup = prepare_cached(cfg.data, pre, "", cache_dir)
    assert not lookup.hit and changed.fingerprint != plain.fingerprint
    # Off, or nothing on disk to key on (generated images): no cache.
    assert prepare_cached(cfg.data, pre, "", cache_dir, enabled=False)[1] is None
    synthetic = to_typed(compose_cfg(*TINY))
    assert prepare_cached(synthetic.data, pre, "", cache_dir)[1] is None


def test_the_streamed_store_equals_decoding_in_memory_with_mixed_channels_and_workers(
    compose_cfg, tmp_path: Path
) -> None:
    """Written image by image (grey ones replicated to RGB as they are copied), decoded in 1 or 2
    processes: the entry reads back as the same tensors and fingerprint as decoding into memory."""
    root = tmp_path / "images"
    _image_folder(root)
    for i in range(3):  # grey images among RGB ones
        Image.fromarray(np.full((30, 44), 40 * i, dtype=np.uint8), mode="L").save(root / "dog" / f"g{i}.png")
    cfg = to_typed(compose_cfg(*TINY, "data=imagefolder", f"data.root={root}"))
    pre = build_backbone(cfg.backbone).preprocess
    plain = prepare(cfg.data, pre, "")
    assert plain.images.shape[1] == 3
    data, lookup = prepare_cached(cfg.data, pre, "", str(tmp_path / "cache-0"))
    assert not lookup.hit
    assert torch.equal(data.images, plain.images) and torch.equal(data.labels, plain.labels)
    assert data.fingerprint == plain.fingerprint
    # 2 decode workers, in a process of its own: this one runs other threads (decoding would stay here).
    script = (
        "import logging, hashlib; logging.basicConfig(level=logging.INFO); "
        "from transferlab.inputs import prepare_cached; "
        "from transferlab.schemas import ImageFolderDataConfig; from transferlab.backbones import Preprocess; "
        f"pre = Preprocess(*{(pre.resize, pre.crop, tuple(pre.mean), tuple(pre.std), pre.interpolation)!r}); "
        f"d, _ = prepare_cached(ImageFolderDataConfig(root={str(root)!r}), pre, '', {str(tmp_path / 'cache-2')!r}, workers=2); "
        "print(d.fingerprint, hashlib.sha256(d.images.numpy().tobytes()).hexdigest())"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "2 worker processes" in run.stderr  # it did decode in workers
    images_sha = hashlib.sha256(plain.images.numpy().tobytes()).hexdigest()
    assert run.stdout.split() == [plain.fingerprint, images_sha]


def test_a_full_disk_while_decoding_into_the_store_keeps_nothing(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    cfg = to_typed(compose_cfg(*TINY, "data=imagefolder", f"data.root={root}"))
    pre = build_backbone(cfg.backbone).preprocess

    def full(path, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003 - write_streamed's
        Path(path).write_bytes(b"\x00" * 100)  # a partial entry, as a disk filling up leaves one
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inputs, "write_streamed", full)
    with pytest.raises(cache.CacheWriteError, match="no space left on device") as info:
        prepare_cached(cfg.data, pre, "", str(tmp_path / "cache"))
    assert ".tmp" not in str(info.value) and ".pixels" not in str(info.value)  # it names the entry
    left = [p for p in (tmp_path / "cache" / "inputs").rglob("*") if not p.name.endswith(".lock")]
    assert left == []  # no entry, no temporary file, no pixel file (the folder's check record may stay)


def test_a_full_disk_in_a_decode_worker_keeps_nothing(compose_cfg, tmp_path: Path) -> None:
    """Decode workers write their chunks to part files themselves: one that hits a full disk ends the
    run in the same one line, and neither the entry nor any part file stays."""
    root = tmp_path / "images"
    _image_folder(root)
    cfg = to_typed(compose_cfg(*TINY, "data=imagefolder", f"data.root={root}"))
    pre = build_backbone(cfg.backbone).preprocess
    script = (
        "import errno, sys; from transferlab import data, cache; "
        "from transferlab.inputs import prepare_cached; "
        "from transferlab.schemas import ImageFolderDataConfig; from transferlab.backbones import Preprocess\n"
        "real = data._decode_chunk\n"
        "def full(indices, part=None):\n"
        "    if part is not None and part.endswith('0000001'):\n"
        "        open(part, 'wb').write(b'x' * 100)\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(indices, part)\n"
        "data._decode_chunk = full\n"
        "data.CHUNK = 4\n"
        f"pre = Preprocess(*{(pre.resize, pre.crop, tuple(pre.mean), tuple(pre.std), pre.interpolation)!r})\n"
        "try:\n"
        f"    prepare_cached(ImageFolderDataConfig(root={str(root)!r}), pre, '', {str(tmp_path / 'cache')!r}, workers=2)\n"
        "except cache.CacheWriteError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert (
        "paths.cache_dir: cannot write cache entry" in run.stdout and "no space left on device" in run.stdout
    )
    assert ".part" not in run.stdout and ".pixels" not in run.stdout  # it names the entry
    left = [p for p in (tmp_path / "cache" / "inputs").rglob("*") if not p.name.endswith(".lock")]
    assert left == []
