"""How an image becomes the backbone's input, and how anomaly maps come back to the image.

Three input modes, and ``auto`` (the default), which picks one of the first two at fit:

- ``square`` (the seed's and anomalib's): every image is resized to
  ``image_size`` x ``image_size``, then optionally center-cropped. Long parts are squashed.
- ``aspect``: every image is scaled by one factor and keeps its shape; sides are rounded to a
  multiple of the backbone's coarsest stride so that every patch lines up with the grid. One
  factor for all images keeps a defect the same size in pixels whatever the image's size, which
  matters when tiles of many sizes are fitted and scored together. Unless given (``scale``), the
  factor is set at fit so that the training images' median shorter side becomes ``image_size``:
  no axis loses detail against the square mode for a typical image.
- ``tile``: the same scaling (native resolution by default: ``scale`` 1), then the image is cut
  into overlapping ``tile_size`` tiles that go through the backbone in batches, and their patch
  features are stitched into one grid for the whole image. Each grid cell comes from the tile
  whose centre is nearest, so it is at least half the overlap away from any tile's inner border,
  where the network's zero padding would change it. The map, the image score and the pictures
  are then made for the whole image at once, as in the other modes.

``auto`` looks only at the training images' sizes (:func:`choose_input_mode`): when they share
one shape and size that is close to square, squashing costs nothing and ``square`` is kept;
when they are long, or their shapes or sizes vary, ``aspect``. The choice and its reason are
recorded in the fitted layout (``chosen``), so ``test``, ``predict`` and ``serve`` use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import cv2
import numpy as np

from .intake import resize_mask, resize_rgb

INPUT_MODES = ("auto", "square", "aspect", "tile")
#: ``auto`` keeps the shape when the median image is this elongated or more (long side / short
#: side). Chosen by measurement (benchmarks/quality.py): cookies at 1.33 score as well squashed
#: (pixel AUROC 0.979 square, 0.974 aspect), battery welds at 1.56 and up and the generated
#: strips at 2.5 better with their shape (image AUROC 0.961 -> 0.987 and 0.883 -> 0.987)
AUTO_ELONGATION = 1.45
#: ... or when fewer than AUTO_ONE_SHAPE of the images are within 10% of the median shape and
#: 25% of the median shorter side: squashing images of many shapes or sizes to one square
#: gives the same defect a different size in each
AUTO_ONE_SHAPE = 0.9
SHAPE_TOLERANCE = 1.1
SIZE_TOLERANCE = 1.25
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the largest input the aspect mode sends through the backbone in one piece (pixels); larger
#: images are refused with advice to tile, before they can exhaust memory
MAX_WHOLE_INPUT_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Tile:
    """One tile of an input: its pixels, and the cells of the whole image's feature grid it supplies."""

    top: int
    left: int
    height: int
    width: int
    own_rows: tuple[int, int]  # [start, stop) in the whole image's feature grid
    own_cols: tuple[int, int]


@dataclass(frozen=True)
class InputLayout:
    """The input mode and its sizes. ``stride`` (the backbone's coarsest tapped stride) and, in
    the aspect mode, ``scale`` are set at fit by :meth:`fitted`."""

    mode: str = "square"  # "auto" is resolved to square or aspect by fitted()
    image_size: int = 256
    center_crop: int | None = None
    scale: float | None = None
    tile_size: int = 256
    tile_overlap: int = 64
    stride: int = 16
    chosen: str | None = None  # why ``auto`` chose this mode at fit (None: the mode was asked for)

    def __post_init__(self) -> None:
        if self.mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {self.mode!r}; choose one of: {', '.join(INPUT_MODES)}")
        if self.image_size < 32:
            raise ValueError(f"image size must be at least 32, got {self.image_size}")
        if self.center_crop is not None:
            if self.mode not in ("square", "auto"):
                raise ValueError("center crop applies to the square input mode only")
            if not 32 <= self.center_crop <= self.image_size:
                raise ValueError(f"center crop must be between 32 and the image size {self.image_size}, got {self.center_crop}")
        if self.scale is not None and not 0 < self.scale <= 16:
            raise ValueError(f"scale must be in (0, 16], got {self.scale}")
        if self.scale is not None and self.mode == "square":
            raise ValueError("scale applies to the aspect and tile input modes only")
        if self.center_crop is not None and self.scale is not None:
            raise ValueError("center crop applies to the square input mode and scale to the aspect and tile modes: give one of them")
        if self.mode == "tile":
            if self.tile_size < 32 or self.tile_size % self.stride:
                raise ValueError(f"tile size must be a multiple of {self.stride} px and at least 32, got {self.tile_size}")
            if not 0 <= self.tile_overlap < self.tile_size or self.tile_overlap % self.stride:
                raise ValueError(f"tile overlap must be a multiple of {self.stride} px and less than the tile size {self.tile_size}, got {self.tile_overlap}")

    # -----------------------------------------------------------------------------------------
    # Fitting

    def fitted(self, stride: int, image_sizes: Sequence[tuple[int, int]]) -> "InputLayout":
        """This layout with the backbone's stride, ``auto`` resolved to a mode from the training
        sizes (:func:`choose_input_mode`), and the aspect mode's scale set from them."""
        layout = replace(self, stride=stride)
        if self.mode == "auto":
            if not image_sizes:
                raise ValueError("no readable training images to choose the input mode from")
            mode, reason = choose_input_mode(image_sizes, self.center_crop, self.scale)
            layout = replace(layout, mode=mode, chosen=reason)
        if layout.mode == "tile" and self.scale is None:
            layout = replace(layout, scale=1.0)
        if layout.mode == "aspect" and self.scale is None:
            if not image_sizes:
                raise ValueError("no readable training images to set the aspect mode's scale from")
            shorter = float(np.median([min(size) for size in image_sizes]))
            layout = replace(layout, scale=self.image_size / shorter)
        return layout

    # -----------------------------------------------------------------------------------------
    # Image -> input

    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the image is resized to (before any crop)."""
        if self.mode == "square":
            return self.image_size, self.image_size
        scale = 1.0 if self.scale is None else self.scale
        # At least 32 px a side, the smallest the map's 33-tap blur can mirror at the borders.
        smallest = self.stride * math.ceil(32 / self.stride)
        return tuple(max(smallest, math.floor(side * scale / self.stride + 0.5) * self.stride) for side in image_hw)  # type: ignore[return-value]

    def input_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the whole input the backbone sees for an image of ``image_hw``."""
        if self.center_crop:
            return self.center_crop, self.center_crop
        return self.resized_hw(image_hw)

    def check_size(self, image_hw: tuple[int, int]) -> str | None:
        """Why an image of this size cannot be used in this mode, or None."""
        height, width = self.input_hw(image_hw)
        if self.mode == "aspect" and height * width > MAX_WHOLE_INPUT_PIXELS:
            return (
                f"image is {image_hw[1]}x{image_hw[0]} px, {width}x{height} at scale {self.scale:.3g}: larger than the aspect mode sends "
                f"through the backbone at once ({MAX_WHOLE_INPUT_PIXELS // 2**20} MP); use the tile input mode or a smaller scale"
            )
        return None

    def image_to_array(self, rgb: np.ndarray) -> np.ndarray:
        """RGB ``uint8`` (H, W, 3) to the normalised float32 input (3, h, w): Pillow's bilinear
        resize, then / 255 and ImageNet's mean and standard deviation, in float32."""
        resized = resize_rgb(rgb, self.resized_hw(rgb.shape[:2]))
        array = resized.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        if self.center_crop:
            start, stop = self._crop_box()
            array = array[:, start:stop, start:stop]
        mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
        return np.ascontiguousarray((array - mean) / std)

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """A full-resolution mask brought to the input grid (nearest neighbour), as anomalib
        measures pixel metrics: for comparing with it, beside the metrics on the mask's own grid."""
        resized = resize_mask(mask, self.resized_hw(mask.shape))
        if self.center_crop:
            start, stop = self._crop_box()
            resized = resized[start:stop, start:stop]
        return resized

    def tiles(self, input_hw: tuple[int, int], cell: int) -> list[Tile] | None:
        """The tiles of an input of ``input_hw`` and the feature cells (``cell`` px each) each
        supplies; None outside the tile mode (the input goes through in one piece)."""
        if self.mode != "tile":
            return None
        rows = _axis_tiles(input_hw[0], self.tile_size, self.tile_overlap, self.stride, cell)
        cols = _axis_tiles(input_hw[1], self.tile_size, self.tile_overlap, self.stride, cell)
        return [Tile(top, left, height, width, own_rows, own_cols) for top, height, own_rows in rows for left, width, own_cols in cols]

    # -----------------------------------------------------------------------------------------
    # Map -> image

    def map_to_image(self, input_map: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
        """An anomaly map on the input grid brought back to the image's own (H, W), bilinearly
        (half-pixel centres, as ``torch.nn.functional.interpolate`` with ``align_corners=False``).

        The one path from the grid to the image, for every engine: PyTorch models and exported
        ones give the same regions for the same map. Outside a center crop the model saw
        nothing; those pixels get the map's minimum.
        """
        full = np.asarray(input_map, dtype=np.float32)
        if self.center_crop:
            full = np.full((self.image_size, self.image_size), full.min(), dtype=np.float32)
            start, stop = self._crop_box()
            full[start:stop, start:stop] = input_map
        if full.shape == tuple(image_hw):
            return full
        # OpenCV's bilinear on float32 is these centres' formula (an exact halving averages 2 x 2, the same)
        return cv2.resize(full, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_LINEAR)

    def _crop_box(self) -> tuple[int, int]:
        start = (self.image_size - self.center_crop) // 2
        return start, start + self.center_crop

    # -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "InputLayout":
        return cls(**values)

    def describe(self) -> str:
        why = f" ({self.chosen})" if self.chosen else ""
        if self.mode == "auto":
            return "auto: square or aspect, chosen at fit from the training images' sizes"
        if self.mode == "square":
            crop = f", center {self.center_crop} px" if self.center_crop else ""
            return f"square {self.image_size}x{self.image_size} px{crop}{why}"
        scale = "?" if self.scale is None else f"{self.scale:.3g}"
        if self.mode == "aspect":
            return f"aspect kept, scale {scale}{why}"
        return f"tiles of {self.tile_size} px overlapping by at least {self.tile_overlap} px, scale {scale}"


def choose_input_mode(image_sizes: Sequence[tuple[int, int]], center_crop: int | None = None, scale: float | None = None) -> tuple[str, str]:
    """``auto``'s choice from the training images' (H, W): the mode, and why, in words.

    ``square`` when the images share one shape and size (at least :data:`AUTO_ONE_SHAPE` of them
    within 10% of the median's aspect ratio and 25% of its shorter side) and that shape is less
    elongated than :data:`AUTO_ELONGATION`; else ``aspect``, whose one scale for every image
    keeps a defect the same size in every image and a long part long. A center crop asked for
    means square, a scale asked for means aspect.
    """
    if center_crop is not None:
        return "square", "auto: square, for the center crop asked for"
    if scale is not None:
        return "aspect", "auto: aspect, for the scale asked for"
    heights, widths = (np.array([size[k] for size in image_sizes], dtype=np.float64) for k in (0, 1))
    ratio = np.log(widths / heights)  # the shape: > 0 landscape, < 0 portrait
    shorter = np.log(np.minimum(heights, widths))
    typical_ratio, typical_shorter = float(np.median(ratio)), float(np.median(shorter))
    one_shape = float(np.mean((np.abs(ratio - typical_ratio) <= math.log(SHAPE_TOLERANCE)) & (np.abs(shorter - typical_shorter) <= math.log(SIZE_TOLERANCE))))
    elongation = math.exp(abs(typical_ratio))
    if one_shape < AUTO_ONE_SHAPE:
        low, high = np.exp(np.percentile(shorter, [5, 95]))
        return "aspect", f"auto: aspect, the training images' shapes and sizes vary ({one_shape:.0%} share the median's; shorter sides {low:.0f} to {high:.0f} px)"
    orientation = "landscape" if typical_ratio > 0 else "portrait"
    if elongation >= AUTO_ELONGATION:
        return "aspect", f"auto: aspect, the training images are long ({elongation:.2f}:1 {orientation}, at least {AUTO_ELONGATION}:1)"
    return "square", f"auto: square, the training images share one shape close to square ({elongation:.2f}:1, under {AUTO_ELONGATION}:1)"


def _axis_tiles(length: int, tile: int, overlap: int, align: int, cell: int) -> list[tuple[int, int, tuple[int, int]]]:
    """(start, size, own cells) of the tiles along one axis of ``length`` px.

    Tiles are spread evenly from one end to the other, starting on multiples of ``align`` and
    overlapping by at least ``overlap``; cell ownership changes half-way between neighbouring
    tiles' centres, so every owned cell is at least half the overlap (less half a cell) from the
    inner border of its tile. ``length``, ``tile`` and ``overlap`` are multiples of ``align``.
    """
    if length <= tile:
        return [(0, length, (0, math.ceil(length / cell)))]
    # In units of align: the fewest tiles whose spacing is at most tile - overlap; rounding half
    # up keeps every spacing within that bound (it is a whole number of units).
    span, step = (length - tile) // align, (tile - overlap) // align
    count = math.ceil(span / step) + 1
    starts = [math.floor(k * span / (count - 1) + 0.5) * align for k in range(count)]
    centres = [start + tile / 2 for start in starts]
    bounds = [0] + [round((a + b) / 2 / cell) for a, b in zip(centres, centres[1:])] + [length // cell]
    return [(start, tile, (bounds[k], bounds[k + 1])) for k, start in enumerate(starts)]
