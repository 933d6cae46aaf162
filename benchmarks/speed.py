"""Speed, memory and accuracy of patchcore's fit and scoring, side by side with a plain reference.

    .venv/bin/python benchmarks/speed.py [--data ../shared/data] [--out benchmarks/results]
                                         [--skip-scale] [--sizes 50 100 200 400 800] [--device cpu]

On MVTec AD bottle with MobileNetV2 (256 px, 10% coreset) it measures, in one run:

- fit: feature extraction, coreset selection and total wall time, and peak memory, for
  patchcore and for a plain reference (exact greedy selection with one full distance pass per
  pick, and exact brute-force search, as anomalib does), and the ratio between the two;
- scoring: images per second over the bottle's 83 test images (those anomalib's test scores) with
  a picture written per image (`patchcore predict`, timed after its imports as anomalib's
  ``engine.test`` is, and for the whole process), and the per-image split (decode and resize, backbone,
  nearest-neighbour search with eq. 7, map upsampling and blur) for each search path;
- accuracy of each path (image and pixel AUROC on the test set), and the recall of the
  approximate (IVF) index against exact search;
- Wide ResNet-50 (the default backbone; seeded random weights, as no ImageNet weights can be had
  offline): a fit on bottle, then `patchcore predict` over the 83 test images with pictures, and
  with ``--anomalib`` anomalib's ``engine.test`` on the same images with the same weights and bank;
- scale: fit time and peak memory for 50 to 800 training images (bottle, extended by flips and
  rotations) with MobileNetV2 and with Wide ResNet-50 (random weights: timing only).

Every fit runs in a child process, so that each peak memory figure (maximum resident set size)
is its own. Results go to speed.json and speed.md, and the scale curves to speed_scale.png.
anomalib 2.7's figures are its last recorded ones (benchmarks/results/anomalib_2_7.json if a rerun
wrote it, else those measured on this kind of machine in ../shared/PEERS.md); ``--anomalib``
installs anomalib 2.7 into its own venv and reruns it in the same run (about 35 minutes).

    .venv/bin/python benchmarks/speed.py --against COMMIT [--rounds 3] [--tolerance 0.05] [--backbone mobilenet_v2]

compares an old commit with the working tree instead, interleaved in one run (benchmarks/against.py:
a git worktree of COMMIT and a copy of the working tree's src/, each measured in fresh child
processes, old, new, old, new, ...): per round and commit, one child fits bottle's 209 train/good
images, saves and loads the model, predicts bottle's 83 test images and scores them from tensors,
through the public ``patchcore.model.PatchCore`` only (``fit``, ``fit_seconds_``, ``save``,
``load``, ``predict``, ``score``, ``calibration_``): the stage split, the plain reference and
``patchcore predict`` above go through internals that may move, so they are not compared. It
writes speed_vs_<commit>.json and .md: each round's figures, the medians, new/old per quantity,
whether the memory bank, thresholds, scores and maps are bit-identical, and PASS or FAIL: the
gated quantities' (fit seconds, its peak memory, predict and score images/s) new/old within
1 +- tolerance. About 5 minutes with MobileNetV2 on 2 quiet cores (13 with two test suites running
beside it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]

RECORDED_ANOMALIB = REPO / "benchmarks" / "results" / "anomalib_2_7.json"
#: anomalib 2.7 PatchCore, MobileNetV2 (features.6, features.13), bottle, 256 px, 10% coreset,
#: measured on this kind of machine (2 CPU cores), from ../shared/PEERS.md and the issue; a
#: rerun (--anomalib) replaces these with its own figures in RECORDED_ANOMALIB.
ANOMALIB = {"fit_seconds": 2014.0, "scoring_images_per_second": 4.9, "peak_memory_gb": 1.9, "image_auroc": 1.000, "pixel_auroc": 0.981, "source": "../shared/PEERS.md"}
if RECORDED_ANOMALIB.is_file():
    ANOMALIB = json.loads(RECORDED_ANOMALIB.read_text())


def anomalib_python() -> Path:
    """The Python of anomalib 2.7's own venv (.venv-anomalib), made on first use."""
    venv = REPO / ".venv-anomalib"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.0"], check=True)
    return python


def run_anomalib(data: Path, *arguments: str) -> dict:
    """benchmarks/anomalib_patchcore.py in anomalib's venv; its JSON line, with where it came from."""
    command = [str(anomalib_python()), str(REPO / "benchmarks" / "anomalib_patchcore.py"), "--data", str(data), *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"anomalib run failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["source"] = f"benchmarks/speed.py --anomalib, {time.strftime('%Y-%m-%d')}, {describe(provenance()['machine'])}"
    return figures


def rerun_anomalib(data: Path, wide: dict | None) -> dict:
    """anomalib 2.7's PatchCore on bottle, fitted and tested with MobileNetV2 (about 35 minutes),
    and, given ``wide`` = {"weights", "bank"}, scoring only with that Wide ResNet-50 and bank."""
    from patchcore.backbones import find_weights_file, get_spec

    figures = {}
    if wide is not None:  # first: a few minutes, and a failure shows before the long fit
        print("anomalib 2.7: Wide ResNet-50 scoring with patchcore's bank", flush=True)
        figures["wide_resnet50_2"] = run_anomalib(data, "--backbone", "wide_resnet50_2", "--weights", str(wide["weights"]), "--bank", str(wide["bank"]))
    print("anomalib 2.7: MobileNetV2 fit and test (about 35 minutes)", flush=True)
    figures.update(run_anomalib(data, "--weights", str(find_weights_file(get_spec("mobilenet_v2"), download=False))))
    RECORDED_ANOMALIB.write_text(json.dumps(stamped(provenance(), figures), indent=2) + "\n")
    return figures


# ---------------------------------------------------------------------------------------------
# Child-process work: one fit, measured on its own


def reference_greedy(points, count, seed=0, on_progress=None, initial_centres=None):
    """The plain loop as anomalib writes it: one full float32 distance pass over all points per
    pick, the distances as |x|^2 - 2 x.c + |c|^2 by a matrix-vector product."""
    import torch

    from patchcore.coreset import _nearest_initial_centres

    points = points.float()
    norms = points.square().sum(dim=1)
    if initial_centres is None:
        pick = int(torch.randint(points.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
        nearest = torch.full((points.shape[0],), float("inf"), device=points.device)
    else:
        nearest = _nearest_initial_centres(points, initial_centres.float())[0].clone()
        pick = int(torch.argmax(nearest))
    picks = []
    for _ in range(count):
        picks.append(pick)
        torch.minimum(nearest, torch.addmv(norms, points, points[pick], alpha=-2.0).add_(norms[pick]), out=nearest)
        pick = int(torch.argmax(nearest))
        if on_progress is not None:
            on_progress(1)
    return torch.tensor(picks)


class ReferenceSearch:
    """Exact brute-force search as anomalib writes it: x^2 - 2xy + y^2 by matrix product, 1024 queries a chunk."""

    def __init__(self, bank, kind="exact"):
        import torch

        self.bank = bank.float().contiguous()
        self.device = bank.device
        self.kind = kind
        self._norms = self.bank.square().sum(dim=1)
        self._torch = torch

    def __len__(self):
        return self.bank.shape[0]

    def search(self, queries, k=1, exclude=None):
        from patchcore.search import matmul_search

        kept = len(self) - (0 if exclude is None else exclude[1] - exclude[0])
        squared, indices = matmul_search(self.bank, self._norms, queries.to(self.device, self._torch.float32), min(k, kept), rows=1024, exclude=exclude)
        return squared.clamp(min=0).sqrt(), indices


def reference_maps(patch_scores, size_hw, sigma=4.0):
    """Upsample with F.interpolate (bilinear, as patchcore; anomalib's default is nearest), blur with torchvision's 2-D Gaussian (33 x 33 kernel)."""
    import torch.nn.functional as F
    from torchvision.transforms.v2.functional import gaussian_blur

    upsampled = F.interpolate(patch_scores[:, None].float(), size=tuple(size_hw), mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[sigma, sigma])[:, 0]


def use_reference(model_module) -> None:
    """Swap patchcore's fast parts for the plain ones, in this process only: the coreset the
    fitting pipeline selects with, the index the model builds, the maps the scoring makes."""
    from patchcore import fitting, search

    fitting.greedy_coreset = reference_greedy
    model_module.NearestNeighbourIndex = ReferenceSearch
    search.anomaly_maps = reference_maps


def worker_fit(args: argparse.Namespace) -> dict:
    """Fit once; report the phases, the peak memory and where the model was saved."""
    started = time.perf_counter()
    import torch

    from patchcore import model as model_module
    from patchcore.data import find_images

    if args.reference:
        use_reference(model_module)
    weights = None
    if args.random_weights:  # timing only: torchvision's architecture with seeded random weights
        from patchcore.backbones import get_spec

        torch.manual_seed(0)
        weights = Path(args.scratch) / f"{args.backbone}-random.pth"
        torch.save(get_spec(args.backbone).build().state_dict(), weights)
    images = find_images(args.images)[: args.count] if args.count else find_images(args.images)
    model = model_module.PatchCore(args.backbone, weights=weights, device=args.device, image_size=args.image_size, progress=False)
    fit_started = time.perf_counter()
    model.fit(images)
    fit_seconds = time.perf_counter() - fit_started
    if args.save:
        model.save(args.save)
    return {
        "images": len(images),
        "image_size": args.image_size,
        "backbone": args.backbone,
        "fit_seconds": fit_seconds,
        "phases": model.fit_seconds_,
        "process_seconds": time.perf_counter() - started,
        "bank": list(model.memory_bank_.shape),
        "peak_memory_gb": peak_memory_gb(),
    }


def peak_memory_gb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ru_maxrss, it starts afresh at exec,
    so a child does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(*arguments: str) -> dict:
    """Run this script as a child worker and return its JSON."""
    command = [sys.executable, __file__, *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Scoring


def stage_split(model, paths: list[Path], search_kind: str, reference: bool) -> dict:
    """Milliseconds per image in each scoring stage, measured stage by stage over ``paths``."""
    import numpy as np
    import torch

    from patchcore.intake import read_image
    from patchcore.maps import anomaly_maps
    from patchcore.search import NearestNeighbourIndex, reweighted_image_scores

    index = ReferenceSearch(model.memory_bank_) if reference else NearestNeighbourIndex(model.memory_bank_, search_kind)
    make_maps = reference_maps if reference else anomaly_maps
    clock = {"decode_and_resize": 0.0, "backbone": 0.0, "search_and_eq7": 0.0, "maps": 0.0}
    with torch.inference_mode():
        for start in range(0, len(paths), model.batch_size):
            chunk = paths[start : start + model.batch_size]
            t0 = time.perf_counter()
            batch = torch.from_numpy(np.stack([model.layout_.image_to_array(read_image(p)) for p in chunk]))
            t1 = time.perf_counter()
            features = model.patch_features_(batch)
            t2 = time.perf_counter()
            size, grid = features.shape[0], features.shape[1:3]
            flat = features.reshape(size, -1, features.shape[-1])
            distances, nearest = index.search(flat.reshape(-1, flat.shape[-1]), k=1)
            patch = distances[:, 0].reshape(size, -1)
            reweighted_image_scores(index, flat, patch, nearest[:, 0].reshape(size, -1), model.num_neighbors)
            t3 = time.perf_counter()
            make_maps(patch.reshape(size, *grid), tuple(batch.shape[-2:]))
            t4 = time.perf_counter()
            for key, seconds in zip(clock, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                clock[key] += seconds
    return {key: 1000 * seconds / len(paths) for key, seconds in clock.items()}


def accuracy(model_file: Path, bottle: Path, index: str, reference: bool) -> dict:
    """Image and pixel AUROC of one search path on the bottle test set (no pictures)."""
    from patchcore import model as model_module
    from patchcore.evaluate import evaluate

    if reference:
        use_reference(model_module)
    model = model_module.PatchCore.load(model_file, index=index, progress=False)
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate(model, bottle, out, pictures=False, report=lambda message: None)
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], "pixel_aupro": metrics["pixel_aupro"]}


def ivf_recall(model, paths: list[Path]) -> float:
    """Share of test patches whose IVF nearest bank entry is the exact nearest one."""
    import numpy as np
    import torch

    from patchcore.intake import read_image
    from patchcore.search import NearestNeighbourIndex

    exact, approximate = NearestNeighbourIndex(model.memory_bank_, "exact"), NearestNeighbourIndex(model.memory_bank_, "ivf")
    batch = torch.from_numpy(np.stack([model.layout_.image_to_array(read_image(p)) for p in paths]))
    queries = torch.cat([model.patch_features_(chunk) for chunk in batch.split(8)]).reshape(-1, model.memory_bank_.shape[1])
    exact_distances, exact_ids = exact.search(queries)
    ivf_distances, ivf_ids = approximate.search(queries)
    # Equal distance counts as found: duplicates in the bank are interchangeable.
    found = (ivf_ids[:, 0] == exact_ids[:, 0]) | torch.isclose(ivf_distances[:, 0], exact_distances[:, 0], rtol=0, atol=1e-5)
    return float(found.float().mean())


def throughput(model_file: Path, paths: list[Path], index: str) -> dict:
    """Images per second of `patchcore predict` over ``paths`` with pictures, in a child process:
    timed around the command after the interpreter has imported it (as anomalib's ``engine.test``
    is timed, after its imports and fit), and for the whole process (start-up and imports too)."""
    with tempfile.TemporaryDirectory() as out:
        listing = Path(out) / "inputs"
        listing.mkdir()
        for number, path in enumerate(paths):
            (listing / f"{number:04d}_{path.name}").symlink_to(path.resolve())
        started = time.perf_counter()
        child = run_child("--worker-predict", str(model_file), "--images", str(listing), "--index", index, "--scratch", out)
        whole = time.perf_counter() - started
    return {"images": len(paths), "images_per_second": len(paths) / child["seconds"], "whole_process_images_per_second": len(paths) / whole}


def worker_predict(args: argparse.Namespace) -> dict:
    """One `patchcore predict` with pictures, timed after the imports."""
    from patchcore import cli, model, render, search  # noqa: F401  (imported before the clock starts)

    started = time.perf_counter()
    code = cli.main(["predict", args.worker_predict, args.images, "--out", str(Path(args.scratch) / "predictions"), "--quiet", "--index", args.index])
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"patchcore predict exited with {code}")
    return {"seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Scale


def augmented_bottle(bottle_train: Path, count: int, folder: Path, size: int) -> Path:
    """``count`` training images: bottle's 209, then their flips and rotations (8 per image), at ``size`` px."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(bottle_train.glob("*.png"))
    transforms = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
                  Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE]
    for number in range(count):
        target = folder / f"{number:04d}.png"
        if target.exists():
            continue
        transform = transforms[number // len(sources)]
        with Image.open(sources[number % len(sources)]) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            (image if transform is None else image.transpose(transform)).save(target)
    return folder


def growth(points: list[dict], key: str) -> float:
    """Exponent b of key ~ images^b between the smallest and largest run."""
    import math

    first, last = points[0], points[-1]
    return math.log(last[key] / first[key]) / math.log(last["images"] / first["images"])


def plot_scale(scale: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backbone, points in scale.items():
        images = [p["images"] for p in points]
        time_axis.plot(images, [p["fit_seconds"] for p in points], "o-", label=backbone)
        memory_axis.plot(images, [p["peak_memory_gb"] for p in points], "o-", label=backbone)
    time_axis.set(xlabel="training images (256 px)", ylabel="fit wall time (s)", title="Fit time")
    memory_axis.set(xlabel="training images (256 px)", ylabel="peak resident memory (GB)", title="Peak memory")
    for axis in (time_axis, memory_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("patchcore fit, 10% coreset, 2-core CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------


def main_run(args: argparse.Namespace) -> dict:
    bottle = args.data / "mvtec_ad" / "bottle"
    global ANOMALIB
    fields = provenance()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # Wide ResNet-50, the default backbone, scoring side by side with anomalib: the same
        # (seeded random) weights and the same bank, patchcore's, fitted here on bottle.
        print("Wide ResNet-50: patchcore fit (random weights)", flush=True)
        wide_file = scratch / "bottle_wrn.safetensors"
        wide_fit = run_child("--worker", "--images", str(bottle / "train" / "good"), "--backbone", "wide_resnet50_2", "--random-weights", "--device", args.device, "--scratch", str(scratch), "--save", str(wide_file))
        from safetensors.numpy import load_file

        np_bank = scratch / "bottle_wrn_bank.npy"
        import numpy as np

        np.save(np_bank, load_file(str(wide_file))["memory_bank"].astype(np.float32))
        if args.anomalib:
            ANOMALIB = rerun_anomalib(args.data, {"weights": scratch / "wide_resnet50_2-random.pth", "bank": np_bank})
        results: dict = stamped(fields, {"device": args.device, "anomalib_2_7": ANOMALIB})
        from patchcore.data import list_test_samples

        wide_test = [sample.path for sample in list_test_samples(bottle)]
        print(f"Wide ResNet-50: patchcore predict over {len(wide_test)} test images with pictures", flush=True)
        wide_scoring = throughput(wide_file, wide_test, "exact")
        anomalib_wide = ANOMALIB.get("wide_resnet50_2")
        results["wide_resnet50_2"] = {
            "fit": wide_fit,
            "scoring_throughput": wide_scoring,
            "anomalib_images_per_second": anomalib_wide["scoring_images_per_second"] if anomalib_wide else None,
            "speedup_vs_anomalib": wide_scoring["images_per_second"] / anomalib_wide["scoring_images_per_second"] if anomalib_wide else None,
        }
        model_file = scratch / "bottle.safetensors"
        common = ["--images", str(bottle / "train" / "good"), "--backbone", "mobilenet_v2", "--device", args.device, "--scratch", str(scratch)]
        print("fit: patchcore", flush=True)
        ours = run_child("--worker", *common, "--save", str(model_file))
        print(f"  {ours['fit_seconds']:.1f} s, peak {ours['peak_memory_gb']:.2f} GB", flush=True)
        print("fit: plain reference (full pass per pick)", flush=True)
        reference = run_child("--worker", *common, "--reference", "--save", str(scratch / "reference.safetensors"))
        print(f"  {reference['fit_seconds']:.1f} s, peak {reference['peak_memory_gb']:.2f} GB", flush=True)
        print("fit: cookies (peak memory)", flush=True)
        results["fit_cookies"] = run_child("--worker", "--images", str(args.data / "cookies" / "train" / "good"), "--backbone", "mobilenet_v2", "--device", args.device, "--scratch", str(scratch))
        print(f"  {results['fit_cookies']['fit_seconds']:.1f} s, peak {results['fit_cookies']['peak_memory_gb']:.2f} GB", flush=True)
        results["fit"] = {
            "patchcore": ours,
            "reference": reference,
            "speedup_vs_reference": reference["fit_seconds"] / ours["fit_seconds"],
            "coreset_speedup_vs_reference": reference["phases"]["coreset"] / ours["phases"]["coreset"],
            # anomalib's fit is timed around engine.fit, after its imports: like ours in-process;
            # ours for the whole process (start-up, imports and the model file written) besides.
            "speedup_vs_anomalib": ANOMALIB["fit_seconds"] / ours["fit_seconds"],
            "whole_process_speedup_vs_anomalib": ANOMALIB["fit_seconds"] / ours["process_seconds"],
        }

        from patchcore import PatchCore
        from patchcore.data import list_test_samples

        test_paths = [s.path for s in list_test_samples(bottle)]
        model = PatchCore.load(model_file, device=args.device, progress=False)
        print("scoring: stage split", flush=True)
        results["scoring_split_ms_per_image"] = {
            "exact": stage_split(model, test_paths, "exact", reference=False),
            "ivf": stage_split(model, test_paths, "ivf", reference=False),
            "reference": stage_split(model, test_paths, "exact", reference=True),
        }
        print("scoring: accuracy and recall", flush=True)
        results["accuracy"] = {
            "exact": accuracy(model_file, bottle, "exact", reference=False),
            "ivf": accuracy(model_file, bottle, "ivf", reference=False),
            "reference": run_child("--worker-accuracy", str(scratch / "reference.safetensors"), str(bottle)),
        }
        results["ivf_recall"] = ivf_recall(model, test_paths)
        # The images anomalib's engine.test scores: bottle's 83 test images.
        print(f"scoring: throughput over {len(test_paths)} images with pictures", flush=True)
        results["scoring_throughput"] = {index: throughput(model_file, test_paths, index) for index in ("exact", "ivf")}
        results["scoring_speedup_vs_anomalib"] = {k: v["images_per_second"] / ANOMALIB["scoring_images_per_second"] for k, v in results["scoring_throughput"].items()}

        previous = args.out / "speed.json"
        if args.skip_scale and previous.is_file() and "scale" in json.loads(previous.read_text()):
            # Keep the last scale curves rather than drop them; they say when they were made.
            earlier = json.loads(previous.read_text())
            results["scale"], results["scale_growth_exponents"] = earlier["scale"], earlier["scale_growth_exponents"]
            results["scale_from_earlier_run"] = earlier.get("finished", "an earlier run")
            # the commit of the run that measured the scale (unknown when that file kept it from one before)
            results["scale_from_earlier_run_commit"] = earlier.get("scale_from_earlier_run_commit") if "scale_from_earlier_run" in earlier else earlier.get("commit")
        if not args.skip_scale:
            results["scale"] = {}
            for backbone in ("mobilenet_v2", "wide_resnet50_2"):
                points = []
                for count in args.sizes:
                    folder = augmented_bottle(bottle / "train" / "good", max(args.sizes), scratch / "augmented", 256)
                    extra = ["--random-weights"] if backbone == "wide_resnet50_2" else []
                    print(f"scale: {backbone}, {count} images", flush=True)
                    point = run_child("--worker", "--images", str(folder), "--count", str(count), "--backbone", backbone, "--device", args.device, "--scratch", str(scratch), *extra)
                    print(f"  {point['fit_seconds']:.1f} s, peak {point['peak_memory_gb']:.2f} GB", flush=True)
                    points.append(point)
                results["scale"][backbone] = points
            results["scale_growth_exponents"] = {
                backbone: {"fit_seconds": growth(points, "fit_seconds"), "peak_memory_gb": growth(points, "peak_memory_gb")}
                for backbone, points in results["scale"].items()
            }
            plot_scale(results["scale"], args.out / "speed_scale.png")
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


# ---------------------------------------------------------------------------------------------
# --against COMMIT: the old commit and the working tree, interleaved (benchmarks/against.py)

#: the quantities the verdict rests on, and which way is better
AGAINST_GATED = {"fit_seconds": "lower", "fit_peak_memory_gb": "lower", "predict_images_per_second": "higher", "score_images_per_second": "higher"}
AGAINST_NOTES = [
    "Measured through the public patchcore.model.PatchCore only (constructor, fit, fit_seconds_, save, load, predict, score, calibration_), "
    "names both commits have. speed.py's own run measures the stage split through internals (patch_features_, layout_, patchcore.intake, "
    "patchcore.maps), predict throughput through patchcore.cli and a plain reference through patchcore.coreset's private helpers: not compared.",
    "Per round and commit one fresh process: imports, PatchCore(backbone, device='cpu').fit(bottle's 209 train/good images) timed (peak "
    "memory: the process's VmHWM right after the fit), save, load, predict of one batch to warm up (the search's bounds are built on the "
    "first search), predict of bottle's 83 test images (no pictures) timed, then score() of the same images, decoded beforehand with "
    "Pillow into [0, 1] tensors, in batches of 8, timed; each of the two timed AGAINST_PASSES (3) times, the median pass kept.",
    "Before the rounds, one warm-up process per commit (10 training images, 8 test images) fills each tree's numba cache; not counted.",
    "Compared outputs: the saved model's memory bank (read from the file), the calibrated image threshold, predict's 83 image scores, "
    "and score()'s image scores and anomaly maps on the input grid.",
]


#: timed passes of predict and of score over the test images in each --against process (the median kept)
AGAINST_PASSES = 3


def against_child(job: dict) -> dict:
    """One measuring process of --against, in whichever tree PYTHONPATH names: public names only."""
    started = time.perf_counter()
    import numpy as np
    import torch
    from PIL import Image

    import patchcore
    from patchcore.model import PatchCore

    imports_seconds = time.perf_counter() - started
    bottle = Path(job["data"]) / "mvtec_ad" / "bottle"
    train, tests = sorted((bottle / "train" / "good").glob("*.png")), sorted((bottle / "test").glob("*/*.png"))
    if job.get("warm_up"):
        train, tests = train[:10], tests[:8]
    out = Path(job["outputs"])
    out.mkdir(parents=True, exist_ok=True)
    model = PatchCore(job["backbone"], device="cpu", progress=False)
    clock = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - clock
    fit_peak = peak_memory_gb()
    phases = {f"fit_{phase}_seconds": float(seconds) for phase, seconds in dict(getattr(model, "fit_seconds_", {})).items()}
    clock = time.perf_counter()
    model.save(out / "model.safetensors")
    save_seconds = time.perf_counter() - clock
    del model
    clock = time.perf_counter()
    loaded = PatchCore.load(out / "model.safetensors", device="cpu", progress=False)
    load_seconds = time.perf_counter() - clock
    loaded.predict(tests[: loaded.batch_size])
    # Each timed AGAINST_PASSES times over the 83 images, the median pass kept: one pass is about
    # 4 s, short enough for this shared machine's bursts to move a single pass by 15%.
    predict_passes = []
    for _ in range(AGAINST_PASSES):
        clock = time.perf_counter()
        predictions = loaded.predict(tests)
        predict_passes.append(time.perf_counter() - clock)
    predict_seconds = statistics.median(predict_passes)
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in tests]
    score_passes = []
    for _ in range(AGAINST_PASSES):
        scores, maps = [], []
        clock = time.perf_counter()
        for start in range(0, len(rgbs), 8):
            batch = torch.from_numpy(np.stack(rgbs[start : start + 8])).permute(0, 3, 1, 2).float().div(255)
            batch_scores, batch_maps = loaded.score(batch)
            scores.append(np.asarray(batch_scores))
            maps.append(np.asarray(batch_maps))
        score_passes.append(time.perf_counter() - clock)
    score_seconds = statistics.median(score_passes)
    np.save(out / "predict_scores.npy", np.array([p.score for p in predictions], dtype=np.float64))
    np.save(out / "score_scores.npy", np.concatenate(scores))
    np.save(out / "score_maps.npy", np.concatenate(maps))
    np.save(out / "image_threshold.npy", np.array([loaded.calibration_.image_threshold], dtype=np.float64))
    figures = {
        "fit_seconds": fit_seconds, "fit_peak_memory_gb": fit_peak,
        "predict_images_per_second": len(tests) / predict_seconds, "score_images_per_second": len(tests) / score_seconds,
        **phases, "save_seconds": save_seconds, "load_seconds": load_seconds, "imports_seconds": imports_seconds,
        "process_peak_memory_gb": peak_memory_gb(), "process_seconds": time.perf_counter() - started,
    }
    return {"patchcore_file": patchcore.__file__, "patchcore_version": getattr(patchcore, "__version__", None), "torch_threads": torch.get_num_threads(),
            "training_images": len(train), "test_images": len(tests), "figures": figures}


def run_against(args: argparse.Namespace) -> int:
    """--against COMMIT: old, new, old, new, ... one fresh process each; results to speed_vs_<commit>.json and .md."""
    import shutil

    import numpy as np
    from against import SIDES, Trees, compare_outputs, comparison, interleave, lines, run_child, summarise, tree_digest, write
    from safetensors import safe_open

    started = time.perf_counter()
    script = Path(__file__).resolve()
    with Trees(args.against, "speed") as trees:
        print(f"old: {trees.old_commit} (git worktree), new: the working tree ({trees.new_state['commit'][:10]}"
              f"{', with uncommitted changes' if trees.new_state['dirty'] else ''}); {args.rounds} rounds, {args.backbone}", flush=True)
        for side in SIDES:
            print(f"warm-up ({side}): a small fit and predict", flush=True)
            run_child(script, trees.paths[side], {"data": str(args.data), "backbone": args.backbone, "warm_up": True, "outputs": str(trees.scratch / f"warm-up-{side}")})
        settings: dict[str, list[dict]] = {side: [] for side in SIDES}

        def measure(side: str, number: int) -> dict:
            folder = trees.scratch / f"{side}-{number}"
            result = run_child(script, trees.paths[side], {"data": str(args.data), "backbone": args.backbone, "outputs": str(folder)})
            model_file = folder / "model.safetensors"
            with safe_open(str(model_file), "np") as handle:
                np.save(folder / "memory_bank.npy", handle.get_tensor("memory_bank"))
                settings[side].append({key: value for key, value in handle.metadata().items()})
            model_file.unlink()
            return result

        results = interleave(args.rounds, measure, report=lambda line: print(line, flush=True))
        outputs = compare_outputs({side: [trees.scratch / f"{side}-{n}" for n in range(args.rounds)] for side in SIDES})
        outputs["model_file_metadata_identical"] = settings["old"][0] == settings["new"][0]
        changed_during_run = tree_digest(REPO / "src") != trees.new_digest
        quantities, passed = summarise(results, AGAINST_GATED, args.tolerance)
        extra = {"backbone": args.backbone, "children": {side: [{k: v for k, v in r.items() if k != "figures"} for r in results[side]] for side in SIDES},
                 "working_tree_src_changed_during_run": changed_during_run}
        notes = list(AGAINST_NOTES) + (["The working tree's src/ changed during the run: the copy made at the start was measured."] if changed_during_run else [])
        result = comparison("speed.py", trees, args.tolerance, args.rounds, results, quantities, passed, outputs, time.perf_counter() - started, notes, extra)
        shutil.rmtree(trees.scratch, ignore_errors=True)
    path = write(result, args.out, f"speed_vs_{trees.short}", "speed.py --against")
    print("\n".join(lines(result, "speed.py --against")))
    print(f"\nwritten: {path} and .md", flush=True)
    return 0 if passed else 1


def markdown(r: dict) -> str:
    fit, split, acc = r["fit"], r["scoring_split_ms_per_image"], r["accuracy"]
    lines = [
        f"Machine: {describe(r['machine'])}. Command: {headline(r)}.",
        "",
        "| bottle, MobileNetV2, 10% coreset | patchcore | plain reference | anomalib 2.7 |",
        "|---|---|---|---|",
        f"| fit (s), timed around the fit | {fit['patchcore']['fit_seconds']:.1f} | {fit['reference']['fit_seconds']:.1f} | {r['anomalib_2_7']['fit_seconds']:.0f} |",
        f"| fit, whole process (s) | {fit['patchcore']['process_seconds']:.1f} | {fit['reference']['process_seconds']:.1f} | - |",
        f"| fit: features / coreset / calibration (s) | {_phases(fit['patchcore'])} | {_phases(fit['reference'])} | - |",
        f"| fit peak memory (GB) | {fit['patchcore']['peak_memory_gb']:.2f} | {fit['reference']['peak_memory_gb']:.2f} | {r['anomalib_2_7']['peak_memory_gb']:.2f} |",
        f"| image AUROC / pixel AUROC | {acc['exact']['image_auroc']:.3f} / {acc['exact']['pixel_auroc']:.3f} | "
        f"{acc['reference']['image_auroc']:.3f} / {acc['reference']['pixel_auroc']:.3f} | {r['anomalib_2_7']['image_auroc']:.3f} / {r['anomalib_2_7']['pixel_auroc']:.3f} |",
        "",
        f"Fitting cookies (31 images, 576 x 768) peaks at {r['fit_cookies']['peak_memory_gb']:.2f} GB in {r['fit_cookies']['fit_seconds']:.1f} s.",
        "",
        f"Fit: {fit['speedup_vs_anomalib']:.0f}x faster than anomalib 2.7's fit ({r['anomalib_2_7']['source']}; both timed around the fit, after the "
        f"imports), {fit['whole_process_speedup_vs_anomalib']:.0f}x counting our whole process; {fit['speedup_vs_reference']:.1f}x faster "
        f"than the plain reference in the same run (coreset alone {fit['coreset_speedup_vs_reference']:.1f}x).",
        "",
        "| scoring, ms per image | decode + resize | backbone | search + eq. 7 | maps |",
        "|---|---|---|---|---|",
    ]
    for name, stages in split.items():
        lines.append(f"| {name} | " + " | ".join(f"{stages[k]:.1f}" for k in ("decode_and_resize", "backbone", "search_and_eq7", "maps")) + " |")
    ips = {index: t["images_per_second"] for index, t in r["scoring_throughput"].items()}
    whole = {index: t["whole_process_images_per_second"] for index, t in r["scoring_throughput"].items()}
    lines += [
        "",
        f"`patchcore predict` over bottle's {r['scoring_throughput']['exact']['images']} test images (those anomalib's engine.test scores) with pictures, "
        f"timed after the imports as anomalib's test is: {ips['exact']:.1f} images/s exact ({r['scoring_speedup_vs_anomalib']['exact']:.1f}x anomalib's "
        f"{r['anomalib_2_7']['scoring_images_per_second']:.1f}), {ips['ivf']:.1f} images/s with `--index ivf` ({r['scoring_speedup_vs_anomalib']['ivf']:.1f}x); "
        f"the whole process, start-up and imports included: {whole['exact']:.1f} and {whole['ivf']:.1f} images/s.",
        f"IVF recall of the exact nearest bank entry: {r['ivf_recall']:.4f}; image / pixel AUROC with IVF {acc['ivf']['image_auroc']:.3f} / {acc['ivf']['pixel_auroc']:.3f}.",
    ]
    wide = r.get("wide_resnet50_2")
    if wide:
        bank = " x ".join(str(n) for n in wide["fit"]["bank"])
        against = (
            f"{wide['speedup_vs_anomalib']:.1f}x anomalib 2.7's {wide['anomalib_images_per_second']:.2f} images/s with the same weights and bank ({r['anomalib_2_7']['wide_resnet50_2']['source']})"
            if wide["speedup_vs_anomalib"] else "anomalib not run"
        )
        lines += [
            "",
            f"Wide ResNet-50 (seeded random weights: timing only; bank {bank} from bottle's training images, fitted in "
            f"{wide['fit']['process_seconds']:.1f} s): `patchcore predict` over the 83 test images with pictures, exact search, "
            f"{wide['scoring_throughput']['images_per_second']:.2f} images/s timed after the imports, {against} "
            f"(whole process {wide['scoring_throughput']['whole_process_images_per_second']:.2f} images/s).",
        ]
    if "scale" in r:
        origin = f" (from {r['scale_from_earlier_run']})" if "scale_from_earlier_run" in r else ""
        lines += ["", f"Scale{origin}:", "", "| backbone | training images | fit (s) | peak memory (GB) | bank |", "|---|---|---|---|---|"]
        for backbone, points in r["scale"].items():
            for p in points:
                lines.append(f"| {backbone} | {p['images']} | {p['fit_seconds']:.1f} | {p['peak_memory_gb']:.2f} | {p['bank'][0]} x {p['bank'][1]} |")
        for backbone, exponents in r["scale_growth_exponents"].items():
            lines.append(f"\n{backbone}: fit time grows as images^{exponents['fit_seconds']:.2f}, peak memory as images^{exponents['peak_memory_gb']:.2f}.")
    return "\n".join(lines) + "\n"


def _phases(run: dict) -> str:
    """Features / coreset / calibration seconds (fits before leave-one-out calibration had no such phase)."""
    phases = run["phases"]
    return " / ".join(f"{phases[key]:.1f}" if key in phases else "-" for key in ("features", "coreset", "calibration"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--anomalib", action="store_true", help="install anomalib 2.7 in .venv-anomalib and rerun its PatchCore (about 35 min) instead of using its recorded figures")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    parser.add_argument("--markdown-only", action="store_true", help="rewrite speed.md from speed.json")
    parser.add_argument("--against", metavar="COMMIT", help="compare COMMIT (e.g. HEAD~1) with the working tree, interleaved, instead: speed_vs_<commit>.json")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: rounds, each one process per commit (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="with --against: largest |new/old - 1| of a gated quantity that passes (default: %(default)s)")
    parser.add_argument("--against-child", metavar="JOB", help=argparse.SUPPRESS)
    # child-process modes
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-accuracy", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-predict", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--index", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="mobilenet_v2", help="with --against: the backbone (default: %(default)s; its ImageNet weights must be on disk)")
    parser.add_argument("--image-size", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.against_child:
        print(json.dumps(against_child(json.loads(arguments.against_child))))
    elif arguments.against:
        sys.exit(run_against(arguments))
    elif arguments.worker:
        print(json.dumps(worker_fit(arguments)))
    elif arguments.worker_predict:
        print(json.dumps(worker_predict(arguments)))
    elif arguments.worker_accuracy:
        print(json.dumps(accuracy(Path(arguments.worker_accuracy[0]), Path(arguments.worker_accuracy[1]), "exact", reference=True)))
    elif arguments.markdown_only:
        summary = json.loads((arguments.out / "speed.json").read_text())
        (arguments.out / "speed.md").write_text(markdown(summary))
        print(markdown(summary))
    else:
        arguments.out.mkdir(parents=True, exist_ok=True)
        summary = main_run(arguments)
        (arguments.out / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")
        (arguments.out / "speed.md").write_text(markdown(summary))
        print(markdown(summary))
