"""Two image sets generated from a seed, in MVTec AD layout, for the input-mode benchmark.

    .venv/bin/python benchmarks/generated_sets.py OUT [--seed 0]

- ``long_strips``: rolled-metal strips, 1,250 x 500 px (landscape), a fine brushed grain on a
  slowly varying sheen; defects are thin scratches at any angle and small pits, painted in.
  Squashing 1,250 px into 256 shrinks a scratch five times across its length, so the
  shape-keeping input should win here.
- ``mixed_crops``: crops of a granular tile surface of many sizes in both orientations, each
  side drawn from 120 to 600 px, with the same kinds of defects. No one shape fits them all.

Every image is drawn from its own seeded generator (``numpy.random.default_rng([seed, set,
split, index])``), so a set is the same on every machine and any one image can be regenerated
alone. Masks are the painted pixels (0/255 PNG), as ``ground_truth/<defect>/<stem>_mask.png``.
Nothing here comes from a real data set; the textures are band-limited noise.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SetSpec:
    name: str
    train: int
    test_good: int
    test_defective: int
    size: Callable[[np.random.Generator], tuple[int, int]]  # (height, width) of one image
    surface: Callable[[np.random.Generator, int, int], np.ndarray]  # float32 grey in [0, 1]


def brushed_metal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A fine grain drawn out along the rolling direction, over a slow sheen."""
    grain = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigmaX=6.0, sigmaY=0.8)
    grain /= grain.std() + 1e-6
    speckle = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 0.7)
    speckle /= speckle.std() + 1e-6
    sheen = cv2.resize(rng.standard_normal((3, 6)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(0.55 + 0.05 * grain + 0.025 * speckle + 0.04 * sheen, 0, 1)


def granular_tile(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An isotropic grain of two sizes, as a pressed ceramic or magnetic tile."""
    fine = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 1.0)
    coarse = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 4.0)
    fine /= fine.std() + 1e-6
    coarse /= coarse.std() + 1e-6
    return np.clip(0.42 + 0.05 * fine + 0.035 * coarse, 0, 1)


def paint_defects(rng: np.random.Generator, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One or two scratches or pits painted onto ``grey``: the image and the mask (0/255)."""
    height, width = grey.shape
    mask = np.zeros((height, width), np.uint8)
    kind = "scratch" if rng.random() < 0.5 else "pit"
    shade = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        centre = (int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20)))
        layer = np.zeros((height, width), np.uint8)
        if kind == "scratch":
            length = rng.uniform(0.12, 0.35) * max(height, width)
            angle = rng.uniform(0, math.pi)
            dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
            ends = [(int(centre[0] - dx), int(centre[1] - dy)), (int(centre[0] + dx), int(centre[1] + dy))]
            cv2.line(layer, ends[0], ends[1], 255, thickness=int(rng.integers(2, 4)), lineType=cv2.LINE_AA)
        else:
            axes = (int(rng.integers(4, 11)), int(rng.integers(4, 11)))
            cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA)
        sign = -1.0 if rng.random() < 0.7 else 1.0
        shade += sign * rng.uniform(0.12, 0.22) * layer.astype(np.float32) / 255.0
        mask |= (layer > 127).astype(np.uint8) * 255
    return np.clip(grey + shade, 0, 1), mask


def strip_size(rng: np.random.Generator) -> tuple[int, int]:
    return 500, 1250


def crop_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(120, 601)), int(rng.integers(120, 601))


SETS = {
    "long_strips": SetSpec("long_strips", train=60, test_good=20, test_defective=30, size=strip_size, surface=brushed_metal),
    "mixed_crops": SetSpec("mixed_crops", train=120, test_good=30, test_defective=30, size=crop_size, surface=granular_tile),
}


def to_rgb(grey: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    return np.clip(grey[..., None] * np.array(tint, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate(spec: SetSpec, out: Path, seed: int = 0) -> Path:
    """Write ``spec``'s images under ``out/spec.name`` (MVTec AD layout); returns that folder."""
    root = out / spec.name
    set_number = list(SETS).index(spec.name)
    tint = (1.0, 1.0, 1.02) if spec.name == "long_strips" else (1.05, 0.97, 0.9)
    splits = (("train/good", spec.train), ("test/good", spec.test_good), ("test/defective", spec.test_defective))
    for split_number, (split, count) in enumerate(splits):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, set_number, split_number, index])
            height, width = spec.size(rng)
            grey = spec.surface(rng, height, width)
            name = f"{index:03d}.png"
            if split == "test/defective":
                grey, mask = paint_defects(rng, grey)
                (root / "ground_truth" / "defective").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / "defective" / f"{index:03d}_mask.png")
            Image.fromarray(to_rgb(grey, tint)).save(folder / name)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()
    for name in args.sets:
        print(generate(SETS[name], args.out, args.seed))
