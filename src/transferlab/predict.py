"""Classify images with a run's model: one CSV row per image.

python -m transferlab.predict RUN_ID photos/                          # a run id (or runs:/RUN_ID)
python -m transferlab.predict models:/elpv-defects@champion a.png b.jpg --out predictions.csv
python -m transferlab.predict models:/elpv-defects/3 images.csv --top-k 1   # a CSV with a `path` column

PATH: image files, folders (searched recursively, hidden files and folders skipped) or CSV files with
a ``path`` column (relative paths are taken from the CSV's folder). The output (stdout, or ``--out``):
``path``, ``label``, ``probability`` (of that label), then ``prob_<class>`` for every class in the
model's order, or with ``--top-k K`` the K most likely as ``label_1, probability_1, ...``; and ``error``,
empty unless the file could not be read. The run's own preprocessing (its weights' eval transform),
class order and tested weights (the EMA's when it kept one) are used, in eval mode, so the run's test
images give its logged test predictions.

The model folder is fetched from MLflow and refused, one line, if it holds anything transferlab does
not write (a pickle, a code file other than its own): nothing from it is run or unpickled; the
network is rebuilt from its config through the typed schema and its safetensors weights.

Exit status: 0, every file predicted; 1, some files could not be read (their rows name the problem);
2, bad input (a SOURCE without a model, a missing PATH), before any image is read.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transferlab.schemas import ConfigError, default_tracking_uri
from transferlab.validate import is_hidden, read_image

CSV_COLUMN = "path"


def expand(paths: list[str]) -> list[Path]:
    """The image files PATH names, in the order given (a folder's files sorted); checked before any
    model is fetched: a PATH that does not exist, or a CSV without a ``path`` column, is bad input."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not is_hidden(p, path))
        elif path.suffix.lower() == ".csv" and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if CSV_COLUMN not in (reader.fieldnames or []):
                    raise ConfigError(
                        "PATH",
                        f"{path} has no {CSV_COLUMN!r} column (columns: {reader.fieldnames})",
                        f"name the column of image paths {CSV_COLUMN!r}",
                    )
                files += [path.parent / row[CSV_COLUMN] for row in reader if row[CSV_COLUMN]]
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise ConfigError(
                "PATH", f"{path} does not exist", "pass image files, folders or a CSV with a path column"
            )
    if not files:
        raise ConfigError(
            "PATH", f"no files under {', '.join(paths)}", "pass image files or a folder holding some"
        )
    return files


def header(classes: list[str], top_k: int | None) -> list[str]:
    columns = [CSV_COLUMN, "label", "probability"]
    if top_k:
        columns += [c for k in range(1, top_k + 1) for c in (f"label_{k}", f"probability_{k}")]
    else:
        columns += [f"prob_{name}" for name in classes]
    return [*columns, "error"]


def row(
    name: str, label: int | None, probs, error: str | None, classes: list[str], top_k: int | None
) -> list:  # noqa: ANN001
    if label is None:
        return [name, "", "", *[""] * (2 * top_k if top_k else len(classes)), error]
    cells = [name, classes[label], f"{probs[label]:.6f}"]
    if top_k:
        order = probs.argsort()[::-1][:top_k]
        cells += [c for k in order for c in (classes[k], f"{probs[k]:.6f}")]
    else:
        cells += [f"{p:.6f}" for p in probs]
    return [*cells, ""]


def _progress(files: list[Path], show: bool) -> Iterator[Path]:
    if not show:
        yield from files
        return
    from tqdm import tqdm

    yield from tqdm(files, desc="predict", unit="image", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transferlab.predict", description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", metavar="SOURCE", help="RUN_ID, runs:/RUN_ID, models:/NAME@ALIAS or models:/NAME/VERSION"
    )
    parser.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files, folders, or CSVs with a path column"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the CSV here (default: stdout)")
    parser.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="the K most likely classes per image"
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or <repo>/mlflow.db"
    )
    args = parser.parse_args(argv)

    try:
        if args.batch_size < 1:
            raise ConfigError(
                "--batch-size", f"must be >= 1, got {args.batch_size}", "use e.g. --batch-size 32"
            )
        if args.out is not None and not args.out.parent.is_dir():
            raise ConfigError("--out", f"{args.out.parent} is not a folder", "create it, or write elsewhere")
        files = expand(args.paths)
        uri = args.tracking_uri or default_tracking_uri()
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ConfigError(
                "--tracking-uri",
                f"no MLflow store at {uri}",
                "pass --tracking-uri of the store holding the run",
            )
        import torch  # after the cheap checks: --help and bad input answer before torch loads
        from mlflow import MlflowClient

        from transferlab import model_store
        from transferlab.classifier import Classifier

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "--device", f"{args.device} asked, but torch sees no CUDA device", "use --device cpu"
            )
        client = MlflowClient(uri)
        source = model_store.resolve(client, args.source)
        with tempfile.TemporaryDirectory(prefix="transferlab-model-") as tmp:
            folder = model_store.fetch(client, source, Path(tmp))
            classifier = Classifier.from_folder(folder, args.device)
        classes = classifier.classes
        if args.top_k is not None and not 1 <= args.top_k <= len(classes):
            raise ConfigError(
                "--top-k", f"must be in 1..{len(classes)}, got {args.top_k}", f"use --top-k 1..{len(classes)}"
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out = (
        args.out.open("w", newline="")
        if args.out
        else io.TextIOWrapper(sys.stdout.buffer, newline="", write_through=True)
    )
    failed = 0
    try:
        writer = csv.writer(out)
        writer.writerow(header(classes, args.top_k))
        items = ((str(p), read_image(p)) for p in _progress(files, sys.stderr.isatty()))
        for name, label, probs, error in classifier.rows(items, args.batch_size):
            failed += error is not None
            writer.writerow(row(name, label, probs, error, classes, args.top_k))
    finally:
        if args.out:
            out.close()
        else:
            out.detach()
    if failed:
        print(f"{failed} of {len(files)} file(s) could not be read: see the error column", file=sys.stderr)
    elif args.out:
        print(f"{len(files)} prediction(s) written to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
