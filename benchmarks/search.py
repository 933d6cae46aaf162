"""Exact nearest-neighbour search by lower bounds (k-means cells for narrow features, principal
components for wide ones) against the full scan, per test image, beside the backbone:
MobileNetV2 and Wide ResNet-50 on MVTec AD bottle.

    .venv/bin/python benchmarks/search.py [--backbones mobilenet_v2 wide_resnet50_2] [--wrn-weights FILE]
                                          [--data ../shared/data] [--out benchmarks/results]

For each backbone, the memory bank is made as a fit makes it (features of bottle's 209
train/good images, 10% greedy coreset; no calibration, which the search does not need), and
each of bottle's 83 test images is scored as ``predict`` scores it, with the model's exact
index two ways, in one run, alternating image by image (the first of each pair of images
with the bounded index first, the second with the full scan first):

- bounded: ``NearestNeighbourIndex(bank)``, the default (cell bounds below 512 dimensions,
  principal bounds from 512 on); its queries bounded and bank entries measured in full are counted;
- full scan: ``NearestNeighbourIndex(bank, bounds=False)``, faiss's brute-force ``knn``;
- for narrow features, also the principal bounds forced on them (a quarter of their dimensions).

Per image it times the backbone (``_features``: network, 3x3 averaging, joining), and for each
index the search plus eq. 7 (``_score_features`` without the maps: the nearest entry of every
patch, then eq. 7's neighbourhood search for the top patch), and checks the two agree: every
patch's nearest distance (relative difference), the nearest entry, and the image score.

Wide ResNet-50's ImageNet weights cannot be had on this project's machine: without
``--wrn-weights`` it runs with seeded random weights (torch.manual_seed(0)), so its times and
bank size hold but its feature distribution, which sets how tight the bounds are, is not
that of the pretrained network. Before the test images, the first ``--left-out-images`` (20)
training images are scored leave-one-out, as a fit's calibration scores them, with each index
(timed per image, alternating). Results go to search.json and search.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchcore import PatchCore
from patchcore.data import training_images
from patchcore.model import own_runs
from patchcore.search import LowerBoundIndex, NearestNeighbourIndex, leading_components

REPO = Path(__file__).resolve().parents[1]


def model_for(backbone: str, weights: Path | None, scratch: Path) -> PatchCore:
    if backbone != "mobilenet_v2" and weights is None:
        from torchvision import models

        torch.manual_seed(0)
        weights = scratch / f"{backbone}-random-seed0.pth"
        torch.save(getattr(models, backbone)().state_dict(), weights)
    return PatchCore(backbone, progress=False, weights=None if weights is None else str(weights))


def bank_and_left_out(model: PatchCore, images: list[Path], left_out_images: int) -> tuple[torch.Tensor, dict]:
    """The memory bank a fit would make (features, 10% coreset), and the seconds of the first
    ``left_out_images`` training images' leave-one-out scoring (a fit's calibration) with the
    bounded and the full-scan index, alternating image by image, and the largest relative
    difference of their scores."""
    sizes = model._begin_fit(images)
    patches = model._extract_patches(images, "features", sizes)
    try:
        picks = model._select_coreset(patches.points, model._bank_entries(len(patches.points)))
        bank = patches.gather(picks).float()
        runs = own_runs(picks.numpy(), patches.starts)
        indexes = {"bounded": NearestNeighbourIndex(bank), "full": NearestNeighbourIndex(bank, bounds=False)}
        indexes["bounded"].search(bank[:1], k=1)  # builds the bounds and compiles the scan before the timing
        seconds = {"bounded": [], "full": []}
        scores: dict[str, list[float]] = {"bounded": [], "full": []}
        for image in range(min(left_out_images, len(patches.sources))):
            for name in ("bounded", "full") if image % 2 == 0 else ("full", "bounded"):
                model.index_ = indexes[name]
                started = time.perf_counter()
                score, *_ = model._left_out(patches, image, (int(runs[image]), int(runs[image + 1])))
                seconds[name].append(time.perf_counter() - started)
                scores[name].append(score)
        gap = max(abs(a - b) / abs(b) for a, b in zip(scores["bounded"], scores["full"]))
        left_out = {"images": len(seconds["full"]), "median_ms": {name: 1000 * statistics.median(values) for name, values in seconds.items()},
                    "worst_relative_score_difference": gap}
        return bank, left_out
    finally:
        patches.close()


def forced_bounds(bank: torch.Tensor) -> NearestNeighbourIndex | None:
    """For features narrower than the principal bounds' threshold (searched by cell bounds), an
    index that bounds them by principal components anyway (a quarter of their dimensions), to
    show what it would cost; None for wide ones."""
    if leading_components(bank.shape[1]) > 0:
        return None
    index = NearestNeighbourIndex(bank)
    index._bounded, index._bounds = True, LowerBoundIndex(index.bank, bank.shape[1] // 4)
    return index


def scored(model: PatchCore, index: NearestNeighbourIndex, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The library's scoring of one image's features with ``index`` (search, eq. 7, maps): (image score, seconds)."""
    model.index_ = index
    started = time.perf_counter()
    scores, _ = model._score_features(features, tuple(image.shape[-2:]))
    return scores, time.perf_counter() - started


def run(backbone: str, weights: Path | None, data: Path, scratch: Path, check_every: int, left_out_images: int) -> dict:
    bottle = data / "mvtec_ad" / "bottle"
    model = model_for(backbone, weights, scratch)
    started = time.perf_counter()
    bank, left_out = bank_and_left_out(model, training_images(bottle), left_out_images)
    bank_seconds = time.perf_counter() - started
    indexes = {"bounded": NearestNeighbourIndex(bank), "full": NearestNeighbourIndex(bank, bounds=False)}
    forced = forced_bounds(bank)
    if forced is not None:
        indexes["forced"] = forced
    started = time.perf_counter()
    for index in indexes.values():
        index.search(bank[:1], k=1)  # builds the bounds (principal axes) and compiles the scan
    build_seconds = time.perf_counter() - started
    tests = sorted((bottle / "test").glob("*/*.png"))
    times: dict[str, list[float]] = {"backbone": [], **{name: [] for name in indexes}}
    worst = {name: 0.0 for name in indexes}
    true_entries = {name: 0 for name in indexes}
    checked, score_gap, image_number = 0, 0.0, 0
    with torch.inference_mode():
        for batch, _ in model._input_batches(tests):
            for image in batch.split(1):
                begun = time.perf_counter()
                features = model._features(image)
                times["backbone"].append(time.perf_counter() - begun)
                order = list(indexes) if image_number % 2 == 0 else list(indexes)[::-1]
                scores = {}
                for name in order:
                    scores[name], seconds = scored(model, indexes[name], image, features)
                    times[name].append(seconds)
                score_gap = max(score_gap, float((scores["bounded"] - scores["full"]).abs().max() / scores["full"].abs().max()))
                if image_number % check_every == 0:
                    queries = features.reshape(-1, bank.shape[1])
                    exact = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
                    true_distances, true_entries_now = exact.min(dim=1)
                    for name, index in indexes.items():
                        distances, entries = index.search(queries, k=1)
                        gap = (distances[:, 0].double() - true_distances).abs() / true_distances.clamp(min=1e-12)
                        worst[name] = max(worst[name], float(gap.max()))
                        true_entries[name] += int((entries[:, 0] == true_entries_now).sum())
                    checked += len(true_distances)
                image_number += 1
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {
        "backbone": backbone, "weights": "ImageNet" if backbone == "mobilenet_v2" or weights else "random (seed 0)",
        "bank": list(bank.shape), "leading_components": leading_components(bank.shape[1]), "test_images": len(times["backbone"]),
        "bank_seconds": bank_seconds, "bounds_build_seconds": build_seconds,
        "median_ms": ms, "search_vs_backbone": ms["bounded"] / ms["backbone"], "full_over_bounded": ms["full"] / ms["bounded"],
        "entries_measured_per_query": {name: index.entries_measured / index.queries_bounded for name, index in indexes.items() if index.queries_bounded},
        "patches_checked_against_float64": checked,
        "true_nearest_entry_share": {name: count / checked for name, count in true_entries.items()},
        "worst_relative_distance_error": worst, "worst_relative_score_difference": score_gap, "leave_one_out": left_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "wide_resnet50_2"])
    parser.add_argument("--wrn-weights", type=Path, help="Wide ResNet-50 weights file (default: seeded random weights)")
    parser.add_argument("--left-out-images", type=int, default=20, help="training images scored leave-one-out with each index (a fit's calibration)")
    parser.add_argument("--check-every", type=int, default=10, help="check every n-th test image against float64 brute force")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for backbone in args.backbones:
            result = run(backbone, args.wrn_weights if backbone != "mobilenet_v2" else None, args.data, Path(scratch), args.check_every, args.left_out_images)
            runs.append(result)
            ms = result["median_ms"]
            forced = f", principal bounds forced {ms['forced']:.1f} ms" if "forced" in ms else ""
            print(f"{backbone} ({result['weights']} weights), bank {result['bank'][0]:,} x {result['bank'][1]}: backbone {ms['backbone']:.1f} ms, "
                  f"scoring: default {ms['bounded']:.1f} ms, full scan {ms['full']:.1f} ms ({result['full_over_bounded']:.2f}x){forced}; "
                  f"entries measured per query {result['entries_measured_per_query']}; against float64 brute force, worst distance error "
                  f"bounded {result['worst_relative_distance_error']['bounded']:.1e}, full scan {result['worst_relative_distance_error']['full']:.1e}; "
                  f"true nearest entry bounded {result['true_nearest_entry_share']['bounded']:.4%}, full scan {result['true_nearest_entry_share']['full']:.4%}", flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps({"machine": machine, "command": command, "runs": runs}, indent=2) + "\n")
    lines = [f"Machine: {machine}. Command: `{command}`.", "",
             "Per test image of MVTec AD bottle (83, 256 px, 1,024 patches each), medians; the bank from bottle's 209 training images at a 10% coreset. "
             "Scoring: the library's `_score_features` (every patch's nearest entry, eq. 7, the maps), as `predict` runs it. "
             "Default: the exact index as a model builds it (bounded by k-means cells below 512 dimensions, by principal components from 512 on); "
             "principal bounds forced: those bounds on narrower features (a quarter of their dimensions).", "",
             "| backbone (weights) | bank | backbone ms | scoring, default ms | full scan ms | full / default | default / backbone | principal bounds forced ms | entries measured per query | worst distance error, default / full scan | true nearest entry, default / full scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ms = r["median_ms"]
        measured = ", ".join(f"{value:.1f} ({name})" for name, value in r["entries_measured_per_query"].items())
        forced = f"{ms['forced']:.1f}" if "forced" in ms else "-"
        lines.append(f"| {r['backbone']} ({r['weights']}) | {r['bank'][0]:,} x {r['bank'][1]} | {ms['backbone']:.1f} | {ms['bounded']:.1f} | {ms['full']:.1f} | "
                     f"{r['full_over_bounded']:.2f}x | {r['search_vs_backbone']:.2f} | {forced} | {measured} of {r['bank'][0]:,} | "
                     f"{r['worst_relative_distance_error']['bounded']:.1e} / {r['worst_relative_distance_error']['full']:.1e} | "
                     f"{r['true_nearest_entry_share']['bounded']:.3%} / {r['true_nearest_entry_share']['full']:.3%} |")
    lines += ["", "A fit's calibration: training images scored leave-one-out (their own bank entries left out), per image, medians:", "",
              "| backbone | images | bounded ms | full scan ms | full / bounded | worst relative score difference |", "|---|---|---|---|---|---|"]
    for r in runs:
        lo = r["leave_one_out"]
        lines.append(f"| {r['backbone']} | {lo['images']} | {lo['median_ms']['bounded']:.1f} | {lo['median_ms']['full']:.1f} | "
                     f"{lo['median_ms']['full'] / lo['median_ms']['bounded']:.2f}x | {lo['worst_relative_score_difference']:.1e} |")
    score_gaps = ", ".join(f"{r['backbone']}: {r['worst_relative_score_difference']:.1e}" for r in runs)
    lines += ["", "Errors against brute force in float64 (torch.cdist on the differences) over every patch of every "
              "--check-every-th test image. The full scan ranks by |q|^2 - 2 q.b + |b|^2 in float32, which loses digits when "
              "the features are long beside their distances; the bounded search measures its candidates from the differences. "
              f"Largest relative difference of an image score between the two: {score_gaps}."]
    (args.out / "search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
