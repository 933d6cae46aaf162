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

from .data import BadInputError, list_test_samples, read_mask
from .metrics import compute_metrics
from .model import PatchCore
from .render import PictureWriter, test_picture


def evaluate(
    model: PatchCore,
    data: str | Path,
    out_dir: str | Path,
    pictures: bool = True,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """Score ``DATA/test/*`` against ``DATA/ground_truth/*`` and write the results under ``out_dir``.

    Pixel metrics use the masks resized (nearest) to the model's input grid, where the maps are
    made. A test image that cannot be read, or whose mask is missing or of the wrong size, is
    reported, listed under ``skipped`` and left out; the rest are still scored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = list_test_samples(data)
    calibration = model.calibration_
    rows, labels, scores, masks, maps, skipped = [], [], [], [], [], []
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
            masks.append(model.geometry.mask_to_input(mask))
            maps.append(prediction.input_map)
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

    metrics = compute_metrics(np.array(labels), np.array(scores), np.stack(masks), np.stack(maps), calibration.image_threshold)
    result = {
        **metrics,
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


METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "image_f1": "Image F1 (calibrated threshold)",
    "image_f1_max": "Image F1 (best threshold on test)",
    "pixel_aupro": "Pixel AUPRO (FPR <= 0.3)",
}


def metrics_table(metrics: dict[str, Any]) -> str:
    """The headline metrics as a small aligned text table."""
    width = max(len(name) for name in METRIC_NAMES.values())
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, name in METRIC_NAMES.items():
        value = metrics.get(key)
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{value:.3f}'}")
    return "\n".join(lines)
