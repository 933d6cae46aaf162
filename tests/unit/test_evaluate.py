"""The decision summary of `test`: counts at the calibrated threshold, and the lines that say why."""

import numpy as np
import pytest

from patchcore.calibrate import calibrate
from patchcore.evaluate import decision_summary, explain_decision, metrics_table


def summary(labels, scores, training, best_threshold, image_f1, image_f1_max):
    calibration = calibrate(np.array(training), np.array(training) + 1, 1.0, 0.05)
    metrics = decision_summary(np.array(labels), np.array(scores), calibration, best_threshold)
    return calibration, metrics | {"image_f1": image_f1, "image_f1_max": image_f1_max, "image_f1_max_threshold": best_threshold, "num_defective": int(sum(labels))}


def test_counts_at_the_calibrated_threshold():
    training = list(np.linspace(1.0, 2.0, 39))  # position 38 of 39: the cut is the 38th smallest
    calibration, metrics = summary([0, 0, 0, 0, 1, 1, 1], [1.0, 1.2, 3.0, 1.1, 0.9, 2.5, 3.5], training, 2.5, 0.8, 1.0)
    assert calibration.image_threshold == pytest.approx(training[37])
    assert (metrics["num_good"], metrics["good_flagged"], metrics["defects_missed"]) == (4, 1, 1)
    assert metrics["good_flagged_rate"] == 0.25 and metrics["defects_missed_rate"] == pytest.approx(1 / 3)
    assert metrics["best_threshold_training_flag_rate"] == 0.0  # no training score reaches 2.5
    assert metrics["false_alarm_rate"] == 0.05 and metrics["expected_false_alarm_rate"] == pytest.approx(0.05)
    table = metrics_table(metrics | {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7})
    assert "Good test images flagged (calibrated)      25.0%" in table
    assert "Defective test images missed (calibrated)  33.3%" in table


def test_a_best_threshold_inside_the_good_training_scores_is_explained():
    training = list(np.linspace(2.0, 4.0, 37))
    _, metrics = summary([0] * 10 + [1] * 10, [2.0] * 10 + [3.0] * 5 + [4.5] * 5, training, 2.5, 0.5, 0.95)
    lines = explain_decision(metrics)
    assert lines[1] == "at that threshold: 0 of 10 good test images flagged (0.0%), 5 of 10 defective missed (50.0%)"
    assert lines[2].startswith("the best threshold on this test set (2.5) would flag 76% of the good training images")
    assert len(lines) == 3


def test_no_explanation_when_the_calibrated_f1_is_the_best():
    training = list(np.linspace(1.0, 2.0, 39))
    _, metrics = summary([0, 1], [1.0, 3.0], training, 3.0, 1.0, 1.0)
    assert len(explain_decision(metrics)) == 2


def test_many_good_test_images_flagged_are_called_out():
    training = list(np.linspace(1.0, 2.0, 39))
    _, metrics = summary([0] * 20 + [1], [2.5] * 4 + [1.0] * 16 + [3.0], training, 3.0, 0.33, 1.0)
    # 4 of 20 flagged against an expected 5%: more than twice the rate plus one image.
    assert explain_decision(metrics)[-1].startswith("more good test images were flagged than the 5.0% expected")
    _, fewer = summary([0] * 20 + [1], [2.5] * 2 + [1.0] * 18 + [3.0], training, 3.0, 0.5, 1.0)
    assert not explain_decision(fewer)[-1].startswith("more good test images")
