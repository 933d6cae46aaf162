"""What every face holds: "a model" that scores images, whichever engine runs it.

``PatchCore`` (PyTorch, a ``.safetensors`` file) and ``runtime.ExportedModel`` (ONNX Runtime or
OpenVINO, no PyTorch) both satisfy :class:`ScoringModel`: the same settings and metadata keys,
the same predictions, records and errors for the same images. :func:`load_model` picks between
them by the file, so the command line, the server and Ray's actors load models one way. Example::

    from patchcore.scoring import load_model
    model = load_model("bottle.onnx")             # or bottle.safetensors, bottle.xml
    for p in model.predict(["part_001.png"]):
        print(p.score, p.is_anomalous, p.to_record()["regions"])

Importing this module imports no PyTorch: loading a ``.safetensors`` model does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

from .errors import BadInputError, ModelFileError, is_missing_pytorch
from .formats import is_exported
from .intake import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from .calibrate import Calibration
    from .data import LoadedImage
    from .layout import InputLayout
    from .prediction import Prediction


@runtime_checkable
class ScoringModel(Protocol):
    """A fitted model ready to score images (``PatchCore`` or ``ExportedModel``)."""

    layout_: InputLayout  # how images become the backbone's input, and maps come back
    calibration_: Calibration  # the thresholds, and the good scores they were cut on
    batch_size: int
    max_image_pixels: int | None

    def settings(self) -> dict[str, Any]:
        """Everything the model was made with, as JSON-ready values."""
        ...

    def metadata(self) -> dict[str, Any]:
        """What a server tells clients: engine, device, index, backbone, layers, input,
        memory_bank_shape, num_fit_images, num_neighbors, format_version, newest_format_version."""
        ...

    def predict(self, images: Sequence[str | Path], keep_images: bool = False, threshold: float | None = None) -> list[Prediction]:
        """Score image files; unreadable ones come back with ``error`` set."""
        ...

    def iter_predictions(self, images: Sequence[str | Path], keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        """:meth:`predict`, one result at a time."""
        ...

    def predict_loaded(self, loaded: Sequence[LoadedImage], threshold: float | None = None) -> Iterator[Prediction]:
        """Score images already decoded and prepared (``data.prepare_image``), in order."""
        ...


def load_model(
    path: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 8,
    index: str | None = None,
    false_alarm_rate: float | None = None,
    progress: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ScoringModel:
    """A model ready to score: an exported file (``.onnx``, OpenVINO's ``.xml``) as
    ``runtime.ExportedModel``, any other as a ``.safetensors`` ``PatchCore``; its image threshold
    moved to ``false_alarm_rate`` when given. ``device`` and ``index`` apply to PyTorch models.

    A ``.safetensors`` model where PyTorch is not installed raises :class:`ModelFileError` saying
    which install has it.
    """
    if is_exported(path):
        from .runtime import ExportedModel

        model: ScoringModel = ExportedModel(path, batch_size=batch_size, max_image_pixels=max_image_pixels)
    else:
        try:
            from .model import PatchCore
        except ModuleNotFoundError as error:
            if not is_missing_pytorch(error):
                raise
            raise ModelFileError(
                f"'{path}': a .safetensors model needs PyTorch ({error}): pip install 'patchcore[full]', "
                "or use a model exported with patchcore export (.onnx, .xml)"
            ) from None
        model = PatchCore.load(path, device=device, batch_size=batch_size, index=index, progress=progress, max_image_pixels=max_image_pixels)
    if false_alarm_rate is not None:
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false-alarm rate must be between 0 and 1 (e.g. 0.05 for 5%), got {false_alarm_rate}")
        try:
            model.calibration_ = model.calibration_.at_rate(false_alarm_rate)
        except ValueError as error:
            raise BadInputError(f"'{path}': {error}") from None
    return model
