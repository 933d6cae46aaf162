"""The intake: the one place where bytes become pixels, for every face (CLI, server, Ray, runtime).

An image is read in two steps, so that nothing is decoded before it is known to be affordable:

1. :func:`read_header` opens the file with an allow-list of raster decoders (PNG, JPEG, BMP,
   TIFF, WebP, PNM), reads its size and mode from the header and refuses, before any pixel is
   decoded, a file in another format (EPS, PDF, ...: their Pillow plugins start Ghostscript or
   other programs), an image of more than ``max_pixels`` pixels, or one smaller than 8 x 8. The
   header also says what decoding it will cost (:attr:`ImageHeader.decode_bytes`), which the
   server reserves from its memory budget first.
2. :func:`read_image` / :func:`read_image_bytes` decode to RGB ``uint8`` (H, W, 3), the one
   form the rest of the package takes, without a wider copy of the whole image: 16-bit and
   float images go to 8 bits through a table or in bands of rows, RGBA is composited on black
   in integers exactly as Pillow does.

Every failure is one of four errors naming the file and the cause in one line:
:class:`FormatNotAcceptedError`, :class:`DamagedImageError`, :class:`ImageTooLargeError` and
:class:`~patchcore.errors.BadInputError` for the rest (missing, too small).

Numpy, Pillow and OpenCV only: no torch. Importing this module changes no process state; a face
that reads every image through it calls :func:`own_the_pixel_limit` at start-up, so that its
``--max-image-pixels`` is the only pixel limit (Pillow's own check would warn past 89 MP and
refuse past 179 MP whatever the user set).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import BadInputError

#: Pillow's decoders an image may be opened with: the formats cameras and vision software write.
#: Every other plugin (EPS and PDF run Ghostscript; GIF, ICO, PSD and the rest are not camera
#: formats) is never tried, so its code never sees an upload.
ACCEPTED_FORMATS: dict[str, str] = {"PNG": "PNG", "JPEG": "JPEG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP", "PPM": "PNM"}
#: file name suffixes searched for in folders (PNM covers .pgm, .ppm, .pbm and .pnm)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"})
#: the pixel limit of the command line and the library: above Pillow's own (89.5 MP), which is
#: what the command line refused before it had one, so no image read then is refused now, and
#: room for a line-scan camera's 50+ MP frames. The server's is lower (below).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
#: the server's pixel limit: a 40 MP image (a 7,500 x 5,300 camera frame) of any mode, and its
#: picture, fit the default memory budget of a machine with 24 GB or more (``serve --max-memory-mb``),
#: but for a WebP with alpha (up to 36 MP there)
DEFAULT_SERVER_MAX_IMAGE_PIXELS = 40_000_000
#: the smallest image side the maps' blur can mirror at the borders
MIN_SIDE = 8
#: EXIF orientations that turn the picture by 90 degrees (width and height swap)
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
#: rows converted at a time where a conversion needs wider values than the result (16-bit, float):
#: about this many pixels a band, so the wide copy is a band's and never the whole image's
_BAND_PIXELS = 1 << 18

#: Peak bytes a pixel that decoding an image of each Pillow mode takes, everything it holds at
#: once (the decoder's buffers, Pillow's pixels, numpy's copy, the RGB result), measured on 9 MP
#: images with a margin; tests/unit/test_intake_memory.py holds every mode to it. Modes not
#: listed go through Pillow's convert("RGB") and are charged the most.
DECODE_BYTES_PER_PIXEL: dict[str, int] = {
    "1": 12, "L": 7, "P": 12, "RGB": 11, "RGBA": 14, "RGBX": 14, "CMYK": 15, "YCbCr": 15, "LA": 9, "PA": 15,
    "I;16": 10, "I;16L": 10, "I;16B": 10, "I;16N": 10, "I": 13, "F": 13,
}
#: formats whose decoder holds more than the mode's figure (libwebp decodes to a buffer of its own)
DECODE_BYTES_PER_PIXEL_BY_FORMAT: dict[tuple[str, str], int] = {("WEBP", "RGB"): 16, ("WEBP", "RGBA"): 19}
_WORST_DECODE_BYTES_PER_PIXEL = max(*DECODE_BYTES_PER_PIXEL.values(), *DECODE_BYTES_PER_PIXEL_BY_FORMAT.values())
#: Signatures of the accepted formats: a file that starts like one but that its decoder cannot
#: open is damaged, not of another format.
_ACCEPTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), *((b"P" + kind, "PNM") for kind in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"f", b"F")),
)
#: Signatures of common formats that are refused, so that the error can say what the file is.
_REFUSED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"8BPS", "Photoshop"),
    (b"<svg", "SVG"), (b"<?xml", "XML/SVG"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"),
    (b"II*\x00\x10\x00\x00\x00CR", "camera raw (CR2)"), (b"\x00\x00\x01\x00", "ICO"), (b"qoif", "QOI"), (b"DDS ", "DDS"),
)


class NotAnImageError(BadInputError):
    """The file holds no image this package reads (an empty file, a text file, a refused format)."""


class FormatNotAcceptedError(NotAnImageError):
    """The file is not in one of :data:`ACCEPTED_FORMATS` (a PDF, an EPS, a text file): refused
    before any decoder but the accepted ones has looked at it."""


class DamagedImageError(BadInputError):
    """The file looks like an image in an accepted format but cannot be decoded (truncated, corrupt)."""


class ImageTooLargeError(BadInputError):
    """The image has more pixels than allowed (a decompression bomb, or a setting too low): refused
    from its header, before decoding."""


def accepted_formats_text() -> str:
    """The accepted formats for messages: "PNG, JPEG, BMP, TIFF, WebP, PNM"."""
    return ", ".join(ACCEPTED_FORMATS.values())


def own_the_pixel_limit() -> None:
    """Make ``--max-image-pixels`` the process's one pixel limit: Pillow's own decompression-bomb
    check (a warning past 89 MP, an error past 179 MP, whatever the intake's limit) is turned off.

    For a process that reads every image through the intake, which checks its own limit from the
    header first: the command line's ``main``, the server's start-up, a Ray actor's start-up.
    Never called on import; a program using the library without it keeps Pillow's check too.
    """
    Image.MAX_IMAGE_PIXELS = None


# ---------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: enough to refuse it, or to know what decoding it costs."""

    name: str
    format: str  # Pillow's name, one of ACCEPTED_FORMATS (or MPO, a JPEG with extra frames)
    mode: str  # Pillow's mode: "RGB", "L", "I;16", ...
    width: int  # as stored (an EXIF turn swaps them when decoded)
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """Peak bytes that decoding this image to RGB takes (see :data:`DECODE_BYTES_PER_PIXEL`)."""
        per_pixel = DECODE_BYTES_PER_PIXEL_BY_FORMAT.get((self.format, self.mode)) or DECODE_BYTES_PER_PIXEL.get(self.mode, _WORST_DECODE_BYTES_PER_PIXEL)
        return self.pixels * per_pixel


def read_header(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """An image's header, from a file or from bytes (an upload), checked against the format
    allow-list, ``max_pixels`` and the smallest size; no pixel is decoded."""
    name = str(source) if name is None else name
    with _open(source, name, max_pixels) as image:
        return ImageHeader(name, image.format or "?", image.mode, image.width, image.height)


def image_size_hw(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """(H, W) of an image as :func:`read_image` will decode it, from its header alone; None if it
    cannot be read (the error is reported when the image itself is read)."""
    try:
        with _open(path, str(path), max_pixels) as image:
            width, height = image.size
            # A PNG's EXIF may follow the pixels, and reading it would decode the whole file;
            # other formats keep it in the header. (A size read wrong only costs a reallocation.)
            turned = image.format != "PNG" and image.getexif().get(0x0112) in _QUARTER_TURNS
    except (BadInputError, OSError):
        return None
    return (width, height) if turned else (height, width)


# ---------------------------------------------------------------------------------------------
# Decoding


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to RGB ``uint8`` of shape (H, W, 3).

    Grayscale, palette, RGBA (composited on black, as a camera sees it), CMYK, 16-bit and float
    images are all brought to 8-bit RGB; EXIF orientation is applied. ``max_pixels`` None: no
    limit of the intake's own (Pillow's still applies unless :func:`own_the_pixel_limit` was called).
    """
    return _decode(Path(path), str(path), max_pixels)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """:func:`read_image` for an image held in memory (an upload); ``name`` is used in errors."""
    return _decode(data, name, max_pixels)


def read_file_bytes(path: str | Path) -> bytes:
    """A file's bytes, to decode with :func:`read_image_bytes` elsewhere (another machine); a missing
    or unreadable file raises the error :func:`read_image` would."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"'{path}': no such file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInputError(f"'{path}': not a readable image ({_first_line(error)})") from None


def read_mask(path: Path | None, image_path: Path, image_size_hw: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as ``bool`` (H, W); ``path=None`` means a good image (all False). The mask
    must have its image's size (``image_size_hw``), which also bounds what decoding it may cost."""
    if path is None:
        return np.zeros(image_size_hw, dtype=bool)
    if not path.is_file():
        raise BadInputError(f"'{image_path}': defective test image has no mask (expected '{path}')")
    try:
        with _open(path, str(path), max(image_size_hw[0] * image_size_hw[1], MIN_SIDE * MIN_SIDE)) as image:
            mask = np.asarray(image, dtype=bool) if image.mode == "1" else np.asarray(image.convert("L")) > 127
    except (BadInputError, OSError) as error:
        raise BadInputError(f"'{path}': not a readable mask: {_cause(error, path)}") from None
    if mask.shape != tuple(image_size_hw):
        raise BadInputError(
            f"'{path}': mask is {mask.shape[1]}x{mask.shape[0]} px but its image '{image_path.name}' is "
            f"{image_size_hw[1]}x{image_size_hw[0]} px"
        )
    return mask


def _cause(error: BaseException, path: Path) -> str:
    """An intake error's cause without the file name it starts with."""
    return str(error).removeprefix(f"'{path}': ")


# ---------------------------------------------------------------------------------------------
# Resizing: Pillow's, because the backbone was fitted on what Pillow's resize gives


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB ``uint8`` resized to (H, W) with Pillow's bilinear filter (antialiased when shrinking),
    as the model's input is made."""
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to (H, W) by nearest neighbour."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


# ---------------------------------------------------------------------------------------------
# Inside


def _open(source: str | Path | bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Pillow's image, opened by an accepted decoder only and checked from its header."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise NotAnImageError(f"'{name}': empty file")
        handle: Path | io.BytesIO = io.BytesIO(source)
    else:
        handle = Path(source)
        if not handle.is_file():
            raise BadInputError(f"'{name}': no such file")
        if handle.stat().st_size == 0:
            raise NotAnImageError(f"'{name}': empty file")
    try:
        image = Image.open(handle, formats=list(ACCEPTED_FORMATS))
    except Image.UnidentifiedImageError:
        head = _head(handle)
        accepted = next((kind for signature, kind in _ACCEPTED_SIGNATURES if head.startswith(signature)), None)
        if accepted is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            accepted = "WebP"
        if accepted is not None:  # its decoder refused the header
            raise DamagedImageError(f"'{name}': not a readable image (a damaged {accepted} header)") from None
        raise FormatNotAcceptedError(f"'{name}': not an accepted image format ({_what_it_is(head)}; accepted: {accepted_formats_text()})") from None
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"'{name}': image too large for Pillow's own limit ({_first_line(error)})") from None
    except OSError as error:
        raise DamagedImageError(f"'{name}': not a readable image ({_first_line(error)})") from None
    except Exception as error:  # a plugin's parser may raise anything on a damaged header
        raise DamagedImageError(f"'{name}': not a readable image ({_first_line(error)})") from None
    width, height = image.size
    try:
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"'{name}': image is {width}x{height} px, more than the limit of {max_pixels:,} pixels (--max-image-pixels)")
        if width < MIN_SIDE or height < MIN_SIDE:
            raise BadInputError(f"'{name}': image is {width}x{height} px, too small (at least {MIN_SIDE}x{MIN_SIDE})")
    except BadInputError:
        image.close()
        raise
    return image


def _head(handle: Path | io.BytesIO) -> bytes:
    """A file's first bytes, where its format's signature is."""
    if isinstance(handle, io.BytesIO):
        return handle.getvalue()[:16]
    with open(handle, "rb") as file:
        return file.read(16)


def _what_it_is(head: bytes) -> str:
    """What a refused file seems to be, from its first bytes (no decoder is run)."""
    for signature, kind in _REFUSED_SIGNATURES:
        if head.startswith(signature):
            return kind
    return "not an image"


def _decode(source: Path | bytes, name: str, max_pixels: int | None) -> np.ndarray:
    with _open(source, name, max_pixels) as image:
        try:
            array = _plain_png(image, source)
            if array is None:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no second copy of the pixels
                array = _to_rgb8(image)
        except MemoryError:
            raise
        except Exception as error:  # Pillow raises many types for damaged files; all mean the same here
            raise DamagedImageError(f"'{name}': not a readable image ({_first_line(error)})") from None
    if array.shape[0] < MIN_SIDE or array.shape[1] < MIN_SIDE:  # a header that lied
        raise DamagedImageError(f"'{name}': not a readable image (decoded to {array.shape[1]}x{array.shape[0]} px)")
    return array


def _plain_png(image: Image.Image, source: Path | bytes) -> np.ndarray | None:
    """An 8-bit RGB or grayscale PNG decoded by OpenCV, which reads it faster than Pillow, to the
    very same pixels (PNG is lossless); None for any other image, which Pillow decodes. A PNG's
    EXIF (which may turn the image) can follow its pixels, so one whose decoded size is not its
    header's, or that has EXIF at all, goes to Pillow too."""
    eight_bit = len(image.tile) == 1 and image.tile[0][3] in ("RGB", "L")  # the raw mode: 8 bits a sample
    if image.format != "PNG" or not eight_bit or "transparency" in image.info or "exif" in image.info:
        return None
    data = source if isinstance(source, bytes) else source.read_bytes()
    if b"eXIf" in data:
        return None
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.shape[:2] != (image.height, image.width):
        return None  # damaged: Pillow names the cause
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=decoded)  # in place: no second copy


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """Pillow's decoded image as RGB ``uint8``, with no copy wider than a band of rows."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        image.close()  # Pillow's copy goes: numpy's is enough
        return _gray_to_rgb(_sixteen_bit_to_8(values, mode))
    if mode == "F":
        values = np.asarray(image)
        image.close()
        return _gray_to_rgb(_float_to_8(values))
    if mode == "L":
        gray = np.asarray(image)
        image.close()
        return _gray_to_rgb(gray)
    if mode in ("LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA") if mode != "LA" else image)
        image.close()
        return _on_black(rgba)
    if mode == "RGBA":
        rgba = np.asarray(image)
        image.close()
        return _on_black(rgba)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
    rgb[...] = gray[..., None]
    return rgb


#: 16-bit value -> 8 bits: the full range scaled to 0..255 and rounded (Pillow's convert("L")
#: would clip at 255 instead); the same float64 arithmetic as before, once per value
_SIXTEEN_TO_8 = np.clip(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)


def _sixteen_bit_to_8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grayscale (or 32-bit "I" holding 16-bit values) to 8 bits by :data:`_SIXTEEN_TO_8`;
    an "I" image whose values fit in 8 bits is taken as 8-bit."""
    if mode.startswith("I;16"):
        return _SIXTEEN_TO_8[values]
    gray = np.empty(values.shape, dtype=np.uint8)
    full_range = values.max() > 255
    for rows in _bands(values.shape):
        band = values[rows]
        gray[rows] = _SIXTEEN_TO_8[np.clip(band, 0, 65535)] if full_range else np.clip(band, 0, 255)
    return gray


def _float_to_8(values: np.ndarray) -> np.ndarray:
    """A float image to 8 bits: [0, 1] scaled to [0, 255], otherwise taken as 0..255; clipped, rounded."""
    gray = np.empty(values.shape, dtype=np.uint8)
    unit = values.max() <= 1.0  # float images are usually in [0, 1]
    for rows in _bands(values.shape):
        band = values[rows].astype(np.float64)
        if unit:
            band *= 255.0
        gray[rows] = np.clip(band, 0, 255).round()
    return gray


def _on_black(rgba: np.ndarray) -> np.ndarray:
    """RGBA (or LA) composited on opaque black, to the very integers Pillow's ``alpha_composite``
    gives: c * a * 128 with its rounded division by 255, then the 7 fraction bits dropped."""
    rgb = np.empty((*rgba.shape[:2], 3), dtype=np.uint8)
    for rows in _bands(rgba.shape[:2]):
        band = rgba[rows].astype(np.uint32)
        colour, alpha = band[..., :-1], band[..., -1:]
        blended = colour * alpha * 128 + (128 << 7)  # src * coef1 + rounding, coef1 = a * 128 over black
        blended = ((blended >> 8) + blended) >> 8 >> 7  # Pillow's SHIFTFORDIV255, then the precision bits
        rgb[rows] = blended  # LA: the one gray channel broadcast to three
    return rgb


def _bands(shape: tuple[int, ...]):
    """Row slices of about :data:`_BAND_PIXELS` pixels each."""
    step = max(1, _BAND_PIXELS // max(1, shape[1]))
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__
