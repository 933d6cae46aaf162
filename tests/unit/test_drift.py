"""The drift watch: quiet on an unchanged stream, alarmed by a rising flag rate or rising scores.

Each test names the mistakes it catches (checked by making each and seeing the test fail):
- "flip the one-sided test's direction" (the score-shift test alarms on falling scores only);
- "compare with the asked rate instead of the interval's upper end";
- "P(X > k) for P(X >= k)" and "count pairs wrongly" (p-values checked against scipy's own tests);
- "never drop old decisions from the window", "seed from the oldest decisions instead of the newest";
- "alarm on p above the level", "test before min_decisions";
- "crash on a format-1 model" (no good scores, no interval).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import stats

from patchcore.calibrate import Calibration, calibrate
from patchcore.record.drift import DEFAULT_WINDOW, DriftWatch


def good_scores(seed: int, count: int = 104) -> np.ndarray:
    # Skewed like real PatchCore scores (a long upper tail)
    return 1.2 + stats.gamma(4.0, scale=0.07).rvs(count, random_state=seed)


def calibration(seed: int = 0, count: int = 104) -> Calibration:
    scores = good_scores(seed, count)
    return calibrate(scores, scores * 2, 1.0, 0.05)


def feed(watch: DriftWatch, scores, cut: float | None = None, flags=None) -> list:
    cut = watch.calibration.image_threshold if cut is None else cut
    flags = [s > cut for s in scores] if flags is None else flags
    return [watch.add(float(s), bool(f)) for s, f in zip(scores, flags)]


@pytest.mark.parametrize("seed", range(5))
def test_a_stream_from_the_calibrations_own_distribution_raises_no_alarm(seed):
    cal = calibration(seed)
    watch = DriftWatch(cal)
    # new good parts: fresh draws from the distribution the good scores came from
    fresh = 1.2 + stats.gamma(4.0, scale=0.07).rvs(4000, random_state=1000 + seed)
    statuses = feed(watch, fresh)
    assert not any(s.alarm for s in statuses), next(s.reason for s in statuses if s.alarm)
    # and resampled from the good scores themselves (the calibration's own empirical law)
    resampled = np.random.default_rng(seed).choice(np.array(cal.good_scores), 4000)
    statuses = feed(DriftWatch(cal), resampled)
    assert not any(s.alarm for s in statuses), next(s.reason for s in statuses if s.alarm)
    last = statuses[-1]
    assert last.decisions == last.window == DEFAULT_WINDOW and last.full
    assert last.reason.startswith("no drift: flag rate ")
    assert 0.3 < last.score_shift < 0.7 and last.score_shift_p_value > 1e-3


@pytest.mark.parametrize("shift_sd", [0.75, 1.5])
def test_rising_scores_alarm_within_a_window_before_the_flag_rate_moves(shift_sd):
    cal = calibration(3)
    rng = np.random.default_rng(7)
    good = np.array(cal.good_scores)
    watch = DriftWatch.from_decisions(cal, [(s, s > cal.image_threshold) for s in rng.choice(good, DEFAULT_WINDOW)])
    assert not watch.status().alarm and watch.status().full
    shifted = rng.choice(good, 300) + shift_sd * good.std()
    # flags stay at the calibration's rate: only the shift test can see this drift
    flags = rng.random(300) < cal.expected_false_alarm_rate
    statuses = feed(watch, shifted, flags=flags)
    first = next((i for i, s in enumerate(statuses) if s.alarm), None)
    assert first is not None and first < (200 if shift_sd > 1 else 300)
    status = statuses[first]
    assert status.score_shift_p_value < status.shift_level and status.flag_rate_p_value >= status.rate_level
    assert status.reason.startswith("drift: scores higher than the calibration's good images")


def test_falling_scores_raise_no_alarm():
    cal = calibration(4)
    good = np.array(cal.good_scores)
    statuses = feed(DriftWatch(cal), np.random.default_rng(1).choice(good, 600) - 2 * good.std())
    assert not any(s.alarm for s in statuses)
    assert statuses[-1].score_shift < 0.2 and statuses[-1].score_shift_p_value > 0.99


def window_with(flagged: int, cal: Calibration, seed: int = 0) -> DriftWatch:
    """A full window of good-looking scores, ``flagged`` of them flagged."""
    rng = np.random.default_rng(seed)
    scores = rng.choice(np.array(cal.good_scores), DEFAULT_WINDOW)
    flags = np.zeros(DEFAULT_WINDOW, dtype=bool)
    flags[rng.choice(DEFAULT_WINDOW, flagged, replace=False)] = True
    return DriftWatch.from_decisions(cal, zip(scores, flags))


def test_the_rate_test_alarms_on_a_high_flag_rate_and_says_why():
    cal = calibration(1)
    status = window_with(40, cal).status()  # 20% flagged where 5% is expected
    assert status.alarm and status.flag_rate == pytest.approx(0.2)
    assert status.flag_rate_p_value < status.rate_level
    assert status.reason.startswith("drift: flag rate 20.0% over the last 200 decisions, above the calibration's 5.0% (90% interval 2.1%-8.9%), p=")
    # p = P(Binomial(200, upper end) >= 40), exactly
    assert status.flag_rate_p_value == pytest.approx(stats.binom.sf(39, 200, cal.false_alarm_interval[1]), rel=1e-9)


def test_the_rate_test_allows_for_the_calibrations_own_uncertainty():
    cal = calibration(1)
    low, high = cal.false_alarm_interval
    # 13% flagged: far above the expected 5% (p < 1e-5 against it) but not against the interval's upper end
    assert stats.binom.sf(25, 200, cal.expected_false_alarm_rate) < 1e-5
    status = window_with(26, cal).status()
    assert status.tested_flag_rate == high and not status.alarm, status.reason
    assert status.flag_rate_p_value == pytest.approx(stats.binom.sf(25, 200, high), rel=1e-9)
    # a flag rate below the expected one is no drift
    assert window_with(0, cal).status().flag_rate_p_value == 1.0


def test_the_p_values_are_scipys():
    cal = calibration(2)
    good = np.array(cal.good_scores)
    rng = np.random.default_rng(5)
    for shift in (-0.05, 0.0, 0.03, 0.08):
        window = rng.choice(good, 150) + shift + rng.normal(0, 1e-4, 150)  # no ties
        flags = rng.random(150) < 0.08
        status = DriftWatch.from_decisions(cal, zip(window, flags)).status()
        expected = stats.mannwhitneyu(window, good, alternative="greater", method="asymptotic").pvalue
        assert status.score_shift_p_value == pytest.approx(expected, rel=1e-9)
        assert status.score_shift == pytest.approx(stats.mannwhitneyu(window, good).statistic / (150 * good.size))
        assert status.flag_rate_p_value == pytest.approx(stats.binom.sf(flags.sum() - 1, 150, cal.false_alarm_interval[1]), rel=1e-9)


def test_the_window_rolls_and_the_alarm_clears():
    cal = calibration(5)
    good = np.array(cal.good_scores)
    rng = np.random.default_rng(2)
    watch = DriftWatch(cal, window=100)
    statuses = feed(watch, rng.choice(good, 150) + 3 * good.std(), flags=[False] * 150)
    assert statuses[-1].alarm and statuses[-1].decisions == 100
    statuses = feed(watch, rng.choice(good, 100), flags=[False] * 100)
    assert not statuses[-1].alarm and statuses[-1].flagged == 0, statuses[-1].reason


def test_seeding_keeps_the_newest_decisions():
    cal = calibration(6)
    good = np.array(cal.good_scores)
    old = [(float(s) + 5.0, True) for s in good[:50]]  # long gone: would alarm both tests
    recent = [(float(s), False) for s in np.random.default_rng(0).choice(good, DEFAULT_WINDOW)]
    status = DriftWatch.from_decisions(cal, old + recent).status()
    assert status.decisions == DEFAULT_WINDOW and status.flagged == 0 and not status.alarm


def test_no_test_before_min_decisions():
    cal = calibration(7)
    watch = DriftWatch(cal, min_decisions=50)
    statuses = feed(watch, [10.0] * 50, flags=[True] * 50)
    assert not any(s.alarm for s in statuses[:49])
    assert statuses[0].flag_rate_p_value is None and statuses[0].score_shift_p_value is None
    assert statuses[48].reason == "49 decisions so far: the drift watch tests from 50 on"
    assert statuses[49].alarm


def test_levels_decide_the_alarm():
    cal = calibration(8)
    rng = np.random.default_rng(0)
    scores = rng.choice(np.array(cal.good_scores), DEFAULT_WINDOW)
    flags = np.zeros(DEFAULT_WINDOW, dtype=bool)
    flags[rng.choice(DEFAULT_WINDOW, 26, replace=False)] = True
    p = DriftWatch.from_decisions(cal, zip(scores, flags)).status().flag_rate_p_value
    assert DriftWatch.from_decisions(cal, zip(scores, flags), rate_level=min(0.99, p * 1.01)).status().alarm
    assert not DriftWatch.from_decisions(cal, zip(scores, flags), rate_level=p * 0.99).status().alarm


def test_a_format_1_model_is_watched_without_crashing():
    stored = {"image_threshold": 2.0, "image_good_mean": 1.5, "pixel_threshold": 3.0, "pixel_good_mean": 1.0, "num_images": 19}
    watch = DriftWatch(stored)  # the dict a model's metadata holds
    status = feed(watch, [1.5] * 130 + [2.5] * 70)[-1]
    assert status.score_shift_p_value is None and status.score_shift is None
    assert "score shift not available" in status.reason
    # its cut is the highest of 19 held-out scores: 1 in 20 expected above, Beta(1, 19) interval
    assert status.expected_flag_rate == pytest.approx(0.05)
    assert status.interval == pytest.approx((stats.beta.ppf(0.05, 1, 19), stats.beta.ppf(0.95, 1, 19)))
    assert status.alarm and status.reason.startswith("drift: flag rate 35.0%")
    json.dumps(status.to_dict())


def test_status_is_json_ready():
    cal = calibration(9)
    empty = DriftWatch(cal).status()
    assert empty.decisions == 0 and empty.flag_rate is None and not empty.alarm
    status = window_with(10, cal).status()
    data = json.loads(json.dumps(status.to_dict()))
    assert data["decisions"] == 200 and data["window"] == 200 and data["flag_rate"] == pytest.approx(0.05)
    assert data["expected_flag_rate"] == pytest.approx(0.05) and len(data["interval"]) == 2
    assert data["alarm"] is False and isinstance(data["reason"], str)
    assert {"flag_rate_p_value", "score_shift_p_value"} <= data.keys()


def test_bad_settings_are_refused():
    cal = calibration(0)
    with pytest.raises(ValueError, match="window"):
        DriftWatch(cal, window=0)
    with pytest.raises(ValueError, match="level"):
        DriftWatch(cal, shift_level=0)


def test_an_update_takes_microseconds():
    watch = DriftWatch(calibration(0))
    scores = np.random.default_rng(0).normal(1.5, 0.2, 5000)
    started = time.perf_counter()
    for s in scores:
        watch.add(float(s), s > 1.8)
    # the server calls this on its event loop once per decision: far under a millisecond each
    assert (time.perf_counter() - started) / scores.size < 2e-4
