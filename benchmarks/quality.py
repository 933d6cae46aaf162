"""Accuracy, decisions and cost of `patchcore train` on the real data sets beside the repo, per input mode.

    .venv/bin/python benchmarks/quality.py [--backbone mobilenet_v2] [--data ../shared/data] [--out benchmarks/results]

Runs `patchcore train` (fit, then test with pictures) on MVTec AD bottle (square mode: its images
are square, so the aspect mode is the same), battery welds and cookies (square, aspect and tile
modes), one after the other, and writes quality_<backbone>.json and .md: image and pixel AUROC,
AUPRO, image F1 at the calibrated threshold and at the best one, the share of good test images
flagged and of defective ones missed at the calibrated threshold, fit seconds and scoring images
per second (with a picture written per image). The last lines add up the good test images
flagged over all sets, against the issue's bound of twice the asked-for rate plus one image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore.calibrate import DEFAULT_FALSE_ALARM_RATE
from patchcore.cli import main as patchcore

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "bottle": ("mvtec_ad/bottle", ["square"]),
    "battery_weld": ("battery_weld", ["square", "aspect", "tile"]),
    "cookies": ("cookies", ["square", "aspect", "tile"]),
}
COLUMNS = [
    "image_auroc", "pixel_auroc", "pixel_auroc_input_grid", "pixel_aupro", "image_f1", "image_f1_max", "good_flagged_rate", "defects_missed_rate",
    "good_flagged", "num_good", "fit_seconds", "images_per_second",
]


def run(args: argparse.Namespace) -> dict:
    fields = provenance()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (relative, modes) in RUNS.items():
            for mode in modes:
                out = Path(scratch) / name / mode
                started = time.perf_counter()
                command = ["train", str(args.data / relative), "--backbone", args.backbone, "--input-mode", mode, "--out", str(out), "--quiet"]
                if patchcore(command) != 0:
                    raise SystemExit(f"patchcore train failed on {name} in the {mode} mode")
                metrics = json.loads((out / "metrics.json").read_text())
                row = {key: metrics[key] for key in COLUMNS} | {"train_seconds": time.perf_counter() - started, "input": metrics["model"]["input"]}
                row["bank"] = metrics["model"]["memory_bank_shape"]
                results.setdefault(name, {})[mode] = row
                print(f"{name} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return stamped(fields, {
        "backbone": args.backbone,
        "false_alarm_rate": DEFAULT_FALSE_ALARM_RATE,
        "procedure": f"patchcore train DATA --backbone {args.backbone} --input-mode MODE --out DIR",
        "results": results,
    })


def markdown(summary: dict) -> str:
    header = (
        "| data | input mode | image AUROC | pixel AUROC | pixel AUROC, input grid | AUPRO | image F1 (calibrated) | image F1 (best) | "
        "good flagged | defects missed | fit s | scoring img/s | bank |"
    )
    lines = [f"`{summary['procedure']}` on {describe(summary['machine'])} ({headline(summary)}); false-alarm rate {summary['false_alarm_rate']:.0%}", "", header, "|---" * 13 + "|"]
    flagged = good = 0
    for name, modes in summary["results"].items():
        for mode, r in modes.items():
            lines.append(
                f"| {name} | {mode} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_auroc_input_grid']:.3f} | {r['pixel_aupro']:.3f} | {r['image_f1']:.3f} | "
                f"{r['image_f1_max']:.3f} | {r['good_flagged']}/{r['num_good']} ({r['good_flagged_rate']:.1%}) | {r['defects_missed_rate']:.1%} | "
                f"{r['fit_seconds']:.1f} | {r['images_per_second']:.1f} | {r['bank'][0]} x {r['bank'][1]} |"
            )
        flagged, good = flagged + modes["square"]["good_flagged"], good + modes["square"]["num_good"]
    bound = 2 * summary["false_alarm_rate"] * good + 1
    lines += ["", f"Square mode, all sets: {flagged} of {good} good test images flagged ({flagged / good:.1%}); at most {bound:.1f} allowed (twice the rate, plus one image)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    summary = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quality_{args.backbone}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"quality_{args.backbone}.md").write_text(markdown(summary))
    print(markdown(summary))
