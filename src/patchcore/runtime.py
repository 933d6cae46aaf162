"""Scoring an exported model (``patchcore export``) with ONNX Runtime or OpenVINO, and no PyTorch.

The pre-processing (decode, Pillow's bilinear resize, ImageNet normalisation), the regions, the
pictures and the JSON records are the library's own modules, which import no torch; the graph
does the rest. Example::

    from patchcore.runtime import ExportedModel
    model = ExportedModel("bottle.onnx")            # or "bottle.xml" (OpenVINO IR + its .json)
    for p in model.predict(["part_001.png"]):
        print(p.score, p.is_anomalous, p.to_record()["regions"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .calibrate import Calibration
from .data import LoadedImage, load_batches, same_size_runs
from .errors import ModelFileError
from .formats import EXPORT_FORMAT_VERSION, METADATA_KEY, check_format_version, model_metadata
from .intake import DEFAULT_MAX_IMAGE_PIXELS
from .layout import InputLayout
from .prediction import Prediction, predictions

#: how an exported OpenVINO model is compiled to compute in float32, as the library does
OPENVINO_COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
#: ONNX models up to this size (graph and external data) get ONNX Runtime's constant folding
FOLD_CONSTANTS_UP_TO_BYTES = 256 * 2**20


class ExportedModelError(ModelFileError):
    """An exported model that cannot be used; the message names the file and says why."""


class ExportedModel:
    """An exported model, ready to score: ``.onnx`` through ONNX Runtime, ``.xml`` through OpenVINO.

    It scores as ``PatchCore`` does (both are a ``scoring.ScoringModel``): the same records,
    regions and errors for the same images."""

    def __init__(self, path: str | Path, batch_size: int = 8, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels  # images with more are refused from their headers
        if not self.path.is_file():
            raise ExportedModelError(f"'{self.path}': no such model file")
        if self.path.suffix == ".onnx":
            self._settings, self._run = _open_onnx(self.path)
            self.engine = "onnxruntime"
        elif self.path.suffix == ".xml":
            self._settings, self._run = _open_openvino(self.path)
            self.engine = "openvino"
        else:
            raise ExportedModelError(f"'{self.path}': not an exported model (expected a .onnx file, or an OpenVINO .xml)")
        try:
            self.format_version = check_format_version(
                self.path, self._settings, "export_format_version", EXPORT_FORMAT_VERSION, "export", self._settings.get("exported_by", "a newer patchcore")
            )
        except ModelFileError as error:
            raise ExportedModelError(str(error)) from None
        try:
            self.layout_ = InputLayout.from_dict(self._settings["input"])
            self.calibration_ = Calibration.from_dict(self._settings["calibration"])
        except (KeyError, TypeError, ValueError) as error:
            raise ExportedModelError(f"'{self.path}': damaged export (settings inconsistent: {error})") from None

    def settings(self) -> dict[str, Any]:
        """The settings the model was exported with (the PyTorch model's, and the export's own)."""
        return dict(self._settings)

    def metadata(self) -> dict[str, Any]:
        """What a server tells clients about the model (the same keys as ``PatchCore.metadata``)."""
        return model_metadata(self._settings, self.layout_, self.engine, "cpu", "exact, in the exported graph", self.format_version, EXPORT_FORMAT_VERSION)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and maps (B, h, w) of normalised float32 images (B, 3, h, w)."""
        scores, maps = self._run(np.ascontiguousarray(images, dtype=np.float32))
        return np.asarray(scores), np.asarray(maps)

    def predict(self, images: Sequence[str | Path], keep_images: bool = False, threshold: float | None = None) -> list[Prediction]:
        """Score image files; unreadable ones come back with ``error`` set instead of a score."""
        return list(self.iter_predictions(images, keep_images, threshold))

    def iter_predictions(self, images: Sequence[str | Path], keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        """Score image files in order, one result each; unreadable ones come back with ``error``."""
        for loaded in load_batches([Path(p) for p in images], self.layout_, self.batch_size, keep_rgb=keep_images, max_pixels=self.max_image_pixels):
            yield from self.predict_loaded(loaded, threshold)

    def predict_loaded(self, loaded: Sequence[LoadedImage], threshold: float | None = None) -> Iterator[Prediction]:
        """Score images already decoded and prepared (``data.prepare_image``), in order, one result each.
        Images of different input sizes (aspect and tile modes) go through the graph separately."""
        for run in same_size_runs(loaded):
            readable = [item.array for item in run if item.error is None]
            scores, maps = self.score(np.stack(readable)) if readable else (None, None)
            yield from predictions(run, scores, maps, self.layout_, self.calibration_, threshold)


def _open_onnx(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise ExportedModelError(f"'{path}': scoring an ONNX model needs onnxruntime: pip install 'patchcore[runtime]'") from None

    # ONNX Runtime's constant folding copies the whole bank for each block's slice of it at session
    # start: 343 s for a 2.25 GB bank. Past this size the slices are taken per batch instead
    # (load in 2 s; a batch costs one copy of the bank, small beside the search itself).
    external = path.with_name(path.name + ".data")
    size = path.stat().st_size + (external.stat().st_size if external.is_file() else 0)
    options = {"disabled_optimizers": ["ConstantFolding"]} if size > FOLD_CONSTANTS_UP_TO_BYTES else {}
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], **options)
    except Exception as error:  # onnxruntime reports bad files as several types
        raise ExportedModelError(f"'{path}': not an ONNX model, or damaged or truncated ({str(error).splitlines()[0][:200]})") from None
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ExportedModelError(f"'{path}': an ONNX model without patchcore settings (not written by patchcore export)")
    return _parse_settings(path, text), lambda images: session.run(None, {"images": images})


def _open_openvino(path: Path):
    try:
        import openvino
    except ImportError:
        raise ExportedModelError(f"'{path}': scoring an OpenVINO model needs openvino: pip install 'patchcore[openvino]'") from None

    beside = path.with_suffix(".json")
    if not beside.is_file():
        raise ExportedModelError(f"'{path}': no settings file '{beside.name}' beside it (patchcore export writes .xml, .bin and .json together)")
    settings = _parse_settings(beside, beside.read_text())
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", settings.get("openvino_compile_config", OPENVINO_COMPILE_CONFIG))
    except Exception as error:
        raise ExportedModelError(f"'{path}': not an OpenVINO model, or damaged or truncated ({str(error).splitlines()[0][:200]})") from None

    def run(images: np.ndarray):
        outputs = compiled(images)
        return outputs[0], outputs[1]

    return settings, run


def _parse_settings(path: Path, text: str) -> dict[str, Any]:
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ExportedModelError(f"'{path}': damaged export (settings are not valid JSON: {error})") from None
    if not isinstance(settings, dict):
        raise ExportedModelError(f"'{path}': damaged export (settings are not a JSON object)")
    return settings
