"""Decision thresholds and score normalisation from good images alone.

Factories rarely have defect samples when a model is set up, and tuning a threshold on the
test labels (what anomalib's F1 figures do by default) reports a figure no user can reach.
Instead, ``fit`` holds out some good images, scores them against the bank built from the rest
(exactly the situation of a new image), and sets the threshold to the highest score a held-out
good image reached: a rule with no distribution assumed and no knob to tune, under which about
1 in (n + 1) new good images is expected to be flagged (n held-out images). The same is done for
pixels with each held-out map's maximum, giving the cut for outlining defect regions. Normalised scores put a typical good
image at 0 and the threshold at 1, so "above 1" means "anomalous" for every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

@dataclass(frozen=True)
class Calibration:
    """Where good images score, and the cuts placed above them (raw distance units)."""

    image_threshold: float
    image_good_mean: float
    pixel_threshold: float
    pixel_good_mean: float
    num_images: int

    def normalize_scores(self, scores: np.ndarray) -> np.ndarray:
        """0 = a typical good image, 1 = the image threshold."""
        return (np.asarray(scores, dtype=np.float64) - self.image_good_mean) / self._span(self.image_threshold, self.image_good_mean)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        """0 = a typical good pixel, 1 = the pixel threshold (where outlines are drawn)."""
        return (np.asarray(maps, dtype=np.float32) - self.pixel_good_mean) / self._span(self.pixel_threshold, self.pixel_good_mean)

    @staticmethod
    def _span(threshold: float, mean: float) -> float:
        return max(threshold - mean, 1e-12)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def calibrate(good_scores: np.ndarray, good_maps: np.ndarray) -> Calibration:
    """Thresholds from held-out good images' scores (N,) and anomaly maps (N, H, W)."""
    good_scores = np.asarray(good_scores, dtype=np.float64)
    if good_scores.size < 2:
        raise ValueError("calibration needs at least 2 held-out good images")
    map_peaks = np.asarray(good_maps, dtype=np.float64).reshape(len(good_maps), -1).max(axis=1)
    return Calibration(
        image_threshold=float(good_scores.max()),
        image_good_mean=float(good_scores.mean()),
        pixel_threshold=float(map_peaks.max()),
        pixel_good_mean=float(np.mean(good_maps, dtype=np.float64)),
        num_images=int(good_scores.size),
    )

