"""The fitting pipeline: the steps of a PatchCore fit, behind one small interface that a local
fit (``PatchCore.fit``), an update (``PatchCore.update``) and a fit on Ray (``distributed``) all
drive (paper, sections 3.1 to 3.2; the thresholds from ``calibrate.py``)::

    pipeline, sizes = FitPipeline.begin(backbone, layers, weights, layout, images, options)
    patches = pipeline.extract(images, sizes)           # patch features, one block per image
    picks, radius = pipeline.select_covering_coreset(patches.points, bank_entries(len(patches.points), ratio, None))
    bank = patches.gather(picks)                         # the memory bank
    inputs = pipeline.leave_one_out(index, num_neighbors, patches, own_runs(picks.numpy(), patches.starts))
    check = check_training_images(inputs.scores, inputs.sources, "auto")  # likely defective ones (contamination.py)
    aside = set_aside_images(check, inputs)
    picks = pipeline.coreset_without(patches.points, patches.starts, aside, picks, radius)  # their patches out, the cover repaired
    ...                                                  # its bank, and leave_one_out again for the others
    calibration = calibrate(*inputs.for_calibrate(), false_alarm_rate)

A fit on Ray runs ``extract`` and ``left_out`` on its actors, each on its share of the images,
and ``select_coreset`` on the driver: the same steps, so the same model, bit for bit.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .backbones import load_pretrained_extractor
from .calibrate import Calibration
from .contamination import ContaminationCheck
from .coreset import coverage_radius, greedy_coreset, random_projection, repair_coreset
from .data import LoadedImage, load_batches, same_size_runs
from .featurefile import FeatureFile
from .features import PatchFeatures
from .intake import image_size_hw
from .layout import InputLayout
from .search import NearestNeighbourIndex, score_patches

#: share of the training patches kept in the memory bank unless a bank size is given (the paper's 10%)
DEFAULT_CORESET_RATIO = 0.1
#: dimensions of the random projection the coreset is selected on (as the paper and its code use)
PROJECTION_DIM = 128
#: training images scored leave-one-out to set the thresholds; beyond this many, a seeded sample:
#: 1,000 good scores already pin a 1% false-alarm rate, and each costs one search like a prediction
CALIBRATION_IMAGES = 1000

ImageInput = Sequence[str | Path] | torch.Tensor
"""Image paths, or a float tensor (N, 3, H, W) of RGB values in [0, 1]."""


@dataclass(frozen=True)
class FitOptions:
    """How a fit runs (not what it learns): JSON-ready, so that a Ray actor gets the driver's."""

    seed: int = 42
    device: str = "cpu"
    batch_size: int = 8
    temp_dir: str | None = None
    max_image_pixels: int | None = None
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingPatches:
    """Patch features of the readable training images, one block of rows per image: the full
    features in a temporary file, their projection for the coreset in memory."""

    file: FeatureFile  # (rows, D): float16 when wide, else float32
    points: torch.Tensor  # (rows, 128) float16, the coreset's projection (the features themselves when narrow)
    starts: np.ndarray  # (images + 1,) first row of each image, then the end
    grids: list[tuple[int, int]]  # each image's feature grid (h, w)
    input_sizes: list[tuple[int, int]]  # each image's input (H, W)
    sources: list[str]  # each image's path
    skipped: list[str] = field(default_factory=list)  # the unreadable images' errors

    def rows(self, image: int) -> torch.Tensor:
        """One image's features, as float32."""
        return torch.from_numpy(self.file.read(int(self.starts[image]), int(self.starts[image + 1]))).float()

    def gather(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The features at increasing row numbers (the chosen coreset), as float32."""
        return torch.from_numpy(self.file.gather(np.asarray(rows))).float()

    def drop_projection(self) -> None:
        """Free the projection once the coreset is final: scoring reads the full features from the
        file (on 10,000 images the projection is 2.6 GB, more than the rest of the fit holds)."""
        self.points = self.points.new_empty((0, self.points.shape[1]))  # (a view of none would keep it all)

    def close(self) -> None:
        """Remove the temporary file."""
        self.file.close()


@dataclass(frozen=True)
class LeftOut:
    """One training image scored against the bank without its own entries."""

    score: float
    map_peak: float
    map_sum: float
    map_pixels: int


@dataclass
class CalibrationInputs:
    """What ``calibrate`` cuts the thresholds on: the left-out images' scores and map peaks, the
    mean map value over them all, the images' paths and their numbers among the training images."""

    scores: np.ndarray
    peaks: np.ndarray
    map_mean: float
    sources: list[str]
    images: np.ndarray

    @classmethod
    def of(cls, left_out: Sequence[LeftOut], sources: list[str], images: np.ndarray) -> "CalibrationInputs":
        """From each image's :class:`LeftOut`, the map's mean summed in order."""
        map_sum, map_pixels = 0.0, 0
        for result in left_out:
            map_sum += result.map_sum
            map_pixels += result.map_pixels
        return cls(np.array([r.score for r in left_out]), np.array([r.map_peak for r in left_out]), map_sum / map_pixels, sources, np.asarray(images))

    def for_calibrate(self) -> tuple[np.ndarray, np.ndarray, float]:
        return self.scores, self.peaks, self.map_mean


@dataclass
class FittedState:
    """What a fit learned, for ``PatchCore.set_fitted``."""

    patch_features: PatchFeatures
    layout: InputLayout
    weights_sha256: str
    memory_bank: torch.Tensor
    coreset_ratio: float  # the share of the training patches the bank holds
    num_fit_images: int
    calibration: Calibration
    calibration_sources: list[str]
    contamination: ContaminationCheck
    skipped: list[str]
    fit_seconds: dict[str, float]
    fit_disk_bytes: int


class FitPipeline:
    """The steps of a fit with one backbone and one fitted input layout (see the module's docstring)."""

    def __init__(self, patch_features: PatchFeatures, layout: InputLayout, options: FitOptions) -> None:
        self.patch_features = patch_features
        self.layout = layout
        self.options = options
        self.device = torch.device(options.device)

    @classmethod
    def begin(
        cls, backbone: str, layers: Sequence[str], weights: str | Path | None, layout: InputLayout, images: ImageInput, options: FitOptions
    ) -> tuple["FitPipeline", list[tuple[int, int]], str]:
        """Load the pretrained backbone and fit the input layout to the images' sizes (read from
        their headers): the pipeline, those sizes, and the SHA-256 of the weights file."""
        torch.manual_seed(options.seed)
        extractor, weights_sha256 = load_pretrained_extractor(backbone, tuple(layers), weights)
        patch_features = PatchFeatures(extractor, tuple(layers)).to(torch.device(options.device))
        sizes = image_sizes(images, options.max_image_pixels)
        return cls(patch_features, layout.fitted(patch_features.align, sizes), options), sizes, weights_sha256

    # -----------------------------------------------------------------------------------------
    # Patch features (paper, section 3.1)

    def extract(
        self, images: ImageInput, sizes: list[tuple[int, int]] | None = None, loaded: Iterable[list[LoadedImage]] | None = None, label: str = "features"
    ) -> TrainingPatches:
        """Patch features of every readable image, one block of rows per image, and their projection.
        ``loaded``: the images already decoded, in batches (a fit on Ray decodes bytes sent to it).

        The features go to a temporary file batch by batch (``featurefile.py``), in float16 when
        wide (more than the projection's 128 dimensions, e.g. 1536 for Wide ResNet-50), so that
        memory holds only the float16 projection the coreset reads: 256 bytes a patch, whatever
        the backbone. Its memory is allocated once, sized from the images' headers; the disk
        space the file will take is checked before the first row is written.
        """
        sizes = image_sizes(images, self.options.max_image_pixels) if sizes is None else sizes
        capacity = sum(math.prod(self.patch_features.grid_hw(self.layout.input_hw(size))) for size in sizes)
        file = points = None
        starts, grids, input_sizes, sources, skipped = [0], [], [], [], []
        try:
            with self.bar(len(images), label) as bar:
                batches = self.loaded_batches(images) if loaded is None else loaded
                for run in (run for batch in batches for run in same_size_runs(batch)):
                    bar.update(len(run))
                    skipped += [item.error for item in run if item.error]
                    inputs = stack_inputs(run)
                    if inputs is None:
                        continue
                    output = self.patch_features.of_inputs(inputs, self.layout, self.options.batch_size)
                    flat = output.reshape(-1, output.shape[-1])
                    if file is None:
                        wide = flat.shape[1] > PROJECTION_DIM
                        file = FeatureFile(flat.shape[1], np.float16 if wide else np.float32, capacity, self.options.temp_dir)
                        points = torch.empty((max(capacity, len(flat)), min(flat.shape[1], PROJECTION_DIM)), dtype=torch.float16, device=self.device)
                    filled = starts[-1]
                    if filled + len(flat) > len(points):  # a header that under-stated its image: grow
                        points = _grow(points, filled + len(flat))
                    file.append(flat.to(torch.float16 if file.dtype == np.float16 else torch.float32).cpu().numpy())
                    points[filled : filled + len(flat)] = self.project(flat)
                    per_image = math.prod(output.shape[1:3])
                    starts += [filled + per_image * (i + 1) for i in range(len(output))]
                    grids += [tuple(output.shape[1:3])] * len(output)
                    input_sizes += [tuple(inputs.shape[-2:])] * len(output)
                    sources += [str(item.path) for item in run if item.error is None]
            if file is None or starts[-1] == 0:
                raise ValueError("no readable training images")
        except BaseException:
            if file is not None:
                file.close()
            raise
        return TrainingPatches(file, points[: starts[-1]], np.array(starts), grids, input_sizes, sources, skipped)

    def loaded_batches(self, images: ImageInput, keep_images: bool = False) -> Iterator[list[LoadedImage]]:
        """Images decoded and prepared for the backbone, ``batch_size`` at a time, errors kept in place."""
        if isinstance(images, torch.Tensor):
            batch_size = self.options.batch_size
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                if chunk.ndim != 4 or chunk.shape[1] != 3:
                    raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(images.shape)}")
                hw = tuple(chunk.shape[-2:])
                rgbs = [rgb8(image) for image in chunk]
                yield [
                    LoadedImage(Path(f"tensor[{start + i}]"), self.layout.image_to_array(rgb), original_hw=hw, rgb=rgb if keep_images else None)
                    for i, rgb in enumerate(rgbs)
                ]
            return
        yield from load_batches(
            [Path(p) for p in images], self.layout, self.options.batch_size, keep_rgb=keep_images, max_pixels=self.options.max_image_pixels
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The coreset's view of patch features: a seeded random projection to 128 dimensions, in float16."""
        return random_projection(features.float(), PROJECTION_DIM, self.options.seed).half()

    # -----------------------------------------------------------------------------------------
    # Coreset (paper, section 3.2)

    def select_coreset(self, points: torch.Tensor, size: int, bank: torch.Tensor | None = None) -> torch.Tensor:
        """Rows to keep, in increasing order: ``size`` of the patches, by greedy k-center
        selection on their projection (carried on from ``bank`` when given)."""
        return self.select_covering_coreset(points, size, bank)[0]

    def select_covering_coreset(self, points: torch.Tensor, size: int, bank: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """:meth:`select_coreset`'s rows, and the distance within which they cover every patch
        (in the projection; infinite when carried on from a bank)."""
        if size == len(points) and bank is None:
            return torch.arange(len(points)), 0.0
        initial = None if bank is None else self.project(bank)
        with self.bar(size, "coreset") as bar:
            picks = greedy_coreset(points, size, seed=self.options.seed, on_progress=bar.update, initial_centres=initial)
        radius = coverage_radius(points, picks) if bank is None else float("inf")
        return torch.sort(picks.cpu()).values, radius

    def coreset_without(self, points: torch.Tensor, starts: np.ndarray, aside: np.ndarray, picks: torch.Tensor, radius: float) -> torch.Tensor:
        """The coreset ``picks`` (covering every patch within ``radius``) without the patches of
        the images ``aside`` (their numbers), repaired so that it covers every other patch within
        ``radius`` again (``coreset.repair_coreset``): the fit's coverage, without a second selection."""
        return repair_coreset(points, picks, rows_of(starts, aside), radius)

    def select_coreset_without(
        self, points: torch.Tensor, starts: np.ndarray, aside: np.ndarray, size_of: Callable[[int], int], bank: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows to keep, in increasing order, selected as :meth:`select_coreset` does on the patches
        of every image but ``aside`` (their numbers): the coreset of a fit without those images.
        ``size_of``: the bank's size for a number of patches."""
        rows = rows_without(starts, aside)
        picks = self.select_coreset(points[torch.from_numpy(rows).to(points.device)], size_of(len(rows)), bank)
        return torch.from_numpy(rows[picks.numpy()])

    # -----------------------------------------------------------------------------------------
    # Leave-one-out scores for the thresholds

    def calibration_images(self, count: int) -> np.ndarray:
        """Which of ``count`` training images are scored leave-one-out: all, or beyond
        :data:`CALIBRATION_IMAGES` a seeded sample, in increasing order."""
        if count <= CALIBRATION_IMAGES:
            return np.arange(count)
        return np.sort(np.random.default_rng(self.options.seed).choice(count, CALIBRATION_IMAGES, replace=False))

    def left_out(self, index: NearestNeighbourIndex, num_neighbors: int, patches: TrainingPatches, image: int, own: tuple[int, int]) -> LeftOut:
        """One training image scored against the bank without its own entries ``own``."""
        features = patches.rows(image).to(self.device).reshape(1, *patches.grids[image], -1)
        score, anomaly_map = score_patches(index, features, patches.input_sizes[image], num_neighbors, exclude=own)
        return LeftOut(float(score[0]), float(anomaly_map.max()), float(anomaly_map.sum(dtype=torch.float64)), anomaly_map.numel())

    def leave_one_out(
        self, index: NearestNeighbourIndex, num_neighbors: int, patches: TrainingPatches, bank_starts: np.ndarray, images: np.ndarray | None = None
    ) -> CalibrationInputs:
        """Each image scored against the bank without its own entries (image i's are
        ``bank[bank_starts[i]:bank_starts[i + 1]]``): what new good images would get. Beyond
        :data:`CALIBRATION_IMAGES` images, a seeded sample of them; ``images``: these instead."""
        chosen = self.calibration_images(len(patches.sources)) if images is None else images
        results = []
        with self.bar(len(chosen), "calibration") as bar:
            for image in chosen:
                results.append(self.left_out(index, num_neighbors, patches, image, (int(bank_starts[image]), int(bank_starts[image + 1]))))
                bar.update(1)
        return CalibrationInputs.of(results, [patches.sources[i] for i in chosen], chosen)

    # -----------------------------------------------------------------------------------------

    def bar(self, total: int, label: str) -> tqdm:
        """A progress bar on standard error (off unless the options ask for progress)."""
        return tqdm(total=total, desc=f"{label:>11}", unit="img" if label != "coreset" else "pick", disable=not self.options.progress, file=sys.stderr, leave=False, dynamic_ncols=True)


def bank_entries(patches: int, coreset_ratio: float | None, bank_size: int | None) -> int:
    """How many of the training patches the memory bank keeps: the bank size (all patches when
    there are fewer), else the coreset ratio of them."""
    if bank_size is not None:
        return min(bank_size, patches)
    return max(1, round(coreset_ratio * patches))


def own_runs(picks: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Where each image's entries begin in a bank of picked rows, then the end.

    ``picks`` are the picked feature rows in increasing order and ``starts`` the first row of
    each image, then the end; since rows go image by image, image i's entries are the run
    ``bank[runs[i]:runs[i + 1]]``.
    """
    return np.searchsorted(picks, starts)


def set_aside_images(check: ContaminationCheck, inputs: CalibrationInputs) -> np.ndarray:
    """The numbers of the training images the check sets aside, in increasing order."""
    aside = set(check.set_aside_paths)
    return np.array(sorted(int(image) for image, source in zip(inputs.images, inputs.sources) if source in aside), dtype=np.int64)


def rows_of(starts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Which feature rows belong to the training images ``images`` (numbers): a mask over all rows."""
    mask = np.zeros(int(starts[-1]), dtype=bool)
    for image in images:
        mask[int(starts[image]) : int(starts[image + 1])] = True
    return mask


def rows_without(starts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The feature rows of every training image but ``images`` (numbers), in increasing order."""
    return np.flatnonzero(~rows_of(starts, images))


def fitted_share(bank_rows: int, starts: np.ndarray, aside: np.ndarray, coreset_ratio: float | None) -> float:
    """The share of the fitted images' patches a bank of ``bank_rows`` entries holds: the coreset
    ratio asked, unless a bank size set the bank (``coreset_ratio`` None) or images were set aside
    (``aside``, their numbers: their patches are not the fit's)."""
    if coreset_ratio is not None and not len(aside):
        return coreset_ratio
    aside = np.asarray(aside, dtype=np.int64)
    return bank_rows / (int(starts[-1]) - int((starts[aside + 1] - starts[aside]).sum()))


def image_sizes(images: ImageInput, max_pixels: int | None) -> list[tuple[int, int]]:
    """(H, W) of every readable image, from headers only (unreadable files are reported later)."""
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[-2:])] * len(images)
    return [size for size in (image_size_hw(image, max_pixels) for image in images) if size is not None]


def stack_inputs(run: Sequence[LoadedImage]) -> torch.Tensor | None:
    """The readable images of a run (one input size) as one batch tensor, or None if none is readable."""
    readable = [item.array for item in run if item.array is not None]
    return torch.from_numpy(np.stack(readable)) if readable else None


def rgb8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) float image in [0, 1] as RGB uint8 (H, W, 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _grow(rows: torch.Tensor, needed: int) -> torch.Tensor:
    grown = rows.new_empty((max(needed, 2 * len(rows)), *rows.shape[1:]))
    grown[: len(rows)] = rows
    return grown
