"""Fit time, peak memory and disk use of fits on thousands of good images with a fixed bank size
(issue 9's scale figures).

    .venv/bin/python benchmarks/scale.py [--sizes 1000 5000 10000] [--wrn-images 2000] [--skip-wrn]
                                         [--bank-size 40000] [--images DIR] [--temp-dir DIR]
                                         [--data ../shared/data] [--out benchmarks/results] [--fresh]

Training images are made from MVTec AD bottle's 209 train/good images: each is resized to
``--image-px`` (320 px; the model resizes to 256 anyway, and decoding 900 px PNGs would dominate
the timing), then given one of the square's 8 flips and rotations (the dihedral group), and,
from the 210th image on, a seeded small shift (up to 4% each way) and small rotation (up to 5
degrees) with reflected edges. Image ``k`` is always the same picture (seeded by ``k``), so the
first 1,000 images are also the first 1,000 of the 10,000: the sizes are nested. They are
written once, as PNG, by a pool of 2 processes, into a cache folder outside the repository
(default /tmp/patchcore-scale-images/bottle-320px-seed0) and reused by later runs; the time this
takes is reported apart and is not part of any fit.

Then, each in a fresh child process of its own (the library's ``PatchCore(...).fit`` on the
first N images, then ``save``, as ``patchcore fit --bank-size`` runs it), with ``--bank-size``
entries (40,000):

- mobilenet_v2 (ImageNet weights) on 1,000, 5,000 and 10,000 images (``--sizes``);
- wide_resnet50_2 with seeded random weights (timing, memory and disk only: no accuracy) on
  2,000 images (``--wrn-images``; ``--skip-wrn`` leaves it out).

For each fit it measures: the wall time of each phase (``fit_seconds_``: loading the backbone,
features, coreset, calibration), of the whole fit and of the whole child process (start-up,
fit and save: what ``patchcore fit`` costs); the child's peak memory, i.e. its maximum resident
set size, file-backed pages included (VmHWM, read by the child itself at its end; unlike
getrusage's ru_maxrss it does not inherit the parent's size across exec), and its peak within
each phase (VmRSS sampled every 0.2 s); the temporary features written to disk
(``fit_disk_bytes_``); the bank's shape; the model file's size; the cores the child used (its
CPU time over its wall time); and the CPU that other work on the machine took during the run
(/proc/stat, less the child's own): the times are only good on a quiet machine, and runs that
shared it with more than 0.2 cores of other work are marked.

It reports the issue's checks (10,000 images with mobilenet_v2: under 20 minutes for the whole
child process and under 4 GB peak; 2,000 with Wide ResNet-50: under 6 GB), and the evidence of
linear growth: the marginal cost (seconds per 1,000 more images) between consecutive sizes, the
ratio of the last to the first (1 for linear growth, 2.5 from 1k-5k-10k for quadratic; at most
1.25 passes), and the exponent b of fit time ~ images^b. GB are 10^9 bytes.

Results go to scale.json and scale.md, and the curves to scale.png (matplotlib). The results are
written after every run, and runs already in scale.json with the same images, bank size and
image recipe are kept unless a new run replaces them (``--fresh`` starts afresh), so the runs can
be done in several sittings. ``--markdown-only`` rewrites scale.md and scale.png from scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path

from provenance import describe, headline, provenance, short, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
#: the fit's phases, as ``fit_seconds_`` names them (the contamination check's since issue 21)
PHASES = ("load_backbone", "features", "coreset", "calibration", "contamination")
#: the issue's limits: (backbone, images) -> (what, limit, unit)
CHECKS = {
    ("mobilenet_v2", 10000): [("process_seconds", 20 * 60, "s"), ("peak_memory_gb", 4.0, "GB")],
    ("wide_resnet50_2", 2000): [("peak_memory_gb", 6.0, "GB")],
}
#: the marginal cost (s per 1,000 images) of the last step may be at most this times the first's
LINEAR_RATIO_LIMIT = 1.25
#: other work on the machine (cores' worth, on average over a run) above which a run is marked as slowed
BUSY_CORES = 0.2
#: recipe of the training images; a cache folder made with another one is not reused
MAX_SHIFT = 0.04  # of the side, each way
MAX_ANGLE = 5.0  # degrees, each way
MARGIN = 0.15  # reflected border around the picture before rotating and shifting (covers 5 degrees and 4%)


# ---------------------------------------------------------------------------------------------
# Training images


def recipe(sources: int, size: int, seed: int) -> dict:
    return {"source": "mvtec_ad/bottle/train/good", "source_images": sources, "size_px": size, "seed": seed,
            "dihedral": 8, "max_shift": MAX_SHIFT, "max_angle_degrees": MAX_ANGLE, "fill": "reflect", "format": "png"}


def image_name(number: int) -> str:
    return f"{number:06d}.png"


def make_variants(source: str, numbers: list[int], sources: int, folder: str, size: int, seed: int) -> int:
    """Write images ``numbers`` (all made from ``source``) that are not there yet; return how many."""
    import numpy as np
    from PIL import Image

    transforms = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
                  Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE]
    missing = [n for n in numbers if not (Path(folder) / image_name(n)).exists()]
    if not missing:
        return 0
    with Image.open(source) as image:
        base = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    margin = math.ceil(MARGIN * size)
    for number in missing:
        transform = transforms[(number // sources) % len(transforms)]
        picture = base if transform is None else base.transpose(transform)
        if number >= sources:  # the originals' first appearance stays unshifted
            rng = np.random.default_rng([seed, number])
            dx, dy = (round(v) for v in rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * size)
            angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
            padded = Image.fromarray(np.pad(np.asarray(picture), ((margin, margin), (margin, margin), (0, 0)), mode="reflect"))
            rotated = padded.rotate(angle, resample=Image.Resampling.BILINEAR)
            picture = rotated.crop((margin + dx, margin + dy, margin + dx + size, margin + dy + size))
        target = Path(folder) / image_name(number)
        partial = target.with_name(f".{target.name}.partial")  # hidden: never read as an image
        picture.save(partial, format="PNG", compress_level=1)  # fast to write; as fast to read
        os.replace(partial, target)
    return len(missing)


def training_images(bottle_train: Path, count: int, folder: Path, size: int, seed: int, workers: int = 2) -> tuple[list[Path], float, int]:
    """The first ``count`` images of the recipe in ``folder``, made where missing; the seconds
    and the number of images that making them took."""
    sources = sorted(bottle_train.glob("*.png"))
    if not sources:
        raise SystemExit(f"no PNG images in {bottle_train}")
    wanted = recipe(len(sources), size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    card = folder / "recipe.json"
    if card.is_file() and json.loads(card.read_text()) != wanted:
        raise SystemExit(f"{folder} holds images made another way ({card}); give another --images folder or remove it")
    card.write_text(json.dumps(wanted, indent=2) + "\n")
    started = time.perf_counter()
    made = 0
    by_source = [list(range(s, count, len(sources))) for s in range(len(sources))]
    jobs = [(str(sources[s]), numbers) for s, numbers in enumerate(by_source) if numbers]
    if any(not (folder / image_name(n)).exists() for n in range(count)):
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(make_variants, source, numbers, len(sources), str(folder), size, seed) for source, numbers in jobs]
            made = sum(f.result() for f in futures)
    return [folder / image_name(n) for n in range(count)], time.perf_counter() - started, made


def random_weights_file(backbone: str, folder: Path) -> Path:
    """Torchvision's architecture with seeded random weights (none can be downloaded here), made
    once in the parent so that building it does not count in the measured child's memory."""
    path = folder / f"{backbone}-random-seed0.pth"
    if not path.is_file():
        import torch

        from patchcore.backbones import get_spec

        torch.manual_seed(0)
        partial = path.with_name(f".{path.name}.partial")
        torch.save(get_spec(backbone).build().state_dict(), partial)
        os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------------------------
# Child process: one fit, measured on its own


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: peak resident so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class RssSampler(threading.Thread):
    """VmRSS every ``interval`` seconds, with the time it was read: the peak within each phase."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.perf_counter(), status_kb("VmRSS")))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peaks(self, start: float, phases: dict[str, float]) -> dict[str, float]:
        """Peak VmRSS (GB) in each of ``phases`` (seconds each, in order from ``start``)."""
        peaks, begin = {}, start
        for name, seconds in phases.items():
            inside = [kb for t, kb in self.samples if begin <= t <= begin + seconds]
            peaks[name] = max(inside) * 1024 / GB if inside else None
            begin += seconds
        return peaks


def worker(job: dict) -> dict:
    """Fit the first ``images`` images with a bank size, save the model; report what it cost."""
    import torch

    from patchcore import PatchCore

    sampler = RssSampler()
    sampler.start()
    baseline = status_kb("VmRSS") * 1024 / GB
    paths = [Path(job["folder"]) / image_name(n) for n in range(job["images"])]
    model = PatchCore(job["backbone"], bank_size=job["bank_size"], weights=job["weights"], device="cpu",
                      temp_dir=job["temp_dir"], progress=False)
    fit_started = time.perf_counter()
    model.fit(paths)
    fit_seconds = time.perf_counter() - fit_started
    save_started = time.perf_counter()
    model.save(job["model_file"])
    save_seconds = time.perf_counter() - save_started
    sampler.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    bank = list(model.memory_bank_.shape)
    return {
        "backbone": job["backbone"],
        "random_weights": job["weights"] is not None,
        "images": job["images"],  # the images given the fit (its checks and growth are by these)
        "fitted_images": model.num_fit_images_,  # less the unreadable and those the contamination check set aside
        "set_aside": len(model.contamination_.set_aside) if model.contamination_ is not None else 0,
        "skipped": len(model.skipped_),
        "bank_size": job["bank_size"],
        "patches": round(bank[0] / model.coreset_ratio_),
        "bank": bank,
        "fit_seconds": fit_seconds,
        "phases": model.fit_seconds_,
        "save_seconds": save_seconds,
        "peak_memory_gb": status_kb("VmHWM") * 1024 / GB,
        "peak_memory_by_phase_gb": sampler.peaks(fit_started, model.fit_seconds_),
        "memory_before_fit_gb": baseline,
        "temporary_disk_gb": model.fit_disk_bytes_ / GB,
        "model_mb": Path(job["model_file"]).stat().st_size / 1e6,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "torch_threads": torch.get_num_threads(),
    }


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all processes, all cores) and has had stolen
    by the hypervisor, since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def run_fit(job: dict) -> dict:
    """One fit in a fresh child process; its figures, with the child's whole wall time and the
    CPU that other work on the machine took meanwhile."""
    load = os.getloadavg()[0]
    busy_before, steal_before = machine_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    busy_after, steal_after = machine_cpu_seconds()
    if done.returncode != 0:
        raise RuntimeError(f"fit of {job['images']} images with {job['backbone']} failed:\n{done.stderr[-4000:]}")
    point = json.loads(done.stdout.strip().splitlines()[-1])
    point.update(process_seconds=seconds, load_average_before=load,
                 other_work_cores=max(0.0, busy_after - busy_before - point["cpu_seconds"]) / seconds,
                 stolen_cores=(steal_after - steal_before) / seconds,
                 finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return point


# ---------------------------------------------------------------------------------------------
# Summary


def growth(points: list[dict]) -> dict | None:
    """Marginal cost between consecutive sizes, its last-to-first ratio, and exponents of fit time ~ images^b."""
    points = sorted(points, key=lambda p: p["images"])
    if len(points) < 2:
        return None
    steps = []
    for a, b in pairwise(points):
        per_1000 = 1000 / (b["images"] - a["images"])
        steps.append({
            "from": a["images"], "to": b["images"],
            "fit_seconds_per_1000_images": per_1000 * (b["fit_seconds"] - a["fit_seconds"]),
            "phase_seconds_per_1000_images": {k: per_1000 * (b["phases"][k] - a["phases"][k]) for k in ("features", "coreset", "calibration") if k in a["phases"] and k in b["phases"]},
            "peak_memory_gb_per_1000_images": per_1000 * (b["peak_memory_gb"] - a["peak_memory_gb"]),
        })
    x = [math.log(p["images"]) for p in points]
    y = [math.log(p["fit_seconds"]) for p in points]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    least_squares = sum((u - mean_x) * (v - mean_y) for u, v in zip(x, y)) / sum((u - mean_x) ** 2 for u in x)
    first, last = steps[0]["fit_seconds_per_1000_images"], steps[-1]["fit_seconds_per_1000_images"]
    return {
        "steps": steps,
        "marginal_ratio": last / first if len(steps) > 1 and first > 0 else None,
        "exponent_least_squares": least_squares,
        "exponent_pairwise": [math.log(b["fit_seconds"] / a["fit_seconds"]) / math.log(b["images"] / a["images"]) for a, b in pairwise(points)],
    }


def checks(runs: list[dict], growth_by_backbone: dict) -> list[dict]:
    found = []
    for (backbone, images), limits in CHECKS.items():
        run = next((r for r in runs if r["backbone"] == backbone and r["images"] == images), None)
        for key, limit, unit in limits:
            what = {"process_seconds": "whole fit (child process)", "peak_memory_gb": "peak memory"}[key]
            entry = {"check": f"{backbone}, {images:,} images: {what} < {limit:g} {unit}", "limit": limit, "measured": None, "status": "not run"}
            if run is not None:
                entry.update(measured=run[key], status="pass" if run[key] < limit else "fail")
            found.append(entry)
    needed = {1000, 5000, 10000}
    mobilenet = growth_by_backbone.get("mobilenet_v2")
    sizes = {r["images"] for r in runs if r["backbone"] == "mobilenet_v2"}
    entry = {"check": f"mobilenet_v2, 1,000 -> 5,000 -> 10,000 images: linear growth (marginal cost ratio <= {LINEAR_RATIO_LIMIT})",
             "limit": LINEAR_RATIO_LIMIT, "measured": None, "status": "not run"}
    if needed <= sizes:
        subset = growth([r for r in runs if r["backbone"] == "mobilenet_v2" and r["images"] in needed])
        entry.update(measured=subset["marginal_ratio"], status="pass" if subset["marginal_ratio"] <= LINEAR_RATIO_LIMIT else "fail")
    elif mobilenet and mobilenet["marginal_ratio"] is not None:
        entry["note"] = f"sizes run: {sorted(sizes)}; marginal cost ratio there {mobilenet['marginal_ratio']:.2f}"
    found.append(entry)
    return found


def summarise(results: dict) -> dict:
    results["runs"].sort(key=lambda r: (r["backbone"] != "mobilenet_v2", r["backbone"], r["images"]))
    results["growth"] = {}
    for backbone in dict.fromkeys(r["backbone"] for r in results["runs"]):
        trend = growth([r for r in results["runs"] if r["backbone"] == backbone])
        if trend:
            results["growth"][backbone] = trend
    results["checks"] = checks(results["runs"], results["growth"])
    return results


def markdown(r: dict) -> str:
    images = r["images"]
    lines = [
        f"Machine: {describe(r['machine'])}. Command: {headline(r)}"
        + (" (runs kept from earlier sittings say their own commit in scale.json)." if any(p.get("provenance", {}).get("commit", r.get("commit")) != r.get("commit") for p in r["runs"]) else "."),
        "",
        (
            f"Training images: bottle's {images['source_images']} good images at {images['size_px']} px (the model resizes to 256), "
            f"the 8 flips and rotations of the square, and from the {images['source_images'] + 1}th on a seeded shift of up to "
            f"{images['max_shift']:.0%} and rotation of up to {images['max_angle_degrees']:g} degrees (reflected edges); seed {images['seed']}. "
            f"Bank size {r['bank_size']:,} entries. Each fit in a child process of its own; GB = 10^9 bytes."
        ),
        "",
        "| backbone | images | set aside | patches | bank | fit (s) | load / features / coreset / calibration / contamination check (s) | whole process (s) | cores used | peak memory (GB) | temporary disk (GB) | model (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["runs"]:
        phases = " / ".join(f"{p['phases'][k]:.1f}" if k in p["phases"] else "-" for k in PHASES)
        name = p["backbone"] + (" (random weights)" if p["random_weights"] else "")
        lines.append(f"| {name} | {p['images']:,} | {p.get('set_aside', '-')} | {p['patches']:,} | {p['bank'][0]:,} x {p['bank'][1]} | {p['fit_seconds']:.1f} | {phases} | "
                     f"{p['process_seconds']:.1f} | {p['cpu_seconds'] / p['process_seconds']:.2f}{' *' if busy(p) else ''} | {p['peak_memory_gb']:.2f} | {p['temporary_disk_gb']:.2f} | {p['model_mb']:.1f} |")
    lines += ["", "Peak memory within each phase (GB, VmRSS sampled every 0.2 s; before the fit: start-up and imports):", "",
              "| backbone | images | before fit | load | features | coreset | calibration | contamination check |", "|---|---|---|---|---|---|---|---|"]
    for p in r["runs"]:
        by = p["peak_memory_by_phase_gb"]
        cells = " | ".join(f"{by[k]:.2f}" if by.get(k) is not None else "-" for k in PHASES)
        lines.append(f"| {p['backbone']} | {p['images']:,} | {p['memory_before_fit_gb']:.2f} | {cells} |")
    lines += ["", "Checks (issue 9):", ""]
    for c in r["checks"]:
        measured = "" if c["measured"] is None else f": {c['measured']:.2f}"
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(f"- **{c['status']}**{measured} - {c['check']}{note}")
    for backbone, g in r["growth"].items():
        lines += ["", f"Growth, {backbone}:", "", "| images | fit: s per 1,000 more images | features | coreset | calibration | peak memory: GB per 1,000 more |", "|---|---|---|---|---|---|"]
        for s in g["steps"]:
            phase = " | ".join(f"{s['phase_seconds_per_1000_images'][k]:.1f}" if k in s["phase_seconds_per_1000_images"] else "-" for k in ("features", "coreset", "calibration"))
            lines.append(f"| {s['from']:,} -> {s['to']:,} | {s['fit_seconds_per_1000_images']:.1f} | {phase} | {s['peak_memory_gb_per_1000_images']:.3f} |")
        ratio = "" if g["marginal_ratio"] is None else f"Marginal cost, last step over first: {g['marginal_ratio']:.2f} (1 for linear growth). "
        exponents = ", ".join(f"{b:.2f}" for b in g["exponent_pairwise"])
        lines += ["", (f"{ratio}Fit time ~ images^b with b = {g['exponent_least_squares']:.2f} (least squares over all sizes; between consecutive sizes {exponents}); "
                       "a fixed start-up cost keeps b below 1 for linear growth.")]
    others = ", ".join(f"{p['backbone']} {p['images']:,}: {p.get('other_work_cores', float('nan')) + p.get('stolen_cores', 0.0):.2f}" for p in r["runs"])
    lines += ["", "Cores used: the child's CPU time over its wall time. "
                  f"Other work on the machine during each run, in cores (CPU time of all other processes and time stolen by the hypervisor, over the run's wall time; 0 on a quiet machine): {others}. "
                  + (f"Runs marked * shared the machine with more than {BUSY_CORES} cores of other work: their times are not representative. " if any(busy(p) for p in r["runs"]) else "")
                  + f"Making the training images took {images['generation_seconds']:.0f} s for {images['generated']:,} new images (not part of any fit)."]
    return "\n".join(lines) + "\n"


def busy(run: dict) -> bool:
    """Whether other work on the machine slowed a run down."""
    return run.get("other_work_cores", 0.0) + run.get("stolen_cores", 0.0) > BUSY_CORES


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backbone in dict.fromkeys(p["backbone"] for p in r["runs"]):
        points = [p for p in r["runs"] if p["backbone"] == backbone]
        label = backbone + (" (random weights)" if points[0]["random_weights"] else "")
        images = [p["images"] for p in points]
        time_axis.plot(images, [p["process_seconds"] / 60 for p in points], "o-", label=label)
        memory_axis.plot(images, [p["peak_memory_gb"] for p in points], "o-", label=label)
    for (backbone, images), limits in CHECKS.items():
        for key, limit, _ in limits:
            axis, value = (time_axis, limit / 60) if key == "process_seconds" else (memory_axis, limit)
            axis.plot([images], [value], "r_", markersize=18, mew=2)
            axis.annotate(f"limit, {backbone}", (images, value), textcoords="offset points", xytext=(-10, 6), fontsize=7, color="r", ha="right")
    time_axis.set(xlabel="training images", ylabel="fit, whole process (min)", title="Fit time")
    memory_axis.set(xlabel="training images", ylabel="peak resident memory (GB)", title="Peak memory (VmHWM)")
    for axis in (time_axis, memory_axis):
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"patchcore fit, bank size {r['bank_size']:,}, {r['images']['size_px']} px bottle variants, {os.cpu_count()}-core CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(results: dict, out: Path) -> None:
    summarise(results)
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(results))
    plot(results, out / "scale.png")


def main(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    bottle_train = args.data / "mvtec_ad" / "bottle" / "train" / "good"
    folder = args.images or Path(tempfile.gettempdir()) / "patchcore-scale-images" / f"bottle-{args.image_px}px-seed{args.seed}"
    plan = [("mobilenet_v2", n) for n in sorted(set(args.sizes))] + ([] if args.skip_wrn else [("wide_resnet50_2", args.wrn_images)])
    count = max(n for _, n in plan)
    print(f"training images: {count:,} in {folder}", flush=True)
    _, generation_seconds, generated = training_images(bottle_train, count, folder, args.image_px, args.seed)
    print(f"  {generated:,} made in {generation_seconds:.0f} s", flush=True)

    sources = len(list(bottle_train.glob("*.png")))
    images = {**recipe(sources, args.image_px, args.seed), "folder": str(folder), "generation_seconds": generation_seconds, "generated": generated}
    fields = provenance()
    results = stamped(fields, {"bank_size": args.bank_size, "images": images, "runs": []})
    previous = args.out / "scale.json"
    if previous.is_file() and not args.fresh:
        earlier = json.loads(previous.read_text())
        same = {k: v for k, v in earlier.get("images", {}).items() if k in recipe(0, 0, 0)} == {k: v for k, v in images.items() if k in recipe(0, 0, 0)}
        if same and earlier.get("bank_size") == args.bank_size:
            results["runs"] = earlier["runs"]
            print(f"keeping {len(earlier['runs'])} earlier runs from {previous} that this run does not redo (--fresh to drop them)", flush=True)

    with tempfile.TemporaryDirectory(dir=args.temp_dir) as scratch:
        for backbone, n in plan:
            weights = str(random_weights_file(backbone, folder)) if backbone != "mobilenet_v2" else None
            job = {"backbone": backbone, "images": n, "bank_size": args.bank_size, "weights": weights, "folder": str(folder),
                   "temp_dir": args.temp_dir and str(args.temp_dir), "model_file": str(Path(scratch) / f"{backbone}-{n}.safetensors")}
            print(f"fit: {backbone}{' (random weights)' if weights else ''}, {n:,} images, bank size {args.bank_size:,}", flush=True)
            point = run_fit(job)
            point["provenance"] = short(fields)  # runs of earlier sittings may be kept beside it
            Path(job["model_file"]).unlink(missing_ok=True)
            phases = ", ".join(f"{k} {v:.1f}" for k, v in point["phases"].items())
            print(f"  fit {point['fit_seconds']:.1f} s ({phases}); whole process {point['process_seconds']:.1f} s; "
                  f"peak {point['peak_memory_gb']:.2f} GB; temporary disk {point['temporary_disk_gb']:.2f} GB; "
                  f"bank {point['bank'][0]} x {point['bank'][1]}; model {point['model_mb']:.1f} MB", flush=True)
            results["runs"] = [r for r in results["runs"] if (r["backbone"], r["images"]) != (backbone, n)] + [point]
            results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            write(results, args.out)
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000], help="training images for the mobilenet_v2 fits")
    parser.add_argument("--wrn-images", type=int, default=2000, help="training images for the wide_resnet50_2 fit (random weights)")
    parser.add_argument("--skip-wrn", action="store_true", help="leave out the wide_resnet50_2 fit")
    parser.add_argument("--bank-size", type=int, default=40000, help="memory bank entries (--bank-size of patchcore fit)")
    parser.add_argument("--images", type=Path, help="cache folder for the training images (default /tmp/patchcore-scale-images/bottle-<px>px-seed<seed>)")
    parser.add_argument("--image-px", type=int, default=320, help="side of the training images written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shifts and rotations")
    parser.add_argument("--temp-dir", type=Path, help="folder for the fits' temporary features and the model files (default $TMPDIR or /tmp)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--fresh", action="store_true", help="drop the runs of an earlier scale.json in --out instead of keeping those not redone")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite scale.md and scale.png from scale.json")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.sizes) < 2 or args.wrn_images < 2 or args.bank_size < 1:
        parser.error("every size needs at least 2 images, and the bank at least 1 entry")
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker:
        print(json.dumps(worker(json.loads(arguments.worker))))
    elif arguments.markdown_only:
        summary = json.loads((arguments.out / "scale.json").read_text())
        write(summary, arguments.out)
        print(markdown(summary))
    else:
        summary = main(arguments)
        print(markdown(summary))
