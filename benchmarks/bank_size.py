"""Accuracy, model size and scoring cost against the memory bank's size (`--bank-size`), on the
real data sets beside the repo.

    .venv/bin/python benchmarks/bank_size.py [--backbone mobilenet_v2] [--sizes 250 500 ...] [--sets bottle cookies ...]
                                             [--data ../shared/data] [--out benchmarks/results]

For each set of benchmarks/quality.py (MVTec AD bottle, battery welds, cookies; square input
mode, the default) it fits `PatchCore(backbone, bank_size=N)` on train/good for every N in
--sizes below the set's patch count, after one fit with the default 10% coreset
(`coreset_ratio=0.1`) as the reference, and then, where the set has at most
--every-patch-up-to patches, one fit that keeps every patch (no coreset) as the upper
reference (bottle, 214,016 patches, has none by default). About 20 minutes for 25 fits on 2
shared CPU cores with mobilenet_v2. Each fit is a normal, complete fit (features, greedy coreset of N entries,
leave-one-out calibration); nothing is shared between sizes.

Each model is then scored on test/ with `patchcore.evaluate.evaluate` (the metrics of `patchcore
test`, no pictures) and saved. Per fit it records: the bank's entries and share of the training
patches, image AUROC, pixel AUROC (full-resolution masks), AUPRO, image F1 at the calibrated
threshold (the decision) and at the best one, good test images flagged and defective ones
missed at the calibrated threshold, the fit's seconds (and its coreset phase) and CPU seconds,
scoring milliseconds per test image (reading, backbone, nearest-neighbour search and maps; no
pictures), the process's CPU milliseconds per test image for scoring and metrics, and the model
file's size.

Writes bank_size.json, bank_size.md (a table per set) and bank_size.png (image and pixel AUROC
against bank entries, log axis, one line per set, the 10% default and every-patch points
marked), after each set. On a machine shared with other work the wall and the CPU times both
swing (threads spin while they wait); the accuracy is deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from patchcore import PatchCore
from patchcore.calibrate import DEFAULT_FALSE_ALARM_RATE
from patchcore.data import training_images
from patchcore.evaluate import evaluate

# The sets, and the machine line, of the quality benchmark beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import describe, headline, provenance, stamped
from quality import RUNS

REPO = Path(__file__).resolve().parents[1]
SIZES = (250, 500, 1000, 2000, 5000, 10000, 20000)
DEFAULT = "10% coreset"
EVERY = 2**62  # a bank size above any patch count: every patch kept


def fit_and_score(data: Path, backbone: str, scratch: Path, **bank) -> dict:
    model = PatchCore(backbone, progress=False, **bank)
    images = training_images(data)
    started, cpu = time.perf_counter(), time.process_time()
    model.fit(images)
    fit_seconds, fit_cpu = time.perf_counter() - started, time.process_time() - cpu
    path = scratch / "model.safetensors"
    model.save(path)
    cpu = time.process_time()
    metrics = evaluate(model, data, scratch / "test", pictures=False, report=lambda message: print(message, file=sys.stderr))
    entries = int(model.memory_bank_.shape[0])
    return {
        "bank_entries": entries,
        "bank_dims": int(model.memory_bank_.shape[1]),
        "patches": round(entries / model.coreset_ratio_),  # exact with a bank size (the ratio is entries / patches); near with a ratio
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pixel_aupro": metrics["pixel_aupro"],
        "image_f1": metrics["image_f1"],
        "image_f1_max": metrics["image_f1_max"],
        "good_flagged": metrics["good_flagged"],
        "num_good": metrics["num_good"],
        "defects_missed": metrics["defects_missed"],
        "num_defective": metrics["num_defective"],
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu,
        "fit_phases": model.fit_seconds_,
        "scoring_ms_per_image": 1000 * metrics["scoring_seconds"] / metrics["num_test_images"],
        # CPU time of this process (all its threads), scoring and the metrics
        "evaluate_cpu_ms_per_image": 1000 * (time.process_time() - cpu) / metrics["num_test_images"],
        "model_bytes": path.stat().st_size,
        "num_fit_images": model.num_fit_images_,
    }


def run(args: argparse.Namespace, save=lambda summary: None) -> dict:
    summary = stamped(provenance(), {
        "backbone": args.backbone,
        "input_mode": "square",
        "false_alarm_rate": DEFAULT_FALSE_ALARM_RATE,
        "procedure": f"PatchCore({args.backbone!r}, bank_size=N).fit(train/good), then patchcore.evaluate.evaluate (no pictures)",
        "results": {},
    })
    for name in args.sets:
        data = args.data / RUNS[name][0]
        rows = summary["results"][name] = []
        with tempfile.TemporaryDirectory() as scratch:
            for setting in [DEFAULT, *sorted(args.sizes), EVERY]:
                if setting == EVERY:
                    # After the last size, every patch (no coreset) as the upper reference, where
                    # the set is small enough; and never twice.
                    if rows[-1]["bank_entries"] == rows[-1]["patches"] or rows[0]["patches"] > args.every_patch_up_to:
                        break
                elif setting != DEFAULT and setting >= rows[0]["patches"]:
                    continue  # at or above the set's patch count: the every-patch point below
                bank = {"coreset_ratio": 0.1} if setting == DEFAULT else {"bank_size": setting}
                label = {DEFAULT: DEFAULT, EVERY: "every patch"}.get(setting, str(setting))
                row = {"setting": label} | fit_and_score(data, args.backbone, Path(scratch), **bank)
                rows.append(row)
                print(
                    f"{name} {label}: {row['bank_entries']} entries of {row['patches']}, image AUROC {row['image_auroc']:.3f}, "
                    f"pixel AUROC {row['pixel_auroc']:.3f}, AUPRO {row['pixel_aupro']:.3f}, F1 {row['image_f1']:.3f}, fit {row['fit_seconds']:.1f} s "
                    f"(coreset {row['fit_phases'].get('coreset', 0):.1f} s), {row['scoring_ms_per_image']:.0f} ms/image, {row['model_bytes'] / 1e6:.1f} MB",
                    flush=True,
                )
        exact = next((r["patches"] for r in rows if r["setting"] != DEFAULT), rows[0]["patches"])
        for r in rows:
            r["patches"] = exact
            r["bank_share"] = r["bank_entries"] / exact
        save(summary)
    return summary


def markdown(summary: dict) -> str:
    intro = (
        f"{summary['procedure']}; {summary['backbone']}, {summary['input_mode']} input, on {describe(summary['machine'])} "
        f"({headline(summary)}); calibrated at a {summary['false_alarm_rate']:.0%} false-alarm rate. "
        "Scoring ms per test image: wall time of reading, backbone, search and maps, no pictures; test CPU ms: this process's CPU time (all threads) "
        "for the same plus the metrics, per test image. On a machine shared with other work, wall and CPU times both swing (waiting threads spin); "
        "the accuracy columns do not: the fits are deterministic."
    )
    lines = [intro]
    header = "| bank | entries | share of patches | image AUROC | pixel AUROC | AUPRO | image F1 (calibrated) | image F1 (best) | good flagged | defects missed | fit s | coreset s | fit CPU s | scoring ms/img | test CPU ms/img | model MB |"
    for name, rows in summary["results"].items():
        first = rows[0]
        lines += ["", f"### {name}: {first['num_fit_images']} training images, {first['patches']} patches ({first['patches'] // first['num_fit_images']} per image), {first['bank_dims']}-d", "", header, "|---" * 16 + "|"]
        for r in sorted(rows, key=lambda r: (r["bank_entries"], r["setting"] != DEFAULT)):
            label = f"**{r['setting']}**" if r["setting"] == DEFAULT else r["setting"]
            lines.append(
                f"| {label} | {r['bank_entries']} | {r['bank_share']:.2%} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_aupro']:.3f} | "
                f"{r['image_f1']:.3f} | {r['image_f1_max']:.3f} | {r['good_flagged']}/{r['num_good']} | {r['defects_missed']}/{r['num_defective']} | "
                f"{r['fit_seconds']:.1f} | {r['fit_phases'].get('coreset', 0):.1f} | {r['fit_cpu_seconds']:.0f} | {r['scoring_ms_per_image']:.0f} | {r['evaluate_cpu_ms_per_image']:.0f} | {r['model_bytes'] / 1e6:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for column, (key, title) in enumerate([("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")]):
        ax = axes[column]
        for index, (name, rows) in enumerate(summary["results"].items()):
            colour = f"C{index}"
            sized = sorted((r for r in rows if r["setting"] != DEFAULT), key=lambda r: r["bank_entries"])
            ax.plot([r["bank_entries"] for r in sized], [r[key] for r in sized], "o-", color=colour, label=f"{name} ({rows[0]['patches']} patches)", markersize=4)
            for r in rows:
                if r["setting"] == DEFAULT:
                    ax.plot(r["bank_entries"], r[key], "*", color=colour, markersize=15, markeredgecolor="black", zorder=5)
                elif r["setting"] == "every patch":
                    ax.plot(r["bank_entries"], r[key], "s", color=colour, markersize=7, markeredgecolor="black", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("memory bank entries (--bank-size)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].plot([], [], "*", color="grey", markeredgecolor="black", markersize=12, label="default: 10% coreset")
    axes[0].plot([], [], "s", color="grey", markeredgecolor="black", markersize=7, label="every patch (no coreset)")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.suptitle(f"PatchCore {summary['backbone']}, {summary['input_mode']} input: accuracy against memory bank size", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N", help="bank sizes, entries (default: %(default)s)")
    parser.add_argument("--every-patch-up-to", type=int, default=50_000, metavar="PATCHES", help="also fit with every patch where a set has at most this many (default: %(default)s)")
    parser.add_argument("--sets", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def save(summary: dict) -> None:  # after every set, so that a long run leaves what it has
        (args.out / "bank_size.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "bank_size.md").write_text(markdown(summary))
        plot(summary, args.out / "bank_size.png")

    print(markdown(run(args, save)))
