"""PatchCore: fit on good images, score new ones (Roth et al., "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022).

    fit:      patch features of every good image -> memory bank -> greedy coreset -> index
              + held-out good images -> thresholds (calibrate.py)
    predict:  patch features -> distance to the nearest bank entry per patch
              -> anomaly map (upsample, blur) and image score (eq. 7)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .backbones import build_feature_extractor, get_spec, load_pretrained_extractor
from .calibrate import Calibration, calibrate
from .coreset import greedy_coreset, random_projection
from .data import Geometry, LoadedImage, load_batches
from .features import PatchFeatures
from .maps import anomaly_maps
from .search import INDEX_KINDS, NearestNeighbourIndex, reweighted_image_scores
from .storage import read_model, write_model

#: dimensions of the random projection the coreset is selected on (as the paper and its code use)
PROJECTION_DIM = 128

ImageInput = Sequence[str | Path] | torch.Tensor
"""Image paths, or a float tensor (N, 3, H, W) of RGB values in [0, 1]."""


@dataclass
class Prediction:
    """One image's result. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str
    score: float = math.nan
    normalized_score: float = math.nan  # 0 = a typical good image, 1 = the threshold
    is_anomalous: bool = False
    input_map: np.ndarray | None = None  # (S, S) anomaly map on the model's input grid (for pixel metrics)
    image_size: tuple[int, int] | None = None  # (H, W) of the image
    image: np.ndarray | None = None  # RGB uint8, only when asked for (pictures)
    error: str | None = None
    geometry: Geometry | None = field(default=None, repr=False, compare=False)

    @cached_property
    def anomaly_map(self) -> np.ndarray | None:
        """(H, W) float32 anomaly map at the image's own resolution, made on first use."""
        return None if self.error is not None else self.map_at(self.image_size)

    def map_at(self, size_hw: tuple[int, int]) -> np.ndarray:
        """The anomaly map brought to any (H, W) over the whole image, e.g. a picture's size."""
        return self.geometry.map_to_image(torch.from_numpy(self.input_map), size_hw).numpy()


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
        image_size: int = 256,
        center_crop: int | None = None,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        seed: int = 42,
        calibration_fraction: float = 0.1,
        device: str = "auto",
        batch_size: int = 8,
        weights: str | Path | None = None,
        index: str = "exact",
        progress: bool = True,
    ) -> None:
        spec = get_spec(backbone)  # fails early on an unknown name
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {coreset_ratio}")
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration fraction must be in (0, 1), got {calibration_fraction}")
        if num_neighbors < 1:
            raise ValueError(f"neighbors must be at least 1, got {num_neighbors}")
        if center_crop is not None and not 32 <= center_crop <= image_size:
            raise ValueError(f"center crop must be between 32 and the image size {image_size}, got {center_crop}")
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of: {', '.join(INDEX_KINDS)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if image_size < 32:
            raise ValueError(f"image size must be at least 32, got {image_size}")
        self.backbone = backbone
        self.layers = tuple(layers) if layers else spec.default_layers
        self.geometry = Geometry(image_size, center_crop)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.calibration_fraction = calibration_fraction
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.weights = weights
        self.index = index
        self.progress = progress

    # -----------------------------------------------------------------------------------------
    # Fitting

    def fit(self, images: ImageInput) -> "PatchCore":
        """Learn the memory bank and the thresholds from good images.

        A seeded share of the images (``calibration_fraction``, at least 2) is held out of the
        bank and scored to set the thresholds. Unreadable images are reported and skipped.
        """
        clock = _PhaseClock()
        torch.manual_seed(self.seed)
        extractor, weights_sha = load_pretrained_extractor(self.backbone, self.layers, self.weights)
        self.patch_features_ = PatchFeatures(extractor, self.layers).to(self.device)
        self.weights_sha256_ = weights_sha
        self.skipped_: list[str] = []

        count = len(images)
        held_out = max(2, round(self.calibration_fraction * count))
        if count - held_out < 1:
            raise ValueError(f"need at least 3 good images to fit (2 are held out to set the threshold), got {count}")
        order = np.random.default_rng(self.seed).permutation(count)
        calibration_ids, fit_ids = np.sort(order[:held_out]), np.sort(order[held_out:])

        clock.lap("load_backbone")
        features, points = self._extract_patches(_subset(images, fit_ids), "features")
        self.num_fit_images_ = len(features) // math.prod(self.feature_grid_)
        clock.lap("features")
        self.memory_bank_ = self._select_coreset(features, points)
        del features, points
        clock.lap("coreset")
        self.index_ = NearestNeighbourIndex(self.memory_bank_, self.index)

        held_out_predictions = list(self._predict_batches(_subset(images, calibration_ids), "calibration"))
        self.skipped_ += [p.error for p in held_out_predictions if p.error]
        good = [p for p in held_out_predictions if p.error is None]
        if len(good) < 2:
            raise ValueError("fewer than 2 readable held-out images: cannot set the threshold")
        self.calibration_ = calibrate(np.array([p.score for p in good]), np.stack([p.input_map for p in good]))
        clock.lap("index_and_calibration")
        self.fit_seconds_ = clock.laps
        return self

    def update(self, images: ImageInput) -> "PatchCore":
        """Add good images to a fitted model without refitting from scratch.

        The greedy k-center selection carries on from the current memory bank: of the new
        images' patches, the ones the bank already covers are not added, and the bank grows by
        ``coreset_ratio`` of the new patches, as if all images had been fitted together. The
        thresholds are kept: new good images only lower the scores of good images.
        """
        self._check_fitted()
        self.skipped_ = []
        features, points = self._extract_patches(images, "features")
        added = self._select_coreset(features, points, bank=self.memory_bank_)
        self.memory_bank_ = torch.cat([self.memory_bank_, added.to(self.memory_bank_.device)])
        self.num_fit_images_ += len(features) // math.prod(self.feature_grid_)
        self.index_ = NearestNeighbourIndex(self.memory_bank_, self.index)
        return self

    def _select_coreset(self, features: torch.Tensor, points: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """``coreset_ratio`` of the patches, by greedy k-center selection on their projection."""
        size = max(1, round(self.coreset_ratio * len(features)))
        if size == len(features) and bank is None:
            return features.float().contiguous()
        initial = None if bank is None else self._project(bank)
        with self._bar(size, "coreset") as bar:
            picks = greedy_coreset(points, size, seed=self.seed, on_progress=bar.update, initial_centres=initial)
        return features[picks.to(features.device)].float().contiguous()

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The coreset's view of patch features: a seeded random projection to 128 dimensions."""
        return random_projection(features.float(), PROJECTION_DIM, self.seed)

    def _extract_patches(self, images: ImageInput, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (N * h * w, D) of every readable image and their projection for the coreset.

        Memory is preallocated once and filled batch by batch. Wide features (more than the
        projection's 128 dimensions, e.g. 1536 for Wide ResNet-50) are kept in float16 until the
        coreset is chosen, halving the largest block of a fit; the chosen rows return to float32.
        """
        features = points = None
        filled = 0
        with self._bar(len(images), label) as bar:
            for batch, loaded in self._input_batches(images):
                bar.update(len(loaded))
                self.skipped_ += [item.error for item in loaded if item.error]
                if batch is None:
                    continue
                output = self.patch_features_(batch.to(self.device))
                self.feature_grid_ = tuple(output.shape[1:3])
                flat = output.reshape(-1, output.shape[-1])
                if features is None:
                    rows, wide = len(images) * len(flat) // len(output), flat.shape[1] > PROJECTION_DIM
                    features = torch.empty((rows, flat.shape[1]), dtype=torch.float16 if wide else torch.float32, device=self.device)
                    points = torch.empty((rows, PROJECTION_DIM), device=self.device) if wide else features
                features[filled : filled + len(flat)] = flat
                if points is not features:
                    points[filled : filled + len(flat)] = self._project(flat)
                filled += len(flat)
        if features is None or filled == 0:
            raise ValueError("no readable training images")
        return features[:filled], points[:filled]

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
        """Raw image scores (B,) and anomaly maps (B, S, S) on the input grid of a (B, 3, H, W) batch in [0, 1]."""
        self._check_fitted()
        scores, maps = self._score_prepared(self._prepare_tensor(batch))
        return scores.numpy(), maps.numpy()

    def _predict_batches(self, images: ImageInput, label: str, keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        calibration: Calibration | None = getattr(self, "calibration_", None)
        cut = threshold if threshold is not None else (calibration.image_threshold if calibration else math.inf)
        with self._bar(len(images), label) as bar:
            for batch, loaded in self._input_batches(images, keep_images):
                scores, maps = self._score_prepared(batch) if batch is not None else (None, None)
                position = 0
                for item in loaded:
                    bar.update(1)
                    if item.error is not None:
                        yield Prediction(str(item.path), error=item.error)
                        continue
                    score, input_map = float(scores[position]), maps[position]
                    position += 1
                    yield Prediction(
                        source=str(item.path),
                        score=score,
                        normalized_score=float(calibration.normalize_scores(score)) if calibration else math.nan,
                        is_anomalous=score >= cut,
                        input_map=input_map.numpy(),
                        image_size=item.original_hw,
                        image=item.rgb,
                        geometry=self.geometry,
                    )

    @torch.inference_mode()
    def _score_prepared(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.patch_features_(batch.to(self.device))
        size, grid = features.shape[0], features.shape[1:3]
        flat = features.reshape(size, -1, features.shape[-1])
        distances, nearest = self.index_.search(flat.reshape(-1, flat.shape[-1]), k=1)
        patch_scores = distances[:, 0].reshape(size, -1)
        image_scores = reweighted_image_scores(self.index_, flat, patch_scores, nearest[:, 0].reshape(size, -1), self.num_neighbors)
        maps = anomaly_maps(patch_scores.reshape(size, *grid), self.geometry.input_size)
        return image_scores.cpu().float(), maps.cpu()

    # -----------------------------------------------------------------------------------------
    # Inputs

    def _input_batches(self, images: ImageInput, keep_images: bool = False) -> Iterator[tuple[torch.Tensor | None, list[LoadedImage]]]:
        """(batch of readable images or None, every image of the batch with its error if any)."""
        if isinstance(images, torch.Tensor):
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                hw = tuple(chunk.shape[-2:])
                loaded = [
                    LoadedImage(Path(f"tensor[{start + i}]"), original_hw=hw, rgb=_to_rgb8(chunk[i]) if keep_images else None)
                    for i in range(len(chunk))
                ]
                yield self._prepare_tensor(chunk), loaded
            return
        for loaded in load_batches([Path(p) for p in images], self.geometry, self.batch_size, keep_rgb=keep_images):
            readable = [item.tensor for item in loaded if item.tensor is not None]
            yield (torch.stack(readable) if readable else None), loaded

    def _prepare_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(batch.shape)}")
        return torch.stack([self.geometry.image_to_tensor(_to_rgb8(image)) for image in batch])

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
            "image_size": self.geometry.image_size,
            "center_crop": self.geometry.crop_size,
            "coreset_ratio": self.coreset_ratio,
            "num_neighbors": self.num_neighbors,
            "index": self.index,
            "seed": self.seed,
            "calibration_fraction": self.calibration_fraction,
            "feature_grid": list(self.feature_grid_),
            "num_fit_images": self.num_fit_images_,
            "memory_bank_shape": list(self.memory_bank_.shape),
            "backbone_weights_sha256": self.weights_sha256_,
            "calibration": self.calibration_.to_dict(),
        }

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", batch_size: int = 8, index: str | None = None, progress: bool = True) -> "PatchCore":
        """Read a model written by :meth:`save`; damaged, foreign or newer files raise :class:`ModelFileError`.

        ``index`` overrides the search the model was saved with (``exact`` or ``ivf``).
        """
        from .storage import ModelFileError

        tensors, settings = read_model(path)
        try:
            model = cls(
                settings["backbone"],
                layers=settings["layers"],
                image_size=settings["image_size"],
                center_crop=settings["center_crop"],
                coreset_ratio=settings["coreset_ratio"],
                num_neighbors=settings["num_neighbors"],
                seed=settings["seed"],
                calibration_fraction=settings["calibration_fraction"],
                device=device,
                batch_size=batch_size,
                index=index or settings.get("index", "exact"),
                progress=progress,
            )
            extractor = build_feature_extractor(get_spec(model.backbone), model.layers)
            extractor.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
            model.calibration_ = Calibration(**settings["calibration"])
            model.feature_grid_ = tuple(settings["feature_grid"])
            model.num_fit_images_ = settings["num_fit_images"]
            model.weights_sha256_ = settings["backbone_weights_sha256"]
            bank = tensors["memory_bank"]
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise ModelFileError(f"'{path}': damaged model file (settings or tensors inconsistent: {str(error).splitlines()[0]})") from None
        model.patch_features_ = PatchFeatures(extractor, model.layers).to(model.device)
        model.memory_bank_ = bank.to(model.device)
        model.index_ = NearestNeighbourIndex(model.memory_bank_, model.index)
        model.skipped_ = []
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


def _subset(images: ImageInput, ids: np.ndarray) -> ImageInput:
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(ids)]
    return [images[i] for i in ids]


def _to_rgb8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) float image in [0, 1] as RGB uint8 (H, W, 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
