"""One image's result, whichever engine scored it, and the one place results are built.

A model (``PatchCore`` in PyTorch, or ``ExportedModel`` in ONNX Runtime or OpenVINO) gives each
batch's image scores and its anomaly maps on the backbone's input grid; :func:`predictions`
makes the results from them, with the decision at the threshold. The map is brought back to the
image by the input layout's one numpy path (``InputLayout.map_to_image``), so that the regions
and pictures of a PyTorch model and of its export are made the same way. Needs no PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np

from .calibrate import Calibration
from .data import LoadedImage
from .layout import InputLayout
from .regions import Region, find_regions, prediction_record


@dataclass
class Prediction:
    """One image's result. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str
    score: float = math.nan
    normalized_score: float = math.nan  # 0 = a typical good image, 1 = the threshold
    is_anomalous: bool = False
    threshold: float = math.nan  # the image threshold the decision used (raw score units)
    input_map: np.ndarray | None = None  # (h, w) float32 anomaly map on the backbone's input grid
    image_size: tuple[int, int] | None = None  # (H, W) of the image
    image: np.ndarray | None = None  # RGB uint8, only when asked for (pictures)
    error: str | None = None
    layout: InputLayout | None = field(default=None, repr=False, compare=False)
    calibration: Calibration | None = field(default=None, repr=False, compare=False)

    @cached_property
    def anomaly_map(self) -> np.ndarray | None:
        """(H, W) float32 anomaly map at the image's own resolution, made on first use."""
        return None if self.error is not None else self.map_at(self.image_size)

    def map_at(self, size_hw: tuple[int, int]) -> np.ndarray:
        """The anomaly map brought to any (H, W) over the whole image, e.g. a picture's size."""
        return self.layout.map_to_image(self.input_map, size_hw)

    @property
    def regions(self) -> list[Region]:
        """The defect regions: where the map is at or above the pixel threshold, highest peak first."""
        return [] if self.error is not None else find_regions(self.anomaly_map, self.calibration)

    def to_record(self) -> dict[str, Any]:
        """The JSON record ``predict`` writes and the server answers (with ``error`` for an unreadable image)."""
        if self.error is not None:
            return {"path": self.source, "error": self.error}
        return prediction_record(self.source, self.score, self.is_anomalous, self.threshold, self.anomaly_map, self.calibration)


def predictions(
    loaded: Sequence[LoadedImage], scores: Sequence[float], maps: Sequence[np.ndarray], layout: InputLayout, calibration: Calibration,
    threshold: float | None = None,
) -> Iterator[Prediction]:
    """The results of a batch, in order: ``scores`` and input-grid ``maps`` are those of its
    readable images, in order; an unreadable image gets its error. ``threshold`` overrides the
    calibrated image threshold (raw score units)."""
    cut = threshold if threshold is not None else calibration.image_threshold
    position = 0
    for item in loaded:
        if item.error is not None:
            yield Prediction(str(item.path), error=item.error)
            continue
        score = float(scores[position])
        yield Prediction(
            source=str(item.path),
            score=score,
            normalized_score=float(calibration.normalize_scores(score)),
            is_anomalous=score >= cut,
            threshold=cut,
            input_map=np.asarray(maps[position]),
            image_size=item.original_hw,
            image=item.rgb,
            layout=layout,
            calibration=calibration,
        )
        position += 1
