"""Scoring an MVTec-layout test set: metrics.json, scores.csv and a picture per image."""

from __future__ import annotations

import csv
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import BadInputError, list_test_samples
from .intake import read_mask
from .metrics import compute_metrics, pixel_auroc
from .calibrate import Calibration
from .scoring import ScoringModel
from .render import PictureWriter, test_picture


def evaluate(
    model: ScoringModel,
    data: str | Path,
    out_dir: str | Path,
    pictures: bool = True,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """Score ``DATA/test/*`` against ``DATA/ground_truth/*`` and write the results under ``out_dir``.

    Pixel metrics are computed on the grid the masks are on (each image's own resolution), with
    the anomaly maps brought there; ``pixel_auroc_input_grid`` is the pixel AUROC the way
    anomalib measures it, with the masks brought (nearest neighbour) to the model's input grid.
    A test image that cannot be read, or whose mask is missing or of the wrong size, is
    reported, listed under ``skipped`` and left out; the rest are still scored. Besides the
    metrics, the decision at the calibrated threshold is summarised: the share of good test
    images flagged and of defective ones missed (:func:`decision_summary`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = list_test_samples(data)
    calibration = model.calibration_
    rows, labels, scores, masks, maps, skipped = [], [], [], [], [], []
    input_masks, input_maps = [], []  # on the model's input grid, as anomalib measures
    started = time.perf_counter()
    with PictureWriter() as pictures_out:  # closed (pictures all written) even on an error
        for sample, prediction in zip(samples, model.iter_predictions([s.path for s in samples], keep_images=pictures)):
            try:
                if prediction.error is not None:
                    raise BadInputError(prediction.error)
                mask = read_mask(sample.mask_path, sample.path, prediction.image_size)
            except BadInputError as error:
                report(f"skipped {error}")
                skipped.append(str(error))
                continue
            labels.append(sample.label)
            scores.append(prediction.score)
            masks.append(mask)
            maps.append(prediction.anomaly_map)
            input_masks.append(model.layout_.mask_to_input(mask))
            input_maps.append(prediction.input_map)
            picture = ""
            if pictures:
                relative = sample.path.relative_to(Path(data) / "test")
                picture_path = out_dir / "images" / relative.parent / f"{relative.stem}.png"
                pictures_out.submit(picture_path, partial(test_picture, prediction.image, prediction.map_at, mask, calibration, prediction.score, prediction.is_anomalous))
                picture = str(picture_path.relative_to(out_dir))
            rows.append(
                {
                    "path": str(sample.path),
                    "defect_type": sample.defect_type,
                    "label": sample.label,
                    "score": f"{prediction.score:.6f}",
                    "normalized_score": f"{prediction.normalized_score:.6f}",
                    "predicted_label": int(prediction.is_anomalous),
                    "picture": picture,
                }
            )
    elapsed = time.perf_counter() - started
    if not rows:
        raise BadInputError(f"'{data}': none of the {len(samples)} test images could be scored")

    labels, scores = np.array(labels), np.array(scores)
    metrics = compute_metrics(labels, scores, masks, maps, calibration.image_threshold)
    del masks, maps
    result = {
        **metrics,
        "pixel_auroc_input_grid": pixel_auroc(input_masks, input_maps),
        **decision_summary(labels, scores, calibration, metrics["image_f1_max_threshold"]),
        "image_threshold": calibration.image_threshold,
        "num_test_images": len(rows),
        "num_defective": int(sum(labels)),
        "skipped": skipped,
        "scoring_seconds": elapsed,
        "images_per_second": len(rows) / elapsed if elapsed > 0 else None,
        "pictures": pictures,
        "data": str(data),
        "model": model.settings(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return result


def decision_summary(labels: np.ndarray, scores: np.ndarray, calibration: Calibration, best_threshold: float) -> dict[str, Any]:
    """What the calibrated decision did on a labelled test set, and why it may fall short of the best F1.

    ``best_threshold_training_flag_rate`` is the share of the training images' leave-one-out
    scores at or above the test set's best-F1 threshold: when it is well above the asked-for
    false-alarm rate, good test images score lower than good training images, and no threshold
    set from good images alone can reach the best F1.
    """
    flagged = scores >= calibration.image_threshold
    good, defective = labels == 0, labels == 1
    training = np.asarray(calibration.good_scores)
    return {
        "decision_rule": calibration.describe(),
        "false_alarm_rate": calibration.false_alarm_rate,
        "expected_false_alarm_rate": calibration.expected_false_alarm_rate,
        "num_good": int(good.sum()),
        "good_flagged": int((flagged & good).sum()),
        "good_flagged_rate": float((flagged & good).sum() / good.sum()) if good.any() else None,
        "defects_missed": int((~flagged & defective).sum()),
        "defects_missed_rate": float((~flagged & defective).sum() / defective.sum()) if defective.any() else None,
        "best_threshold_training_flag_rate": float((training >= best_threshold).mean()) if training.size else None,
    }


def explain_decision(metrics: dict[str, Any]) -> list[str]:
    """Lines that say what the calibrated decision did, and why when it fell short."""
    lines = [f"decision: {metrics['decision_rule']}"]
    if metrics["good_flagged_rate"] is not None and metrics["defects_missed_rate"] is not None:
        lines.append(
            f"at that threshold: {metrics['good_flagged']} of {metrics['num_good']} good test images flagged "
            f"({metrics['good_flagged_rate']:.1%}), {metrics['defects_missed']} of {metrics['num_defective']} defective missed "
            f"({metrics['defects_missed_rate']:.1%})"
        )
    rate, asked = metrics["best_threshold_training_flag_rate"], metrics["false_alarm_rate"]
    if rate is not None and asked is not None and metrics["image_f1"] is not None and metrics["image_f1"] < metrics["image_f1_max"] and rate > 2 * asked:
        lines.append(
            f"the best threshold on this test set ({metrics['image_f1_max_threshold']:.4g}) would flag {rate:.0%} of the good training "
            "images (scored leave-one-out): the good test images score lower than the good training images, so no threshold set "
            "from good images alone reaches the best F1 (see docs/calibration.md, 'When the calibrated F1 is low')"
        )
    expected = metrics["expected_false_alarm_rate"]
    if expected is not None and metrics["num_good"] and metrics["good_flagged"] > 2 * expected * metrics["num_good"] + 1:
        lines.append(
            f"more good test images were flagged than the {expected:.1%} expected: they score higher than the good training "
            "images (a change on the line, or variation the training images do not cover)"
        )
    return lines


METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "image_f1": "Image F1 (calibrated threshold)",
    "image_f1_max": "Image F1 (best threshold on test)",
    "pixel_aupro": "Pixel AUPRO (FPR <= 0.3)",
    "good_flagged_rate": "Good test images flagged (calibrated)",
    "defects_missed_rate": "Defective test images missed (calibrated)",
}
_SHARES = ("good_flagged_rate", "defects_missed_rate")


def metrics_table(metrics: dict[str, Any]) -> str:
    """The headline metrics as a small aligned text table."""
    width = max(len(name) for name in METRIC_NAMES.values())
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, name in METRIC_NAMES.items():
        value = metrics.get(key)
        shown = "n/a" if value is None else f"{value:.1%}" if key in _SHARES else f"{value:.3f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)
