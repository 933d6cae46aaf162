"""Tests for patchcore.data: finding files, the MVTec layout and the overlapped batch loader
(decoding is the intake's: test_intake.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.data import BadInputError, find_images, list_test_samples, load_batches, training_images
from patchcore.data import LabelledSample as Sample
from patchcore.intake import IMAGE_SUFFIXES, read_mask
from patchcore.layout import IMAGENET_MEAN, IMAGENET_STD, InputLayout

from imagefiles import exact, save_gray

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


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
    assert listed == ".bmp, .jpeg, .jpg, .pbm, .pgm, .png, .pnm, .ppm, .tif, .tiff, .webp"
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
    message = f"'{path}': not a readable mask: not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)"
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
    assert items[3].array is None
    assert items[3].error == f"'{bad}': not an accepted image format (not an image; accepted: PNG, JPEG, BMP, TIFF, WebP, PNM)"
    for i, item in enumerate(items):
        if i == 3:
            continue
        assert item.error is None
        assert item.array.shape == (3, 32, 32)
        assert item.original_hw == (10 + i, 12)
        assert item.rgb is None
        expected = (20 * i / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
        assert float(item.array[0, 5, 5]) == pytest.approx(expected, abs=1e-5)


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
