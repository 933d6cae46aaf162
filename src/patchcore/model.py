"""PatchCore: fit on good images, score new ones (Roth et al., "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022). The estimator people call; its fit runs the steps of ``fitting.py``.

    fit:      patch features of every good image -> memory bank -> greedy coreset -> index
              + every good image scored without its own bank entries -> thresholds (calibrate.py),
              after setting aside the images that score like defects (contamination.py)
    predict:  patch features -> distance to the nearest bank entry per patch
              -> anomaly map (upsample, blur) and image score (eq. 7)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .backbones import build_feature_extractor, get_spec
from .calibrate import DEFAULT_FALSE_ALARM_RATE, Calibration, calibrate
from .contamination import DEFAULT_CONTAMINATION, ContaminationCheck, check_training_images, parse_contamination
from .data import LoadedImage, same_size_runs
from .errors import ModelFileError
from .features import PatchFeatures
from .fitting import (
    DEFAULT_CORESET_RATIO,
    FitOptions,
    FitPipeline,
    FittedState,
    CalibrationInputs,
    ImageInput,
    TrainingPatches,
    bank_entries,
    fitted_share,
    own_runs,
    rgb8,
    set_aside_images,
    stack_inputs,
)
from .formats import MODEL_FORMAT_VERSION, model_metadata
from .intake import DEFAULT_MAX_IMAGE_PIXELS
from .layout import InputLayout
from .prediction import Prediction, predictions
from .search import INDEX_KINDS, NearestNeighbourIndex, score_patches
from .storage import read_model, write_model

__all__ = ["PatchCore", "Prediction", "resolve_device"]


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
        input_mode: str = "auto",
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
        contamination: str | float = DEFAULT_CONTAMINATION,
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
        self.contamination = parse_contamination(contamination)  # auto, off, or the share of defective images stated
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.weights = weights
        self.index = index
        self.temp_dir = temp_dir
        self.max_image_pixels = max_image_pixels  # images with more are refused from their headers
        self.progress = progress

    # -----------------------------------------------------------------------------------------
    # Fitting

    def fit(self, images: ImageInput, trusted: Sequence[str | Path] = ()) -> "PatchCore":
        """Learn the memory bank from every good image, and the thresholds from the same images.

        Each training image is then scored against the bank with its own entries left out, so
        that it is an image the bank has not seen; the thresholds are cut on those scores at
        ``false_alarm_rate`` (calibrate.py). Images whose scores stand out as defects' do
        (``contamination``, contamination.py) are set aside: the model is then the fit of the
        others (``contamination_`` lists them). ``trusted``: paths reviewed as good, never set
        aside. Unreadable images are reported and skipped.
        """
        clock = _PhaseClock()
        pipeline, sizes, weights_sha256 = FitPipeline.begin(self.backbone, self.layers, self.weights, self.layout, images, self.fit_options())
        clock.lap("load_backbone")
        patches = pipeline.extract(images, sizes)
        try:
            if len(patches.sources) < 2:
                raise ValueError(f"need at least 2 readable good images to fit (each is scored against the others to set the threshold), got {len(patches.sources)}")
            clock.lap("features")
            disk_bytes = patches.file.nbytes
            size_of = lambda rows: bank_entries(rows, self.coreset_ratio, self.bank_size)  # noqa: E731
            picks, radius = pipeline.select_covering_coreset(patches.points, size_of(len(patches.points)))
            clock.lap("coreset")
            bank, index, inputs = self._bank_and_scores(pipeline, patches, picks)
            clock.lap("calibration")
            check = check_training_images(inputs.scores, inputs.sources, self.contamination, [str(path) for path in trusted])
            aside = set_aside_images(check, inputs)
            if len(aside):  # their patches out of the bank, its cover repaired, and the others scored again
                del bank, index  # (freed before the repaired bank's are built: a large fit's peak memory)
                picks = pipeline.coreset_without(patches.points, patches.starts, aside, picks, radius)
                patches.drop_projection()
                bank, index, inputs = self._bank_and_scores(pipeline, patches, picks, np.setdiff1d(inputs.images, aside))
            clock.lap("contamination")
        finally:
            patches.close()
        calibration = calibrate(*inputs.for_calibrate(), self.false_alarm_rate)
        return self.set_fitted(FittedState(
            pipeline.patch_features, pipeline.layout, weights_sha256, bank,
            coreset_ratio=fitted_share(len(bank), patches.starts, aside, None if self.bank_size is not None else self.coreset_ratio),
            num_fit_images=len(patches.sources) - len(aside), calibration=calibration, calibration_sources=inputs.sources,
            contamination=check, skipped=patches.skipped, fit_seconds=clock.laps, fit_disk_bytes=disk_bytes,
        ), index)

    def _bank_and_scores(
        self, pipeline: FitPipeline, patches: TrainingPatches, picks: torch.Tensor, images: np.ndarray | None = None
    ) -> tuple[torch.Tensor, NearestNeighbourIndex, CalibrationInputs]:
        """The memory bank of the picked rows, its index, and the training images (``images``, or
        those the pipeline calibrates on) scored leave-one-out against it."""
        bank = patches.gather(picks).to(pipeline.device)
        index = NearestNeighbourIndex(bank, self.index)
        return bank, index, pipeline.leave_one_out(index, self.num_neighbors, patches, own_runs(picks.numpy(), patches.starts), images)

    def fit_options(self) -> FitOptions:
        """How this model's fits run (seed, device, batch size, temporary files, pixel limit, progress)."""
        return FitOptions(
            seed=self.seed, device=str(self.device), batch_size=self.batch_size, temp_dir=None if self.temp_dir is None else str(self.temp_dir),
            max_image_pixels=self.max_image_pixels, progress=self.progress,
        )

    def set_fitted(self, state: FittedState, index: NearestNeighbourIndex | None = None) -> "PatchCore":
        """Take the state a fit learned (``fitting.FittedState``; a fit on Ray assembles one):
        the fitted attributes, ending in ``_``. ``index``: the bank's index, if already built."""
        self.patch_features_ = state.patch_features
        self.layout_ = state.layout
        self.weights_sha256_ = state.weights_sha256
        self.memory_bank_ = state.memory_bank
        self.index_ = index if index is not None else NearestNeighbourIndex(self.memory_bank_, self.index)
        self.coreset_ratio_ = state.coreset_ratio
        self.num_fit_images_ = state.num_fit_images
        self.calibration_ = state.calibration
        self.calibration_sources_ = state.calibration_sources
        self.contamination_ = state.contamination
        self.skipped_ = state.skipped
        self.fit_seconds_ = state.fit_seconds
        self.fit_disk_bytes_ = state.fit_disk_bytes
        self.format_version_ = MODEL_FORMAT_VERSION  # the format save() writes
        return self

    def update(self, images: ImageInput, trusted: Sequence[str | Path] = ()) -> "PatchCore":
        """Add good images to a fitted model without refitting from scratch.

        The greedy k-center selection carries on from the current memory bank: of the new
        images' patches, the ones the bank already covers are not added, and the bank grows by
        the fit's share of the new patches (``coreset_ratio_``: the coreset ratio, or the share a
        bank size came to). The new images are then scored leave-one-out
        against the grown bank and the thresholds are cut again, at the model's false-alarm
        rate, on their scores together with the stored scores of the earlier images (taken
        against the smaller bank, so a little high: the cut errs towards fewer false alarms).
        New images that score like defects beside the earlier ones are set aside as in
        :meth:`fit`; ``trusted`` (paths reviewed as good) never are.
        """
        self._check_fitted()
        pipeline = self.pipeline()
        patches = pipeline.extract(images, label="features")
        self.skipped_ = patches.skipped
        old = self.calibration_
        before = len(self.memory_bank_)
        try:
            size_of = lambda rows: max(1, round(self.coreset_ratio_ * rows))  # noqa: E731
            picks = pipeline.select_coreset(patches.points, size_of(len(patches.points)), bank=self.memory_bank_)
            bank, index, inputs = self._grown_bank_and_scores(pipeline, patches, picks)
            earlier = np.array(old.good_scores) if old.good_scores else None  # a format-1 model stores none
            check = check_training_images(inputs.scores, inputs.sources, self.contamination, [str(path) for path in trusted], reference=earlier)
            aside = set_aside_images(check, inputs)
            if len(aside):  # the update again, without them
                picks = pipeline.select_coreset_without(patches.points, patches.starts, aside, size_of, bank=self.memory_bank_)
                bank, index, inputs = self._grown_bank_and_scores(pipeline, patches, picks, np.setdiff1d(inputs.images, aside))
        finally:
            patches.close()
        self.memory_bank_, self.index_ = bank, index
        self.num_fit_images_ += len(patches.sources) - len(aside)
        self.contamination_ = self.contamination_.joined(check) if self.contamination_ is not None else check
        scores, peaks, map_mean, sources = inputs.scores, inputs.peaks, inputs.map_mean, inputs.sources
        if old.good_scores:
            scores = np.concatenate([old.good_scores, scores])
            peaks = np.concatenate([old.good_map_peaks, peaks])
            map_mean = (old.pixel_good_mean * old.num_images + map_mean * len(sources)) / (old.num_images + len(sources))
            sources = ["(fitted earlier)"] * old.num_images + sources
        if len(scores) >= 2:
            self.calibration_ = calibrate(scores, peaks, map_mean, old.false_alarm_rate or self.false_alarm_rate)
            self.calibration_sources_ = sources
        return self

    def _grown_bank_and_scores(
        self, pipeline: FitPipeline, patches: TrainingPatches, picks: torch.Tensor, images: np.ndarray | None = None
    ) -> tuple[torch.Tensor, NearestNeighbourIndex, CalibrationInputs]:
        """The memory bank grown by the picked rows of new images, its index, and the new images
        (``images``, or those the pipeline calibrates on) scored leave-one-out against it."""
        before = len(self.memory_bank_)
        bank = torch.cat([self.memory_bank_, patches.gather(picks).to(self.memory_bank_.device)])
        index = NearestNeighbourIndex(bank, self.index)
        return bank, index, pipeline.leave_one_out(index, self.num_neighbors, patches, before + own_runs(picks.numpy(), patches.starts), images)

    def pipeline(self) -> FitPipeline:
        """The fitting pipeline of this fitted model: its backbone and input layout."""
        self._check_fitted()
        return FitPipeline(self.patch_features_, self.layout_, self.fit_options())

    # -----------------------------------------------------------------------------------------
    # Scoring

    def predict(self, images: ImageInput, keep_images: bool = False, threshold: float | None = None) -> list[Prediction]:
        """Score images; unreadable ones come back with ``error`` set instead of a score."""
        return list(self.iter_predictions(images, keep_images, threshold))

    def iter_predictions(self, images: ImageInput, keep_images: bool = False, threshold: float | None = None) -> Iterator[Prediction]:
        """Like :meth:`predict`, one result at a time, so that memory stays flat over any number of images.

        ``threshold`` overrides the calibrated image threshold (raw score units).
        """
        pipeline = self.pipeline()
        # A few images are scanned rather than paying to build the search's bounds (the same
        # answers); the square grid of the layout's size is the patches an image has, or about.
        grid = self.patch_features_.grid_hw((self.layout_.image_size, self.layout_.image_size))
        self.index_.expect(len(images) * grid[0] * grid[1])
        with pipeline.bar(len(images), "scoring") as bar:
            for loaded in pipeline.loaded_batches(images, keep_images):
                for prediction in self.predict_loaded(loaded, threshold):
                    bar.update(1)
                    yield prediction

    def score(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores (B,) and anomaly maps (B, h, w) on the input grid of a (B, 3, H, W) batch in [0, 1]."""
        self._check_fitted()
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(batch.shape)}")
        inputs = torch.from_numpy(np.stack([self.layout_.image_to_array(rgb8(image)) for image in batch]))
        scores, maps = self.score_inputs(inputs)
        return scores.numpy(), maps.numpy()

    def predict_loaded(self, loaded: Sequence[LoadedImage], threshold: float | None = None) -> Iterator[Prediction]:
        """Score images already decoded and prepared (``data.prepare_image``), in order, one result each.

        The server decodes uploads itself and scores them here, through the same path as
        :meth:`iter_predictions`; images of different input sizes are scored in separate batches.
        """
        self._check_fitted()
        for run in same_size_runs(loaded):
            inputs = stack_inputs(run)
            scores, maps = self.score_inputs(inputs) if inputs is not None else (None, None)
            yield from predictions(run, scores, None if maps is None else maps.numpy(), self.layout_, self.calibration_, threshold)

    def score_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and input-grid maps (B, H, W) of a batch of prepared inputs of one size
        (normalised, as ``InputLayout.image_to_array`` makes them)."""
        self._check_fitted()
        features = self.patch_features_.of_inputs(inputs, self.layout_, self.batch_size)
        return score_patches(self.index_, features, tuple(inputs.shape[-2:]), self.num_neighbors)

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
            # absent for a model loaded from a file that predates the check
            **({"contamination": self.contamination_.to_dict()} if self.contamination_ is not None else {}),
        }

    def metadata(self) -> dict[str, Any]:
        """What a server tells clients about the model (the same keys as ``ExportedModel.metadata``)."""
        self._check_fitted()
        return model_metadata(self.settings(), self.layout_, "pytorch", str(self.device), self.index, self.format_version_, MODEL_FORMAT_VERSION)

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
        tensors, settings = read_model(path)
        try:
            # Format 1 had the square mode only, as two settings.
            layout = InputLayout.from_dict(settings["input"]) if "input" in settings else InputLayout("square", settings["image_size"], settings["center_crop"])
            calibration = Calibration.from_dict(settings["calibration"])
            contamination = ContaminationCheck.from_dict(settings["contamination"]) if "contamination" in settings else None
            model = cls(
                settings["backbone"],
                layers=settings["layers"],
                coreset_ratio=None if settings.get("bank_size") else settings["coreset_ratio"],
                bank_size=settings.get("bank_size"),
                num_neighbors=settings["num_neighbors"],
                seed=settings["seed"],
                false_alarm_rate=calibration.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
                contamination=contamination.setting if contamination is not None else DEFAULT_CONTAMINATION,
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
        model.contamination_ = contamination
        model.format_version_ = settings["format_version"]
        return model

    # -----------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("this PatchCore is not fitted yet: call fit() or PatchCore.load()")


class _PhaseClock:
    """Wall time of each phase of a fit, for users and benchmarks (``fit_seconds_``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now
