"""A trained run as a classifier: its model folder written and read back, images in, probabilities out.

A run's model folder (``model`` in MLflow, see :mod:`transferlab.model_store`) holds plain files only:

- ``weights.safetensors``: the tested weights (the EMA's when the run kept an EMA), the new head included;
- ``config.yaml``: the run's resolved config, from which the network is rebuilt through the typed schema;
- ``classes.json``: the class names in the order of the head's outputs;
- ``preprocess.json``: the weights' eval transform as numbers (resize, crop, mean, std, interpolation).

Reading a folder runs nothing from it: YAML and JSON through safe loaders, tensors through safetensors,
and a folder holding any file transferlab does not write (a pickle, a code file) is refused before
anything in it is read (:func:`check_folder`). Images go through the functions training uses: decoded
by :func:`transferlab.validate.load_image` (EXIF orientation, 16-bit scans, alpha on white, CMYK), then
the stored square and its centre crop (:mod:`transferlab.data`), so a run's test images give the run's
own test predictions.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transferlab import validate
from transferlab.backbones import Preprocess, TransferModel, architecture
from transferlab.data import eval_crop, normalize, preprocess_image
from transferlab.modes import make_model
from transferlab.schemas import BackboneConfig, ConfigError

WEIGHTS, CONFIG, CLASSES, PREPROCESS = "weights.safetensors", "config.yaml", "classes.json", "preprocess.json"
FILES = (WEIGHTS, CONFIG, CLASSES, PREPROCESS)


class ModelFilesError(ConfigError):
    """A model folder that cannot be used as it is: one line naming the file and the fix."""


def write_files(
    folder: Path, state: dict[str, torch.Tensor], config_yaml: str, classes: list[str], pre: Preprocess
) -> None:
    """The four files of a model folder (see the module's docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    # contiguous copies: safetensors refuses tensors that share storage (tied weights) or views.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(config_yaml)
    (folder / CLASSES).write_text(json.dumps({"classes": classes}))
    (folder / PREPROCESS).write_text(json.dumps(dataclasses.asdict(pre)))


def check_folder(root: Path, allowed: dict[str, bytes | None], where: str) -> None:
    """Refuse ``root`` if it holds a file not in ``allowed`` (relative path -> the exact bytes it must
    hold, or None for any content), or one whose bytes differ: named, before any file is read."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ModelFilesError(
                where, f"{name} is a symbolic link", "use a model folder as transferlab logs it (plain files)"
            )
        if name not in allowed:
            raise ModelFilesError(
                where,
                f"{name} is not a file transferlab writes (a pickle or code would have to be trusted to load it); "
                "refused, nothing in the folder was read",
                "log the model again with transferlab (python -m transferlab.reproduce RUN_ID), or load it "
                "with a tool that trusts it",
            )
        expected = allowed[name]
        if expected is not None and path.read_bytes() != expected:
            raise ModelFilesError(
                where,
                f"{name} is not the file transferlab writes (foreign code); refused, nothing in the folder was run",
                "log the model again with transferlab (python -m transferlab.reproduce RUN_ID)",
            )


def _read_json(path: Path, key: str) -> object:
    try:
        return json.loads(path.read_text())[key] if key else json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFilesError(
            str(path), f"unreadable ({type(exc).__name__}: {exc})", "log the model again"
        ) from None


@dataclass
class Classifier:
    """The rebuilt network in eval mode, its preprocessing and class order."""

    model: TransferModel
    preprocess: Preprocess
    classes: list[str]
    device: torch.device

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> Classifier:
        """Rebuild from the four files: the backbone section of ``config.yaml`` through the typed schema,
        the architecture without pretrained weights, then the run's own tensors, strictly."""
        classes = _read_json(folder / CLASSES, "classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
            raise ModelFilesError(
                str(folder / CLASSES), "does not list >= 2 class names", "log the model again"
            )
        numbers = _read_json(folder / PREPROCESS, "")
        try:
            pre = Preprocess(**numbers)  # type: ignore[arg-type]
            pre = dataclasses.replace(pre, mean=tuple(pre.mean), std=tuple(pre.std))
        except TypeError as exc:
            raise ModelFilesError(
                str(folder / PREPROCESS), f"unexpected fields ({exc})", "log the model again"
            ) from None
        try:  # yaml.safe_load: plain values only, no Python object is constructed
            logged = yaml.safe_load((folder / CONFIG).read_text())
            section = OmegaConf.merge(OmegaConf.structured(BackboneConfig), logged["backbone"])
            backbone_cfg = OmegaConf.to_object(section)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a torn file, a missing section, an unknown key
            raise ModelFilesError(
                str(folder / CONFIG),
                f"no usable backbone section ({type(exc).__name__}: {exc})",
                "log the model again",
            ) from None
        assert isinstance(backbone_cfg, BackboneConfig)
        try:
            state = load_file(str(folder / WEIGHTS))  # safetensors: tensors only, never unpickled
        except (SafetensorError, OSError) as exc:
            raise ModelFilesError(
                str(folder / WEIGHTS), f"not a safetensors file ({exc})", "log the model again"
            ) from None
        model = make_model(architecture(backbone_cfg), len(classes))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFilesError(
                str(folder / WEIGHTS),
                f"does not fit {backbone_cfg.name} with {len(classes)} classes ({str(exc).splitlines()[0]})",
                "log the model again",
            ) from None
        target = torch.device(device)
        return cls(model.to(target).eval(), pre, list(classes), target)

    def inputs(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded images (HxW or HxWx3 uint8) -> the normalised batch the run evaluated on."""
        stored = [preprocess_image(a, self.preprocess) for a in arrays]
        channels = max(t.shape[0] for t in stored)  # grey beside colour: grey repeated, as training does
        batch = torch.stack([t.expand(channels, -1, -1) for t in stored])
        return normalize(eval_crop(batch, self.preprocess).to(self.device), self.preprocess)

    @torch.inference_mode()
    def predict(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each image's predicted class index (argmax of the logits, as the run's test did) and its
        class probabilities (softmax), as NumPy arrays."""
        logits = self.model(self.inputs(arrays)).float()
        return logits.argmax(1).cpu().numpy(), torch.softmax(logits, 1).cpu().numpy()

    def rows(
        self, items: Iterable[tuple[str, np.ndarray | str]], batch_size: int
    ) -> Iterator[tuple[str, int | None, np.ndarray | None, str | None]]:
        """(name, decoded array or what is wrong with it) -> (name, class index, probabilities, error), in
        order, ``batch_size`` images per forward pass; a bad item is a row with its error, not a stop."""
        for chunk in _chunks(items, batch_size):
            good = [i for i, (_, item) in enumerate(chunk) if not isinstance(item, str)]
            labels, probs = self.predict([chunk[i][1] for i in good]) if good else ((), ())
            at = {i: k for k, i in enumerate(good)}
            for i, (name, item) in enumerate(chunk):
                if i in at:
                    yield name, int(labels[at[i]]), probs[at[i]], None
                else:
                    yield name, None, None, str(item)


def _chunks(items: Iterable, size: int) -> Iterator[tuple]:
    """Tuples of ``size`` items (``itertools.batched`` from Python 3.12 on)."""
    iterator = iter(items)
    while chunk := tuple(itertools.islice(iterator, size)):
        yield chunk


def decode_bytes(data: bytes) -> np.ndarray:
    """Encoded image bytes -> the uint8 array training would have decoded from the same file."""
    return validate.load_image(io.BytesIO(data))
