"""The false-alarm rule: order statistics, what they promise, few images, ties, storage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from patchcore.calibrate import Calibration, calibrate, minimum_images, order_statistic_cut


def test_the_cut_is_the_weibull_plotting_position_quantile():
    scores = np.random.default_rng(0).gamma(3.0, 1.0, size=57)
    for rate in (0.01, 0.05, 0.1, 0.25, 0.5):
        cut = order_statistic_cut(scores, rate)
        assert cut.value == pytest.approx(float(np.quantile(scores, 1 - rate, method="weibull")), rel=1e-12)
        assert cut.position == pytest.approx(min(58 * (1 - rate), 57))


def test_a_whole_position_is_that_order_statistic_and_promises_its_exact_rate():
    scores = np.arange(1.0, 20.0)[::-1].copy()  # 19 scores, unsorted on purpose
    cut = order_statistic_cut(scores, 0.05)  # (19 + 1) * 0.95 = 19: the largest
    assert cut.value == 19.0 and cut.position == pytest.approx(19.0)
    assert cut.expected_false_alarm_rate == pytest.approx(1 / 20)
    cut = order_statistic_cut(scores, 0.25)  # 20 * 0.75 = 15: the 15th smallest
    assert cut.value == 15.0
    assert cut.expected_false_alarm_rate == pytest.approx(0.25)


def test_between_two_order_statistics_the_cut_is_interpolated():
    scores = np.array([1.0, 2.0, 4.0, 8.0])
    cut = order_statistic_cut(scores, 0.3)  # position 5 * 0.7 = 3.5: half-way from 4 to 8
    assert cut.value == pytest.approx(6.0)
    assert cut.expected_false_alarm_rate == pytest.approx(0.3)


def test_the_promised_rate_holds_on_new_draws():
    # Distribution-free: over many calibrations, the share of new good scores above the cut
    # averages the asked-for rate, here for a skewed law and n = 39 (position 38).
    rng = np.random.default_rng(1)
    exceed = [(rng.lognormal(size=2000) >= order_statistic_cut(rng.lognormal(size=39), 0.05).value).mean() for _ in range(800)]
    assert np.mean(exceed) == pytest.approx(0.05, abs=0.004)
    # ... and the realised rate of one calibration falls in the recorded 90% interval about 90% of the time.
    low, high = order_statistic_cut(np.arange(39.0), 0.05).interval
    inside = np.mean([(low <= e <= high) for e in exceed])
    assert 0.85 <= inside <= 0.95
    assert low == pytest.approx(0.00919, abs=1e-5) and high == pytest.approx(0.11595, abs=1e-5)  # Beta(2, 38) quantiles 0.05, 0.95


def test_with_too_few_images_the_cut_is_the_largest_and_the_rate_says_so():
    scores = np.array([2.0, 3.0, 2.5, 2.2, 2.8])
    cut = order_statistic_cut(scores, 0.05)
    assert cut.value == 3.0
    assert cut.expected_false_alarm_rate == pytest.approx(1 / 6)
    assert minimum_images(0.05) == 19 and minimum_images(0.01) == 99 and minimum_images(0.1) == 9
    calibration = calibrate(scores, scores + 1, 1.0, 0.05)
    assert calibration.warning == (
        "only 5 good images: the cut is the highest of their scores, and about 1 in 6 (16.7%) new good images is expected "
        "above it, more than the 5.0% asked for; 19 good images reach that rate"
    )
    assert calibrate(np.arange(19.0), np.arange(19.0), 1.0, 0.05).warning is None


def test_ties_give_a_cut_on_the_tied_value_and_a_finite_scale():
    cut = order_statistic_cut(np.array([1.0, 2.0, 2.0, 2.0, 2.0, 5.0]), 0.4)  # position 4.2: within the run of 2s
    assert cut.value == 2.0
    same = calibrate(np.full(30, 1.5), np.full(30, 4.0), 1.0, 0.05)
    assert same.image_threshold == 1.5 and same.pixel_threshold == 4.0
    normalised = same.normalize_scores(np.array([1.5, 1.5 + 1e-3]))
    assert normalised[0] == 0.0 and np.isfinite(normalised[1]) and normalised[1] > 1


def test_calibrate_places_image_and_pixel_cuts_by_the_same_rule():
    rng = np.random.default_rng(2)
    scores, peaks = rng.normal(3, 0.5, 60), rng.normal(5, 0.5, 60)
    calibration = calibrate(scores, peaks, 1.25, 0.1)
    assert calibration.image_threshold == order_statistic_cut(scores, 0.1).value
    assert calibration.pixel_threshold == order_statistic_cut(peaks, 0.1).value
    assert calibration.image_good_mean == pytest.approx(scores.mean())
    assert calibration.pixel_good_mean == 1.25
    assert calibration.num_images == 60 and calibration.false_alarm_rate == 0.1
    assert calibration.normalize_scores(calibration.image_threshold) == pytest.approx(1.0)
    assert calibration.normalize_scores(scores.mean()) == pytest.approx(0.0, abs=1e-12)
    assert calibration.good_scores == tuple(scores)  # training order kept, for the report


def test_at_rate_moves_the_cut_without_refitting():
    rng = np.random.default_rng(3)
    calibration = calibrate(rng.normal(3, 1, 100), rng.normal(5, 1, 100), 1.0, 0.05)
    looser = calibration.at_rate(0.2)
    assert looser.image_threshold < calibration.image_threshold
    assert looser.image_threshold == order_statistic_cut(np.array(calibration.good_scores), 0.2).value
    assert looser.false_alarm_rate == 0.2 and looser.good_scores == calibration.good_scores


def test_round_trip_through_json_values():
    calibration = calibrate(np.linspace(1, 3, 25), np.linspace(2, 4, 25), 0.5, 0.05)
    import json

    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration


def test_a_format_1_calibration_loads_and_explains_what_it_cannot_do():
    old = Calibration.from_dict({"image_threshold": 3.2, "image_good_mean": 2.0, "pixel_threshold": 4.0, "pixel_good_mean": 1.0, "num_images": 4})
    assert old.false_alarm_rate is None and old.good_scores == ()
    assert old.describe() == "image threshold 3.2: the highest score of 4 held-out good images (model format 1)"
    with pytest.raises(ValueError, match="^this model stores no good-image scores .*refit it with `patchcore fit`"):
        old.at_rate(0.1)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 5])
def test_rates_outside_zero_one_are_refused(rate):
    with pytest.raises(ValueError, match=f"false-alarm rate must be between 0 and 1 \\(e.g. 0.05 for 5%\\), got {rate}"):
        order_statistic_cut(np.arange(10.0), rate)


def test_bad_good_scores_are_refused():
    with pytest.raises(ValueError, match="calibration needs at least 2 good images"):
        calibrate(np.array([1.0]), np.array([1.0]), 1.0)
    with pytest.raises(ValueError, match="good scores must be finite"):
        order_statistic_cut(np.array([1.0, math.nan]), 0.05)
    with pytest.raises(ValueError, match="3 good scores but 2 map peaks"):
        calibrate(np.arange(3.0), np.arange(2.0), 1.0)


# Concrete, skewed scores whose order statistics are known by construction, handed over shuffled
# (training order): X_(k) = k^2, k = 1..20 (mean 143.5), and 10 k + 1, k = 1..19, then 1001 (mean
# 146). Every cut below is far from the mean.
SQUARES = np.random.default_rng(4).permutation(np.arange(1.0, 21.0) ** 2)
PEAKS = np.random.default_rng(5).permutation(np.append(10.0 * np.arange(1.0, 20.0) + 1.0, 1001.0))


@pytest.mark.parametrize(
    "rate, image_cut, pixel_cut",
    [
        (0.1, 324.0 + 0.9 * (361.0 - 324.0), 181.0 + 0.9 * 10.0),  # j = 21 x 0.9 = 18.9: 0.9 of the way from X_(18) to X_(19)
        (0.25, 225.0 + 0.75 * (256.0 - 225.0), 151.0 + 0.75 * 10.0),  # j = 21 x 0.75 = 15.75
        (0.5, 100.0 + 0.5 * (121.0 - 100.0), 101.0 + 0.5 * 10.0),  # j = 10.5: between the two middle scores
        (0.05, 361.0 + 0.95 * (400.0 - 361.0), 191.0 + 0.95 * (1001.0 - 191.0)),  # j = 19.95: just below the largest
    ],
)
def test_calibrate_cuts_at_the_interpolated_order_statistic_not_the_mean(rate, image_cut, pixel_cut):
    calibration = calibrate(SQUARES, PEAKS, 0.5, rate)
    assert calibration.image_threshold == pytest.approx(image_cut, rel=1e-12)
    assert calibration.pixel_threshold == pytest.approx(pixel_cut, rel=1e-12)
    assert calibration.image_good_mean == pytest.approx(143.5) and calibration.pixel_good_mean == 0.5
    assert calibration.expected_false_alarm_rate == pytest.approx(rate, rel=1e-12)  # (n + 1 - j) / (n + 1)
    assert order_statistic_cut(SQUARES, rate).value == pytest.approx(image_cut, rel=1e-12)
    assert order_statistic_cut(PEAKS, rate).value == pytest.approx(pixel_cut, rel=1e-12)
    # Moving the cut later lands on the same numbers.
    assert calibrate(SQUARES, PEAKS, 0.5, 0.3).at_rate(rate).image_threshold == pytest.approx(image_cut, rel=1e-12)


def test_with_too_few_images_calibrate_cuts_at_the_highest_scores():
    # n = 5 at 5%: j = 6 x 0.95 = 5.7 is past the last order statistic, so the cut is the largest.
    scores, peaks = np.array([3.0, 1.0, 9.25, 1.5, 4.0]), np.array([7.0, 2.0, 2.5, 1.0, 3.0])
    calibration = calibrate(scores, peaks, 0.5, 0.05)
    assert (calibration.image_threshold, calibration.pixel_threshold) == (9.25, 7.0)  # means: 3.75 and 3.1
    assert calibration.expected_false_alarm_rate == pytest.approx(1 / 6)
