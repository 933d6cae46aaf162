"""Finding images and masks, decoding them to RGB, and loading batches for the backbone (``layout.py`` shapes them).

Every failure names the file and the cause in one line (:class:`BadInputError`), so that a
batch can report one bad image and carry on with the rest.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps

from .layout import InputLayout

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
#: EXIF orientations that turn the picture by 90 degrees (width and height swap)
_QUARTER_TURNS = frozenset({5, 6, 7, 8})

# Decompression-bomb warnings become errors we report per file, not a process-wide crash.
warnings.simplefilter("error", Image.DecompressionBombWarning)


from .errors import BadInputError  # noqa: E402  (defined apart, re-exported here)


class NotAnImageError(BadInputError):
    """The file is in no image format we read (a text file, a PDF, an empty file)."""


class DamagedImageError(BadInputError):
    """The file looks like an image but cannot be decoded (truncated, corrupt)."""


class ImageTooLargeError(BadInputError):
    """The image has more pixels than allowed (e.g. a decompression bomb); refused before decoding."""


# ---------------------------------------------------------------------------------------------
# Finding files


def find_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursively, by suffix), in a stable sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInputError(f"'{root}': not a folder")
    images = _images_below(root)
    if not images:
        raise BadInputError(f"'{root}': no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def _images_below(root: Path) -> list[Path]:
    # Hidden files (macOS "._name.png" resource forks, editor backups) are never images to use.
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to every file in them (bad ones get reported later)."""
    expanded: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            expanded.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            expanded.append(path)
    return expanded


def training_images(data: str | Path) -> list[Path]:
    """Good images to fit on: ``DATA/train/good`` in an MVTec-layout folder, else every image under DATA."""
    root = Path(data)
    mvtec_train = root / "train" / "good"
    return find_images(mvtec_train if mvtec_train.is_dir() else root)


@dataclass(frozen=True)
class LabelledSample:
    """One test image of an MVTec-layout folder and what is known about it."""

    path: Path
    defect_type: str  # "good" or the defect folder's name
    label: int  # 0 good, 1 defective
    mask_path: Path | None  # None for good images (an all-zero mask)


def list_test_samples(data: str | Path) -> list[LabelledSample]:
    """The samples of ``DATA/test/<type>/*`` with masks from ``DATA/ground_truth/<type>/<stem>_mask.*``.

    A defective image without a mask is still listed, with ``mask_path`` pointing where the mask
    was expected; reading it then fails with a clear error for that image alone.
    """
    root = Path(data)
    test_root = root / "test"
    if not test_root.is_dir():
        raise BadInputError(f"'{root}': no test/ folder (expected the MVTec AD layout test/<defect type>/*)")
    samples = []
    for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        is_good = type_dir.name == "good"
        for path in _images_below(type_dir):  # an empty defect folder is no reason to stop
            mask = None if is_good else _find_mask(root / "ground_truth" / type_dir.name, path.relative_to(type_dir))
            samples.append(LabelledSample(path, type_dir.name, 0 if is_good else 1, mask))
    if not samples:
        raise BadInputError(f"'{test_root}': no test images")
    return samples


def _find_mask(mask_dir: Path, relative: Path) -> Path:
    stem_dir = mask_dir / relative.parent
    for name in (f"{relative.stem}_mask", relative.stem):
        for suffix in (".png", relative.suffix, ".bmp", ".tif", ".tiff"):
            candidate = stem_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return stem_dir / f"{relative.stem}_mask.png"  # where MVTec AD puts it: named in the error


# ---------------------------------------------------------------------------------------------
# Decoding


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode any common image to RGB ``uint8`` of shape (H, W, 3).

    Grayscale, palette, RGBA (composited on black, as a camera sees it), CMYK, 16-bit and float
    images are all brought to 8-bit RGB; EXIF orientation is applied. An image of more than
    ``max_pixels`` pixels (default: Pillow's decompression-bomb limit) is refused from its header.
    """
    path = Path(path)
    _check_file(path)
    if path.stat().st_size == 0:  # as an empty upload or a file read elsewhere (read_image_bytes) is reported
        raise NotAnImageError(f"'{path}': empty file")
    return _decode(path, str(path), max_pixels)


def read_file_bytes(path: str | Path) -> bytes:
    """A file's bytes, to decode with :func:`read_image_bytes` elsewhere (another machine); a missing
    or unreadable file raises the error :func:`read_image` would."""
    path = Path(path)
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInputError(f"'{path}': not a readable image ({str(error).splitlines()[0]})") from None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BadInputError(f"'{path}': no such file")


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """:func:`read_image` for an image held in memory (an upload); ``name`` is used in errors."""
    if not data:
        raise NotAnImageError(f"'{name}': empty file")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int | None) -> np.ndarray:
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"'{name}': image is {width}x{height} px, more than the limit of {max_pixels:,} pixels")
            array = _plain_png(image, source)
            if array is None:
                image.load()
                image = ImageOps.exif_transpose(image)
                array = _to_rgb8(image)
    except BadInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLargeError(f"'{name}': image too large ({error})") from None
    except Image.UnidentifiedImageError:
        raise NotAnImageError(f"'{name}': not a readable image (not in any image format)") from None
    except Exception as error:  # PIL raises many types for damaged files; all mean the same here
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedImageError(f"'{name}': not a readable image ({cause})") from None
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise BadInputError(f"'{name}': image is {array.shape[1]}x{array.shape[0]} px, too small (at least 8x8)")
    return array


def _plain_png(image: Image.Image, source: Path | io.BytesIO) -> np.ndarray | None:
    """An 8-bit RGB or grayscale PNG decoded by OpenCV, which reads it faster than Pillow, to the
    very same pixels (PNG is lossless); None for any other image, which Pillow decodes. A PNG's
    EXIF (which may turn the image) can follow its pixels, so one whose decoded size is not its
    header's, or that has EXIF at all, goes to Pillow too."""
    eight_bit = len(image.tile) == 1 and image.tile[0][3] in ("RGB", "L")  # the raw mode: 8 bits a sample
    if image.format != "PNG" or not eight_bit or "transparency" in image.info or "exif" in image.info:
        return None
    data = source.getvalue() if isinstance(source, io.BytesIO) else source.read_bytes()
    if b"eXIf" in data:
        return None
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.shape[:2] != (image.height, image.width):
        return None  # damaged: Pillow names the cause
    return np.ascontiguousarray(decoded[..., ::-1])


def image_size_hw(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image as :func:`read_image` will decode it, from its header alone; None if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # A PNG's EXIF may follow the pixels, and reading it would decode the whole file;
            # other formats keep it in the header. (A size read wrong only costs a reallocation.)
            turned = image.format != "PNG" and image.getexif().get(0x0112) in _QUARTER_TURNS
    except Exception:  # reported when the image itself is read
        return None
    return (width, height) if turned else (height, width)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scale the full range to 8 bits (PIL's convert("L") would clip at 255).
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max() <= 1.0:  # float images are usually in [0, 1]
            values = values * 255.0
        gray = np.clip(values, 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_mask(path: Path | None, image_path: Path, image_size_hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as ``bool`` (H, W); ``path=None`` means a good image (all False)."""
    if path is None:
        return np.zeros(image_size_hw, dtype=bool)
    if not path.is_file():
        raise BadInputError(f"'{image_path}': defective test image has no mask (expected '{path}')")
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 127 if image.mode not in ("1",) else np.asarray(image, dtype=bool)
    except Exception as error:
        raise BadInputError(f"'{path}': not a readable mask ({str(error).splitlines()[0]})") from None
    if mask.shape != tuple(image_size_hw):
        raise BadInputError(
            f"'{path}': mask is {mask.shape[1]}x{mask.shape[0]} px but its image '{image_path.name}' is "
            f"{image_size_hw[1]}x{image_size_hw[0]} px"
        )
    return mask


# ---------------------------------------------------------------------------------------------
# Batches with decoding overlapped


@dataclass
class LoadedImage:
    """An image decoded and prepared for the backbone, or the error that stopped it."""

    path: Path
    tensor: torch.Tensor | np.ndarray | None = None  # an array for the exported-model runtime
    original_hw: tuple[int, int] = (0, 0)
    rgb: np.ndarray | None = None  # kept only when asked (for pictures)
    error: str | None = None


def _load(path: Path, layout: InputLayout, keep_rgb: bool, as_array: bool) -> LoadedImage:
    try:
        rgb = read_image(path)
    except BadInputError as error:
        return LoadedImage(path, error=str(error))
    return prepare_image(path, rgb, layout, keep_rgb, as_array)


def prepare_image(name: str | Path, rgb: np.ndarray, layout: InputLayout, keep_rgb: bool = False, as_array: bool = False) -> LoadedImage:
    """A decoded image made ready for the backbone, or its error if its size cannot be used.
    ``as_array``: the input as a numpy array rather than a tensor (the exported-model runtime)."""
    if (problem := layout.check_size(rgb.shape[:2])) is not None:
        return LoadedImage(Path(name), error=f"'{name}': {problem}")
    prepared = layout.image_to_array(rgb) if as_array else layout.image_to_tensor(rgb)
    return LoadedImage(Path(name), prepared, rgb.shape[:2], rgb if keep_rgb else None)


def load_batches(
    paths: Sequence[Path], layout: InputLayout, batch_size: int, keep_rgb: bool = False, workers: int = 2, as_array: bool = False
) -> Iterator[list[LoadedImage]]:
    """Decode images on worker threads (PIL releases the GIL) while the caller computes on the last batch.

    Every path comes back exactly once, in order, with either a tensor or an error. At most two
    batches are decoded ahead, so memory stays bounded however many images there are.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    look_ahead = 2 * batch_size
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[Future[LoadedImage]] = deque()
        remaining = iter(paths)
        batch: list[LoadedImage] = []
        while True:
            while len(pending) < look_ahead and (path := next(remaining, None)) is not None:
                pending.append(pool.submit(_load, path, layout, keep_rgb, as_array))
            if not pending:
                break
            batch.append(pending.popleft().result())
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in 1 MB blocks (weights and model files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
