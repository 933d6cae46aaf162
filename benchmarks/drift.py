"""Drift watch on a real stream: false alarms on an unchanged line, and how soon it sees a change.

    .venv/bin/python benchmarks/drift.py [--decisions 20000] [--seed 1] [--starts 5] [--data ../shared/data] [--out benchmarks/results]

The issue's protocol: a MobileNetV2 model is fitted on a seeded half of MVTec AD bottle's
train/good images (``--split-seed``); the other half and test/good make the stream. Each decision
is one of those images, drawn at random, under a fresh nuisance augmentation (a shift of up to
``SHIFT_PX`` pixels each way, edges replicated, and Gaussian noise of ``NOISE_SIGMA`` grey levels),
and scored for real by the model, in memory (``data.prepare_image`` then ``predict_loaded``: the
server's path). Every decision goes through a :class:`patchcore.record.drift.DriftWatch` and the
watch's alarm is read after every decision, so each window position counts as one test.

- Null: ``--decisions`` decisions of the unchanged stream; the figure is alarmed window positions
  per 10,000 decisions (and alarm episodes: runs of consecutive alarmed positions).
- Shifts (``SHIFTS``): from ``--starts`` seeded positions of the null stream, the watch holds the
  window of unshifted decisions before that position, then the same stream continues under the
  shift until the first alarm (at most ``--max-images``); the figure is images until the alarm.

Results: ``benchmarks/results/drift.json`` and ``drift.md``, stamped with the commit and command.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore.data import prepare_image
from patchcore.intake import read_image, read_image_bytes
from patchcore.model import PatchCore
from patchcore.record.drift import DriftWatch

REPO = Path(__file__).resolve().parents[1]
#: nuisance augmentation of every decision, on the 900-px image: an integer shift of up to SHIFT_PX
#: pixels each way and Gaussian noise (grey levels), cut from a field NOISE_MARGIN px larger
SHIFT_PX = 4
NOISE_SIGMA = 2.0
NOISE_MARGIN = 64
BLUR_RADIUS = 3
JPEG_QUALITY = 30
#: the plausible changes of a line, made to the 900-px image before it is resized and augmented
SHIFTS = {
    "brightness -20%": "a dimmer lamp: every pixel value times 0.8",
    f"blur (Gaussian, radius {BLUR_RADIUS} px)": f"a lens slightly out of focus: Pillow GaussianBlur({BLUR_RADIUS}) on the 900-px image (under 1 px at the model's 256-px input)",
    f"JPEG quality {JPEG_QUALITY}": f"a camera switched to heavy compression: the 900-px image re-encoded by Pillow at quality {JPEG_QUALITY}",
}


def change(rgb: np.ndarray, shift: str) -> np.ndarray:
    """The 900-px scene as the changed line would take it (before the camera's noise)."""
    if shift.startswith("brightness"):
        return np.clip(rgb.astype(np.float32) * 0.8, 0, 255).round().astype(np.uint8)
    if shift.startswith("blur"):
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(BLUR_RADIUS)))
    return rgb  # JPEG: after the noise (the camera encodes what its sensor gave)


def jpeg(rgb: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return read_image_bytes(buffer.getvalue(), "shifted.jpg")


class Pool:
    """The stream's good images at full resolution, and the nuisance that makes each decision new.

    Each decision: one image at random, moved by up to SHIFT_PX pixels each way (edges replicated),
    plus Gaussian noise of NOISE_SIGMA grey levels, rounded. The noise is cut at a random offset
    from one larger field drawn once (2.4 million fresh normal values per decision would cost as
    much as scoring it on this machine); the model then resizes to its input as for any upload.
    """

    def __init__(self, paths: list[Path], seed: int) -> None:
        self.full = [read_image(path) for path in paths]
        height, width = self.full[0].shape[:2]
        rng = np.random.default_rng([seed, 99])
        self.noise = np.round(rng.standard_normal((height + NOISE_MARGIN, width + NOISE_MARGIN, 3), dtype=np.float32) * NOISE_SIGMA).astype(np.int16)

    def __len__(self) -> int:
        return len(self.full)

    def decision_image(self, rng: np.random.Generator, shift: str | None) -> np.ndarray:
        rgb = self.full[int(rng.integers(len(self.full)))]
        if shift is not None:
            rgb = change(rgb, shift)
        height, width = rgb.shape[:2]
        dy, dx = (int(v) for v in rng.integers(-SHIFT_PX, SHIFT_PX + 1, size=2))
        padded = np.pad(rgb, ((SHIFT_PX, SHIFT_PX), (SHIFT_PX, SHIFT_PX), (0, 0)), mode="edge")
        moved = padded[SHIFT_PX + dy : SHIFT_PX + dy + height, SHIFT_PX + dx : SHIFT_PX + dx + width]
        oy, ox = (int(v) for v in rng.integers(0, NOISE_MARGIN + 1, size=2))
        noisy = np.clip(moved.astype(np.int16) + self.noise[oy : oy + height, ox : ox + width], 0, 255).astype(np.uint8)
        return jpeg(noisy) if shift is not None and shift.startswith("JPEG") else noisy


class Scorer:
    """Scores generated images in batches through the model's in-memory path, and counts them."""

    def __init__(self, model: PatchCore, batch: int) -> None:
        self.model, self.batch, self.count, self.seconds = model, batch, 0, 0.0

    def stream(self, pool: "Pool", rng: np.random.Generator, shift: str | None, total: int):
        """Yield (score, is_anomalous) for ``total`` decisions drawn from ``pool``."""
        done = 0
        while done < total:
            size = min(self.batch, total - done)
            started = time.perf_counter()
            loaded = [prepare_image(f"d{done + i}.png", pool.decision_image(rng, shift), self.model.layout_) for i in range(size)]
            results = [(p.score, p.is_anomalous) for p in self.model.predict_loaded(loaded)]
            self.seconds += time.perf_counter() - started
            self.count += size
            done += size
            yield from results


def fit_and_pool(data: Path, backbone: str, split_seed: int, model_path: Path | None) -> tuple[PatchCore, Pool, dict]:
    root = data / "mvtec_ad" / "bottle"
    train = sorted((root / "train" / "good").glob("*.png"))
    order = np.random.default_rng(split_seed).permutation(len(train))
    fit_paths = [train[i] for i in sorted(order[: len(train) // 2])]
    stream_paths = [train[i] for i in sorted(order[len(train) // 2 :])] + sorted((root / "test" / "good").glob("*.png"))
    if model_path is not None and model_path.is_file():
        model = PatchCore.load(model_path)
    else:
        model = PatchCore(backbone, progress=False, device="cpu").fit(fit_paths)
        if model_path is not None:
            model.save(model_path)
    pool = Pool(stream_paths, split_seed)
    info = {"fit_images": len(fit_paths), "stream_images": len(stream_paths), "split_seed": split_seed}
    return model, pool, info


def episodes(alarms: np.ndarray) -> int:
    """Runs of consecutive alarmed positions."""
    alarms = np.asarray(alarms, dtype=bool)
    return int(np.count_nonzero(alarms[1:] & ~alarms[:-1]) + (1 if alarms.size and alarms[0] else 0))


def make_watch(calibration, window: int | None, recent=()) -> DriftWatch:
    options = {} if window is None else {"window": window}
    return DriftWatch.from_decisions(calibration, recent, **options)


class NullRun:
    """The unchanged stream, scored in steps (the shifts start from its windows), tested at every decision."""

    def __init__(self, scorer: Scorer, pool: Pool, calibration, seed: int, window: int | None) -> None:
        self.scorer, self.pool, self.calibration = scorer, pool, calibration
        self.rng = np.random.default_rng([seed, 0])
        self.watch = make_watch(calibration, window)
        self.scores, self.flags, self.alarms, self.rate_alarms, self.shift_alarms = [], [], [], [], []
        self.rate_p, self.shift_p = [], []
        self.seconds = 0.0

    def advance(self, decisions: int, total: int) -> None:
        started = time.perf_counter()
        for score, flag in self.scorer.stream(self.pool, self.rng, None, decisions):
            status = self.watch.add(score, flag)
            self.scores.append(score)
            self.flags.append(flag)
            self.alarms.append(status.alarm)
            if status.flag_rate_p_value is not None:
                self.rate_alarms.append(status.flag_rate_p_value < self.watch.rate_level)
                self.shift_alarms.append(status.score_shift_p_value < self.watch.shift_level)
                self.rate_p.append(status.flag_rate_p_value)
                self.shift_p.append(status.score_shift_p_value)
            if len(self.scores) % 250 == 0:
                elapsed = self.seconds + time.perf_counter() - started
                print(f"null {len(self.scores)}/{total}: {sum(self.alarms)} alarmed positions, flag rate {np.mean(self.flags):.2%}, "
                      f"{len(self.scores) / elapsed:.1f} decisions/s", flush=True)
        self.seconds += time.perf_counter() - started

    def summary(self) -> dict:
        alarms = np.array(self.alarms, dtype=bool)
        decisions = len(self.scores)
        return {
            "decisions": decisions,
            "window": self.watch.window,
            "tested_positions": len(self.rate_p),
            "alarmed_positions": int(alarms.sum()),
            "alarmed_positions_per_10000": float(alarms.sum() / max(decisions, 1) * 10_000),
            "alarm_episodes": episodes(alarms),
            "rate_test_alarmed_positions": int(np.sum(self.rate_alarms)),
            "shift_test_alarmed_positions": int(np.sum(self.shift_alarms)),
            "lowest_flag_rate_p_value": float(min(self.rate_p, default=1.0)),
            "lowest_score_shift_p_value": float(min(self.shift_p, default=1.0)),
            "flag_rate": float(np.mean(self.flags)),
            "expected_flag_rate": self.calibration.expected_false_alarm_rate,
            "interval": list(self.calibration.false_alarm_interval),
            "score_mean": float(np.mean(self.scores)),
            "good_score_mean": float(np.mean(self.calibration.good_scores)),
            # share of (stream, good) pairs where the stream's image scores higher, over the whole stream (0.5: same law)
            "score_shift_whole_stream": float(np.mean(np.searchsorted(np.sort(self.calibration.good_scores), self.scores)) / len(self.calibration.good_scores)),
        }


def run_shift(scorer: Scorer, pool, calibration, shift: str, null_scores, null_flags, starts: int, seed: int, max_images: int, window: int | None):
    """Images until the first alarm from ``starts`` positions, each after a window of unshifted decisions."""
    w = make_watch(calibration, window).window
    positions = np.random.default_rng([seed, 1]).choice(np.arange(w, len(null_scores) + 1), size=starts, replace=len(null_scores) + 1 - w < starts)
    runs = []
    for start, position in enumerate(positions):
        recent = list(zip(null_scores[position - w : position].tolist(), null_flags[position - w : position].tolist()))
        watch = make_watch(calibration, window, recent)
        before = watch.status()
        rng = np.random.default_rng([seed, 2, list(SHIFTS).index(shift), start])
        until, status, flagged = None, before, 0
        stream = scorer.stream(pool, rng, shift, max_images)
        for count, (score, flag) in enumerate(stream, start=1):
            status = watch.add(score, flag)
            flagged += flag
            if status.alarm:
                until = count
                stream.close()  # stop scoring: the alarm is what was measured
                break
        runs.append({
            "start_position": int(position), "alarm_before_shift": before.alarm, "images_to_alarm": until,
            "flagged_before_alarm": int(flagged), "reason": status.reason,
        })
        print(f"{shift} start {start}: alarm after {until} images ({status.reason})", flush=True)
    found = [r["images_to_alarm"] for r in runs if r["images_to_alarm"] is not None]
    return {
        "description": SHIFTS[shift],
        "starts": starts,
        "max_images": max_images,
        "detected": len(found),
        "median_images_to_alarm": float(np.median(found)) if found else None,
        "max_images_to_alarm": (max(found) if len(found) == len(runs) else None),
        "runs": runs,
    }


def report(results: dict) -> str:
    null = results["null"]
    lines = [
        "# Drift watch: false alarms on an unchanged stream, images until a change is seen",
        "",
        headline(results),
        "",
        f"Machine: {describe(results['machine'])}",
        "",
        f"Model: {results['backbone']} fitted on {results['fit_images']} of bottle's train/good images (split seed "
        f"{results['split_seed']}); stream: the other {results['stream_images']} good images drawn at random, each under a fresh shift of up to "
        f"{results['nuisance']['shift_px']} px and noise of sigma {results['nuisance']['noise_sigma']} grey levels. Window {null['window']} decisions; "
        f"levels: flag rate {results['levels']['rate_level']:g}, score shift {results['levels']['shift_level']:g}.",
        "",
        "## Unchanged stream",
        "",
        "| decisions | alarmed window positions | per 10,000 | alarm episodes | flag rate | expected (90% interval) | lowest p (rate, shift) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {null['decisions']} | {null['alarmed_positions']} | {null['alarmed_positions_per_10000']:.2f} | {null['alarm_episodes']} | "
        f"{null['flag_rate']:.2%} | {null['expected_flag_rate']:.2%} ({null['interval'][0]:.1%}-{null['interval'][1]:.1%}) | "
        f"{null['lowest_flag_rate_p_value']:.2g}, {null['lowest_score_shift_p_value']:.2g} |",
        "",
        "## Shifts (images from the first shifted decision to the alarm)",
        "",
        "| shift | what | detected | median images | most images |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in results["shifts"].items():
        most = r["max_images_to_alarm"] if r["max_images_to_alarm"] is not None else f"> {r['max_images']}"
        median = f"{r['median_images_to_alarm']:g}" if r["median_images_to_alarm"] is not None else "-"
        lines.append(f"| {name} | {r['description']} | {r['detected']}/{r['starts']} | {median} | {most} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1, help="seed of the stream (draws, augmentation, start positions)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the fit/stream split of train/good")
    parser.add_argument("--starts", type=int, default=5, help="shifted streams per shift, from seeded positions")
    parser.add_argument("--start-pool", type=int, default=1000, help="the shifts start in the first this many null decisions")
    parser.add_argument("--max-images", type=int, default=300, help="shifted images scored before giving up")
    parser.add_argument("--window", type=int, default=None, help="window size (default: DriftWatch's)")
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--model", type=Path, default=None, help="reuse (or save) the fitted model here")
    parser.add_argument("--dump", type=Path, default=None, help="write the null stream's scores and flags here (.npz)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="drift")
    args = parser.parse_args()
    fields = provenance()
    model, pool, info = fit_and_pool(args.data, args.backbone, args.split_seed, args.model)
    calibration = model.calibration_
    print(calibration.describe(), flush=True)
    scorer = Scorer(model, args.batch)
    null = NullRun(scorer, pool, calibration, args.seed, args.window)
    shifts: dict = {}

    def write(complete: bool) -> None:
        results = stamped(fields, {
            "complete": complete,
            "backbone": args.backbone, "set": "mvtec_ad/bottle", **info, "seed": args.seed,
            "nuisance": {"shift_px": SHIFT_PX, "noise_sigma": NOISE_SIGMA, "at": "the 900-px image"},
            "levels": {"window": null.watch.window, "rate_level": null.watch.rate_level, "shift_level": null.watch.shift_level,
                       "min_decisions": null.watch.min_decisions, "test": null.watch.describe()},
            "calibration": calibration.describe(),
            "scoring": {"images": scorer.count, "seconds": round(scorer.seconds, 1), "images_per_second": round(scorer.count / max(scorer.seconds, 1e-9), 1)},
            "null": null.summary(), "shifts": shifts,
        })
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(report(results))
        if args.dump is not None:
            np.savez(args.dump, scores=np.array(null.scores), flags=np.array(null.flags), good_scores=np.array(calibration.good_scores))

    # The shifts start from windows of the first --start-pool null decisions, so that their figures
    # come early; then the null stream goes on to --decisions, written every 1,000.
    first = min(args.start_pool, args.decisions)
    null.advance(first, args.decisions)
    for shift in args.shifts:
        shifts[shift] = run_shift(scorer, pool, calibration, shift, np.array(null.scores), np.array(null.flags), args.starts, args.seed, args.max_images, args.window)
        write(False)
    while len(null.scores) < args.decisions:
        null.advance(min(1000, args.decisions - len(null.scores)), args.decisions)
        write(len(null.scores) >= args.decisions)
    write(True)
    print(report(json.loads((args.out / f"{args.name}.json").read_text())))


if __name__ == "__main__":
    sys.exit(main())
