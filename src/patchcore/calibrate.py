"""Decision thresholds from good images alone, at a false-alarm rate the user states.

Factories rarely have defect samples when a model is set up, and a threshold tuned on test
labels (what anomalib's F1 figures use by default) is a figure no user can reach. ``fit``
instead scores every training image against the memory bank with that image's own entries
left out (leave-one-image-out, ``model.py``): each is then an image the bank has not seen,
like a new good part. From those n scores the cut is an order statistic:

    cut = X_(j), the j-th smallest good score, with j = (n + 1)(1 - rate),

interpolated linearly between neighbouring order statistics when j is not whole. For n
exchangeable scores and a new good image, P(new score > X_(j)) = (n + 1 - j) / (n + 1) for any
continuous distribution (the Weibull plotting position; the argument of split-conformal
prediction), so the expected false-alarm rate is the asked-for ``rate`` with no distribution
assumed. The realised rate of one calibration is random: it follows Beta(n + 1 - j, j), whose
central 90% interval is recorded beside the cut. With fewer than 1/rate - 1 images no order
statistic reaches the rate: the cut is then the highest good score and the expected rate is
1 / (n + 1), which the calibration records and ``warning`` states.

Pixels get the same rule on each good image's highest map value, so that an outline is drawn on
about ``rate`` of good images. Normalised scores put a typical good image at 0 and the cut at 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: expected share of good images flagged, unless the user asks for another. On a line an escaped
#: defect costs more than a second look at a good part, so the default leans to flagging.
DEFAULT_FALSE_ALARM_RATE = 0.05
#: coverage of the interval recorded for the realised false-alarm rate
INTERVAL_CONFIDENCE = 0.9
#: how the cut is set (recorded in the model; format-1 files read as "highest held-out score")
METHOD = "leave-one-image-out order statistic"


@dataclass(frozen=True)
class Cut:
    """A cut placed on good scores, and what it promises."""

    value: float
    position: float  # j, 1-based: the cut is the j-th smallest good score (interpolated)
    expected_false_alarm_rate: float  # (n + 1 - j) / (n + 1)
    interval: tuple[float, float]  # central INTERVAL_CONFIDENCE interval of the realised rate


def order_statistic_cut(good_scores: np.ndarray, rate: float) -> Cut:
    """The cut with expected false-alarm ``rate`` over new good images, from ``n`` good scores.

    The cut is the (n + 1)(1 - rate)-th smallest score, interpolated; with too few scores for
    ``rate``, the largest (expected rate 1 / (n + 1)).
    """
    scores = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    count = scores.size
    if count < 1:
        raise ValueError("a cut needs at least one good score")
    if not np.isfinite(scores).all():
        raise ValueError("good scores must be finite")
    _check_rate(rate)
    position = min(max((count + 1) * (1.0 - rate), 1.0), float(count))
    below = int(math.floor(position))
    above = min(below + 1, count)
    value = scores[below - 1] + (position - below) * (scores[above - 1] - scores[below - 1])
    # Realised rate ~ Beta(n + 1 - j, j); for an interpolated j the same law with real parameters.
    # Beta quantiles: scipy.special's betaincinv is what scipy.stats.beta.ppf computes, without the
    # 0.6 s of importing scipy.stats (imported here: `patchcore --help` imports this module).
    from scipy.special import betaincinv

    tail = (1.0 - INTERVAL_CONFIDENCE) / 2
    shape_above, shape_below = count + 1 - position, position
    interval = (float(betaincinv(shape_above, shape_below, tail)), float(betaincinv(shape_above, shape_below, 1 - tail)))
    return Cut(float(value), position, (count + 1 - position) / (count + 1), interval)


def minimum_images(rate: float) -> int:
    """The fewest good images whose order statistics reach an expected false-alarm ``rate``."""
    _check_rate(rate)
    return max(1, math.ceil(1.0 / rate - 1.0 - 1e-9))


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-alarm rate must be between 0 and 1 (e.g. 0.05 for 5%), got {rate}")


@dataclass(frozen=True)
class Calibration:
    """Where good images score, the cuts placed above them (raw distance units), and how.

    ``good_scores`` and ``good_map_peaks`` are the leave-one-out image scores and highest map
    values of the training images, in training order: they let :meth:`at_rate` move the cut to
    another false-alarm rate without refitting.
    """

    image_threshold: float
    image_good_mean: float
    pixel_threshold: float
    pixel_good_mean: float
    num_images: int
    false_alarm_rate: float | None = None  # asked for; None for a format-1 model
    expected_false_alarm_rate: float | None = None  # what the cut gives (above the asked rate with too few images)
    false_alarm_interval: tuple[float, float] | None = None
    method: str = METHOD
    good_scores: tuple[float, ...] = field(default=(), repr=False)
    good_map_peaks: tuple[float, ...] = field(default=(), repr=False)

    def normalize_scores(self, scores: np.ndarray) -> np.ndarray:
        """0 = a typical good image, 1 = the image threshold."""
        return (np.asarray(scores, dtype=np.float64) - self.image_good_mean) / _span(self.image_threshold, self.image_good_mean)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        """0 = a typical good pixel, 1 = the pixel threshold (where outlines are drawn)."""
        return (np.asarray(maps, dtype=np.float32) - self.pixel_good_mean) / _span(self.pixel_threshold, self.pixel_good_mean)

    def at_rate(self, rate: float) -> "Calibration":
        """The same good scores cut at another false-alarm rate (no refit)."""
        if not self.good_scores:
            raise ValueError(
                "this model stores no good-image scores (model format 1, thresholds from held-out images): "
                "refit it with `patchcore fit` to choose a false-alarm rate"
            )
        return calibrate(np.array(self.good_scores), np.array(self.good_map_peaks), self.pixel_good_mean, rate)

    @property
    def warning(self) -> str | None:
        """Why the cut cannot keep the asked-for rate, or None when it can."""
        if self.false_alarm_rate is None or self.expected_false_alarm_rate is None:
            return None
        if self.expected_false_alarm_rate <= self.false_alarm_rate * (1 + 1e-9):
            return None
        return (
            f"only {self.num_images} good images: the cut is the highest of their scores, and about 1 in "
            f"{self.num_images + 1} ({self.expected_false_alarm_rate:.1%}) new good images is expected above it, "
            f"more than the {self.false_alarm_rate:.1%} asked for; {minimum_images(self.false_alarm_rate)} good images reach that rate"
        )

    def describe(self) -> str:
        """One line a user can state: the rule, and what it promises."""
        if self.false_alarm_rate is None:
            return f"image threshold {self.image_threshold:.4g}: the highest score of {self.num_images} held-out good images (model format 1)"
        low, high = self.false_alarm_interval or (math.nan, math.nan)
        return (
            f"image threshold {self.image_threshold:.4g} for a {self.false_alarm_rate:.1%} false-alarm rate, set on "
            f"{self.num_images} good images scored leave-one-out: {self.expected_false_alarm_rate:.1%} of new good images "
            f"expected above it ({INTERVAL_CONFIDENCE:.0%} interval {low:.1%} to {high:.1%})"
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["good_scores"], values["good_map_peaks"] = list(self.good_scores), list(self.good_map_peaks)
        if self.false_alarm_interval is not None:
            values["false_alarm_interval"] = list(self.false_alarm_interval)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Calibration":
        """Read a stored calibration; format-1 files hold only the five numbers of the old rule."""
        values = dict(values)
        if "false_alarm_rate" not in values:
            values["method"] = "highest held-out score (model format 1)"
        for key in ("good_scores", "good_map_peaks"):
            values[key] = tuple(float(v) for v in values.get(key, ()))
        if values.get("false_alarm_interval") is not None:
            values["false_alarm_interval"] = tuple(values["false_alarm_interval"])
        return cls(**values)


def _span(threshold: float, mean: float) -> float:
    # All good scores equal (ties): the cut sits on the mean; keep the scale finite.
    return max(threshold - mean, 1e-6 * abs(threshold), 1e-12)


def calibrate(good_scores: np.ndarray, good_map_peaks: np.ndarray, good_map_mean: float, rate: float = DEFAULT_FALSE_ALARM_RATE) -> Calibration:
    """Thresholds at false-alarm ``rate`` from good images' scores (n,) and highest map values (n,).

    The scores must come from images the bank has not seen (``fit`` scores each training image
    with its own bank entries left out). ``good_map_mean`` is the mean map value of those images.
    """
    good_scores = np.asarray(good_scores, dtype=np.float64).ravel()
    good_map_peaks = np.asarray(good_map_peaks, dtype=np.float64).ravel()
    if good_scores.size < 2:
        raise ValueError("calibration needs at least 2 good images")
    if good_map_peaks.size != good_scores.size:
        raise ValueError(f"{good_scores.size} good scores but {good_map_peaks.size} map peaks")
    image_cut = order_statistic_cut(good_scores, rate)
    pixel_cut = order_statistic_cut(good_map_peaks, rate)
    return Calibration(
        image_threshold=image_cut.value,
        image_good_mean=float(good_scores.mean()),
        pixel_threshold=pixel_cut.value,
        pixel_good_mean=float(good_map_mean),
        num_images=int(good_scores.size),
        false_alarm_rate=float(rate),
        expected_false_alarm_rate=image_cut.expected_false_alarm_rate,
        false_alarm_interval=image_cut.interval,
        method=METHOD,
        good_scores=tuple(float(s) for s in good_scores),
        good_map_peaks=tuple(float(p) for p in good_map_peaks),
    )
