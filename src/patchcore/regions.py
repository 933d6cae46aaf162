"""Defect regions: the parts of an anomaly map above the pixel threshold, as outlines a line
controller can act on (polygon, bounding box, area, peak), and the JSON record of a prediction.

Shared by ``predict`` (its JSON lines), the server and its page, so that every face reports
the same regions for the same image. Needs no PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .calibrate import Calibration

#: outlines are simplified to within this many pixels of the exact boundary (Douglas-Peucker),
#: which keeps a smooth blob's polygon to tens of points instead of hundreds
OUTLINE_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Region:
    """One connected area of the anomaly map at or above the pixel threshold (8-connected)."""

    polygon: list[tuple[int, int]]  # outer boundary through the centres of its edge pixels, (x, y) of the image
    box: tuple[int, int, int, int]  # x, y, width, height of the smallest box holding the region
    area: int  # pixels at or above the threshold
    peak_normalized_score: float  # the map's highest value in the region: 0 = typical good, 1 = the pixel threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "polygon": [list(point) for point in self.polygon],
            "box": list(self.box),
            "area": self.area,
            "peak_normalized_score": round(self.peak_normalized_score, 6),
        }


def find_regions(anomaly_map: np.ndarray, calibration: Calibration) -> list[Region]:
    """The regions of an (H, W) anomaly map at the image's resolution, highest peak first."""
    above = anomaly_map >= calibration.pixel_threshold
    rows, columns = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if len(rows) == 0:
        return []
    # Labelled within the box around every pixel above (each region lies inside it, so the labels
    # are the whole map's): a defect is a small part of a large image.
    top, left = int(rows[0]), int(columns[0])
    box = (slice(top, int(rows[-1]) + 1), slice(left, int(columns[-1]) + 1))
    # Views, not copies, where they can be: a map can be tens of megapixels (bool is one byte, as uint8).
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above[box].view(np.uint8), connectivity=8)
    del above
    regions = []
    for label in range(1, count):  # 0 is the background
        x, y, width, height, area = (int(v) for v in stats[label])
        inside = labels[y : y + height, x : x + width] == label
        x, y = x + left, y + top
        peak = float(np.max(anomaly_map[y : y + height, x : x + width], where=inside, initial=-np.inf))
        regions.append(Region(_outline(inside, x, y), (x, y, width, height), area, float(calibration.normalize_maps(np.float32(peak)))))
    return sorted(regions, key=lambda region: -region.peak_normalized_score)


def _outline(inside: np.ndarray, left: int, top: int) -> list[tuple[int, int]]:
    """The outer boundary of one 8-connected region, simplified, in image coordinates."""
    contours, _ = cv2.findContours(inside.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(left, top))
    boundary = max(contours, key=len)  # an 8-connected region has one outer boundary
    simplified = cv2.approxPolyDP(boundary, OUTLINE_TOLERANCE_PX, closed=True)
    if len(simplified) < 4:  # a small region would collapse to a line: keep its exact boundary
        simplified = boundary
    if len(simplified) < 3:  # a region one pixel wide or high: its box, as the corner pixels
        height, width = inside.shape
        right, bottom = left + width - 1, top + height - 1
        return [(left, top), (left, bottom), (right, bottom), (right, top)]
    return [(int(x), int(y)) for x, y in simplified[:, 0]]


def prediction_record(
    source: str,
    score: float,
    is_anomalous: bool,
    threshold: float,
    anomaly_map: np.ndarray,
    calibration: Calibration,
) -> dict[str, Any]:
    """What ``predict`` writes per image and the server answers: the scores, the decision with the
    threshold it used, and the defect regions in the image's pixel coordinates."""
    return {
        "path": source,
        "score": score,
        "normalized_score": float(calibration.normalize_scores(score)),
        "is_anomalous": bool(is_anomalous),
        "threshold": threshold,
        "image_size": [int(anomaly_map.shape[1]), int(anomaly_map.shape[0])],
        "regions": [region.to_dict() for region in find_regions(anomaly_map, calibration)],
    }
