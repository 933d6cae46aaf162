"""Tests for patchcore.intake, the one place bytes become pixels: every common image kind to RGB
uint8 with the pixels it always had, the format allow-list, the pixel limit from the header, and
the typed one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore import intake
from patchcore.errors import BadInputError
from patchcore.intake import DamagedImageError, FormatNotAcceptedError, ImageTooLargeError, image_size_hw, read_image

from imagefiles import exact, save_gray, save_rgb


# ---------------------------------------------------------------------------
# read_image: every mode to RGB uint8
# ---------------------------------------------------------------------------


def test_read_rgb_png_unchanged(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    array = read_image(save_rgb(tmp_path / "rgb.png", rgb))
    assert array.dtype == np.uint8
    assert array.shape == (12, 20, 3)
    np.testing.assert_array_equal(array, rgb)


def test_read_grayscale_l_repeats_to_three_channels(tmp_path: Path) -> None:
    gray = np.arange(10 * 14, dtype=np.uint8).reshape(10, 14)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode == "L"
    array = read_image(path)
    assert array.shape == (10, 14, 3)
    assert array.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gray)


def test_read_palette_image_uses_palette_colours(tmp_path: Path) -> None:
    image = Image.new("P", (16, 10), 0)
    image.putpalette([0, 0, 0, 10, 20, 30, 250, 240, 230] + [0] * (256 * 3 - 9))
    image.paste(1, (0, 0, 8, 10))  # left half palette entry 1
    image.paste(2, (8, 0, 16, 10))  # right half palette entry 2
    path = tmp_path / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    array = read_image(path)
    assert array.shape == (10, 16, 3)
    assert array[5, 2].tolist() == [10, 20, 30]
    assert array[5, 12].tolist() == [250, 240, 230]


def test_read_palette_with_transparency_composites_on_black(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 100, 50, 90, 80, 70] + [0] * (256 * 3 - 9))
    image.paste(2, (0, 0, 4, 8))
    path = tmp_path / "palette_transparent.png"
    image.save(path, transparency=1)  # palette entry 1 fully transparent
    array = read_image(path)
    assert array[0, 6].tolist() == [0, 0, 0]  # transparent entry -> black, not (200, 100, 50)
    assert array[0, 1].tolist() == [90, 80, 70]  # opaque entry unchanged


def test_read_rgba_composites_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 100, 50, 255)  # opaque
    rgba[:, 4:8] = (200, 100, 50, 0)  # fully transparent
    rgba[:, 8:] = (200, 100, 50, 128)  # half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    array = read_image(path)
    assert array.shape == (8, 12, 3)
    assert array[3, 1].tolist() == [200, 100, 50]
    assert array[3, 5].tolist() == [0, 0, 0]
    expected = np.array([200, 100, 50]) * 128 / 255  # over black: colour * alpha
    assert np.abs(array[3, 10].astype(float) - expected).max() <= 1.0
    assert array[3, 10].tolist() != [200, 100, 50]  # not just alpha dropped


def test_read_la_composites_on_black(tmp_path: Path) -> None:
    la = np.zeros((8, 10, 2), dtype=np.uint8)
    la[:, :5] = (200, 255)
    la[:, 5:] = (200, 0)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    assert Image.open(path).mode == "LA"
    array = read_image(path)
    assert array.shape == (8, 10, 3)
    assert array[4, 0].tolist() == [200, 200, 200]
    assert array[4, 9].tolist() == [0, 0, 0]


def test_read_cmyk_tiff(tmp_path: Path) -> None:
    image = Image.new("CMYK", (10, 8), (0, 0, 0, 0))  # white
    image.paste((0, 255, 255, 0), (0, 0, 5, 8))  # no cyan, full magenta+yellow: red
    path = tmp_path / "cmyk.tif"
    image.save(path)
    assert Image.open(path).mode == "CMYK"
    array = read_image(path)
    assert array.shape == (8, 10, 3)
    assert array[2, 1].tolist() == [255, 0, 0]
    assert array[2, 8].tolist() == [255, 255, 255]


def test_read_16_bit_grayscale_png_scales_full_range(tmp_path: Path) -> None:
    values = np.zeros((9, 11), dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 32896
    values[0, 2] = 257
    values[0, 3] = 200  # a dark 16-bit value must stay dark, not be read as 8-bit 200
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    array = read_image(path)
    assert array.dtype == np.uint8
    assert array.shape == (9, 11, 3)
    assert array[0, 0].tolist() == [255, 255, 255]
    assert array[0, 1].tolist() == [128, 128, 128]
    assert array[0, 2].tolist() == [1, 1, 1]
    assert array[0, 3].tolist() == [1, 1, 1]  # 200 * 255 / 65535 = 0.78 -> 1
    assert array[5, 5].tolist() == [0, 0, 0]


def test_read_float_tiff_in_unit_range(tmp_path: Path) -> None:
    values = np.zeros((8, 9), dtype=np.float32)
    values[0, 0] = 1.0
    values[0, 1] = 0.5
    values[0, 2] = 0.25
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    array = read_image(path)
    assert array.dtype == np.uint8
    assert array[0, 0].tolist() == [255, 255, 255]
    assert array[0, 1].tolist() == [128, 128, 128]  # 127.5 rounds to even 128
    assert array[0, 2].tolist() == [64, 64, 64]  # 63.75
    assert array[4, 4].tolist() == [0, 0, 0]


def test_read_float_tiff_above_one_is_not_rescaled(tmp_path: Path) -> None:
    values = np.full((8, 8), 100.0, dtype=np.float32)
    values[0, 0] = 300.0  # clipped
    path = tmp_path / "float255.tif"
    Image.fromarray(values).save(path)
    array = read_image(path)
    assert array[4, 4].tolist() == [100, 100, 100]
    assert array[0, 0].tolist() == [255, 255, 255]


def test_read_jpeg_applies_exif_orientation(tmp_path: Path) -> None:
    stored = np.zeros((64, 40, 3), dtype=np.uint8)  # 40 wide, 64 high as stored
    stored[:20, :20] = (255, 255, 255)  # a white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    array = read_image(path)
    assert array.shape == (40, 64, 3)  # width and height swapped
    # Turning 90 degrees clockwise takes the top-left corner to the top-right.
    assert array[:20, -20:].mean() > 200
    assert array[:20, :20].mean() < 50
    assert array[-20:, -20:].mean() < 50


def test_plain_pngs_are_decoded_by_opencv_to_pillows_pixels(tmp_path: Path) -> None:
    # 8-bit RGB and gray PNGs take the faster OpenCV path: Pillow's very pixels, in RGB order,
    # from a file or from bytes (an upload).
    rng = np.random.default_rng(5)
    for name, pixels in (("rgb.png", rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)), ("gray.png", rng.integers(0, 256, size=(21, 19), dtype=np.uint8))):
        path = tmp_path / name
        Image.fromarray(pixels).save(path)
        with Image.open(path) as image:
            assert intake._plain_png(image, path) is not None
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(read_image(path), expected)
        np.testing.assert_array_equal(intake.read_image_bytes(path.read_bytes(), name), expected)


def test_read_png_applies_exif_orientation(tmp_path: Path) -> None:
    # A PNG that carries EXIF goes to Pillow, which turns it as a JPEG is turned.
    stored = np.zeros((64, 40, 3), dtype=np.uint8)
    stored[:20, :20] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    array = read_image(path)
    assert array.shape == (40, 64, 3)
    assert array[:20, -20:].mean() > 200 and array[:20, :20].mean() < 50


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(BadInputError, match=exact(f"'{path}': no such file")):
        read_image(path)


def test_read_folder_is_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=exact(f"'{tmp_path}': no such file")):
        read_image(tmp_path)


def test_read_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    message = f"'{path}': not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)"
    with pytest.raises(BadInputError, match=exact(message)):
        read_image(path)


def test_read_truncated_png(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = save_rgb(tmp_path / "cut.png", rgb)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match=exact(f"'{path}': not a readable image (image file is truncated)")):
        read_image(path)


@pytest.mark.parametrize(("width", "height"), [(7, 8), (8, 7), (3, 3)])
def test_read_too_small_image(tmp_path: Path, width: int, height: int) -> None:
    path = save_gray(tmp_path / "tiny.png", 50, (height, width))
    message = f"'{path}': image is {width}x{height} px, too small (at least 8x8)"
    with pytest.raises(BadInputError, match=exact(message)):
        read_image(path)


def test_read_eight_by_eight_is_accepted(tmp_path: Path) -> None:
    assert read_image(save_gray(tmp_path / "ok.png", 50, (8, 8))).shape == (8, 8, 3)


def test_bad_input_error_is_value_error() -> None:
    assert issubclass(BadInputError, ValueError)


def test_image_size_from_the_header_follows_exif_rotation(tmp_path: Path) -> None:
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    plain, turned = tmp_path / "plain.jpg", tmp_path / "turned.jpg"
    Image.fromarray(rgb).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(turned, exif=exif)
    assert image_size_hw(plain) == (30, 50)
    assert image_size_hw(turned) == (50, 30) == read_image(turned).shape[:2]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert image_size_hw(tmp_path / "a.png") == (30, 50)
    (tmp_path / "bad.png").write_text("not an image")
    assert image_size_hw(tmp_path / "bad.png") is None and image_size_hw(tmp_path / "missing.png") is None


def test_a_damaged_header_of_an_accepted_format_is_damaged_not_refused(data_root):
    # One bit of the PNG's header checksum flipped: Pillow's PNG decoder refuses it, but the file
    # is a PNG, so the error says it is damaged (422 in the server), not of another format (415).
    data = bytearray((data_root / "mvtec_ad" / "bottle" / "test" / "good" / "000.png").read_bytes())
    data[29] ^= 1
    with pytest.raises(DamagedImageError, match=exact("'part.png': not a readable image (a damaged PNG header)")):
        intake.read_image_bytes(bytes(data), "part.png")


@pytest.mark.parametrize(
    ("head", "kind"), [(b"%PDF-1.7\n", "PDF"), (b"%!PS-Adobe-3.0 EPSF-3.0\n", "PostScript/EPS"), (b"GIF89a\x10\x00", "GIF"), (b"8BPS\x00\x01", "Photoshop")]
)
def test_a_refused_format_is_named_and_never_decoded(head, kind):
    with pytest.raises(FormatNotAcceptedError, match=exact(f"'x': not an accepted image format ({kind}; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)")):
        intake.read_header(head + b"\0" * 64, "x")


def test_the_pixel_limit_is_read_from_the_header(tmp_path):
    path = save_gray(tmp_path / "big.png", 7, (300, 400))
    assert intake.read_header(path, max_pixels=120_000).pixels == 120_000
    with pytest.raises(ImageTooLargeError, match=exact(f"'{path}': image is 400x300 px, more than the limit of 119,999 pixels (--max-image-pixels)")):
        read_image(path, max_pixels=119_999)
