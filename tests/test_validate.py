"""Bad data: a folder of deliberately broken and unusual images, made here, checked before any run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from transferlab.data import load_raw, prepare
from transferlab.schemas import ConfigError, ImageFolderDataConfig
from transferlab.validate import check_image, load_image

from .conftest import TINY, runs_in
from .test_data import SMALL


def _pattern(size: int = 20) -> np.ndarray:
    """A left-to-right ramp in red: orientation and channel order are both visible."""
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return np.stack([ramp, np.zeros_like(ramp), 255 - ramp], axis=-1)


def _good(folder: Path, n: int, shade: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 24), (shade, 20 * i, 0)).save(folder / f"ok{i}.png")


def _supported_formats(folder: Path) -> dict[str, np.ndarray]:
    """One file per supported-but-unusual format, with the array it must decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, np.ndarray] = {}
    grey = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (20, 1))
    Image.fromarray(grey, "L").save(folder / "grey.png")
    expected["grey.png"] = grey
    wide = grey.astype(np.uint16) * 257  # 16-bit: full range, not clipped at 255
    Image.fromarray(wide).save(folder / "sixteen.png")
    Image.fromarray(wide).save(folder / "sixteen.tif")
    expected["sixteen.png"] = expected["sixteen.tif"] = grey
    rgba = np.dstack([_pattern(), np.full((20, 20), 255, np.uint8)])
    rgba[:, :5, 3] = 0  # fully transparent stripe: composited on white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    flat = _pattern().copy()
    flat[:, :5] = 255
    expected["rgba.png"] = flat
    # Palette and CMYK: the expected pixels are written down, not computed by the PIL call under test.
    colours = np.array([[255, 0, 0], [0, 128, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    indices = (np.arange(20)[None, :] // 5 + np.zeros((20, 1), dtype=int)).astype(np.uint8)  # 4 stripes
    palette = Image.fromarray(indices, "P")
    palette.putpalette(colours.flatten().tolist())
    palette.save(folder / "palette.gif")
    expected["palette.gif"] = colours[indices]
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)  # no black ink
    expected["cmyk.jpg"] = np.tile(np.array([255, 0, 0], dtype=np.uint8), (20, 20, 1))  # C=0 M=Y=255: red
    # A phone photo stored sideways with EXIF Orientation=6 (rotate 90 degrees clockwise to view).
    stored = Image.fromarray(_pattern())
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.png", exif=exif)
    expected["rotated.png"] = np.rot90(_pattern(), k=-1)
    return expected


def _broken(folder: Path) -> dict[str, str]:
    """One file per kind of damage, with a word its reported problem must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pattern(64)).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    return {
        "truncated.jpg": "decode",
        "garbage.png": "decode",
        "notes.txt": "not an image",
        "empty.jpg": "empty",
    }


def test_supported_formats_decode_correctly(tmp_path: Path) -> None:
    for name, want in _supported_formats(tmp_path).items():
        assert check_image(tmp_path / name) is None, name
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        tolerance = 3 if name.endswith(".jpg") else 0
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tolerance, name


def test_every_kind_of_damage_is_named(tmp_path: Path) -> None:
    for name, word in _broken(tmp_path).items():
        problem = check_image(tmp_path / name)
        assert problem is not None and word in problem, (name, problem)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _good(root / "cats", 8, 200)
    _good(root / "dogs", 8, 40)
    _supported_formats(root / "dogs")
    _broken(root / "cats")
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: not data, not an error
    (root / "dogs" / ".ipynb_checkpoints").mkdir()
    (root / "dogs" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    return root


def test_error_names_the_file_before_loading(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_raw(ImageFolderDataConfig(root=str(root)), "")
    msg = str(info.value)
    assert msg.startswith("data.on_bad_image: ") and str(root / "cats") in msg
    assert "and 3 more bad file(s)" in msg and "on_bad_image=skip" in msg


def test_skip_leaves_bad_files_out_and_keeps_the_rest(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    data = prepare(ImageFolderDataConfig(root=str(root), on_bad_image="skip"), SMALL, "")
    assert sorted(Path(b.path).name for b in data.skipped) == sorted(_broken(tmp_path / "again"))
    assert len(data.labels) == 8 + 8 + 7  # 8 good cats, 8 good dogs + 7 unusual-format dogs
    assert data.images.shape[1] == 3  # mixed grey and colour: grey becomes RGB


def test_an_empty_class_and_mismatched_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _good(root / "a", 4, 10)
    _broken(root / "b")  # only bad files: empty once they are skipped
    with pytest.raises(ConfigError, match=r"\['b'\] under .* hold no readable images \(4 file"):
        load_raw(ImageFolderDataConfig(root=str(root), on_bad_image="skip"), "")
    split = tmp_path / "split"
    for part in ("train", "test"):
        _good(split / part / "a", 4, 10)
    _good(split / "train" / "b", 4, 90)
    _good(split / "test" / "c", 4, 90)
    with pytest.raises(ConfigError, match=r"lacks class folder\(s\) \['b'\] and has extra \['c'\]"):
        load_raw(ImageFolderDataConfig(root=str(split)), "")


def test_the_cli_stops_before_any_run_or_logs_the_skipped(run_cli, store, tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path)
    args = [*TINY, *store, "data=imagefolder", f"data.root={root}", "trainer.epochs=1"]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.on_bad_image: ") and str(root / "cats") in err[-1]
    assert not (tmp_path / "mlflow.db").exists() or runs_in(tmp_path).empty

    assert run_cli(*args, "data.on_bad_image=skip") == 0
    run = runs_in(tmp_path).iloc[0]
    assert run["status"] == "FINISHED" and run["metrics.skipped_images"] == 4
    client = MlflowClient()
    listed = json.loads(
        Path(client.download_artifacts(run["run_id"], "skipped_images.json", str(tmp_path))).read_text()
    )
    assert {Path(item["path"]).name for item in listed} == {
        "truncated.jpg",
        "garbage.png",
        "notes.txt",
        "empty.jpg",
    }


def test_an_unchanged_folder_is_checked_from_disk_and_a_changed_file_rescanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's jobs (new processes) decode nothing to check an unchanged folder; edits are seen."""
    from transferlab import validate
    from transferlab.sources import imagefolder as data_module

    root = _folder(tmp_path)
    cfg = ImageFolderDataConfig(root=str(root), on_bad_image="skip")
    first = load_raw(cfg, "", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "scans").glob("*.json"))) == 1

    decoded: list[str] = []
    real_check = validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda p: decoded.append(p.name) or real_check(p))
    data_module._SCANS.clear()  # as in a new process: only the disk remains
    again = load_raw(cfg, "", str(tmp_path / "cache"))
    assert decoded == []
    assert (again.sources, list(again.labels), again.skipped) == (
        first.sources,
        list(first.labels),
        first.skipped,
    )

    # A good file truncated in place: size and mtime change, so the folder is scanned again.
    victim = root / "dogs" / "ok0.png"
    victim.write_bytes(victim.read_bytes()[:40])
    data_module._SCANS.clear()
    changed = load_raw(cfg, "", str(tmp_path / "cache"))
    assert "ok0.png" in decoded
    assert str(victim) in {b.path for b in changed.skipped} and str(victim) not in changed.sources

    # A torn scan file is ignored (rescanned), never trusted.
    for path in (tmp_path / "cache" / "scans").glob("*.json"):
        path.write_text('[{"classes": ["cats"')
    data_module._SCANS.clear()
    decoded.clear()
    assert load_raw(cfg, "", str(tmp_path / "cache")).sources == changed.sources
    assert decoded  # scanned anew


def test_the_tracking_server_and_the_weights_are_checked_before_any_image_is_decoded(
    tmp_path: Path, run_cli, store, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Fail fast in the promised order: an unreachable server or missing weights are reported
    before the image-folder check decodes a single file; with both fine, that check runs."""
    from huggingface_hub import constants

    from transferlab import validate

    root = _folder(tmp_path)
    decoded: list[str] = []
    real_check = validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda p: decoded.append(p.name) or real_check(p))
    data = ["data=imagefolder", f"data.root={root}", "data.on_bad_image=skip", "data.cache=false"]
    tiny = ["backbone=timm", "backbone.name=test_efficientnet", "trainer.epochs=1", "trainer.progress=false"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    assert run_cli(*data, *tiny, "backbone.weights=null", *store, f"mlflow.tracking_uri={nobody}") == 2
    assert "cannot reach" in capsys.readouterr().err and decoded == []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run_cli(*data, *tiny, "backbone.weights=pretrained", *store) == 2
    assert "error: backbone.weights: cannot load pretrained timm weights" in capsys.readouterr().err
    assert decoded == []
    assert run_cli(*data, *tiny, "backbone.weights=null", *store) == 0
    assert decoded  # the check itself still runs, after the others
