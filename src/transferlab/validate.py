"""Image files checked once, up front: decoded the way training decodes them, or reported by path.

A user's image folder holds what cameras, scanners and file managers leave behind: truncated
JPEGs, a ``notes.txt``, ``.DS_Store``, grayscale scans, RGBA screenshots, palette GIFs, 16-bit
microscopy TIFFs, CMYK prints and phone photos whose orientation lives in an EXIF tag. Every
supported format is converted to 8-bit L or RGB here, with the same function training uses, so a
file that passes the check cannot fail in epoch 3. The rest is a :class:`BadImage` with the reason:
``data.on_bad_image=error`` stops before any run starts, ``skip`` leaves those files out and the
run logs them (``skipped_images.json``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from transferlab.schemas import ConfigError

# A truncated file is an error, never silently padded with grey (Pillow's opt-in behaviour).
ImageFile.LOAD_TRUNCATED_IMAGES = False

_GREY_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit scans/TIFFs (mode I: 16-bit PNGs)
_GREY = ("1", "L", "LA", "La", "PA") + _GREY_16BIT


@dataclass(frozen=True)
class BadImage:
    path: str
    problem: str


def is_hidden(path: Path, root: Path) -> bool:
    """Dotfiles and files inside dot-folders (``.DS_Store``, ``.ipynb_checkpoints/``) are not data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite on white: transparent pixels often hold black or garbage colour underneath."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def to_array(im: Image.Image) -> np.ndarray:
    """Any supported PIL image -> HxW (grey) or HxWx3 (colour) uint8, upright."""
    im = ImageOps.exif_transpose(im)  # phone photos: pixels stored sideways, orientation in EXIF
    if im.mode in _GREY_16BIT:
        # Pillow's convert("L") clips 16-bit values at 255; scale the full range instead.
        wide = np.asarray(im).astype(np.int64)
        return (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
    if im.mode == "F":
        raise ValueError("32-bit float pixels have no standard 8-bit scale")
    has_alpha = im.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    )
    grey = im.mode in _GREY or (im.mode == "P" and _palette_is_grey(im))
    if has_alpha:
        im = _flatten_alpha(im)
    # CMYK, YCbCr, LAB, HSV and palettes: Pillow's conversions to RGB (inverted Adobe CMYK included).
    return np.asarray(im.convert("L" if grey else "RGB"))


def _palette_is_grey(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    triples = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(triples)) and bool((triples == triples[:, :1]).all())


def load_image(path: str | Path | BinaryIO) -> np.ndarray:
    """Decode one file (or an open binary stream of one) fully (a truncated file raises here, not in
    training)."""
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes": handled by _flatten_alpha.
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(path) as im:
            im.load()
            array = to_array(im)
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ValueError(f"unexpected decoded shape {array.shape}")
    return array


def read_image(path: Path) -> np.ndarray | str:
    """The decoded array, or what is wrong with the file (one line): for a check, and for ``predict``,
    where a bad file is a row of its output, not a crash."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return load_image(path)
    except UnidentifiedImageError:
        return f"not an image Pillow can read (suffix {path.suffix or 'none'!r})"
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:  # truncated, corrupt headers, bad modes
        return f"cannot decode: {type(exc).__name__}: {exc}".replace("\n", " ")


def check_image(path: Path) -> str | None:
    """What is wrong with the file, or None when it decodes to an image training can use."""
    result = read_image(path)
    return result if isinstance(result, str) else None


def scan_class_folder(folder: Path, root: Path) -> tuple[list[Path], list[BadImage]]:
    """Every non-hidden file under one class folder, checked; returns the good ones and the bad."""
    good, bad = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or is_hidden(path, root):
            continue
        problem = check_image(path)
        if problem is None:
            good.append(path)
        else:
            bad.append(BadImage(str(path), problem))
    return good, bad


def raise_or_report(bad: list[BadImage], policy: str, root: Path) -> None:
    """``error``: stop with the first file and how many more; ``skip``: the caller leaves them out."""
    if bad and policy == "error":
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad file(s) under {root})" if len(bad) > 1 else ""
        raise ConfigError(
            "data.on_bad_image",
            f"{first.path}: {first.problem}{more}",
            "fix or delete the file, or pass data.on_bad_image=skip to leave bad files out (they are logged)",
        )
