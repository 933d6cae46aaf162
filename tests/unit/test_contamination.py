"""The contamination check's rule (contamination.py) on scores with known answers."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from patchcore.contamination import (
    AUTO_Z_LIMIT,
    ContaminationCheck,
    check_training_images,
    parse_contamination,
    robust_z,
)


def good_scores(count: int, seed: int = 0) -> np.ndarray:
    """Leave-one-out scores of good images: log-normal, as measured ones nearly are."""
    return np.exp(np.random.default_rng(seed).normal(0.3, 0.08, count))


def test_robust_z_is_the_log_scores_distance_from_their_median_in_mad_units():
    scores = np.array([1.0, 2.0, 2.0, 4.0, 4.0, 4.0, 8.0, 64.0])
    logs = [math.log(s) for s in scores]
    middle = statistics.median(logs)
    spread = 1.4826 * statistics.median([abs(v - middle) for v in logs])
    np.testing.assert_allclose(robust_z(scores), [(v - middle) / spread for v in logs], rtol=1e-12)
    # On the logs, not the scores: 64 is 3 doublings above 8 (z 4.05), not 56 units (z 23.6 on the raw scale).
    assert robust_z(scores)[-1] == pytest.approx((math.log(64) - middle) / spread) and robust_z(scores)[-1] < 5


def test_robust_z_does_not_move_when_all_scores_are_scaled():
    scores = good_scores(50)
    np.testing.assert_allclose(robust_z(scores), robust_z(scores * 1000.0), atol=1e-9)


def test_robust_z_is_zero_where_there_is_no_spread_to_measure_by():
    assert not robust_z(np.array([2.0] * 30 + [50.0])).any()  # MAD 0: identical images
    assert not robust_z(np.array([1.0, 9.0])).any()  # too few


def test_a_twin_scoring_zero_keeps_the_z_finite():
    scores = np.concatenate([[0.0], good_scores(30)])
    assert np.isfinite(robust_z(scores)).all() and robust_z(scores)[0] < -3


def test_auto_sets_aside_the_scores_that_stand_out_and_no_good_one():
    scores = np.concatenate([good_scores(60), [4.0, 6.0, 9.0]])  # good ones near 1.35
    sources = [f"good_{i}.png" for i in range(60)] + ["bad_a.png", "bad_b.png", "bad_c.png"]
    check = check_training_images(scores, sources, "auto")
    assert check.set_aside_paths == ["bad_c.png", "bad_b.png", "bad_a.png"]  # highest first
    assert check.num_checked == 63 and all(s.z > AUTO_Z_LIMIT for s in check.set_aside)
    assert check.describe().startswith("set aside 3 of 63 training images as likely defective")
    assert "robust z" in check.set_aside[0].reason and check.set_aside[0].score == 9.0


def test_auto_leaves_a_clean_folder_whole():
    for seed in range(20):
        assert check_training_images(good_scores(200, seed), [f"{i}.png" for i in range(200)], "auto").suspects == ()


def test_an_image_just_below_the_limit_stays_and_just_above_goes():
    scores = good_scores(100)
    z = robust_z(scores)
    logs = np.log(scores)
    spread = (logs.max() - np.median(logs)) / z.max()
    below, above = (np.exp(np.median(logs) + limit * spread) for limit in (AUTO_Z_LIMIT - 0.3, AUTO_Z_LIMIT + 0.3))
    # (adding the score moves the median and MAD by about 0.1 z here: 0.3 either side is clear of that)
    assert check_training_images(np.append(scores, below), [str(i) for i in range(101)], "auto").suspects == ()
    assert check_training_images(np.append(scores, above), [str(i) for i in range(101)], "auto").set_aside_paths == ["100"]


def test_a_stated_share_sets_aside_that_many_of_the_highest():
    scores = good_scores(40)
    check = check_training_images(scores, [str(i) for i in range(40)], 0.1)
    assert sorted(check.set_aside_paths) == sorted(str(i) for i in np.argsort(-scores)[:4])
    assert check.setting == "0.1" and "the 4 highest" in check.rule


def test_off_sets_aside_nothing():
    scores = np.concatenate([good_scores(60), [40.0]])
    check = check_training_images(scores, [str(i) for i in range(61)], "off")
    assert check.suspects == () and check.describe().startswith("contamination check off")


def test_images_reviewed_as_good_are_listed_and_never_set_aside():
    scores = np.concatenate([good_scores(60), [6.0, 9.0]])
    sources = [f"{i}.png" for i in range(60)] + ["odd_but_good.png", "bad.png"]
    check = check_training_images(scores, sources, "auto", trusted=["odd_but_good.png"])
    assert check.set_aside_paths == ["bad.png"]
    kept = [s for s in check.suspects if not s.set_aside]
    assert [s.path for s in kept] == ["odd_but_good.png"] and "reviewed as good" in kept[0].reason
    assert "1 reviewed as good stand out too" in check.describe()


def test_two_images_always_stay_to_calibrate_on():
    check = check_training_images(np.array([1.0, 2.0, 3.0, 4.0]), list("abcd"), 0.5)
    assert len(check.set_aside) == 2
    check = check_training_images(np.array([1.0, 2.0, 3.0]), list("abc"), 0.5)
    assert check.set_aside_paths == ["c"] and len(check.suspects) == 2 and "a fit needs two images" in check.suspects[1].reason


def test_an_update_is_judged_beside_the_earlier_images():
    earlier = good_scores(100)
    new = np.array([earlier[0], 8.0])
    # alone, two scores have no spread to judge by; beside the 100 earlier ones, 8.0 stands out
    assert check_training_images(new, ["a", "b"], "auto").suspects == ()
    assert check_training_images(new, ["a", "b"], "auto", reference=earlier).set_aside_paths == ["b"]


def test_the_check_survives_its_json_and_joins_a_later_one():
    first = check_training_images(np.concatenate([good_scores(60), [9.0]]), [str(i) for i in range(61)], "auto")
    again = ContaminationCheck.from_dict(first.to_dict())
    assert again == first
    later = check_training_images(np.concatenate([good_scores(30, 1), [7.0]]), [f"new{i}" for i in range(31)], "auto")
    joined = first.joined(later)
    assert joined.num_checked == 92 and joined.set_aside_paths == ["60", "new30"]


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("OFF", "off"), ("0.1", 0.1), (" auto ", "auto"), ("0.5", 0.5)])
def test_contamination_settings_read(text, value):
    assert parse_contamination(text) == value


@pytest.mark.parametrize("text, message", [("0", "above 0"), ("0.6", "at most 0.5"), ("nan", "at most 0.5"), ("some", "auto, off or a share"), ("-0.1", "above 0")])
def test_contamination_settings_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_contamination(text)


def test_auto_judges_nothing_with_fewer_than_ten_images():
    # three images: the median and MAD of three scores say nothing (one of them would be "z 30")
    assert check_training_images(np.array([1.0, 1.01, 1.6]), list("abc"), "auto").suspects == ()
    assert "fewer than 10 images" in check_training_images(np.array([1.0, 1.01, 1.6]), list("abc"), "auto").rule
    # a stated share still applies, and an update counts the earlier images
    assert check_training_images(np.array([1.0, 1.01, 1.6]), list("abc"), 0.34).set_aside_paths == ["c"]
    assert check_training_images(np.array([1.35, 9.0]), ["a", "b"], "auto", reference=good_scores(20)).set_aside_paths == ["b"]
