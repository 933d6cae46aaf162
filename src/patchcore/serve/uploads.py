"""One uploaded image: its header checked, then decoded and prepared for the model, then its
scored prediction turned into the JSON record (with the picture and map when asked).

Every image is decoded by the intake (``intake.py``), prepared by ``data.prepare_image`` and its
pictures encoded by ``render.encode_picture``, as for the command line. An image refused comes
back as a ``LoadedImage`` with its error and the HTTP status that says why: 413 (too large),
415 (not an accepted image format) or 422 (damaged, or a size the model cannot take).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import LoadedImage, prepare_image
from ..errors import BadInputError
from ..intake import ImageHeader, ImageTooLargeError, NotAnImageError, read_header, read_image_bytes
from ..render import encode_picture, picture_format, predict_picture, shrink
from .budget import PICTURE_MAX_SIDE, tile_count
from .limits import ServerLimits

if TYPE_CHECKING:
    from ..prediction import Prediction
    from .holder import ServedModel

#: the metrics' outcome of an image refused with each status
REFUSAL_OUTCOMES = {413: "too_large", 415: "not_an_image", 422: "unreadable"}
#: the MIME type of each picture format (``render.picture_format``'s names)
MIME_TYPES = {"jpg": "image/jpeg", "png": "image/png"}

#: an image refused, and the HTTP status that says why
Refusal = tuple[LoadedImage, int]


def refusal_status(error: BadInputError) -> int:
    """The HTTP status of an image the intake refused."""
    if isinstance(error, ImageTooLargeError):
        return 413
    if isinstance(error, NotAnImageError):
        return 415
    return 422  # damaged, too small, or a size the input mode cannot take


def check_headers(files: list[tuple[str, bytes]], served: ServedModel, limits: ServerLimits) -> list[tuple[ImageHeader | None, Refusal | None]]:
    """:func:`check_header` of each upload (one trip to a thread for them all)."""
    return [check_header(name, data, served, limits) for name, data in files]


def check_header(name: str, data: bytes, served: ServedModel, limits: ServerLimits) -> tuple[ImageHeader | None, Refusal | None]:
    """One upload's header, or its refusal: for its format, pixels or tiles, before anything is decoded."""
    try:
        header = read_header(data, name, limits.max_image_pixels)
    except BadInputError as error:
        return None, (LoadedImage(Path(name), error=str(error)), refusal_status(error))
    tiles = tile_count(header, served.model.layout_)
    if tiles > limits.max_tiles:
        message = f"'{name}': image is {header.width}x{header.height} px, {tiles} tiles of the model's tile mode, more than the limit of {limits.max_tiles} (--max-tiles)"
        return None, (LoadedImage(Path(name), error=message), 413)
    return header, None


def decode_upload(name: str, data: bytes, served: ServedModel, picture: bool, max_pixels: int | None) -> tuple[LoadedImage, int]:
    """Decode and prepare one upload for ``served``'s model: the image and 200, or its error and
    status. The image is kept only for a picture, and then only at the picture's size."""
    try:
        rgb = read_image_bytes(data, name, max_pixels)
    except BadInputError as error:
        return LoadedImage(Path(name), error=str(error)), refusal_status(error)
    loaded = prepare_image(name, rgb, served.model.layout_, keep_rgb=picture)
    del rgb
    if loaded.rgb is not None:
        loaded.rgb = shrink(loaded.rgb, PICTURE_MAX_SIDE)
    return loaded, 200 if loaded.error is None else 422


def record(prediction: Prediction, picture: bool, format_name: str = "jpeg") -> dict[str, Any]:
    """The JSON record (as ``predict`` writes it), with the overlay picture and the map when asked.
    The map at the image's size is made once, for the regions; the picture's once, at its size
    (the same map when the picture is at the image's size)."""
    result = prediction.to_record()
    if picture:
        calibration, rgb = prediction.calibration, prediction.image
        size = rgb.shape[:2]
        at_picture = prediction.anomaly_map if tuple(size) == tuple(prediction.image_size) else prediction.map_at(size)
        overlay = predict_picture(rgb, lambda _: at_picture, calibration, prediction.score, prediction.is_anomalous)
        result["picture"] = data_url(overlay, format_name)
        # the map on the pictures' fixed scale: 0 = typical good, 128 = the pixel threshold, 255 = twice as far
        level = np.clip(calibration.normalize_maps(at_picture) / 2.0, 0.0, 1.0)
        result["anomaly_map"] = data_url((level * 255).round().astype(np.uint8), "png")
    return result


def data_url(image: np.ndarray, format_name: str) -> str:
    """An RGB (H, W, 3) or grey (H, W) image as a ``data:`` URL in ``format_name`` (jpeg, jpg, png)."""
    kind = picture_format(format_name)
    return f"data:{MIME_TYPES[kind]};base64,{base64.b64encode(encode_picture(image, kind)).decode('ascii')}"
