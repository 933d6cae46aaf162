"""The issue's bar: `patchcore train` on MVTec AD bottle with pretrained MobileNetV2."""

import csv
import json

import pytest



@pytest.fixture(scope="module")
def bottle_run(bottle_train_run):
    return bottle_train_run  # the session's run (conftest.py): the other tests use its model


def test_accuracy_floors(bottle_run):
    metrics = json.loads((bottle_run / "metrics.json").read_text())
    # anomalib 2.7 with the same weights measured 1.000 / 0.981 on this machine (on its 256 px grid);
    # ours are on the masks' own 900 x 900 grid.
    assert metrics["image_auroc"] >= 0.99
    assert metrics["pixel_auroc"] >= 0.98
    assert metrics["pixel_auroc_input_grid"] >= 0.978  # on the 256 px grid, as anomalib measures
    assert metrics["pixel_aupro"] >= 0.85
    assert metrics["image_f1_max"] >= 0.98
    assert metrics["image_f1"] >= 0.95  # at the threshold set on good training images only
    assert metrics["num_test_images"] == 83 and metrics["num_defective"] == 63 and metrics["num_good"] == 20
    assert metrics["skipped"] == []
    # every training image but 132.png, which the contamination check sets aside (a swirl of light
    # in the mouth and a line on the rim: its leave-one-out score stands at robust z 5.7)
    assert metrics["model"]["num_fit_images"] == 208
    # 10% of 209 x 32 x 32 patches selected (21,402), less 132.png's entries, the cover repaired
    assert metrics["model"]["memory_bank_shape"] == [21238, 128]
    suspects = metrics["model"]["contamination"]["suspects"]
    assert [(s["path"].rsplit("/", 1)[-1], s["set_aside"]) for s in suspects] == [("132.png", True)] and 5 < suspects[0]["z"] < 6.5


def test_the_decision_is_stated_and_its_errors_counted(bottle_run):
    metrics = json.loads((bottle_run / "metrics.json").read_text())
    calibration = metrics["model"]["calibration"]
    assert calibration["num_images"] == 208 and len(calibration["good_scores"]) == 208
    assert calibration["false_alarm_rate"] == metrics["false_alarm_rate"] == 0.05
    # 208 scores: position 209 * 0.95 = 198.55, whose expected rate is 10.45 / 209 = 5% exactly.
    assert metrics["expected_false_alarm_rate"] == pytest.approx(0.05)
    assert metrics["good_flagged"] <= 3 and metrics["good_flagged_rate"] == metrics["good_flagged"] / 20
    assert metrics["defects_missed_rate"] <= 0.05
    assert metrics["decision_rule"].startswith(f"image threshold {metrics['image_threshold']:.4g} for a 5.0% false-alarm rate, set on 208 good images")
    report = list(csv.DictReader(open(bottle_run / "model.calibration.csv")))
    assert len(report) == 208 and float(report[0]["score"]) == pytest.approx(max(calibration["good_scores"]), abs=1e-6)
    assert sum(int(row["flagged"]) for row in report) == sum(s >= metrics["image_threshold"] for s in calibration["good_scores"])


def test_scores_and_pictures_written(bottle_run):
    rows = list(csv.DictReader(open(bottle_run / "scores.csv")))
    assert len(rows) == 83
    assert sorted({r["defect_type"] for r in rows}) == ["broken_large", "broken_small", "contamination", "good"]
    assert sum(int(r["label"]) for r in rows) == 63
    pictures = sorted((bottle_run / "images").rglob("*.png"))
    assert len(pictures) == 83
    assert (bottle_run / rows[0]["picture"]).is_file()
    assert (bottle_run / "model.safetensors").stat().st_size > 1_000_000
    aside = list(csv.DictReader(open(bottle_run / "model.set_aside.csv")))
    assert [row["picture"] for row in aside] == ["132.jpg"] and (bottle_run / "model.set_aside" / "132.jpg").is_file()
