"""Accuracy and speed of `patchcore train` on the real data sets beside the repo.

    .venv/bin/python benchmarks/quality.py [--backbone mobilenet_v2] [--data ../shared/data] [--out benchmarks/results]

Runs `patchcore train` (fit, then test with pictures) on MVTec AD bottle, battery welds and
cookies, one after the other, and writes quality_<backbone>.json and .md with image AUROC,
pixel AUROC, image F1 (calibrated and best), AUPRO, fit seconds and scoring images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from patchcore.cli import main as patchcore

REPO = Path(__file__).resolve().parents[1]
SETS = {"bottle": "mvtec_ad/bottle", "battery_weld": "battery_weld", "cookies": "cookies"}
COLUMNS = ["image_auroc", "pixel_auroc", "image_f1", "image_f1_max", "pixel_aupro", "fit_seconds", "images_per_second"]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}"


def run(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, relative in SETS.items():
            out = Path(scratch) / name
            started = time.perf_counter()
            code = patchcore(["train", str(args.data / relative), "--backbone", args.backbone, "--out", str(out), "--quiet"])
            if code != 0:
                raise SystemExit(f"patchcore train failed on {name} (exit {code})")
            metrics = json.loads((out / "metrics.json").read_text())
            results[name] = {key: metrics[key] for key in COLUMNS} | {"train_seconds": time.perf_counter() - started}
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    return {"backbone": args.backbone, "machine": machine(), "command": f"patchcore train DATA --backbone {args.backbone} --out DIR", "results": results}


def markdown(summary: dict) -> str:
    header = "| data | image AUROC | pixel AUROC | image F1 (calibrated) | image F1 (best) | AUPRO | fit s | scoring img/s |"
    lines = [f"`{summary['command']}` on {summary['machine']}", "", header, "|---" * 8 + "|"]
    for name, r in summary["results"].items():
        lines.append(
            f"| {name} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['image_f1']:.3f} | {r['image_f1_max']:.3f} | "
            f"{r['pixel_aupro']:.3f} | {r['fit_seconds']:.1f} | {r['images_per_second']:.1f} |"
        )
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
