"""Greedy k-center selection on real patch features: the CPU loop's time and how much work its
pruning skips, against the plain loop on the same points, side by side in one run.

    .venv/bin/python benchmarks/coreset.py [--backbone mobilenet_v2] [--ratio 0.1] [--plain-picks 2000]
                                           [--data ../shared/data] [--out benchmarks/results]

The points are what a fit hands the selection: the float16 128-d projection of the patch
features of MVTec AD bottle's 209 train/good images (214,016 patches with MobileNetV2 at 256
px). Then, on those points:

- the CPU loop (``patchcore.coreset.greedy_coreset`` on the CPU, what ``fit`` runs) selects ``--ratio`` of them
  (10%: 21,402 picks), timed, with its counts: pool entries read and distances computed, as a
  share of the plain loop's work (every point against every pick, N x M);
- for a like-for-like ratio, the CPU loop and the plain loop (``_greedy_plain``: one full
  distance pass per pick, what runs on a GPU; here on the CPU, float32) each make the first
  ``--plain-picks`` picks, timed; their picks are compared (equal, or the first pick where
  they part and the float64 distances of the two candidates, a float32 near-tie).

Writes coreset.json and coreset.md in --out. On a shared machine the times swing; the counts
are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from provenance import describe, headline, provenance, stamped  # benchmarks/provenance.py: this folder is on sys.path when run as a script

from patchcore import PatchCore
from patchcore.coreset import _greedy_plain, greedy_coreset
from patchcore.fitting import FitPipeline
from patchcore.data import training_images

REPO = Path(__file__).resolve().parents[1]


def bottle_projection(data: Path, backbone: str) -> torch.Tensor:
    """The float16 projection of bottle's training patches, as a fit makes it."""
    images = training_images(data / "mvtec_ad" / "bottle")
    model = PatchCore(backbone, progress=False)
    pipeline, sizes, _ = FitPipeline.begin(model.backbone, model.layers, model.weights, model.layout, images, model.fit_options())
    patches = pipeline.extract(images, sizes)
    patches.close()
    return patches.points


def cpu_loop(points: torch.Tensor, count: int) -> tuple[np.ndarray, dict, float]:
    counts: dict[str, int] = {}
    started = time.perf_counter()
    picks = greedy_coreset(points, count, seed=0, counts=counts)
    return picks.numpy(), counts, time.perf_counter() - started


def plain_loop(points: torch.Tensor, count: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    picks = _greedy_plain(points.float(), count, 0, None, None)
    return picks.numpy(), time.perf_counter() - started


def first_difference(points: torch.Tensor, a: np.ndarray, b: np.ndarray) -> dict | None:
    """Where two pick lists part, and the float64 distances of the two candidates then."""
    differ = np.flatnonzero(a != b)
    if len(differ) == 0:
        return None
    step = int(differ[0])
    x = points.double()
    nearest = torch.full((len(x),), float("inf"), dtype=torch.float64)
    for pick in a[:step]:
        nearest = torch.minimum(nearest, (x - x[int(pick)]).square().sum(dim=1))
    first, second = float(nearest[int(a[step])]), float(nearest[int(b[step])])
    return {"pick": step, "cpu_loop": int(a[step]), "plain_loop": int(b[step]), "cpu_squared_distance": first,
            "plain_squared_distance": second, "relative_gap": abs(first - second) / max(first, second)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--plain-picks", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    fields = provenance()

    points = bottle_projection(args.data, args.backbone)
    total = len(points)
    count = max(1, round(args.ratio * total))
    greedy_coreset(points[:20000], 50)  # compile
    picks, counts, seconds = cpu_loop(points, count)
    full = {"picks": count, "seconds": seconds, **counts,
            "entries_read_share": counts["entries_read"] / (total * count), "distances_share": counts["distances"] / (total * count)}
    print(f"cpu loop, {count:,} picks of {total:,}: {seconds:.1f} s; entries read {full['entries_read_share']:.2%}, "
          f"distances {full['distances_share']:.2%} of the plain loop's {total * count:,}", flush=True)
    few = min(args.plain_picks, count)
    cpu_picks, _, cpu_seconds = cpu_loop(points, few)
    plain_picks, plain_seconds = plain_loop(points, few)
    difference = first_difference(points, cpu_picks, plain_picks)
    side = {"picks": few, "cpu_loop_seconds": cpu_seconds, "plain_loop_seconds": plain_seconds, "speedup": plain_seconds / cpu_seconds,
            "same_picks": difference is None, "first_difference": difference}
    parted = "" if difference is None else f" (parted at pick {difference['pick']}, relative gap {difference['relative_gap']:.1e})"
    print(f"first {few:,} picks: cpu loop {cpu_seconds:.2f} s, plain loop {plain_seconds:.2f} s ({side['speedup']:.1f}x); "
          f"same picks: {difference is None}{parted}", flush=True)

    result = stamped(fields, {"backbone": args.backbone, "points": total, "dims": int(points.shape[1]), "full": full, "side_by_side": side})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coreset.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {describe(result['machine'])}. Command: {headline(result)}.", "",
             f"Points: the float16 {result['dims']}-d projection of bottle's {total:,} training patches ({args.backbone}).", "",
             "| run | picks | seconds | entries read (share of N x M) | distances computed (share of N x M) |", "|---|---|---|---|---|",
             f"| CPU loop, {args.ratio:.0%} | {count:,} | {seconds:.1f} | {full['entries_read_share']:.2%} | {full['distances_share']:.2%} |", "",
             "Side by side, the same points and picks:", "",
             "| picks | CPU loop (s) | plain loop (s) | ratio | same picks |", "|---|---|---|---|---|",
             f"| {few:,} | {cpu_seconds:.2f} | {plain_seconds:.2f} | {side['speedup']:.1f}x | "
             + ("yes" if difference is None else f"until pick {difference['pick']} (a float32 near-tie: relative gap {difference['relative_gap']:.1e})") + " |", ""]
    (args.out / "coreset.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
