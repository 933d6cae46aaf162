"""Fuzzing the intake (patchcore.intake) with mutated real images, and a few hand-made hostile files.

Every input, however damaged, must end one of two ways: RGB ``uint8`` (H, W, 3) of at least 8 x 8
and at most ``max_pixels`` pixels, or one of the intake's typed errors (a ``BadInputError``) with
a one-line message naming the file. Anything else (another exception type, a hang past the
deadline) is a bug; a crash kills pytest, which fails too.

The seeds are small crops of the real data sets (bottle, battery_weld, cookies), so that a decode
costs about a millisecond and a few thousand mutations run in seconds. The run is deterministic
(``derandomize=True``, no example database), so CI sees the same inputs every time.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore.errors import BadInputError
from patchcore.intake import DamagedImageError, FormatNotAcceptedError, ImageTooLargeError, NotAnImageError, read_header, read_image_bytes

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py
MAX_PIXELS = 4_000_000
#: the allow-list as the brief states it, written out here so that the test does not take it from
#: the module it checks
ALLOWED = ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM"]
#: the typed errors, exactly: a subclass of these made elsewhere would be a new kind of failure
TYPED_ERRORS = (BadInputError, NotAnImageError, FormatNotAcceptedError, DamagedImageError, ImageTooLargeError)
ACCEPTED_TEXT = "PNG, JPEG, BMP, TIFF, WebP, PNM"
EXAMPLES_PER_FORMAT = 1500
#: a mutated 64-128 px image decodes in about a millisecond; one taking seconds is a bug
DEADLINE_MS = 2000

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_FORMAT,
    deadline=DEADLINE_MS,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------
# Seeds: small crops of real images, saved in memory


def _data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"real test data not found: {path} (set up /work/shared/data)")
    return path


def _first(folder: str, pattern: str) -> Path:
    found = sorted((DATA / folder).glob(pattern))
    if not found:
        pytest.fail(f"real test data not found: {DATA / folder}/{pattern}")
    return found[0]


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def seeds() -> dict[str, list[tuple[str, bytes]]]:
    """Per format, (description, bytes) of a few small real images in the kinds the intake reads."""
    bottle = Image.open(_data_file("mvtec_ad/bottle/test/good/000.png")).convert("RGB").crop((400, 300, 496, 396))  # 96 x 96 RGB
    weld = Image.open(_first("battery_weld/test/good", "*.png")).convert("L").crop((100, 60, 212, 140))  # 112 x 80 gray
    cookie = Image.open(_first("cookies/test/good", "*.jpg")).convert("RGB").crop((200, 250, 328, 346))  # 128 x 96 RGB
    weld16 = Image.fromarray(np.asarray(weld).astype(np.uint16) * 257)  # I;16, the full 16-bit range
    assert weld16.mode.startswith("I;16")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1)))
    bottle_rgba = bottle.copy()
    bottle_rgba.putalpha(alpha)
    turned = Image.Exif()
    turned[0x0112] = 6  # EXIF orientation: turn 90 degrees
    return {
        "PNG": [
            ("png rgb8", _save(bottle, "PNG")),
            ("png gray8", _save(weld, "PNG")),
            ("png gray16", _save(weld16, "PNG")),
            ("png rgba", _save(bottle_rgba, "PNG")),
        ],
        "JPEG": [
            ("jpeg baseline", _save(cookie, "JPEG", quality=90)),
            ("jpeg progressive exif-6", _save(cookie, "JPEG", quality=85, progressive=True, exif=turned.tobytes())),
            ("jpeg gray baseline exif-6", _save(weld, "JPEG", quality=90, exif=turned.tobytes())),
        ],
        "TIFF": [
            ("tiff raw rgb", _save(bottle.resize((64, 64)), "TIFF")),
            ("tiff lzw rgb", _save(cookie, "TIFF", compression="tiff_lzw")),
            ("tiff raw gray16", _save(weld16.crop((0, 0, 72, 64)), "TIFF")),
        ],
    }


# ---------------------------------------------------------------------------------------------
# Where each format keeps its structure: chunks/segments and the image size


def png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk (length, type, data, CRC) after the signature."""
    chunks, at = [], 8
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        end = at + 12 + length
        if end > len(data):
            break
        chunks.append((at, end))
        at = end
    return chunks


def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment; a scan (SOS) runs to the next marker that is not a
    stuffed 0xFF00 or a restart marker."""
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xD9:  # EOI
            segments.append((at, at + 2))
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            segments.append((at, at + 2))
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        end = at + 2 + length
        if marker == 0xDA:  # the entropy-coded data follows
            while end + 1 < len(data) and not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        end = min(end, len(data))
        segments.append((at, end))
        at = end
    return segments


def tiff_entries(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    """The byte order and (start, end) of each entry of the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    return order, [(ifd + 2 + 12 * i, ifd + 14 + 12 * i) for i in range(count)]


def structure(data: bytes, fmt: str) -> list[tuple[int, int]]:
    """The format's units (chunks, segments, IFD entries) in a file, as far as it still parses."""
    try:
        if fmt == "PNG":
            return png_chunks(data)
        if fmt == "JPEG":
            return jpeg_segments(data)
        return tiff_entries(data)[1]
    except (struct.error, IndexError):
        return []


def size_fields(data: bytes, fmt: str) -> list[tuple[int, int, str]]:
    """(offset, width in bytes, byte order) of each field holding the image's width or height."""
    try:
        if fmt == "PNG":
            return [(16, 4, ">"), (20, 4, ">")] if data[12:16] == b"IHDR" else []
        if fmt == "JPEG":
            sof = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
            return [f for start, _ in jpeg_segments(data) if data[start + 1] in sof for f in ((start + 5, 2, ">"), (start + 7, 2, ">"))]
        order, entries = tiff_entries(data)
        fields = []
        for start, _ in entries:
            tag, kind = struct.unpack(order + "HH", data[start : start + 4])
            if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength as SHORT or LONG
                fields.append((start + 8, 2 if kind == 3 else 4, order))
        return fields
    except (struct.error, IndexError):
        return []


def fix_png_crcs(data: bytearray) -> None:
    """Every chunk's CRC made right again, as far as the chunks still parse."""
    for start, end in png_chunks(bytes(data)):
        data[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(data[start + 4 : end - 4])))


def fix_png_ihdr_crc(data: bytearray) -> None:
    if len(data) >= 33 and data[12:16] == b"IHDR":
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


# ---------------------------------------------------------------------------------------------
# Mutations

#: bytes of each format's signature (PNG's 8; JPEG's SOI and the next marker's 0xFF; TIFF's byte order and 42)
SIGNATURE_BYTES = {"PNG": 8, "JPEG": 3, "TIFF": 4}
MUTATIONS = ("bit_flip", "overwrite", "truncate", "insert", "delete", "duplicate_unit", "swap", "size_field", "unit_length")


@st.composite
def mutated(draw, fmt: str) -> tuple[str, bytes, list[str]]:
    """A seed of ``fmt`` with one to four mutations; returns its name, the bytes and what was done."""
    description, seed = draw(st.sampled_from(seeds()[fmt]))
    data = bytearray(seed)
    done = []

    def position(length: int, header_bias: bool = True) -> int:
        if length <= 1:
            return 0
        if header_bias:  # half the time in the first 64 bytes: the signature and the header
            return draw(st.one_of(st.integers(0, min(length - 1, 63)), st.integers(0, length - 1)))
        return draw(st.integers(0, length - 1))

    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(MUTATIONS))
        if kind == "bit_flip" and data:
            at, bit = position(len(data)), draw(st.integers(0, 7))
            data[at] ^= 1 << bit
            done.append(f"flip bit {bit} at {at}")
        elif kind == "overwrite" and data:
            at = position(len(data))
            run = draw(st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from([b"\x00" * 4, b"\xff" * 4, b"\x7f\xff\xff\xff", b"\x80\x00"])))
            data[at : at + len(run)] = run[: max(0, len(data) - at)]
            done.append(f"overwrite {run.hex()} at {at}")
        elif kind == "truncate" and data:
            keep = position(len(data), header_bias=draw(st.booleans()))
            del data[keep:]
            done.append(f"truncate to {keep}")
        elif kind == "insert":
            at = position(len(data) + 1)
            run = draw(st.one_of(st.binary(min_size=1, max_size=64), st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(1, 512))))
            data[at:at] = run
            done.append(f"insert {len(run)} bytes at {at}")
        elif kind == "delete" and data:
            at, count = position(len(data)), draw(st.integers(1, 256))
            del data[at : at + count]
            done.append(f"delete {count} bytes at {at}")
        elif kind == "duplicate_unit":
            units = structure(bytes(data), fmt)
            if units:
                start, end = draw(st.sampled_from(units))
                where = draw(st.sampled_from(["after", "before", "anywhere"]))
                at = end if where == "after" else start if where == "before" else position(len(data) + 1)
                data[at:at] = data[start:end]
                done.append(f"duplicate unit {start}:{end} {where} ({at})")
            elif data:  # no structure left: duplicate a run
                start = position(len(data))
                end = min(len(data), start + draw(st.integers(1, 512)))
                data[end:end] = data[start:end]
                done.append(f"duplicate bytes {start}:{end}")
        elif kind == "swap" and len(data) >= 4:
            first = position(len(data) - 1)
            second = draw(st.integers(first + 1, len(data) - 1))
            length = draw(st.integers(1, max(1, min(256, second - first, len(data) - second))))
            a, b = bytes(data[first : first + length]), bytes(data[second : second + length])
            data[second : second + length] = a
            data[first : first + length] = b
            done.append(f"swap {first}+{length} with {second}+{length}")
        elif kind == "size_field":
            fields = size_fields(bytes(data), fmt)
            if fields:
                at, width, order = draw(st.sampled_from(fields))
                top = 2 ** (8 * width) - 1
                value = draw(st.one_of(st.integers(2001, top), st.sampled_from([top, 2**15, 2**31 - 1, 100_000, 65_500]), st.integers(0, 3000)))
                value = min(value, top)
                data[at : at + width] = value.to_bytes(width, "big" if order == ">" else "little")
                fixed = fmt == "PNG" and draw(st.booleans())
                if fixed:  # the header is then valid, and only the size is hostile
                    fix_png_ihdr_crc(data)
                done.append(f"size field at {at} = {value}" + (" (CRC fixed)" if fixed else ""))
        elif kind == "unit_length":  # a chunk's or segment's length field made huge or zero
            units = structure(bytes(data), fmt)
            if units and fmt in ("PNG", "JPEG"):
                start, _ = draw(st.sampled_from(units))
                if fmt == "PNG":
                    value = draw(st.sampled_from([0, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 24]))
                    data[start : start + 4] = value.to_bytes(4, "big")
                elif start + 4 <= len(data) and data[start + 1] not in (0xD8, 0xD9, *range(0xD0, 0xD8)):
                    value = draw(st.sampled_from([0, 1, 2, 0xFFFF]))
                    data[start + 2 : start + 4] = value.to_bytes(2, "big")
                else:
                    continue
                done.append(f"unit length at {start} = {value}")
    # Mostly keep the signature, and for PNG often fix the chunks' CRCs, so that the damage gets
    # past the first checks into the decoders; the rest of the time the file is taken as it is.
    signature = SIGNATURE_BYTES[fmt]
    if len(data) >= signature and data[:signature] != seed[:signature] and draw(st.integers(0, 9)) > 0:
        data[:signature] = seed[:signature]
        done.append("signature restored")
    if fmt == "PNG" and draw(st.integers(0, 3)) > 0:
        fix_png_crcs(data)
        done.append("CRCs fixed")
    return description, bytes(data), done


# ---------------------------------------------------------------------------------------------
# The property


@contextlib.contextmanager
def pixel_limit_owned() -> Iterator[None]:
    """As every face runs (``own_the_pixel_limit``): the intake's ``max_pixels`` is the only limit."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def looks_accepted(data: bytes) -> bool:
    """Whether the bytes start with the signature of an accepted format (PNG, JPEG, BMP, TIFF, WebP, PNM)."""
    signatures = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    return data.startswith(signatures) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or (data[:1] == b"P" and data[1:2] in b"1234567fF" and len(data) > 1)


def claimed_size(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """What plain Pillow, with the allow-list, says of the bytes: (format, size); (None, None)
    where no accepted decoder recognises them; ("?", None) where a decoder's header parser failed."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED) as image:
            return image.format, image.size
    except Image.UnidentifiedImageError:
        return None, None
    except Exception:  # a damaged header: no claim
        return "?", None


def check_one(name: str, data: bytes) -> None:
    started = time.perf_counter()
    with pixel_limit_owned():
        fmt, size = claimed_size(data)
        try:
            rgb = read_image_bytes(data, name, MAX_PIXELS)
        except TYPED_ERRORS as error:
            assert type(error) in TYPED_ERRORS, f"{type(error).__name__} is no typed intake error"
            message = str(error)
            assert message.startswith(f"'{name}': "), message
            assert "\n" not in message and "\r" not in message, message
            if not data:
                assert type(error) is NotAnImageError and message == f"'{name}': empty file"
            elif fmt is None and looks_accepted(data):  # an accepted format's signature, its decoder refused the rest
                assert type(error) is DamagedImageError and " header)" in message, message
            elif fmt is None:  # no accepted decoder knows the bytes: refused as a format, never "damaged"
                assert type(error) is FormatNotAcceptedError, message
                assert message.endswith(f"; accepted: {ACCEPTED_TEXT})"), message
            elif fmt == "?":  # an accepted decoder's parser failed on the header: damaged
                assert type(error) is DamagedImageError, message
            elif size is not None and size[0] * size[1] > MAX_PIXELS:
                # The header claims too many pixels: refused from the header, whatever the data.
                assert type(error) is ImageTooLargeError, message
                assert message == f"'{name}': image is {size[0]}x{size[1]} px, more than the limit of {MAX_PIXELS:,} pixels (--max-image-pixels)"
            if type(error) is ImageTooLargeError:
                assert size is not None and size[0] * size[1] > MAX_PIXELS, message
        else:
            assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8, (type(rgb), getattr(rgb, "dtype", None))
            assert rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
            height, width = rgb.shape[:2]
            assert height >= 8 and width >= 8, rgb.shape
            assert height * width <= MAX_PIXELS, rgb.shape
            assert size is not None and height * width == size[0] * size[1], (rgb.shape, size)  # the header did not lie
    assert time.perf_counter() - started < DEADLINE_MS / 1000


@pytest.mark.filterwarnings("ignore")  # Pillow warns of corrupt EXIF and the like: not failures
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_mutated_real_images_decode_or_raise_a_typed_error(fmt: str, data_root) -> None:
    @FUZZ_SETTINGS
    @given(case=mutated(fmt))
    def run(case: tuple[str, bytes, list[str]]) -> None:
        description, data, _done = case
        check_one(f"fuzz-{fmt.lower()}", data)

    for description, seed in seeds()[fmt]:  # every seed itself decodes
        check_one(description, seed)
        with Image.open(io.BytesIO(seed)) as image:
            width, height = image.size
        turned = "exif-6" in description
        assert read_image_bytes(seed, description, MAX_PIXELS).shape == ((width, height) if turned else (height, width)) + (3,)
    run()


def test_seeds_are_what_they_claim() -> None:
    kinds = {}
    for fmt, cases in seeds().items():
        for description, data in cases:
            with Image.open(io.BytesIO(data)) as image:
                kinds[description] = (image.format, image.mode, image.info.get("progressive", 0), image.getexif().get(0x0112))
                assert image.format == fmt and 64 <= max(image.size) <= 128
            assert structure(data, fmt), description
            assert size_fields(data, fmt), description
    assert kinds["png gray16"][1].startswith("I;16") and kinds["png rgba"][1] == "RGBA" and kinds["png gray8"][1] == "L"
    assert kinds["jpeg progressive exif-6"][2] and kinds["jpeg progressive exif-6"][3] == 6
    assert kinds["tiff raw gray16"][1].startswith("I;16")
    lzw = Image.open(io.BytesIO(seeds()["TIFF"][1][1]))
    assert lzw.info["compression"] == "tiff_lzw"


# ---------------------------------------------------------------------------------------------
# Hand-made hostile files


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR says ``width`` x ``height``, its CRC fixed: only the size is hostile."""
    data = bytearray(seeds()["PNG"][0][1])
    data[16:24] = struct.pack(">II", width, height)
    fix_png_ihdr_crc(data)
    return bytes(data)


def test_hostile_files_get_the_expected_typed_error() -> None:
    square = Image.new("RGB", (16, 16), (200, 40, 40))
    refused = {
        "part.eps": (_save(square, "EPS"), "PostScript/EPS"),
        "part.pdf": (_save(square, "PDF"), "PDF"),
        "part.gif": (_save(square, "GIF"), "GIF"),
        "notes.png": (b"serial 1234, line 7\nthis is not an image\n", "not an image"),
    }
    for name, (data, kind) in refused.items():
        with pytest.raises(FormatNotAcceptedError) as caught:
            read_image_bytes(data, name, MAX_PIXELS)
        assert str(caught.value) == f"'{name}': not an accepted image format ({kind}; accepted: {ACCEPTED_TEXT})"
        with pytest.raises(FormatNotAcceptedError):
            read_header(data, name, MAX_PIXELS)

    with pytest.raises(NotAnImageError) as caught:
        read_image_bytes(b"", "empty.png", MAX_PIXELS)
    assert type(caught.value) is NotAnImageError and str(caught.value) == "'empty.png': empty file"

    good = seeds()["PNG"][0][1]
    with pytest.raises(DamagedImageError) as caught:
        read_image_bytes(good[: len(good) // 2], "cut.png", MAX_PIXELS)
    assert str(caught.value).startswith("'cut.png': not a readable image (")

    with pytest.raises(BadInputError) as caught:
        read_image_bytes(_save(Image.new("RGB", (4, 4)), "PNG"), "tiny.png", MAX_PIXELS)
    assert type(caught.value) is BadInputError and str(caught.value) == "'tiny.png': image is 4x4 px, too small (at least 8x8)"


@pytest.mark.parametrize("owned", [True, False], ids=["pixel-limit-owned", "pillow-limit-on"])
def test_a_png_claiming_100000_by_100000_is_refused_from_its_header(owned: bool) -> None:
    """A 10-gigapixel claim in a 25 kB file: refused before decoding, in milliseconds, without
    the memory it claims (30 GB as RGB)."""
    bomb = png_claiming(100_000, 100_000)
    with pixel_limit_owned(), Image.open(io.BytesIO(bomb)) as image:
        assert image.size == (100_000, 100_000) and image.format == "PNG"
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    with pixel_limit_owned() if owned else contextlib.nullcontext():
        for max_pixels in (MAX_PIXELS, 100_000_000):
            with pytest.raises(ImageTooLargeError) as caught:
                read_image_bytes(bomb, "bomb.png", max_pixels)
            if owned:  # the intake's own limit, from the header (with Pillow's on, Pillow's may speak first)
                assert str(caught.value) == f"'bomb.png': image is 100000x100000 px, more than the limit of {max_pixels:,} pixels (--max-image-pixels)"
            with pytest.raises(ImageTooLargeError):
                read_header(bomb, "bomb.png", max_pixels)
    elapsed = time.perf_counter() - started
    grown = process.memory_info().rss - rss_before
    assert elapsed < 0.5, f"refusing took {elapsed:.2f} s: was it decoded?"
    assert grown < 100 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB: was it decoded?"
