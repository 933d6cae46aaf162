"""Finding images and masks, and loading batches for the backbone: decoded by the intake
(``intake.py``), shaped by the input layout (``layout.py``).

Every failure names the file and the cause in one line (:class:`BadInputError`), so that a
batch can report one bad image and carry on with the rest.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import BadInputError
from .intake import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, read_image, read_image_bytes
from .layout import InputLayout

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
# Batches with decoding overlapped


@dataclass
class LoadedImage:
    """An image decoded and prepared for the backbone, or the error that stopped it."""

    path: Path
    array: np.ndarray | None = None  # the normalised float32 input (3, h, w), for any engine
    original_hw: tuple[int, int] = (0, 0)
    rgb: np.ndarray | None = None  # kept only when asked (for pictures)
    error: str | None = None


def _load(path: Path, layout: InputLayout, keep_rgb: bool, max_pixels: int | None) -> LoadedImage:
    try:
        rgb = read_image(path, max_pixels)
    except BadInputError as error:
        return LoadedImage(path, error=str(error))
    return prepare_image(path, rgb, layout, keep_rgb)


def load_bytes(name: str, data: bytes, layout: InputLayout, keep_rgb: bool = False, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> LoadedImage:
    """An image file's bytes (sent over a network: Ray's actors) decoded by the intake and
    prepared for the backbone, or the error that stopped it, as :func:`load_batches` gives a file."""
    try:
        rgb = read_image_bytes(data, name, max_pixels)
    except BadInputError as error:
        return LoadedImage(Path(name), error=str(error))
    return prepare_image(name, rgb, layout, keep_rgb)


def prepare_image(name: str | Path, rgb: np.ndarray, layout: InputLayout, keep_rgb: bool = False) -> LoadedImage:
    """A decoded image made ready for the backbone, or its error if its size cannot be used."""
    if (problem := layout.check_size(rgb.shape[:2])) is not None:
        return LoadedImage(Path(name), error=f"'{name}': {problem}")
    return LoadedImage(Path(name), layout.image_to_array(rgb), rgb.shape[:2], rgb if keep_rgb else None)


def load_batches(
    paths: Sequence[Path], layout: InputLayout, batch_size: int, keep_rgb: bool = False, workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[list[LoadedImage]]:
    """Decode images on worker threads (PIL releases the GIL) while the caller computes on the last batch.

    Every path comes back exactly once, in order, with either its input array or an error (an image of
    more than ``max_pixels`` pixels is refused from its header). At most two batches are decoded
    ahead, so memory stays bounded however many images there are.
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
                pending.append(pool.submit(_load, path, layout, keep_rgb, max_pixels))
            if not pending:
                break
            batch.append(pending.popleft().result())
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def same_size_runs(loaded: Sequence[LoadedImage]) -> Iterator[list[LoadedImage]]:
    """Split images, in order, into runs whose readable images share one input size (the aspect
    and tile modes give several), each run with its unreadable images in place: a backbone batch each."""
    run: list[LoadedImage] = []
    shape = None  # input size of the run's readable images
    for item in loaded:
        if item.array is not None:
            if shape is not None and item.array.shape != shape:
                yield run
                run = []
            shape = item.array.shape
        run.append(item)
    if run:
        yield run


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in 1 MB blocks (weights and model files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
