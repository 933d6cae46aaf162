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

Per image it times the backbone (``PatchFeatures.of_inputs``: network, 3x3 averaging, joining), and for each
index the search plus eq. 7 (``search.score_patches`` without the maps: the nearest entry of every
patch, then eq. 7's neighbourhood search for the top patch), and checks the two agree: every
patch's nearest distance (relative difference), the nearest entry, and the image score.

Wide ResNet-50's ImageNet weights cannot be had on this project's machine: without
``--wrn-weights`` it runs with seeded random weights (torch.manual_seed(0)), so its times and
bank size hold but its feature distribution, which sets how tight the bounds are, is not
that of the pretrained network. Before the test images, the first ``--left-out-images`` (20)
training images are scored leave-one-out, as a fit's calibration scores them, with each index
(timed per image, alternating). Results go to search.json and search.md.

    .venv/bin/python benchmarks/search.py --against COMMIT [--rounds 3] [--tolerance 0.05]

compares an old commit with the working tree instead, MobileNetV2 only, interleaved in one run
(benchmarks/against.py: a git worktree of COMMIT and a copy of the working tree's src/, each
measured in fresh child processes, old, new, old, new, ...), through public names only: the
timings above go through the fitting pipeline (``fitting.FitPipeline``) and the
index's private ``_bounds``, which an older commit may not have, so they are not compared, nor are leave-one-out scoring and
the forced principal bounds. First each commit fits bottle's train/good images
(``PatchCore.fit``, ``save``) and records the features of bottle's 83 test images as
``PatchCore.score`` hands them to its index's ``search``; then, both commits on the working
tree's bank and features, each round times per image: the bounded index
(``NearestNeighbourIndex(bank)``) and the full scan (``NearestNeighbourIndex(bank,
bounds=False)``), each ``search`` plus ``reweighted_image_scores`` (eq. 7), and
``PatchCore.load(model).score`` of the image (backbone, search, eq. 7, maps). Writes
search_vs_<commit>.json and .md: each round's medians, the medians over the rounds, new/old,
whether the banks, features, nearest entries, scores and maps are bit-identical, and PASS or
FAIL (the three per-image times' new/old within 1 +- tolerance). About 5 minutes on 2 cores (7 with
--rounds 5; 11 for one round with two test suites running beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from provenance import describe, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

# patchcore is imported where it is used: a --against child imports only the public names both commits have
if TYPE_CHECKING:
    from patchcore import PatchCore
    from patchcore.search import NearestNeighbourIndex

REPO = Path(__file__).resolve().parents[1]


def model_for(backbone: str, weights: Path | None, scratch: Path) -> PatchCore:
    from patchcore import PatchCore

    if backbone != "mobilenet_v2" and weights is None:
        from torchvision import models

        torch.manual_seed(0)
        weights = scratch / f"{backbone}-random-seed0.pth"
        torch.save(getattr(models, backbone)().state_dict(), weights)
    return PatchCore(backbone, progress=False, weights=None if weights is None else str(weights))


def bank_and_left_out(model: PatchCore, images: list[Path], left_out_images: int) -> tuple[torch.Tensor, dict, Any]:
    """The memory bank a fit would make (features, 10% coreset), and the seconds of the first
    ``left_out_images`` training images' leave-one-out scoring (a fit's calibration) with the
    bounded and the full-scan index, alternating image by image, and the largest relative
    difference of their scores; through the library's fitting pipeline, which it returns."""
    from patchcore.fitting import FitPipeline, bank_entries, own_runs
    from patchcore.search import NearestNeighbourIndex

    pipeline, sizes, _ = FitPipeline.begin(model.backbone, model.layers, model.weights, model.layout, images, model.fit_options())
    patches = pipeline.extract(images, sizes)
    try:
        picks = pipeline.select_coreset(patches.points, bank_entries(len(patches.points), model.coreset_ratio, model.bank_size))
        bank = patches.gather(picks).float()
        runs = own_runs(picks.numpy(), patches.starts)
        indexes = {"bounded": NearestNeighbourIndex(bank), "full": NearestNeighbourIndex(bank, bounds=False)}
        indexes["bounded"].search(bank[:1], k=1)  # builds the bounds and compiles the scan before the timing
        seconds = {"bounded": [], "full": []}
        scores: dict[str, list[float]] = {"bounded": [], "full": []}
        for image in range(min(left_out_images, len(patches.sources))):
            for name in ("bounded", "full") if image % 2 == 0 else ("full", "bounded"):
                started = time.perf_counter()
                score = pipeline.left_out(indexes[name], model.num_neighbors, patches, image, (int(runs[image]), int(runs[image + 1]))).score
                seconds[name].append(time.perf_counter() - started)
                scores[name].append(score)
        gap = max(abs(a - b) / abs(b) for a, b in zip(scores["bounded"], scores["full"]))
        left_out = {"images": len(seconds["full"]), "median_ms": {name: 1000 * statistics.median(values) for name, values in seconds.items()},
                    "worst_relative_score_difference": gap}
        return bank, left_out, pipeline
    finally:
        patches.close()


def forced_bounds(bank: torch.Tensor) -> NearestNeighbourIndex | None:
    """For features narrower than the principal bounds' threshold (searched by cell bounds), an
    index that bounds them by principal components anyway (a quarter of their dimensions), to
    show what it would cost; None for wide ones."""
    from patchcore.search import LowerBoundIndex, NearestNeighbourIndex, leading_components

    if leading_components(bank.shape[1]) > 0:
        return None
    index = NearestNeighbourIndex(bank)
    index._bounded, index._bounds = True, LowerBoundIndex(index.bank, bank.shape[1] // 4)
    return index


def scored(model: PatchCore, index: NearestNeighbourIndex, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The library's scoring of one image's features with ``index`` (search, eq. 7, maps): (image score, seconds)."""
    from patchcore.search import score_patches

    started = time.perf_counter()
    scores, _ = score_patches(index, features, tuple(image.shape[-2:]), model.num_neighbors)
    return scores, time.perf_counter() - started


def run(backbone: str, weights: Path | None, data: Path, scratch: Path, check_every: int, left_out_images: int) -> dict:
    from patchcore.data import same_size_runs, training_images
    from patchcore.fitting import stack_inputs
    from patchcore.search import NearestNeighbourIndex, leading_components

    bottle = data / "mvtec_ad" / "bottle"
    model = model_for(backbone, weights, scratch)
    started = time.perf_counter()
    bank, left_out, pipeline = bank_and_left_out(model, training_images(bottle), left_out_images)
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
        batches = (stack_inputs(run) for loaded in pipeline.loaded_batches(tests) for run in same_size_runs(loaded))
        for batch in batches:
            for image in batch.split(1):
                begun = time.perf_counter()
                features = pipeline.patch_features.of_inputs(image, pipeline.layout, model.batch_size)
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


# ---------------------------------------------------------------------------------------------
# --against COMMIT: the old commit and the working tree, interleaved (benchmarks/against.py)

#: the quantities the verdict rests on (medians over the test images, then over the rounds), and which way is better
AGAINST_GATED = {"bounded_search_eq7_ms": "lower", "full_scan_eq7_ms": "lower", "score_ms": "lower"}
AGAINST_NOTES = [
    "Measured through public names only, which both commits have: patchcore.model.PatchCore (constructor, fit, save, load, score, "
    "memory_bank_, index_, calibration_) and patchcore.search.NearestNeighbourIndex (search; bounds=False for the full scan) and "
    "reweighted_image_scores. search.py's own run times the fitting pipeline's features and left-out scores, and score_patches, and forces principal bounds through "
    "the index's private attributes: leave-one-out scoring and the forced bounds are not compared.",
    "Setup, once per commit (not timed for the verdict): PatchCore('mobilenet_v2', device='cpu').fit(bottle's 209 train/good images), "
    "save; then PatchCore.score of each of bottle's 83 test images (decoded with Pillow), with the fitted index's search wrapped to "
    "record the patch features it is handed (k=1): the test features. The working tree's bank, features and model file are the inputs "
    "of both commits' rounds, so both search the same bank with the same queries; the two commits' fits are compared for identity.",
    "Each round and commit, one fresh process: both indexes built and warmed on one query (timed: build seconds), then per test image "
    "(bounded first on even images, full scan first on odd ones) search(features, k=1) plus reweighted_image_scores (eq. 7, 9 neighbours) "
    "with each index, then PatchCore.load(model).score(image) (backbone, search, eq. 7, maps); per round the median over the 83 images.",
]


def against_child(job: dict) -> dict:
    """One process of --against (``mode`` setup or measure), in whichever tree PYTHONPATH names: public names only."""
    started = time.perf_counter()
    import numpy as np
    from PIL import Image

    import patchcore
    from patchcore.model import PatchCore
    from patchcore.search import NearestNeighbourIndex, reweighted_image_scores

    bottle = Path(job["data"]) / "mvtec_ad" / "bottle"
    tests = sorted((bottle / "test").glob("*/*.png"))
    out = Path(job["outputs"])
    out.mkdir(parents=True, exist_ok=True)
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in tests]

    def tensor(rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255)

    report = {"patchcore_file": patchcore.__file__, "patchcore_version": getattr(patchcore, "__version__", None), "torch_threads": torch.get_num_threads()}
    if job["mode"] == "setup":
        model = PatchCore(job["backbone"], device="cpu", progress=False)
        clock = time.perf_counter()
        model.fit(sorted((bottle / "train" / "good").glob("*.png")))
        fit_seconds = time.perf_counter() - clock
        model.save(out / "model.safetensors")
        index, recorded = model.index_, []
        search = index.search

        def recording(queries: torch.Tensor, k: int = 1, exclude: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            if k == 1 and exclude is None:
                recorded.append(queries.detach().to("cpu", torch.float32).clone())
            return search(queries, k=k, exclude=exclude)

        index.search = recording  # this instance only
        scores = [float(np.asarray(model.score(tensor(rgb))[0])[0]) for rgb in rgbs]
        del index.search
        if len(recorded) != len(rgbs):
            raise RuntimeError(f"recorded {len(recorded)} searches for {len(rgbs)} images: score() no longer searches its index once per image")
        features = torch.stack(recorded)
        np.save(out / "fit_test_features.npy", features.numpy())
        np.save(out / "fit_image_threshold.npy", np.array([model.calibration_.image_threshold], dtype=np.float64))
        np.save(out / "fit_score_scores.npy", np.array(scores, dtype=np.float32))
        # the recorded features, searched through the public names, give score()'s scores
        check = NearestNeighbourIndex(model.memory_bank_)
        again = []
        with torch.inference_mode():
            for queries in features:
                distances, nearest = check.search(queries, k=1)
                again.append(float(reweighted_image_scores(check, queries[None], distances[:, 0][None], nearest[:, 0][None], model.num_neighbors)[0]))
        report.update(fit_seconds=fit_seconds, features_shape=list(features.shape), num_neighbors=model.num_neighbors,
                      features_reproduce_score_max_abs_difference=float(np.max(np.abs(np.array(again, dtype=np.float32) - np.array(scores, dtype=np.float32)))))
        return report

    bank = torch.from_numpy(np.load(job["bank"]))
    features = torch.from_numpy(np.load(job["features"]))
    neighbours = job["num_neighbors"]
    figures, indexes = {}, {}
    for name, make in (("bounded", lambda: NearestNeighbourIndex(bank)), ("full", lambda: NearestNeighbourIndex(bank, bounds=False))):
        clock = time.perf_counter()
        indexes[name] = make()
        indexes[name].search(bank[:1], k=1)  # builds the bounds, compiles the scan
        figures[f"{name}_build_seconds"] = time.perf_counter() - clock
    counters = {key: getattr(indexes["bounded"], key, None) for key in ("queries_bounded", "entries_measured")}
    clock = time.perf_counter()
    try:
        model, report["score_model"] = PatchCore.load(job["model"], device="cpu", progress=False), "the working tree's fit (shared)"
    except Exception as error:  # a model file this commit cannot read: its own fit's
        model, report["score_model"] = PatchCore.load(job["own_model"], device="cpu", progress=False), f"this commit's own fit ({type(error).__name__} on the shared one)"
    figures["load_seconds"] = time.perf_counter() - clock
    model.score(tensor(rgbs[0]))  # warm-up
    times: dict[str, list[float]] = {"bounded": [], "full": [], "score": []}
    kept: dict[str, list] = {key: [] for key in ("bounded_scores", "bounded_distances", "bounded_nearest", "full_scores", "full_distances", "full_nearest", "score_scores", "score_maps")}
    with torch.inference_mode():
        for number, (rgb, queries) in enumerate(zip(rgbs, features)):
            for name in ("bounded", "full") if number % 2 == 0 else ("full", "bounded"):
                index = indexes[name]
                clock = time.perf_counter()
                distances, nearest = index.search(queries, k=1)
                score = reweighted_image_scores(index, queries[None], distances[:, 0][None], nearest[:, 0][None], neighbours)
                times[name].append(time.perf_counter() - clock)
                kept[f"{name}_scores"].append(np.asarray(score, dtype=np.float32))
                kept[f"{name}_distances"].append(distances[:, 0].numpy())
                kept[f"{name}_nearest"].append(nearest[:, 0].numpy())
            clock = time.perf_counter()
            scores, maps = model.score(tensor(rgb))
            times["score"].append(time.perf_counter() - clock)
            kept["score_scores"].append(np.asarray(scores))
            kept["score_maps"].append(np.asarray(maps))
    for key, values in kept.items():
        np.save(out / f"{key}.npy", np.concatenate(values) if key.endswith(("scores", "maps")) else np.stack(values))
    figures = {"bounded_search_eq7_ms": 1000 * statistics.median(times["bounded"]), "full_scan_eq7_ms": 1000 * statistics.median(times["full"]),
               "score_ms": 1000 * statistics.median(times["score"]), **figures}
    if None not in counters.values():
        queries = indexes["bounded"].queries_bounded - counters["queries_bounded"]
        figures["entries_measured_per_query"] = (indexes["bounded"].entries_measured - counters["entries_measured"]) / max(queries, 1)
    figures["process_seconds"] = time.perf_counter() - started
    bounded, full = np.concatenate(kept["bounded_scores"]), np.concatenate(kept["full_scores"])
    report.update(images=len(rgbs), bank=list(bank.shape), figures=figures,
                  bounded_vs_full={"max_abs_score_difference": float(np.max(np.abs(bounded - full))),
                                   "same_nearest_entry_share": float(np.mean(np.stack(kept["bounded_nearest"]) == np.stack(kept["full_nearest"])))})
    return report


def run_against(args: argparse.Namespace) -> int:
    """--against COMMIT: setup per commit, then old, new, old, new, ...; results to search_vs_<commit>.json and .md."""
    import shutil

    import numpy as np
    from against import SIDES, Trees, compare_outputs, comparison, interleave, lines, run_child, summarise, tree_digest, write
    from safetensors import safe_open

    started = time.perf_counter()
    script = Path(__file__).resolve()
    with Trees(args.against, "search") as trees:
        print(f"old: {trees.old_commit} (git worktree), new: the working tree ({trees.new_state['commit'][:10]}"
              f"{', with uncommitted changes' if trees.new_state['dirty'] else ''}); {args.rounds} rounds, mobilenet_v2", flush=True)
        setups = {}
        for side in SIDES:
            folder = trees.scratch / f"setup-{side}"
            print(f"setup ({side}): fit on bottle train/good, test features recorded at the index", flush=True)
            setups[side] = run_child(script, trees.paths[side], {"mode": "setup", "data": str(args.data), "backbone": "mobilenet_v2", "outputs": str(folder)})
            with safe_open(str(folder / "model.safetensors"), "np") as handle:
                np.save(folder / "fit_memory_bank.npy", handle.get_tensor("memory_bank"))
            print(f"  fit {setups[side]['fit_seconds']:.1f} s; features {setups[side]['features_shape']}, "
                  f"searched again: max |score difference| {setups[side]['features_reproduce_score_max_abs_difference']:.2g}", flush=True)
        shared = trees.scratch / "setup-new"

        def measure(side: str, number: int) -> dict:
            job = {"mode": "measure", "data": str(args.data), "outputs": str(trees.scratch / f"{side}-{number}"),
                   "bank": str(shared / "fit_memory_bank.npy"), "features": str(shared / "fit_test_features.npy"),
                   "model": str(shared / "model.safetensors"), "own_model": str(trees.scratch / f"setup-{side}" / "model.safetensors"),
                   "num_neighbors": setups["new"]["num_neighbors"]}
            return run_child(script, trees.paths[side], job)

        results = interleave(args.rounds, measure, report=lambda line: print(line, flush=True))
        outputs = compare_outputs({side: [trees.scratch / f"setup-{side}", *[trees.scratch / f"{side}-{n}" for n in range(args.rounds)]] for side in SIDES})
        changed_during_run = tree_digest(REPO / "src") != trees.new_digest
        quantities, passed = summarise(results, AGAINST_GATED, args.tolerance)
        extra = {"backbone": "mobilenet_v2", "setup": setups,
                 "children": {side: [{k: v for k, v in r.items() if k != "figures"} for r in results[side]] for side in SIDES},
                 "working_tree_src_changed_during_run": changed_during_run}
        notes = list(AGAINST_NOTES) + (["The working tree's src/ changed during the run: the copy made at the start was measured."] if changed_during_run else [])
        result = comparison("search.py", trees, args.tolerance, args.rounds, results, quantities, passed, outputs, time.perf_counter() - started, notes, extra)
        shutil.rmtree(trees.scratch, ignore_errors=True)
    path = write(result, args.out, f"search_vs_{trees.short}", "search.py --against")
    print("\n".join(lines(result, "search.py --against")))
    print(f"\nwritten: {path} and .md", flush=True)
    return 0 if passed else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "wide_resnet50_2"])
    parser.add_argument("--wrn-weights", type=Path, help="Wide ResNet-50 weights file (default: seeded random weights)")
    parser.add_argument("--left-out-images", type=int, default=20, help="training images scored leave-one-out with each index (a fit's calibration)")
    parser.add_argument("--check-every", type=int, default=10, help="check every n-th test image against float64 brute force")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--against", metavar="COMMIT", help="compare COMMIT (e.g. HEAD~1) with the working tree, interleaved, instead: search_vs_<commit>.json")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: rounds, each one process per commit (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="with --against: largest |new/old - 1| of a gated quantity that passes (default: %(default)s)")
    parser.add_argument("--against-child", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against_child:
        print(json.dumps(against_child(json.loads(args.against_child))))
        return
    if args.against:
        sys.exit(run_against(args))
    fields = provenance()
    machine = describe(fields["machine"])
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(stamped(fields, {"runs": runs}), indent=2) + "\n")
    lines = [f"Machine: {machine}. Command: `{fields['command']}` at commit {fields['commit'][:12]}{'+changes' if fields['dirty'] else ''}, {fields['date']}.", "",
             "Per test image of MVTec AD bottle (83, 256 px, 1,024 patches each), medians; the bank from bottle's 209 training images at a 10% coreset. "
             "Scoring: the library's `search.score_patches` (every patch's nearest entry, eq. 7, the maps), as `predict` runs it. "
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
