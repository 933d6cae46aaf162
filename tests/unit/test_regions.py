"""Tests for patchcore.regions: defect regions of an anomaly map, and the prediction record."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.calibrate import Calibration, calibrate
from patchcore.regions import find_regions, prediction_record


@pytest.fixture
def calibration() -> Calibration:
    # pixel threshold: the highest of 19 good map peaks at a 5% rate -> 1.0; good map mean 0.0
    return calibrate(np.linspace(0.0, 1.0, 19), np.linspace(0.0, 1.0, 19), 0.0, 0.05)


def test_two_blobs_are_two_regions_with_exact_boxes_areas_and_peaks(calibration):
    assert calibration.pixel_threshold == 1.0 and calibration.pixel_good_mean == 0.0
    anomaly_map = np.zeros((40, 60), np.float32)
    anomaly_map[5:10, 10:20] = 1.5  # 5 x 10 block
    anomaly_map[7, 12] = 3.0  # its peak
    anomaly_map[30:34, 50:53] = 2.0  # 4 x 3 block
    first, second = find_regions(anomaly_map, calibration)
    assert first.box == (10, 5, 10, 5) and first.area == 50 and first.peak_normalized_score == 3.0
    assert second.box == (50, 30, 3, 4) and second.area == 12 and second.peak_normalized_score == 2.0
    # a rectangle's outline is its four corners, in image (x, y) coordinates
    assert sorted(first.polygon) == [(10, 5), (10, 9), (19, 5), (19, 9)]
    assert first.to_dict() == {"polygon": [list(p) for p in first.polygon], "box": [10, 5, 10, 5], "area": 50, "peak_normalized_score": 3.0}


def test_the_threshold_itself_counts_and_pixels_touching_at_a_corner_are_one_region(calibration):
    anomaly_map = np.zeros((20, 20), np.float32)
    anomaly_map[4, 4] = anomaly_map[5, 5] = 1.0  # exactly at the threshold, diagonal neighbours
    anomaly_map[15, 15] = np.nextafter(np.float32(1.0), np.float32(0.0))  # just below: no region
    [region] = find_regions(anomaly_map, calibration)
    assert region.box == (4, 4, 2, 2) and region.area == 2


def test_no_region_on_a_clean_map_and_regions_sorted_by_peak(calibration):
    assert find_regions(np.full((16, 16), 0.99, np.float32), calibration) == []
    anomaly_map = np.zeros((30, 30), np.float32)
    anomaly_map[2:4, 2:4] = 1.2
    anomaly_map[20:25, 20:25] = 4.0
    anomaly_map[10:12, 25:27] = 2.5
    assert [r.peak_normalized_score for r in find_regions(anomaly_map, calibration)] == pytest.approx([4.0, 2.5, 1.2])


def test_a_blob_with_a_hole_is_one_region_whose_area_leaves_the_hole_out(calibration):
    anomaly_map = np.zeros((30, 30), np.float32)
    anomaly_map[5:15, 5:15] = 2.0
    anomaly_map[8:12, 8:12] = 0.0
    [region] = find_regions(anomaly_map, calibration)
    assert region.area == 100 - 16 and region.box == (5, 5, 10, 10)
    assert sorted(region.polygon) == [(5, 5), (5, 14), (14, 5), (14, 14)]


def test_a_smooth_outline_is_simplified_to_within_a_pixel(calibration):
    yy, xx = np.mgrid[0:200, 0:200]
    anomaly_map = (2.0 - np.hypot(yy - 100, xx - 100) / 50).astype(np.float32)  # >= 1 inside radius 50
    [region] = find_regions(anomaly_map, calibration)
    assert 8 <= len(region.polygon) <= 60  # not one point per boundary pixel (about 280)
    radii = [np.hypot(x - 100, y - 100) for x, y in region.polygon]
    assert max(abs(r - 50) for r in radii) <= 1.5
    assert region.area == int((anomaly_map >= 1.0).sum())


def test_prediction_record(calibration):
    anomaly_map = np.zeros((12, 20), np.float32)
    anomaly_map[2:4, 3:6] = 2.0
    record = prediction_record("a.png", 0.5, False, 1.0, anomaly_map, calibration)
    assert record == {
        "path": "a.png",
        "score": 0.5,
        "normalized_score": pytest.approx((0.5 - calibration.image_good_mean) / (calibration.image_threshold - calibration.image_good_mean)),
        "is_anomalous": False,
        "threshold": 1.0,
        "image_size": [20, 12],
        "regions": [{"polygon": [[3, 2], [3, 3], [5, 3], [5, 2]], "box": [3, 2, 3, 2], "area": 6, "peak_normalized_score": 2.0}],
    }


@pytest.mark.parametrize(("rows", "cols", "expected"), [
    ((3, 4), (7, 8), [(7, 3), (7, 3), (7, 3), (7, 3)]),  # one pixel
    ((3, 4), (7, 12), [(7, 3), (7, 3), (11, 3), (11, 3)]),  # one row
    ((3, 6), (7, 9), [(7, 3), (7, 5), (8, 3), (8, 5)]),  # 3 x 2: simplifying would leave a line
])
def test_small_regions_still_have_a_polygon_of_at_least_three_points(calibration, rows, cols, expected):
    anomaly_map = np.zeros((12, 20), np.float32)
    anomaly_map[rows[0] : rows[1], cols[0] : cols[1]] = 2.0
    [region] = find_regions(anomaly_map, calibration)
    assert sorted(region.polygon) == expected
