"""PatchCore: fit on good images, score new ones (Roth et al., "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022).

    fit:      patch features of every good image -> memory bank -> greedy coreset -> index
              + every good image scored without its own bank entries -> thresholds (calibrate.py)
    predict:  patch features -> distance to the nearest bank entry per patch
              -> anomaly map (upsample, blur) and image score (eq. 7)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .backbones import build_feature_extractor, get_spec, load_pretrained_extractor
from .calibrate import DEFAULT_FALSE_ALARM_RATE, Calibration, calibrate
from .coreset import greedy_coreset, random_projection
from .data import LoadedImage, load_batches
from .featurefile import FeatureFile
from .features import PatchFeatures
from .intake import DEFAULT_MAX_IMAGE_PIXELS, image_size_hw
from .layout import InputLayout
from .maps import anomaly_maps
from .regions import ImagePrediction
from .search import INDEX_KINDS, NearestNeighbourIndex, reweighted_image_scores
from .storage import read_model, write_model

#: share of the training patches kept in the memory bank unless a bank size is given (the paper's 10%)
DEFAULT_CORESET_RATIO = 0.1
#: dimensions of the random projection the coreset is selected on (as the paper and its code use)
PROJECTION_DIM = 128
#: training images scored leave-one-out to set the thresholds; beyond this many, a seeded sample:
#: 1,000 good scores already pin a 1% false-alarm rate, and each costs one search like a prediction
CALIBRATION_IMAGES = 1000

ImageInput = Sequence[str | Path] | torch.Tensor
"""Image paths, or a float tensor (N, 3, H, W) of RGB values in [0, 1]."""


@dataclass
class Prediction(ImagePrediction):
    """One image's result from a PyTorch model; fields and records as :class:`ImagePrediction`."""

    def map_at(self, size_hw: tuple[int, int]) -> np.ndarray:
        """The anomaly map brought to any (H, W) over the whole image, e.g. a picture's size."""
        return self.layout.map_to_image(torch.from_numpy(self.input_map), size_hw).numpy()


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

    def rows(self, image: int) -> torch.Tensor:
        """One image's features, as float32."""
        return torch.from_numpy(self.file.read(int(self.starts[image]), int(self.starts[image + 1]))).float()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The features at increasing row numbers (the chosen coreset), as float32."""
        return torch.from_numpy(self.file.gather(rows.numpy())).float()

    def close(self) -> None:
        """Remove the temporary file."""
        self.file.close()


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when a GPU is visible, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible to PyTorch")
    return resolved


class PatchCore:
    """A PatchCore anomaly detector.

    Settings go in the constructor; ``fit`` learns the state, which lives in attributes ending in
    ``_``. Example::

        model = PatchCore("mobilenet_v2").fit(sorted(Path("train/good").glob("*.png")))
        for p in model.predict(["part_001.png"]):
            print(p.score, p.is_anomalous, p.anomaly_map.shape)
        model.save("bottle.safetensors")
        model = PatchCore.load("bottle.safetensors")
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        *,
        layers: Sequence[str] | None = None,
        input_mode: str = "square",
        image_size: int = 256,
        center_crop: int | None = None,
        scale: float | None = None,
        tile_size: int = 256,
        tile_overlap: int = 64,
        coreset_ratio: float | None = None,
        bank_size: int | None = None,
        num_neighbors: int = 9,
        seed: int = 42,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        device: str = "auto",
        batch_size: int = 8,
        weights: str | Path | None = None,
        index: str = "exact",
        temp_dir: str | Path | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        progress: bool = True,
    ) -> None:
        spec = get_spec(backbone)  # fails early on an unknown name
        if coreset_ratio is not None and bank_size is not None:
            raise ValueError("give a coreset ratio or a bank size, not both")
        if coreset_ratio is None and bank_size is None:
            coreset_ratio = DEFAULT_CORESET_RATIO
        if coreset_ratio is not None and not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {coreset_ratio}")
        if bank_size is not None and (isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < 1):
            raise ValueError(f"bank size must be a whole number of entries, at least 1, got {bank_size}")
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false-alarm rate must be between 0 and 1 (e.g. 0.05 for 5%), got {false_alarm_rate}")
        if num_neighbors < 1:
            raise ValueError(f"neighbors must be at least 1, got {num_neighbors}")
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of: {', '.join(INDEX_KINDS)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if max_image_pixels is not None and max_image_pixels < 64:
            raise ValueError(f"max image pixels must be at least 64, got {max_image_pixels}")
        self.backbone = backbone
        self.layers = tuple(layers) if layers else spec.default_layers
        self.layout = InputLayout(input_mode, image_size, center_crop, scale, tile_size, tile_overlap)
        self.coreset_ratio = coreset_ratio
        self.bank_size = bank_size
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.false_alarm_rate = false_alarm_rate
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.weights = weights
        self.index = index
        self.temp_dir = temp_dir
        self.max_image_pixels = max_image_pixels  # images with more are refused from their headers
        self.progress = progress

    # -----------------------------------------------------------------------------------------
    # Fitting

    def fit(self, images: ImageInput) -> "PatchCore":
        """Learn the memory bank from every good image, and the thresholds from the same images.

        Each training image is then scored against the bank with its own entries left out, so
        that it is an image the bank has not seen; the thresholds are cut on those scores at
        ``false_alarm_rate`` (calibrate.py). Unreadable images are reported and skipped.
        """
        clock = _PhaseClock()
        sizes = self._begin_fit(images)
        clock.lap("load_backbone")

        patches = self._extract_patches(images, "features", sizes)
        try:
            if len(patches.sources) < 2:
                raise ValueError(f"need at least 2 readable good images to fit (each is scored against the others to set the threshold), got {len(patches.sources)}")
            self.num_fit_images_ = len(patches.sources)
            self.fit_disk_bytes_ = patches.file.nbytes
            clock.lap("features")
            size = self._bank_entries(len(patches.points))
            self.coreset_ratio_ = self.coreset_ratio if self.bank_size is None else size / len(patches.points)
            picks = self._select_coreset(patches.points, size)
            self.memory_bank_ = patches.gather(picks).to(self.device)
            clock.lap("coreset")
            self.index_ = NearestNeighbourIndex(self.memory_bank_, self.index)
            scores, peaks, map_mean, self.calibration_sources_ = self._leave_one_out(patches, own_runs(picks.numpy(), patches.starts))
        finally:
            patches.close()
        self.calibration_ = calibrate(scores, peaks, map_mean, self.false_alarm_rate)
        clock.lap("calibration")
        self.fit_seconds_ = clock.laps
        return self

    def _begin_fit(self, images: ImageInput) -> list[tuple[int, int]]:
        """Load the backbone and fit the input layout to the images' sizes (read from their headers, returned)."""
        torch.manual_seed(self.seed)
        extractor, self.weights_sha256_ = load_pretrained_extractor(self.backbone, self.layers, self.weights)
        self.patch_features_ = PatchFeatures(extractor, self.layers).to(self.device)
        sizes = _image_sizes(images, self.max_image_pixels)
        self.layout_ = self.layout.fitted(self.patch_features_.align, sizes)
        self.skipped_: list[str] = []
        return sizes

    def _bank_entries(self, patches: int) -> int:
        """How many of the training patches the memory bank keeps: the bank size (all patches
        when there are fewer), else the coreset ratio of them."""
        if self.bank_size is not None:
            return min(self.bank_size, patches)
        return max(1, round(self.coreset_ratio * patches))

    def update(self, images: ImageInput) -> "PatchCore":
        """Add good images to a fitted model without refitting from scratch.

        The greedy k-center selection carries on from the current memory bank: of the new
        images' patches, the ones the bank already covers are not added, and the bank grows by
        the fit's share of the new patches (``coreset_ratio_``: the coreset ratio, or the share a
        bank size came to). The new images are then scored leave-one-out
        against the grown bank and the thresholds are cut again, at the model's false-alarm
        rate, on their scores together with the stored scores of the earlier images (taken
        against the smaller bank, so a little high: the cut errs towards fewer false alarms).
        """
        self._check_fitted()
        self.skipped_ = []
        patches = self._extract_patches(images, "features")
        try:
            size = max(1, round(self.coreset_ratio_ * len(patches.points)))
            picks = self._select_coreset(patches.points, size, bank=self.memory_bank_)
            before = len(self.memory_bank_)
            added = patches.gather(picks)
            self.memory_bank_ = torch.cat([self.memory_bank_, added.to(self.memory_bank_.device)])
            self.num_fit_images_ += len(patches.sources)
            self.index_ = NearestNeighbourIndex(self.memory_bank_, self.index)
            scores, peaks, map_mean, sources = self._leave_one_out(patches, before + own_runs(picks.numpy(), patches.starts))
        finally:
            patches.close()
        old = self.calibration_
        if old.good_scores:  # a format-1 model stores none: its old images cannot take part
            scores = np.concatenate([old.good_scores, scores])
            peaks = np.concatenate([old.good_map_peaks, peaks])
            map_mean = (old.pixel_good_mean * old.num_images + map_mean * len(sources)) / (old.num_images + len(sources))
            sources = ["(fitted earlier)"] * old.num_images + sources
        if len(scores) >= 2:
            self.calibration_ = calibrate(scores, peaks, map_mean, old.false_alarm_rate or self.false_alarm_rate)
            self.calibration_sources_ = sources
        return self

    def _select_coreset(self, points: torch.Tensor, size: int, bank: torch.Tensor | None = None) -> torch.Tensor:
        """Rows to keep, in increasing order: ``size`` of the patches, by greedy k-center
        selection on their projection (carried on from ``bank`` when given)."""
        if size == len(points) and bank is None:
            return torch.arange(len(points))
        initial = None if bank is None else self._project(bank)
        with self._bar(size, "coreset") as bar:
            picks = greedy_coreset(points, size, seed=self.seed, on_progress=bar.update, initial_centres=initial)
        return torch.sort(picks.cpu()).values

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The coreset's view of patch features: a seeded random projection to 128 dimensions, in float16."""
        return random_projection(features.float(), PROJECTION_DIM, self.seed).half()

    def _extract_patches(
        self, images: ImageInput, label: str, sizes: list[tuple[int, int]] | None = None, loaded: Iterable[list[LoadedImage]] | None = None
    ) -> TrainingPatches:
        """Patch features of every readable image, one block of rows per image, and their projection.
        ``loaded``: the images already decoded, in batches (a fit on Ray decodes bytes sent to it).

        The features go to a temporary file batch by batch (``featurefile.py``), in float16 when
        wide (more than the projection's 128 dimensions, e.g. 1536 for Wide ResNet-50), so that
        memory holds only the float16 projection the coreset reads: 256 bytes a patch, whatever
        the backbone. Its memory is allocated once, sized from the images' headers; the disk
        space the file will take is checked before the first row is written.
        """
        sizes = _image_sizes(images, self.max_image_pixels) if sizes is None else sizes
        capacity = sum(math.prod(self.patch_features_.grid_hw(self.layout_.input_hw(size))) for size in sizes)
        file = points = None
        starts, grids, input_sizes, sources = [0], [], [], []
        try:
            with self._bar(len(images), label) as bar:
                runs = self._input_batches(images) if loaded is None else (run for batch in loaded for run in _same_size_runs(batch))
                for batch, run in runs:
                    bar.update(len(run))
                    self.skipped_ += [item.error for item in run if item.error]
                    if batch is None:
                        continue
                    output = self._features(batch)
                    flat = output.reshape(-1, output.shape[-1])
                    if file is None:
                        wide = flat.shape[1] > PROJECTION_DIM
                        file = FeatureFile(flat.shape[1], np.float16 if wide else np.float32, capacity, self.temp_dir)
                        points = torch.empty((max(capacity, len(flat)), min(flat.shape[1], PROJECTION_DIM)), dtype=torch.float16, device=self.device)
                    filled = starts[-1]
                    if filled + len(flat) > len(points):  # a header that under-stated its image: grow
                        points = _grow(points, filled + len(flat))
                    file.append(flat.to(torch.float16 if file.dtype == np.float16 else torch.float32).cpu().numpy())
                    points[filled : filled + len(flat)] = self._project(flat)
                    per_image = math.prod(output.shape[1:3])
                    starts += [filled + per_image * (i + 1) for i in range(len(output))]
                    grids += [tuple(output.shape[1:3])] * len(output)
                    input_sizes += [tuple(batch.shape[-2:])] * len(output)
                    sources += [str(item.path) for item in run if item.error is None]
            if file is None or starts[-1] == 0:
                raise ValueError("no readable training images")
        except BaseException:
            if file is not None:
                file.close()
            raise
        return TrainingPatches(file, points[: starts[-1]], np.array(starts), grids, input_sizes, sources)

    def _leave_one_out(self, patches: TrainingPatches, bank_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
        """Each image's score and highest map value against the bank without its own entries, the
        mean map value over all, and the images' paths: what new good images would get, for
        ``calibrate``. Beyond :data:`CALIBRATION_IMAGES` images, a seeded sample of them."""
        chosen = self._calibration_images(len(patches.sources))
        with self._bar(len(chosen), "calibration") as bar:
            results = []
            for image in chosen:
                results.append(self._left_out(patches, image, (int(bank_starts[image]), int(bank_starts[image + 1]))))
                bar.update(1)
        return (*_calibration_inputs(results), [patches.sources[i] for i in chosen])

    def _calibration_images(self, count: int) -> np.ndarray:
        """Which of ``count`` training images are scored leave-one-out: all, or beyond
        :data:`CALIBRATION_IMAGES` a seeded sample, in increasing order."""
        if count <= CALIBRATION_IMAGES:
            return np.arange(count)
        return np.sort(np.random.default_rng(self.seed).choice(count, CALIBRATION_IMAGES, replace=False))

    def _left_out(self, patches: TrainingPatches, image: int, own: tuple[int, int]) -> tuple[float, float, float, int]:
        """One training image scored against the bank without its own entries ``own``: its
        score, its map's highest value, the sum of its map and the map's pixel count."""
        features = patches.rows(image).to(self.device).reshape(1, *patches.grids[image], -1)
        score, anomaly_map = self._score_features(features, patches.input_sizes[image], exclude=own)
        return float(score[0]), float(anomaly_map.max()), float(anomaly_map.sum(dtype=torch.float64)), anomaly_map.numel()

    # -----------------------------------------------------------------------------------------
    # Scoring

    def predict(self, images: ImageInput, keep_images: bool = False) -> list[Prediction]:
        """Score images; unreadable ones come back with ``error`` set instead of a score."""
        return list(self.iter_predictions(images, keep_images))

    def iter_predictions(self, images: ImageInput, keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        """Like :meth:`predict`, one result at a time, so that memory stays flat over any number of images.

        ``threshold`` overrides the calibrated image threshold (raw score units).
        """
        self._check_fitted()
        yield from self._predict_batches(images, "scoring", keep_images, threshold)

    def score(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores (B,) and anomaly maps (B, h, w) on the input grid of a (B, 3, H, W) batch in [0, 1]."""
        self._check_fitted()
        scores, maps = self._score_prepared(self._prepare_tensor(batch))
        return scores.numpy(), maps.numpy()

    def predict_loaded(self, loaded: Sequence[LoadedImage], threshold: float | None = None) -> Iterator[Prediction]:
        """Score images already decoded and prepared (``data.load_image``), in order, one result each.

        The server decodes uploads itself and scores them here, through the same path as
        :meth:`iter_predictions`; images of different input sizes are scored in separate batches.
        """
        self._check_fitted()
        calibration: Calibration = self.calibration_
        cut = threshold if threshold is not None else calibration.image_threshold
        for batch, run in _same_size_runs(loaded):
            scores, maps = self._score_prepared(batch) if batch is not None else (None, None)
            position = 0
            for item in run:
                if item.error is not None:
                    yield Prediction(str(item.path), error=item.error)
                    continue
                score, input_map = float(scores[position]), maps[position]
                position += 1
                yield Prediction(
                    source=str(item.path),
                    score=score,
                    normalized_score=float(calibration.normalize_scores(score)),
                    is_anomalous=score >= cut,
                    threshold=cut,
                    input_map=input_map.numpy(),
                    image_size=item.original_hw,
                    image=item.rgb,
                    layout=self.layout_,
                    calibration=calibration,
                )

    def _predict_batches(self, images: ImageInput, label: str, keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        with self._bar(len(images), label) as bar:
            for loaded in self._loaded_batches(images, keep_images):
                for prediction in self.predict_loaded(loaded, threshold):
                    bar.update(1)
                    yield prediction

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, D) of a batch of same-size inputs, through tiles in the tile mode."""
        tiles = self.layout_.tiles(tuple(batch.shape[-2:]), self.patch_features_.cell)
        return self.patch_features_(batch.to(self.device), tiles, self.batch_size)

    def _score_prepared(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._score_features(self._features(batch), tuple(batch.shape[-2:]))

    @torch.inference_mode()
    def _score_features(self, features: torch.Tensor, input_hw: tuple[int, int], exclude: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) from patch features (B, h, w, D) of inputs of ``input_hw``.

        ``exclude`` leaves a run of bank entries out of every search (leave-one-image-out).
        """
        size, grid = features.shape[0], features.shape[1:3]
        flat = features.reshape(size, -1, features.shape[-1])
        distances, nearest = self.index_.search(flat.reshape(-1, flat.shape[-1]), k=1, exclude=exclude)
        patch_scores = distances[:, 0].reshape(size, -1)
        image_scores = reweighted_image_scores(self.index_, flat, patch_scores, nearest[:, 0].reshape(size, -1), self.num_neighbors, exclude)
        maps = anomaly_maps(patch_scores.reshape(size, *grid), input_hw)
        return image_scores.cpu().float(), maps.cpu()

    # -----------------------------------------------------------------------------------------
    # Inputs

    def _input_batches(self, images: ImageInput, keep_images: bool = False) -> Iterator[tuple[torch.Tensor | None, list[LoadedImage]]]:
        """(batch of readable images of one input size or None, every image of the batch with its error if any).

        Images of different input sizes (aspect and tile modes) go in separate batches, in order.
        """
        for loaded in self._loaded_batches(images, keep_images):
            yield from _same_size_runs(loaded)

    def _loaded_batches(self, images: ImageInput, keep_images: bool = False) -> Iterator[list[LoadedImage]]:
        """Images decoded and prepared for the backbone, ``batch_size`` at a time, errors kept in place."""
        if isinstance(images, torch.Tensor):
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                prepared = self._prepare_tensor(chunk)
                hw = tuple(chunk.shape[-2:])
                yield [
                    LoadedImage(Path(f"tensor[{start + i}]"), prepared[i], original_hw=hw, rgb=_to_rgb8(chunk[i]) if keep_images else None)
                    for i in range(len(chunk))
                ]
            return
        yield from load_batches([Path(p) for p in images], self.layout_, self.batch_size, keep_rgb=keep_images, max_pixels=self.max_image_pixels)

    def _prepare_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(batch.shape)}")
        return torch.stack([self.layout_.image_to_tensor(_to_rgb8(image)) for image in batch])

    # -----------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (no pickle), replacing any file there atomically."""
        self._check_fitted()
        tensors = {"memory_bank": self.memory_bank_}
        tensors.update({f"backbone.{name}": value for name, value in self.patch_features_.extractor.state_dict().items()})
        return write_model(path, tensors, self.settings())

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild the model, as JSON-ready values."""
        return {
            "package_version": __version__,
            "backbone": self.backbone,
            "layers": list(self.layers),
            "input": self.layout_.to_dict(),
            "coreset_ratio": self.coreset_ratio_,
            "bank_size": self.bank_size,
            "num_neighbors": self.num_neighbors,
            "index": self.index,
            "seed": self.seed,
            "num_fit_images": self.num_fit_images_,
            "memory_bank_shape": list(self.memory_bank_.shape),
            "backbone_weights_sha256": self.weights_sha256_,
            "calibration": self.calibration_.to_dict(),
        }

    @classmethod
    def load(
        cls, path: str | Path, device: str = "auto", batch_size: int = 8, index: str | None = None, progress: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> "PatchCore":
        """Read a model written by :meth:`save`; damaged, foreign or newer files raise :class:`ModelFileError`.

        ``index`` overrides the search the model was saved with (``exact`` or ``ivf``). Files of
        model format 1 (patchcore 0.1) load with their thresholds as they were set.
        ``max_image_pixels`` is the pixel limit of the images it will score (not stored in the file).
        """
        from .storage import ModelFileError

        tensors, settings = read_model(path)
        try:
            # Format 1 had the square mode only, as two settings.
            layout = InputLayout.from_dict(settings["input"]) if "input" in settings else InputLayout("square", settings["image_size"], settings["center_crop"])
            calibration = Calibration.from_dict(settings["calibration"])
            model = cls(
                settings["backbone"],
                layers=settings["layers"],
                coreset_ratio=None if settings.get("bank_size") else settings["coreset_ratio"],
                bank_size=settings.get("bank_size"),
                num_neighbors=settings["num_neighbors"],
                seed=settings["seed"],
                false_alarm_rate=calibration.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
                device=device,
                batch_size=batch_size,
                index=index or settings.get("index", "exact"),
                max_image_pixels=max_image_pixels,
                progress=progress,
            )
            model.layout = model.layout_ = layout
            extractor = build_feature_extractor(get_spec(model.backbone), model.layers)
            extractor.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
            model.calibration_ = calibration
            # The share of the fit's patches the bank holds (also when a bank size set it).
            model.coreset_ratio_ = float(settings["coreset_ratio"])
            model.num_fit_images_ = settings["num_fit_images"]
            model.weights_sha256_ = settings["backbone_weights_sha256"]
            bank = tensors["memory_bank"]
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise ModelFileError(f"'{path}': damaged model file (settings or tensors inconsistent: {str(error).splitlines()[0]})") from None
        model.patch_features_ = PatchFeatures(extractor, model.layers).to(model.device)
        model.memory_bank_ = bank.to(model.device)
        model.index_ = NearestNeighbourIndex(model.memory_bank_, model.index)
        model.skipped_ = []
        model.calibration_sources_ = []
        return model

    # -----------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("this PatchCore is not fitted yet: call fit() or PatchCore.load()")

    def _bar(self, total: int, label: str) -> tqdm:
        return tqdm(total=total, desc=f"{label:>11}", unit="img" if label != "coreset" else "pick", disable=not self.progress, file=sys.stderr, leave=False, dynamic_ncols=True)


class _PhaseClock:
    """Wall time of each phase of a fit, for users and benchmarks (``fit_seconds_``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now


def _calibration_inputs(left_out: Sequence[tuple[float, float, float, int]]) -> tuple[np.ndarray, np.ndarray, float]:
    """The images' scores, their maps' highest values and the mean map value over all of them,
    from each image's :meth:`PatchCore._left_out`, summed in order."""
    map_sum, map_pixels = 0.0, 0
    for _, _, image_sum, pixels in left_out:
        map_sum += image_sum
        map_pixels += pixels
    return np.array([r[0] for r in left_out]), np.array([r[1] for r in left_out]), map_sum / map_pixels


def own_runs(picks: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Where each image's entries begin in a bank of picked rows, then the end.

    ``picks`` are the picked feature rows in increasing order and ``starts`` the first row of
    each image, then the end; since rows go image by image, image i's entries are the run
    ``bank[runs[i]:runs[i + 1]]``.
    """
    return np.searchsorted(picks, starts)


def _image_sizes(images: ImageInput, max_pixels: int | None) -> list[tuple[int, int]]:
    """(H, W) of every readable image, from headers only (unreadable files are reported later)."""
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[-2:])] * len(images)
    return [size for size in (image_size_hw(image, max_pixels) for image in images) if size is not None]


def _same_size_runs(loaded: Sequence[LoadedImage]) -> Iterator[tuple[torch.Tensor | None, list[LoadedImage]]]:
    """Split images, in order, into runs whose readable images share one input size: (their
    stacked tensors or None, the run with its unreadable images in place)."""
    run: list[LoadedImage] = []
    shape = None  # input size of the run's readable images
    for item in loaded:
        if item.tensor is not None:
            if shape is not None and item.tensor.shape != shape:
                yield _stack_readable(run), run
                run = []
            shape = item.tensor.shape
        run.append(item)
    if run:
        yield _stack_readable(run), run


def _stack_readable(run: list[LoadedImage]) -> torch.Tensor | None:
    readable = [item.tensor for item in run if item.tensor is not None]
    return torch.stack(readable) if readable else None


def _grow(rows: torch.Tensor, needed: int) -> torch.Tensor:
    grown = rows.new_empty((max(needed, 2 * len(rows)), *rows.shape[1:]))
    grown[: len(rows)] = rows
    return grown


def _to_rgb8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) float image in [0, 1] as RGB uint8 (H, W, 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
