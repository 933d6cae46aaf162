"""Pictures people look at: heat-map overlays and defect outlines (OpenCV)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .calibrate import Calibration

#: longest side of each panel of a picture; large images are shown smaller
PANEL_SIZE = 448
GROUND_TRUTH_COLOUR = (0, 220, 0)
PREDICTED_COLOUR = (255, 40, 40)


def fit_panel(rgb: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scale an image, its map and mask together so the longest side is at most :data:`PANEL_SIZE`."""
    height, width = rgb.shape[:2]
    scale = min(1.0, PANEL_SIZE / max(height, width))
    if scale == 1.0:
        return rgb, anomaly_map, mask
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_mask = None if mask is None else cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), cv2.resize(anomaly_map, size, interpolation=cv2.INTER_LINEAR), small_mask


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


def test_picture(rgb: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, calibration: Calibration, score: float, is_anomalous: bool) -> np.ndarray:
    """image | heat-map overlay | ground-truth outline | predicted outline, side by side."""
    rgb, anomaly_map, mask = fit_panel(rgb, anomaly_map, mask)
    verdict = "anomalous" if is_anomalous else "good"
    panels = [
        _caption(rgb, "image"),
        _caption(heat_overlay(rgb, anomaly_map, calibration), f"score {calibration.normalize_scores(score):.2f} ({verdict})"),
        _caption(draw_outline(rgb, mask, GROUND_TRUTH_COLOUR), "ground truth"),
        _caption(draw_outline(rgb, anomaly_map >= calibration.pixel_threshold, PREDICTED_COLOUR), "predicted"),
    ]
    return np.hstack(panels)


def predict_picture(rgb: np.ndarray, anomaly_map: np.ndarray, calibration: Calibration, score: float, is_anomalous: bool) -> np.ndarray:
    """image | heat-map overlay with the predicted outline, at the image's own resolution."""
    overlay = draw_outline(heat_overlay(rgb, anomaly_map, calibration), anomaly_map >= calibration.pixel_threshold, PREDICTED_COLOUR)
    verdict = "anomalous" if is_anomalous else "good"
    return np.hstack([_caption(rgb, "image"), _caption(overlay, f"score {calibration.normalize_scores(score):.2f} ({verdict})")])


def save_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"'{path}': could not write picture")
