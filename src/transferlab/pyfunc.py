"""A run's model as an MLflow pyfunc: a DataFrame of encoded images in, labels and probabilities out.

``mlflow.pyfunc.load_model("runs:/<id>/model").predict(df)`` and ``mlflow models serve`` call this
(through :mod:`transferlab.model_code`); both need transferlab importable, e.g. ``--env-manager local``
from this repository's environment. The rebuild is :class:`transferlab.classifier.Classifier`'s, the
same as ``python -m transferlab.predict``'s, so the three give the same predictions.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from transferlab.classifier import Classifier, decode_bytes

IMAGE = "image"  # the input column: encoded image bytes (PNG, JPEG, ...), or the same as base64 text


def prediction_frame(classes: list[str], labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """``label``, its ``probability``, then ``prob_<class>`` per class in the head's order."""
    frame = pd.DataFrame(
        {"label": [classes[i] for i in labels], "probability": probs[np.arange(len(labels)), labels]}
    )
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k].astype(np.float64)
    frame["probability"] = frame["probability"].astype(np.float64)
    return frame


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: the scoring server answers 400 (and goes on serving), not 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value: Any, row: int) -> bytes:
    """One cell of the ``image`` column as encoded bytes: bytes as they are, text as base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: the {IMAGE!r} text is not base64") from None
    raise _bad_input(
        f"row {row}: {IMAGE!r} must be encoded image bytes or base64 text, got {type(value).__name__}"
    )


class TransferlabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = Classifier.from_folder(Path(context.artifacts["weights"]).parent, device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE not in model_input.columns:
            raise _bad_input(f"expected a DataFrame with an {IMAGE!r} column (encoded image bytes or base64)")
        arrays = []
        for row, value in enumerate(model_input[IMAGE]):
            try:
                arrays.append(decode_bytes(image_bytes(value, row)))
            except MlflowException:
                raise
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
                raise _bad_input(f"row {row}: not an image ({type(exc).__name__}: {exc})") from None
        if not arrays:
            return prediction_frame(
                self.classifier.classes, np.zeros(0, int), np.zeros((0, len(self.classifier.classes)))
            )
        labels, probs = self.classifier.predict(arrays)
        return prediction_frame(self.classifier.classes, labels, probs)


__all__ = ["IMAGE", "TransferlabModel", "image_bytes", "prediction_frame"]
