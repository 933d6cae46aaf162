"""Pixel AUROC and AUPRO on full-resolution maps: patchcore's one-sort metrics against scikit-learn.

    .venv/bin/python benchmarks/pixel_metrics.py [--images 83] [--size 900] [--out benchmarks/results]

Bottle-sized synthetic maps (83 random float32 maps of 900 x 900, a 100 x 200 defect in each
mask, raised by 0.3): times ``patchcore.metrics.pixel_auroc`` + ``aupro`` through
``compute_metrics`` (one shared sort), and scikit-learn's ``roc_auc_score`` on the same pixels,
and checks that both AUROCs agree. Writes pixel_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from provenance import provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script
from sklearn.metrics import roc_auc_score

from patchcore.metrics import compute_metrics

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=83)
    parser.add_argument("--size", type=int, default=900)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    fields = provenance()
    rng = np.random.default_rng(0)
    masks = np.zeros((args.images, args.size, args.size), dtype=bool)
    masks[:, 300:400, 200:400] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    maps[masks] += np.float32(0.3)
    labels = np.ones(args.images, dtype=int)
    labels[:20] = 0
    scores = rng.random(args.images) + labels

    started = time.perf_counter()
    ours = compute_metrics(labels, scores, list(masks), list(maps), threshold=0.5)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference = float(roc_auc_score(masks.ravel(), maps.ravel()))
    sklearn_seconds = time.perf_counter() - started
    result = {
        "pixels": int(masks.size),
        "patchcore_pixel_auroc_and_aupro_seconds": ours_seconds,
        "sklearn_pixel_auroc_seconds": sklearn_seconds,
        "ratio": sklearn_seconds / ours_seconds,
        "pixel_auroc": ours["pixel_auroc"],
        "sklearn_pixel_auroc": reference,
        "pixel_aupro": ours["pixel_aupro"],
    }
    assert abs(result["pixel_auroc"] - reference) < 1e-9, result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pixel_metrics.json").write_text(json.dumps(stamped(fields, result), indent=2) + "\n")
    print(
        f"{result['pixels']:,} pixels: patchcore AUROC + AUPRO {ours_seconds:.1f} s; scikit-learn AUROC alone {sklearn_seconds:.1f} s "
        f"({result['ratio']:.1f}x); AUROC {result['pixel_auroc']:.6f} both"
    )


if __name__ == "__main__":
    main()
