"""Pictures people look at: heat-map overlays and defect outlines (OpenCV)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .calibrate import Calibration

#: longest side of each panel of a picture; large images are shown smaller
PANEL_SIZE = 448
GROUND_TRUTH_COLOUR = (0, 220, 0)
PREDICTED_COLOUR = (255, 40, 40)


def panel_size(size_hw: tuple[int, int], longest: int = PANEL_SIZE) -> tuple[int, int]:
    """(H, W) of a picture panel: the image's own size, shrunk so the longest side is at most ``longest``."""
    height, width = size_hw
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink(rgb: np.ndarray, longest: int) -> np.ndarray:
    """An image shrunk (by area) so that its longest side is at most ``longest``; unchanged if it is."""
    return _resize(rgb, panel_size(rgb.shape[:2], longest))


def _resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if array.shape[:2] == tuple(size_hw):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (size_hw[1], size_hw[0]), interpolation=interpolation)


def heat_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The map in JET colours over the image, on a fixed scale: blue = typical good, the pixel threshold
    at mid-scale, red = twice as far above good. One scale for every image, so pictures compare."""
    level = np.clip(calibration.normalize_maps(anomaly_map) / 2.0, 0.0, 1.0)
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(rgb, 0.5, colours, 0.5, 0.0)


def draw_outline(rgb: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The boundary of a boolean region drawn on a copy of the image."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    drawn = np.ascontiguousarray(rgb.copy())
    cv2.drawContours(drawn, contours, -1, colour, thickness=max(1, round(max(rgb.shape[:2]) / 200)))
    return drawn


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    band = np.full((24, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(band, text, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, panel])


MapAt = Callable[[tuple[int, int]], np.ndarray]
"""Gives the anomaly map at a requested (H, W): maps are made at the size they are shown at."""


def test_picture(rgb: np.ndarray, map_at: MapAt, mask: np.ndarray, calibration: Calibration, score: float, is_anomalous: bool) -> np.ndarray:
    """image | heat-map overlay | ground-truth outline | predicted outline, side by side."""
    size = panel_size(rgb.shape[:2])
    rgb, anomaly_map = _resize(rgb, size), map_at(size)
    mask = _resize(mask.astype(np.uint8), size, nearest=True).astype(bool)
    verdict = "anomalous" if is_anomalous else "good"
    panels = [
        _caption(rgb, "image"),
        _caption(heat_overlay(rgb, anomaly_map, calibration), f"score {calibration.normalize_scores(score):.2f} ({verdict})"),
        _caption(draw_outline(rgb, mask, GROUND_TRUTH_COLOUR), "ground truth"),
        _caption(draw_outline(rgb, anomaly_map >= calibration.pixel_threshold, PREDICTED_COLOUR), "predicted"),
    ]
    return np.hstack(panels)


def predict_picture(rgb: np.ndarray, map_at: MapAt, calibration: Calibration, score: float, is_anomalous: bool) -> np.ndarray:
    """The heat map over the image with the predicted outline, at the image's own resolution.

    One panel, not image | overlay: the image is the user's own file, and encoding the picture
    is much of its cost.
    """
    anomaly_map = map_at(rgb.shape[:2])
    overlay = draw_outline(heat_overlay(rgb, anomaly_map, calibration), anomaly_map >= calibration.pixel_threshold, PREDICTED_COLOUR)
    verdict = "anomalous" if is_anomalous else "good"
    return _caption(overlay, f"score {calibration.normalize_scores(score):.2f} ({verdict})")


class PictureWriter:
    """Renders and writes pictures on a background thread while the caller scores the next batch.

    At most ``pending`` pictures wait at a time, so memory stays flat; errors surface on the
    caller's thread, at the latest when the writer is closed.
    """

    def __init__(self, pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._waiting: deque[Future[None]] = deque()
        self._pending = pending

    def submit(self, path: Path, render: Callable[[], np.ndarray]) -> None:
        self._waiting.append(self._pool.submit(lambda: save_picture(path, render())))
        while len(self._waiting) > self._pending:
            self._waiting.popleft().result()

    def close(self) -> None:
        try:
            while self._waiting:
                self._waiting.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "PictureWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: formats of the pictures: JPEG (``jpg`` or ``jpeg``) by default, about a seventh of the PNG's
#: size and a tenth of its encoding time, which was most of a picture's cost; PNG for lossless ones
PICTURE_FORMATS = ("jpg", "jpeg", "png")
#: JPEG quality of the pictures: a heat map over the image for a person to look at, not data
JPEG_QUALITY = 90
#: PNG compression (0 to 9): the fastest, since a picture is written once and looked at
PNG_COMPRESSION = 1


def picture_format(name: str) -> str:
    """A picture format's canonical name, ``jpg`` or ``png`` (``jpeg`` is ``jpg``); ValueError if unknown."""
    canonical = name.lower().replace("jpeg", "jpg")
    if canonical not in ("jpg", "png"):
        raise ValueError(f"unknown picture format {name!r}; choose one of: {', '.join(PICTURE_FORMATS)}")
    return canonical


def save_picture(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB picture, as JPEG when ``path`` ends in .jpg or .jpeg, else as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_picture(rgb, "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"))


def encode_picture(image: np.ndarray, format_name: str = "png") -> bytes:
    """An RGB (H, W, 3) or single-channel (H, W) picture as JPEG or PNG bytes: the one encoder of
    the pictures every face gives (files, Ray's actors, the server's answers)."""
    kind = picture_format(format_name)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if kind == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    pixels = image[..., ::-1] if image.ndim == 3 else image  # OpenCV writes BGR
    ok, encoded = cv2.imencode(f".{kind}", np.ascontiguousarray(pixels), params)
    if not ok:
        raise OSError(f"could not encode picture as {kind.upper()}")
    return encoded.tobytes()
