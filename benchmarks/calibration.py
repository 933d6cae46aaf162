"""How to set the threshold from good images: leave-one-image-out against k-fold refits and the
old held-out rule, at several false-alarm rates, on the real data sets beside the repo.

    .venv/bin/python benchmarks/calibration.py [--backbone mobilenet_v2] [--folds 5] [--data ../shared/data] [--out benchmarks/results]

For each set one model is fitted on every good training image; its test scores are the same
for every rule, only the cut differs:

- ``leave-one-out``: the model's own calibration (each training image scored against the bank
  without its own entries), cut by the order-statistic rule of calibrate.py;
- ``k-fold refit``: k models each fitted without one fold of the training images, which are
  then scored as new images; the pooled scores are cut by the same rule (k extra fits);
- ``held-out 10%, highest``: patchcore 0.1's rule, a seeded 10% (at least 2) of the training
  images left out of a model fitted on the rest, the cut at their highest score, applied to
  that model's own test scores (the bank lacks those images: the accuracy it cost).

Writes calibration_<backbone>.json and .md: per set and rule the cut, the share of good test
images flagged, of defective test images missed, F1, image AUROC, the extra fitting time, and
how the calibration scores compare with the good test images' scores (and how many good test
images are byte-for-byte copies of training images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore import PatchCore
from patchcore.calibrate import order_statistic_cut
from patchcore.data import list_test_samples, training_images
from patchcore.metrics import best_f1, f1_at_threshold, image_auroc

REPO = Path(__file__).resolve().parents[1]
SETS = {"bottle": "mvtec_ad/bottle", "battery_weld": "battery_weld", "cookies": "cookies"}
RATES = (0.01, 0.02, 0.05, 0.1)


def decision(labels: np.ndarray, scores: np.ndarray, cut: float) -> dict:
    flagged = scores >= cut
    good, defective = labels == 0, labels == 1
    return {
        "cut": cut,
        "good_flagged": int((flagged & good).sum()),
        "good_flagged_rate": float((flagged & good).mean() / good.mean()),
        "defects_missed_rate": float((~flagged & defective).mean() / defective.mean()),
        "image_f1": f1_at_threshold(labels, scores, cut),
    }


def test_scores(model: PatchCore, data: Path) -> tuple[np.ndarray, np.ndarray]:
    samples = list_test_samples(data)
    return np.array([s.label for s in samples]), np.array([p.score for p in model.predict([s.path for s in samples])])


def run_set(name: str, data: Path, backbone: str, folds: int) -> dict:
    images = training_images(data)
    options = {"progress": False}
    started = time.perf_counter()
    model = PatchCore(backbone, **options).fit(images)
    fit_seconds = time.perf_counter() - started
    labels, scores = test_scores(model, data)
    loo = np.array(model.calibration_.good_scores)

    # k-fold: each fold scored by a model fitted without it.
    order = np.random.default_rng(0).permutation(len(images))
    kfold = np.empty(len(images))
    started = time.perf_counter()
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        fold_model = PatchCore(backbone, **options).fit([images[i] for i in rest])
        kfold[fold] = [p.score for p in fold_model.predict([images[i] for i in fold])]
    kfold_seconds = time.perf_counter() - started

    # patchcore 0.1: a seeded 10% held out (at least 2), its highest score the cut.
    held = max(2, round(0.1 * len(images)))
    split = np.random.default_rng(42).permutation(len(images))
    held_model = PatchCore(backbone, **options).fit([images[i] for i in np.sort(split[held:])])
    held_scores = np.array([p.score for p in held_model.predict([images[i] for i in np.sort(split[:held])])])
    held_labels, held_test = test_scores(held_model, data)

    good_test = scores[labels == 0]
    training_bytes = {hashlib.sha256(path.read_bytes()).digest() for path in images}
    copies = sum(hashlib.sha256(s.path.read_bytes()).digest() in training_bytes for s in list_test_samples(data) if s.label == 0)
    result = {
        "train_images": len(images),
        "good_test_images_copied_from_training": copies,
        "fit_seconds": fit_seconds,
        "leave_one_out_seconds": model.fit_seconds_["calibration"],
        "kfold_extra_seconds": kfold_seconds,
        "image_auroc": image_auroc(labels, scores),
        "image_auroc_held_out_model": image_auroc(held_labels, held_test),
        "best_f1": best_f1(labels, scores)[0],
        "score_summary": {
            key: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "max": float(v.max())}
            for key, v in (("leave_one_out", loo), ("kfold", kfold), ("good_test", good_test))
        },
        "held_out_highest": decision(held_labels, held_test, float(held_scores.max())),
        "rates": {},
    }
    for rate in RATES:
        result["rates"][str(rate)] = {
            "leave_one_out": decision(labels, scores, order_statistic_cut(loo, rate).value),
            "kfold": decision(labels, scores, order_statistic_cut(kfold, rate).value),
        }
    return result


def markdown(summary: dict) -> str:
    lines = [f"{headline(summary)}, on {describe(summary['machine'])}; "
             f"backbone {summary['backbone']}, {summary['folds']} folds", ""]
    lines += ["| set | rule | rate | cut | good flagged | defects missed | F1 |", "|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        h = r["held_out_highest"]
        lines.append(f"| {name} | held-out 10%, highest | - | {h['cut']:.3f} | {h['good_flagged_rate']:.1%} | {h['defects_missed_rate']:.1%} | {h['image_f1']:.3f} |")
        for rate, rules in r["rates"].items():
            for rule, d in rules.items():
                lines.append(f"| {name} | {rule} | {float(rate):.0%} | {d['cut']:.3f} | {d['good_flagged_rate']:.1%} | {d['defects_missed_rate']:.1%} | {d['image_f1']:.3f} |")
    lines += ["", "| set | image AUROC, bank of all images | image AUROC, 10% held out | best F1 | leave-one-out s | k-fold extra s | LOO mean/sd/max | k-fold mean/sd/max | good test mean/sd/max | good test images that are copies of training images |"]
    lines.append("|---" * 10 + "|")
    for name, r in summary["results"].items():
        s = r["score_summary"]
        cells = [f"{s[k]['mean']:.2f} / {s[k]['sd']:.2f} / {s[k]['max']:.2f}" for k in ("leave_one_out", "kfold", "good_test")]
        lines.append(
            f"| {name} | {r['image_auroc']:.3f} | {r['image_auroc_held_out_model']:.3f} | {r['best_f1']:.3f} | {r['leave_one_out_seconds']:.1f} | "
            f"{r['kfold_extra_seconds']:.1f} | " + " | ".join(cells) + f" | {r['good_test_images_copied_from_training']} |"
        )
    lines += ["", "Good test images flagged over all sets, per rate and rule:", ""]
    for rate in RATES:
        for rule in ("leave_one_out", "kfold"):
            flagged = sum(r["rates"][str(rate)][rule]["good_flagged"] for r in summary["results"].values())
            lines.append(f"- {rate:.0%}, {rule}: {flagged} of {summary['good_test_images']} (at most twice the rate plus one image: {2 * rate * summary['good_test_images'] + 1:.1f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    fields = provenance()
    results = {}
    for name, relative in SETS.items():
        results[name] = run_set(name, args.data / relative, args.backbone, args.folds)
        print(name, json.dumps(results[name]["rates"]["0.05"]), flush=True)
    good_total = sum(int((np.array([s.label for s in list_test_samples(args.data / rel)]) == 0).sum()) for rel in SETS.values())
    summary = stamped(fields, {"backbone": args.backbone, "folds": args.folds, "good_test_images": good_total, "results": results})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration_{args.backbone}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"calibration_{args.backbone}.md").write_text(markdown(summary))
    print(markdown(summary))
