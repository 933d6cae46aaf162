"""Dirty training folders: defective images added to the good ones, with the contamination check on and off.

    .venv/bin/python benchmarks/contamination.py [--sets bottle cookies battery_weld] [--levels 0.05 0.1 0.2]
                                                 [--draws 3] [--anomalib cookies] [--data ../shared/data] [--out benchmarks/results]

The issue's protocol, with defaults (MobileNetV2, square 256 px, 10% coreset, 5% false-alarm
rate): for each set, defective images drawn from its test set (seeded by level and draw) are added
to train/good until they are ``level`` of the training images, and taken out of the test set, so
that no test image is in training. Each dirty fit is made twice, with ``contamination="auto"``
(the default) and ``"off"``, and scored on that reduced test set; the clean fit (train/good alone,
also both ways) is scored on the same reduced test set, draw by draw. Figures per fit: image
AUROC, pixel AUROC (on the model's input grid, as anomalib measures it), F1 at the calibrated
threshold, the share of good test images flagged beside the calibration's 90% interval, the
injected images set aside and the clean ones set aside, and the fit's phases.

Where ``auto`` sets nothing aside, its fit is the ``off`` fit (the same steps; the check changes
nothing), and the ``off`` figures are those of the same model: the results say so.

``--anomalib SET`` also runs anomalib 2.7's PatchCore (benchmarks/anomalib_folder.py, in
.venv-anomalib) on the clean folder and the draws at 10% of that set: its AUROCs, and its F1 at
its own threshold, which anomalib tunes on the labelled test set (no user has that threshold).

Results: ``benchmarks/results/contamination.json`` and ``contamination.md``, stamped with the
commit and command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore.backbones import find_weights_file, get_spec
from patchcore.data import list_test_samples, training_images
from patchcore.evaluate import read_mask
from patchcore.metrics import f1_at_threshold, image_auroc, pixel_auroc
from patchcore.model import PatchCore

REPO = Path(__file__).resolve().parent.parent
SETS = {"bottle": "mvtec_ad/bottle", "cookies": "cookies", "battery_weld": "battery_weld"}
BACKBONE = "mobilenet_v2"


@dataclass
class TestImage:
    path: Path
    label: int
    mask: Path | None


def injected(good: int, defects: list[TestImage], level: float, draw: int) -> list[TestImage]:
    """Defective test images that make ``level`` of a training folder of ``good`` images, seeded by level and draw."""
    count = round(level / (1 - level) * good)
    rng = np.random.default_rng([draw, round(level * 1000)])
    return [defects[i] for i in sorted(rng.choice(len(defects), count, replace=False))]


class Scores:
    """A fit's scores and input-grid maps of test images, by path, to measure on any subset."""

    def __init__(self, model: PatchCore, tests: list[TestImage]) -> None:
        self.calibration = model.calibration_
        self.by_path: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
        for test, prediction in zip(tests, model.iter_predictions([t.path for t in tests])):
            if prediction.error is not None:
                raise RuntimeError(prediction.error)
            mask = read_mask(test.mask, test.path, prediction.image_size)
            self.by_path[str(test.path)] = (prediction.score, model.layout_.mask_to_input(mask), prediction.input_map)

    def figures(self, tests: list[TestImage]) -> dict:
        labels = np.array([t.label for t in tests])
        rows = [self.by_path[str(t.path)] for t in tests]
        scores = np.array([r[0] for r in rows])
        flagged = scores >= self.calibration.image_threshold
        good = labels == 0
        low, high = self.calibration.false_alarm_interval
        share = float(flagged[good].mean())
        return {
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc([r[1] for r in rows], [r[2] for r in rows]),
            "image_f1": f1_at_threshold(labels, scores, self.calibration.image_threshold),
            "good_flagged": share, "good_flagged_count": int(flagged[good].sum()), "num_good": int(good.sum()),
            "false_alarm_interval": [low, high], "good_flagged_within_interval": bool(low <= share <= high) or _binomially_within(int(flagged[good].sum()), int(good.sum()), low, high),
            "defects_missed": int((~flagged[~good]).sum()), "num_defective": int((~good).sum()),
            "image_threshold": self.calibration.image_threshold,
        }


def _binomially_within(flagged: int, count: int, low: float, high: float) -> bool:
    """Whether ``flagged`` of ``count`` good images is a count the interval's rates would give
    (a few test images cannot land inside a narrow interval exactly: with 14 good images the
    shares are multiples of 7%)."""
    from scipy.stats import binom

    return bool(binom.cdf(flagged, count, high) >= 0.05 and binom.sf(flagged - 1, count, low) >= 0.05)


def fit(paths: list[Path], contamination: str) -> tuple[PatchCore, float]:
    model = PatchCore(BACKBONE, contamination=contamination, device="cpu", progress=False)
    started = time.perf_counter()
    model.fit(paths)
    return model, time.perf_counter() - started


def fit_summary(model: PatchCore, seconds: float, injected_paths: set[str]) -> dict:
    aside = set(model.contamination_.set_aside_paths)
    phases = {phase: round(value, 2) for phase, value in model.fit_seconds_.items()}
    return {
        "fit_seconds": round(seconds, 2), "phases": phases,
        "contamination_share_of_fit": round(model.fit_seconds_.get("contamination", 0.0) / seconds, 4),
        "set_aside": len(aside), "injected_set_aside": len(aside & injected_paths), "clean_set_aside": len(aside - injected_paths),
        "num_fit_images": model.num_fit_images_,
    }


def run_set(name: str, data: Path, levels: list[float], draws: int, log) -> dict:
    root = data / SETS[name]
    good = training_images(root)
    tests = [TestImage(s.path, s.label, s.mask_path) for s in list_test_samples(root)]
    defects = [t for t in tests if t.label == 1]
    result: dict = {"set": SETS[name], "train_good": len(good), "test_good": sum(t.label == 0 for t in tests), "test_defective": len(defects), "clean": {}, "dirty": []}
    clean_scores = {}
    for mode in ("auto", "off"):
        if mode == "off" and result["clean"]["auto"]["set_aside"] == 0:
            result["clean"]["off"] = {"same_fit_as": "auto", **result["clean"]["auto"]}
            clean_scores["off"] = clean_scores["auto"]
            continue
        model, seconds = fit(good, mode)
        clean_scores[mode] = Scores(model, tests)
        result["clean"][mode] = {**fit_summary(model, seconds, set()), "full_test": clean_scores[mode].figures(tests)}
        log(f"{name} clean {mode}: {seconds:.1f} s, set aside {result['clean'][mode]['set_aside']}, {_line(result['clean'][mode]['full_test'])}")
    for level in levels:
        for draw in range(1, draws + 1):
            added = injected(len(good), defects, level, draw)
            added_paths = {str(t.path) for t in added}
            remaining = [t for t in tests if str(t.path) not in added_paths]
            entry = {"level": level, "draw": draw, "injected": len(added), "injected_paths": sorted(added_paths), "test_images": len(remaining),
                     "clean": {mode: clean_scores[mode].figures(remaining) for mode in ("auto", "off")}}
            for mode in ("auto", "off"):
                if mode == "off" and entry["auto"]["set_aside"] == 0:
                    entry["off"] = {"same_fit_as": "auto", **entry["auto"]}
                    continue
                model, seconds = fit(good + [t.path for t in added], mode)
                entry[mode] = {**fit_summary(model, seconds, added_paths), **Scores(model, remaining).figures(remaining)}
                log(f"{name} {level:.0%} draw {draw} {mode}: {len(added)} added, set aside {entry[mode]['injected_set_aside']} of them and "
                    f"{entry[mode]['clean_set_aside']} clean; {_line(entry[mode])} (clean fit: {_line(entry['clean']['auto'])})")
            result["dirty"].append(entry)
    return result


def _line(figures: dict) -> str:
    return (f"image AUROC {figures['image_auroc']:.3f}, pixel AUROC {figures['pixel_auroc']:.3f}, F1 {figures['image_f1']:.3f}, "
            f"good flagged {figures['good_flagged']:.1%}")


def checks(results: dict) -> dict:
    """The issue's bars, each with the figures it was judged on."""
    out = {}
    for name, result in results.items():
        at10 = [e for e in result["dirty"] if abs(e["level"] - 0.1) < 1e-9]
        out[name] = {
            "f1_within_0.03_at_10%": all(abs(e["auto"]["image_f1"] - e["clean"]["auto"]["image_f1"]) <= 0.03 for e in at10),
            "image_auroc_within_0.005_at_10%": all(abs(e["auto"]["image_auroc"] - e["clean"]["auto"]["image_auroc"]) <= 0.005 for e in at10),
            "good_flagged_within_interval_at_10%": all(e["auto"]["good_flagged_within_interval"] for e in at10),
            "injected_set_aside_at_10%": _share(sum(e["auto"]["injected_set_aside"] for e in at10), sum(e["injected"] for e in at10)),
            "clean_set_aside_in_dirty_at_10%": _share(sum(e["auto"]["clean_set_aside"] for e in at10), len(at10) * result["train_good"]),
            "clean_set_aside_in_dirty_most": max((e["auto"]["clean_set_aside"] / result["train_good"] for e in result["dirty"]), default=0.0),
            "clean_folder_set_aside": _share(result["clean"]["auto"]["set_aside"], result["train_good"]),
            "clean_folder_largest_change_vs_off": max(
                abs(result["clean"]["auto"]["full_test"][key] - result["clean"]["off"]["full_test"][key]) for key in ("image_auroc", "pixel_auroc", "image_f1")
            ),
        }
    return out


def _share(part: int, whole: int) -> dict:
    return {"count": part, "of": whole, "share": part / whole if whole else None}


def run_anomalib(name: str, data: Path, draws: int, log) -> list[dict]:
    """anomalib 2.7 on the clean folder of ``name`` and on its draws at 10%, the same images as ours."""
    python = REPO / ".venv-anomalib" / "bin" / "python"
    if not python.exists():
        raise SystemExit("anomalib's venv is missing: run `.venv/bin/python benchmarks/speed.py --anomalib` once, or make .venv-anomalib with anomalib==2.7.0")
    root = data / SETS[name]
    good = training_images(root)
    tests = [TestImage(s.path, s.label, s.mask_path) for s in list_test_samples(root)]
    defects = [t for t in tests if t.label == 1]
    weights = find_weights_file(get_spec(BACKBONE), download=False)
    runs = []
    for draw in [0, *range(1, draws + 1)]:
        added = injected(len(good), defects, 0.1, draw) if draw else []
        added_paths = {str(t.path) for t in added}
        remaining = [t for t in tests if str(t.path) not in added_paths]
        spec = {"name": f"{name}-{'clean' if not draw else f'10%-draw{draw}'}", "train": [str(p) for p in good] + sorted(added_paths),
                "test": [{"path": str(t.path), "label": t.label, "mask": None if t.mask is None else str(t.mask)} for t in remaining]}
        with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
            json.dump(spec, handle)
            handle.flush()
            done = subprocess.run([str(python), str(REPO / "benchmarks" / "anomalib_folder.py"), "--spec", handle.name, "--weights", str(weights)],
                                  capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"anomalib run failed:\n{done.stderr[-4000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append({"draw": draw, "level": 0.1 if draw else 0.0, **figures})
        log(f"anomalib {spec['name']}: image AUROC {figures['image_auroc']:.3f}, pixel AUROC {figures['pixel_auroc']:.3f}, "
            f"F1 at its own (test-tuned) threshold {figures['image_f1_at_own_threshold']:.3f}, fit {figures['fit_seconds']:.0f} s")
    return runs


def report(results: dict) -> str:
    lines = [
        "# Dirty training folders: the contamination check on and off", "",
        f"{headline(results)}; {describe(results.get('machine'))}.", "",
        "Per set and level, the mean over the draws (each draw's own figures in the JSON). Clean: the fit on train/good alone, "
        "scored on the same reduced test sets. Pixel AUROC on the model's input grid.", "",
        "| set | injected | fit | image AUROC | pixel AUROC | calibrated F1 | good flagged | injected set aside | clean set aside |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results["sets"].items():
        clean = result["clean"]["auto"]
        lines.append(f"| {name} | none | check on | {clean['full_test']['image_auroc']:.3f} | {clean['full_test']['pixel_auroc']:.3f} | "
                     f"{clean['full_test']['image_f1']:.3f} | {clean['full_test']['good_flagged']:.1%} | - | {clean['set_aside']} of {result['train_good']} |")
        off = result["clean"]["off"]
        lines.append(f"| {name} | none | check off | {off['full_test']['image_auroc']:.3f} | {off['full_test']['pixel_auroc']:.3f} | "
                     f"{off['full_test']['image_f1']:.3f} | {off['full_test']['good_flagged']:.1%} | - | - |")
        for level in sorted({e["level"] for e in result["dirty"]}):
            entries = [e for e in result["dirty"] if e["level"] == level]
            injected_total = sum(e["injected"] for e in entries)
            for label, key in (("clean fit", None), ("check on", "auto"), ("check off", "off")):
                rows = [e["clean"]["auto"] if key is None else e[key] for e in entries]
                mean = {k: float(np.mean([r[k] for r in rows])) for k in ("image_auroc", "pixel_auroc", "image_f1", "good_flagged")}
                found = "-" if key != "auto" else f"{sum(r['injected_set_aside'] for r in rows)} of {injected_total}"
                clean_aside = "-" if key != "auto" else f"{sum(r['clean_set_aside'] for r in rows)} of {len(rows) * result['train_good']}"
                lines.append(f"| {name} | {level:.0%} ({injected_total // len(entries)} images) | {label} | {mean['image_auroc']:.3f} | {mean['pixel_auroc']:.3f} | "
                             f"{mean['image_f1']:.3f} | {mean['good_flagged']:.1%} | {found} | {clean_aside} |")
    lines += ["", "## The issue's bars", "", "```", json.dumps(results["checks"], indent=2), "```"]
    if results.get("fit_time"):
        lines += ["", "## Added fit time", "", "```", json.dumps(results["fit_time"], indent=2), "```"]
    if results.get("anomalib"):
        lines += ["", f"## anomalib 2.7 on {results['anomalib']['set']} (F1 at anomalib's own threshold, tuned on the labelled test set)", "",
                  "| run | image AUROC | pixel AUROC | F1 at its own threshold | fit s |", "|---|---|---|---|---|"]
        for run in results["anomalib"]["runs"]:
            lines.append(f"| {run['name']} | {run['image_auroc']:.3f} | {run['pixel_auroc']:.3f} | {run['image_f1_at_own_threshold']:.3f} | {run['fit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def fit_time(results: dict) -> dict:
    """The check's share of the fit on bottle: on the clean folder (the check alone) and on dirty ones (a second coreset and calibration)."""
    if "bottle" not in results:
        return {}
    bottle = results["bottle"]
    dirty = [e["auto"] for e in bottle["dirty"] if e["auto"]["set_aside"]]
    return {
        "clean_folder": {"contamination_seconds": bottle["clean"]["auto"]["phases"].get("contamination"), "fit_seconds": bottle["clean"]["auto"]["fit_seconds"],
                         "share": bottle["clean"]["auto"]["contamination_share_of_fit"]},
        "dirty_folders_with_images_set_aside": {"fits": len(dirty), "mean_share": float(np.mean([d["contamination_share_of_fit"] for d in dirty])) if dirty else None},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS), help="(none: only --anomalib)")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--anomalib", choices=list(SETS), help="also run anomalib 2.7 on this set's clean folder and its draws at 10%%")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="contamination")
    args = parser.parse_args()
    fields = provenance()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    sets = {}

    def write(complete: bool, anomalib: dict | None = None) -> None:
        results = stamped(fields, {"complete": complete, "backbone": BACKBONE, "levels": args.levels, "draws": args.draws, "sets": sets,
                                   "checks": checks(sets), "fit_time": fit_time(sets), "anomalib": anomalib})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(report(results))

    for name in args.sets:
        sets[name] = run_set(name, args.data, args.levels, args.draws, log)
        write(False)
    anomalib = None
    if args.anomalib:
        anomalib = {"set": args.anomalib, "runs": run_anomalib(args.anomalib, args.data, args.draws, log)}
    write(True, anomalib)
    print(report(json.loads((args.out / f"{args.name}.json").read_text())))


if __name__ == "__main__":
    sys.exit(main())
