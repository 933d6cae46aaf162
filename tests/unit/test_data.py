"""Tests for patchcore.data: decoding every common image kind, finding files, the MVTec layout,
image sizes from headers and the overlapped batch loader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.data import (
    IMAGE_SUFFIXES,
    BadInputError,
    find_images,
    load_batches,
    read_image,
    read_mask,
    training_images,
)
from patchcore.data import LabelledSample as Sample
from patchcore.data import image_size_hw, list_test_samples
from patchcore.layout import IMAGENET_MEAN, IMAGENET_STD, InputLayout

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def exact(message: str) -> str:
    """A pattern that matches exactly ``message`` (pytest.raises uses re.search)."""
    return "^" + re.escape(message) + "$"


def save_gray(path: Path, value: int, size_hw: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size_hw, value, dtype=np.uint8)).save(path)
    return path


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


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
    from patchcore import data

    rng = np.random.default_rng(5)
    for name, pixels in (("rgb.png", rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)), ("gray.png", rng.integers(0, 256, size=(21, 19), dtype=np.uint8))):
        path = tmp_path / name
        Image.fromarray(pixels).save(path)
        with Image.open(path) as image:
            assert data._plain_png(image, path) is not None
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(read_image(path), expected)
        np.testing.assert_array_equal(data.read_image_bytes(path.read_bytes(), name), expected)


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
    message = f"'{path}': not a readable image (not in any image format)"
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


# ---------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------


def test_find_images_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    save_gray(tmp_path / "sub" / "deeper" / "c.jpg", 1)
    save_gray(tmp_path / "sub" / "b.PNG", 1)
    save_gray(tmp_path / "d.JPEG", 1)
    save_gray(tmp_path / "a.png", 1)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    found = find_images(tmp_path)
    assert found == [
        tmp_path / "a.png",
        tmp_path / "d.JPEG",
        tmp_path / "sub" / "b.PNG",
        tmp_path / "sub" / "deeper" / "c.jpg",
    ]


def test_find_images_accepts_a_string(tmp_path: Path) -> None:
    save_gray(tmp_path / "x.bmp", 1)
    assert find_images(str(tmp_path)) == [tmp_path / "x.bmp"]


def test_find_images_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    listed = ", ".join(sorted(IMAGE_SUFFIXES))
    assert listed == ".bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp"
    with pytest.raises(BadInputError, match=exact(f"'{tmp_path}': no images found (looked for {listed})")):
        find_images(tmp_path)


def test_find_images_not_a_folder(tmp_path: Path) -> None:
    file = save_gray(tmp_path / "a.png", 1)
    with pytest.raises(BadInputError, match=exact(f"'{file}': not a folder")):
        find_images(file)
    missing = tmp_path / "missing"
    with pytest.raises(BadInputError, match=exact(f"'{missing}': not a folder")):
        find_images(missing)


def test_training_images_prefers_train_good(tmp_path: Path) -> None:
    good = [save_gray(tmp_path / "train" / "good" / f"{i:03d}.png", 1) for i in range(3)]
    save_gray(tmp_path / "test" / "good" / "900.png", 1)
    save_gray(tmp_path / "test" / "crack" / "901.png", 1)
    save_gray(tmp_path / "ground_truth" / "crack" / "901_mask.png", 255)
    assert training_images(tmp_path) == good


def test_training_images_whole_folder_without_train_good(tmp_path: Path) -> None:
    images = [save_gray(tmp_path / "b.png", 1), save_gray(tmp_path / "train" / "a.png", 1)]
    assert training_images(tmp_path) == [images[0], images[1]]  # sorted: b.png before train/


# ---------------------------------------------------------------------------
# MVTec test layout and masks
# ---------------------------------------------------------------------------


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    """test/good (2), test/scratch (2, one without mask), test/crack (1, wrong-size mask)."""
    root = tmp_path / "bottle"
    for name in ("000.png", "001.png"):
        save_gray(root / "test" / "good" / name, 100, (16, 20))
    save_gray(root / "test" / "scratch" / "000.png", 100, (16, 20))
    save_gray(root / "test" / "scratch" / "001.png", 100, (16, 20))
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[2:5, 3:9] = 255
    mask[10, 10] = 128  # just above the 127 cut
    mask[11, 11] = 127  # just below
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    Image.fromarray(mask).save(root / "ground_truth" / "scratch" / "000_mask.png")
    save_gray(root / "test" / "crack" / "000.png", 100, (16, 20))
    save_gray(root / "ground_truth" / "crack" / "000_mask.png", 255, (10, 12))
    save_gray(root / "train" / "good" / "000.png", 100, (16, 20))
    return root


def test_test_samples_labels_types_and_masks(mvtec: Path) -> None:
    samples = list_test_samples(mvtec)
    assert [(s.path.relative_to(mvtec).as_posix(), s.defect_type, s.label) for s in samples] == [
        ("test/crack/000.png", "crack", 1),
        ("test/good/000.png", "good", 0),
        ("test/good/001.png", "good", 0),
        ("test/scratch/000.png", "scratch", 1),
        ("test/scratch/001.png", "scratch", 1),
    ]
    masks = [s.mask_path for s in samples]
    gt = mvtec / "ground_truth"
    assert masks == [
        gt / "crack" / "000_mask.png",
        None,
        None,
        gt / "scratch" / "000_mask.png",
        gt / "scratch" / "001_mask.png",  # missing, but named where it was expected
    ]
    assert not masks[4].exists()
    assert all(isinstance(s, Sample) for s in samples)


def test_read_mask_thresholds_at_127(mvtec: Path) -> None:
    sample = next(s for s in list_test_samples(mvtec) if s.defect_type == "scratch" and s.path.name == "000.png")
    mask = read_mask(sample.mask_path, sample.path, (16, 20))
    assert mask.dtype == bool
    assert mask.shape == (16, 20)
    assert mask.sum() == 3 * 6 + 1
    assert mask[2:5, 3:9].all()
    assert mask[10, 10]
    assert not mask[11, 11]


def test_read_mask_missing_mask_message(mvtec: Path) -> None:
    sample = next(s for s in list_test_samples(mvtec) if s.defect_type == "scratch" and s.path.name == "001.png")
    message = f"'{sample.path}': defective test image has no mask (expected '{sample.mask_path}')"
    with pytest.raises(BadInputError, match=exact(message)):
        read_mask(sample.mask_path, sample.path, (16, 20))


def test_read_mask_size_mismatch_names_both_sizes(mvtec: Path) -> None:
    sample = next(s for s in list_test_samples(mvtec) if s.defect_type == "crack")
    message = f"'{sample.mask_path}': mask is 12x10 px but its image '000.png' is 20x16 px"
    with pytest.raises(BadInputError, match=exact(message)):
        read_mask(sample.mask_path, sample.path, (16, 20))


def test_read_mask_none_is_all_false(tmp_path: Path) -> None:
    mask = read_mask(None, tmp_path / "good.png", (7, 9))
    assert mask.dtype == bool
    assert mask.shape == (7, 9)
    assert not mask.any()


def test_read_mask_bilevel_mode(tmp_path: Path) -> None:
    bits = np.zeros((8, 10), dtype=bool)
    bits[1, 2] = bits[6, 9] = True
    path = tmp_path / "m.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    mask = read_mask(path, tmp_path / "img.png", (8, 10))
    np.testing.assert_array_equal(mask, bits)


def test_read_mask_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "m_mask.png"
    path.write_text("garbage")
    message = f"'{path}': not a readable mask (cannot identify image file '{path}')"
    with pytest.raises(BadInputError, match=exact(message)):
        read_mask(path, tmp_path / "m.png", (8, 8))


def test_test_samples_mask_without_mask_suffix(tmp_path: Path) -> None:
    save_gray(tmp_path / "test" / "hole" / "005.png", 1)
    plain = save_gray(tmp_path / "ground_truth" / "hole" / "005.png", 255)
    [sample] = list_test_samples(tmp_path)
    assert sample.mask_path == plain
    assert sample.label == 1


def test_test_samples_needs_test_folder(tmp_path: Path) -> None:
    save_gray(tmp_path / "train" / "good" / "000.png", 1)
    message = f"'{tmp_path}': no test/ folder (expected the MVTec AD layout test/<defect type>/*)"
    with pytest.raises(BadInputError, match=exact(message)):
        list_test_samples(tmp_path)


def test_test_samples_empty_test_folder(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    with pytest.raises(BadInputError, match=exact(f"'{tmp_path / 'test'}': no test images")):
        list_test_samples(tmp_path)


# ---------------------------------------------------------------------------
# load_batches
# ---------------------------------------------------------------------------


def test_load_batches_order_errors_and_sizes(tmp_path: Path) -> None:
    paths = [save_gray(tmp_path / f"{i}.png", 20 * i, (10 + i, 12)) for i in range(7)]
    bad = tmp_path / "3.png"
    bad.write_text("broken")  # the fourth file is not an image
    batches = list(load_batches(paths, InputLayout("square", 32), batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    items = [item for batch in batches for item in batch]
    assert [item.path for item in items] == paths
    assert items[3].tensor is None
    assert items[3].error == f"'{bad}': not a readable image (not in any image format)"
    for i, item in enumerate(items):
        if i == 3:
            continue
        assert item.error is None
        assert item.tensor.shape == (3, 32, 32)
        assert item.original_hw == (10 + i, 12)
        assert item.rgb is None
        expected = (20 * i / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
        assert float(item.tensor[0, 5, 5]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("workers", [1, 4])
def test_load_batches_many_paths_each_once(tmp_path: Path, workers: int) -> None:
    base = [save_gray(tmp_path / f"{i:02d}.png", i, (8, 8)) for i in range(5)]
    missing = tmp_path / "missing.png"
    paths = [base[i % 5] for i in range(17)] + [missing]  # duplicates stay separate entries
    batches = list(load_batches(paths, InputLayout("square", 32), batch_size=4, keep_rgb=True, workers=workers))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]
    items = [item for batch in batches for item in batch]
    assert [item.path for item in items] == paths
    assert items[-1].error == f"'{missing}': no such file"
    for i, item in enumerate(items[:-1]):
        assert item.rgb.shape == (8, 8, 3)
        assert int(item.rgb[0, 0, 0]) == i % 5


def test_load_batches_exact_multiple_and_empty(tmp_path: Path) -> None:
    paths = [save_gray(tmp_path / f"{i}.png", 1) for i in range(6)]
    assert [len(b) for b in load_batches(paths, InputLayout("square", 32), batch_size=3)] == [3, 3]
    assert [len(b) for b in load_batches(paths, InputLayout("square", 32), batch_size=10)] == [6]
    assert list(load_batches([], InputLayout("square", 32), batch_size=3)) == []


def test_an_empty_defect_folder_is_skipped_not_fatal(tmp_path: Path) -> None:
    save_gray(tmp_path / "test" / "good" / "000.png", 1)
    (tmp_path / "test" / "crack").mkdir()
    samples = list_test_samples(tmp_path)
    assert [(s.path.name, s.defect_type, s.label) for s in samples] == [("000.png", "good", 0)]


def test_hidden_files_are_not_images(tmp_path: Path) -> None:
    save_gray(tmp_path / "a.png", 1)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert [p.name for p in find_images(tmp_path)] == ["a.png"]


def test_batch_size_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=exact("batch size must be at least 1, got 0")):
        next(load_batches([save_gray(tmp_path / "a.png", 1)], InputLayout("square", 64), batch_size=0))


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
