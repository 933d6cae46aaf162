"""Tests for patchcore.layout: the input modes (square, aspect, tile), tile planning, stitching
features from tiles, and maps back at each image's own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore.features import PatchFeatures
from patchcore.layout import AUTO_ELONGATION, IMAGENET_MEAN, IMAGENET_STD, InputLayout, Tile, _axis_tiles, choose_input_mode

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------
# The square mode (the seed's)
# ---------------------------------------------------------------------------


def test_input_size_with_and_without_crop() -> None:
    assert InputLayout().input_hw((900, 500)) == (256, 256)
    assert InputLayout("square", 256, 224).input_hw((10, 700)) == (224, 224)
    assert InputLayout("square", 64).input_hw((64, 64)) == (64, 64)


def test_image_to_tensor_shape_without_crop() -> None:
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    tensor = torch.from_numpy(InputLayout("square", 64).image_to_array(rgb))
    assert tensor.shape == (3, 64, 64)
    assert tensor.dtype == torch.float32


def test_image_to_tensor_shape_with_crop() -> None:
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    assert torch.from_numpy(InputLayout("square", 256, 224).image_to_array(rgb)).shape == (3, 224, 224)
    assert torch.from_numpy(InputLayout("square", 64, 48).image_to_array(rgb)).shape == (3, 48, 48)


def test_image_to_tensor_normalises_mid_gray() -> None:
    rgb = np.full((40, 40, 3), 128, dtype=np.uint8)
    tensor = torch.from_numpy(InputLayout("square", 32).image_to_array(rgb))
    expected = (0.5 - MEAN) / STD
    assert torch.allclose(tensor, expected.expand(3, 32, 32), atol=1e-2)
    exact_value = (128 / 255 - MEAN) / STD
    assert torch.allclose(tensor, exact_value.expand(3, 32, 32), atol=1e-5)
    # Channels differ (the means and stds do): a wrong broadcast would show.
    assert tensor[0, 0, 0] != pytest.approx(float(tensor[2, 0, 0]), abs=1e-3)


def test_image_to_tensor_channel_order_and_orientation() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, :16, 0] = 255  # left half red
    rgb[:16, :, 2] = 255  # top half blue
    tensor = torch.from_numpy(InputLayout("square", 32).image_to_array(rgb))
    red_hi = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    red_lo = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    blue_hi = (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    blue_lo = (0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    assert float(tensor[0, 20, 2]) == pytest.approx(red_hi, abs=1e-5)
    assert float(tensor[0, 20, 29]) == pytest.approx(red_lo, abs=1e-5)
    assert float(tensor[2, 2, 20]) == pytest.approx(blue_hi, abs=1e-5)
    assert float(tensor[2, 29, 20]) == pytest.approx(blue_lo, abs=1e-5)
    assert float(tensor[1].max()) == pytest.approx(-IMAGENET_MEAN[1] / IMAGENET_STD[1], abs=1e-5)


def test_image_to_tensor_crop_is_centered() -> None:
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[8:56, 8:56] = 255  # white exactly where a 64 -> crop 48 keeps
    tensor = torch.from_numpy(InputLayout("square", 64, 48).image_to_array(rgb))
    white = (1 - MEAN) / STD
    assert torch.allclose(tensor, white.expand(3, 48, 48), atol=1e-5)





def test_mask_to_input_no_crop_nearest() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :32] = True
    out = InputLayout("square", 32).mask_to_input(mask)
    assert out.dtype == bool
    assert out.shape == (32, 32)
    assert out.sum() == 16 * 16
    assert out[:16, :16].all()


def test_mask_to_input_with_crop() -> None:
    mask = np.zeros((128, 128), dtype=bool)
    mask[:64, :64] = True
    out = InputLayout("square", 64, 32).mask_to_input(mask)  # resized mask's [16:48, 16:48]
    assert out.shape == (32, 32)
    assert out.sum() == 16 * 16
    assert out[:16, :16].all()


def test_mask_to_input_nearest_keeps_single_pixels_binary() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[3, 7] = True
    out = InputLayout("square", 40).mask_to_input(mask)  # upsampling x4 by nearest: a 4x4 block
    assert out.shape == (40, 40)
    assert out.sum() == 16
    assert out[12:16, 28:32].all()


def test_mask_to_input_in_the_aspect_mode_keeps_the_shape() -> None:
    mask = np.zeros((100, 400), dtype=bool)
    mask[50:, 200:] = True
    out = InputLayout("aspect", scale=0.5).fitted(16, []).mask_to_input(mask)
    assert out.shape == (48, 208)  # 50 -> 48, 200 -> 208: the input's own grid
    assert out[30:, 110:].all() and not out[:20].any() and not out[:, :100].any()


def test_map_to_image_returns_image_size() -> None:
    input_map = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    out = InputLayout("square", 32).map_to_image(input_map, (50, 70))
    assert out.shape == (50, 70) and out.dtype == np.float32
    assert float(out.min()) >= float(input_map.min()) - 1e-6
    assert float(out.max()) <= float(input_map.max()) + 1e-6


@pytest.mark.parametrize("size_hw", [(50, 70), (64, 64), (16, 16), (21, 90), (900, 900)])
def test_map_to_image_is_torchs_bilinear_with_half_pixel_centres(size_hw) -> None:
    """The one numpy path (OpenCV) gives PyTorch's bilinear interpolation (align_corners False)
    up and down, exact halvings included, to float32 rounding."""
    import torch.nn.functional as F

    input_map = np.random.default_rng(1).random((32, 32), dtype=np.float32) * 5
    out = InputLayout("square", 32).map_to_image(input_map, size_hw)
    expected = F.interpolate(torch.from_numpy(input_map)[None, None], size=size_hw, mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(out - expected).max() <= 4e-6 * input_map.max()  # float32 rounding of the weights


def test_map_to_image_same_size_is_identity() -> None:
    input_map = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    out = InputLayout("square", 32).map_to_image(input_map, (32, 32))
    assert np.array_equal(out, input_map)


def test_map_to_image_crop_border_is_map_minimum() -> None:
    input_map = (1.0 + np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).astype(np.float32)  # min 1.0, max 2.0
    out = InputLayout("square", 64, 32).map_to_image(input_map, (128, 128))
    assert out.shape == (128, 128)
    # The crop covers [16, 48) of the 64 grid, i.e. [32, 96) of the 128 output; away from its
    # edge (bilinear blends one pixel in) the outside is exactly the minimum.
    assert (out[:30] == 1.0).all() and (out[-30:] == 1.0).all()
    assert (out[:, :30] == 1.0).all() and (out[:, -30:] == 1.0).all()
    assert out[40:90, 40:90].min() > 1.0


def test_aspect_scale_comes_from_the_median_shorter_side():
    sizes = [(256, 400), (300, 400), (100, 400), (256, 400), (600, 800)]  # shorter sides 256 300 100 256 600: median 256
    layout = InputLayout("aspect", image_size=256).fitted(16, sizes)
    assert layout.scale == 1.0 and layout.stride == 16
    assert layout.input_hw((256, 400)) == (256, 400)
    assert layout.input_hw((89, 400)) == (96, 400)  # each side rounded to the stride
    assert layout.input_hw((10, 400)) == (32, 400)  # at least 32 px, what the map's blur needs
    half = InputLayout("aspect", image_size=128).fitted(16, sizes)
    assert half.scale == 0.5 and half.input_hw((500, 1260)) == (256, 624)  # 250 -> 256, 630 -> 624


def test_an_explicit_scale_is_kept_and_the_tile_mode_defaults_to_native():
    assert InputLayout("aspect", scale=0.25).fitted(16, [(1000, 1000)]).scale == 0.25
    tile = InputLayout("tile").fitted(16, [(1000, 3000)])
    assert tile.scale == 1.0 and tile.input_hw((900, 900)) == (896, 896)


def test_aspect_image_to_tensor_keeps_the_shape():
    layout = InputLayout("aspect", scale=0.5).fitted(16, [])
    rgb = np.zeros((200, 640, 3), dtype=np.uint8)
    rgb[:, 320:] = 255  # right half white
    tensor = torch.from_numpy(layout.image_to_array(rgb))
    assert tensor.shape == (3, 96, 320)  # 100 -> 96, 320 -> 320
    white, black = (1 - MEAN[0, 0, 0]) / STD[0, 0, 0], (0 - MEAN[0, 0, 0]) / STD[0, 0, 0]
    assert float(tensor[0, 50, 300]) == pytest.approx(float(white), abs=1e-5)
    assert float(tensor[0, 50, 10]) == pytest.approx(float(black), abs=1e-5)


def test_a_huge_whole_image_is_refused_in_the_aspect_mode_with_advice():
    layout = InputLayout("aspect", scale=1.0).fitted(16, [])
    assert layout.check_size((4000, 4000)) is None
    assert layout.check_size((5000, 4000)) == (
        "image is 4000x5000 px, 4000x5008 at scale 1: larger than the aspect mode sends through the backbone at once (16 MP); "
        "use the tile input mode or a smaller scale"
    )
    assert InputLayout("tile").fitted(16, []).check_size((5000, 4000)) is None


def test_aspect_without_training_sizes_is_refused():
    with pytest.raises(ValueError, match="no readable training images to set the aspect mode's scale from"):
        InputLayout("aspect").fitted(16, [])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "round"}, "unknown input mode 'round'; choose one of: auto, square, aspect, tile"),
        ({"mode": "aspect", "center_crop": 224}, "center crop applies to the square input mode only"),
        ({"mode": "square", "scale": 0.5}, "scale applies to the aspect and tile input modes only"),
        ({"mode": "tile", "tile_size": 200}, "tile size must be a multiple of 16 px and at least 32, got 200"),
        ({"mode": "tile", "tile_overlap": 256}, "tile overlap must be a multiple of 16 px and less than the tile size 256, got 256"),
        ({"mode": "aspect", "scale": 0.0}, "scale must be in (0, 16], got 0.0"),
        ({"mode": "auto", "scale": 0.5, "center_crop": 224}, "center crop applies to the square input mode and scale to the aspect and tile modes: give one of them"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=f"^{__import__('re').escape(message)}$"):
        InputLayout(**settings)


# ---------------------------------------------------------------------------
# auto: the mode chosen from the training images' sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, mode",
    [
        ([(500, 1250)] * 20, "aspect"),  # long strips, landscape
        ([(1250, 500)] * 20, "aspect"),  # and portrait
        ([(900, 900)] * 20, "square"),  # bottle
        ([(768, 576)] * 20, "square"),  # cookies, 1.33:1
        ([(256, 400)] * 11 + [(h, 400) for h in range(100, 400, 12)], "aspect"),  # welds: one width, heights 100 to 400
        ([(s, s) for s in range(200, 900, 35)], "aspect"),  # square, but every size from 200 to 900 px
        ([(100 + 23 * k % 500, 120 + 41 * k % 480) for k in range(40)], "aspect"),  # crops of many sizes, both ways
    ],
)
def test_auto_keeps_the_shape_of_long_parts_and_of_mixed_sizes_and_squashes_one_near_square_shape(sizes, mode):
    chosen, reason = choose_input_mode(sizes)
    assert chosen == mode and reason.startswith(f"auto: {mode}, ")


def test_auto_turns_at_the_stated_elongation_and_share_of_one_shape():
    below, above = round(1000 / (AUTO_ELONGATION - 0.02)), round(1000 / (AUTO_ELONGATION + 0.02))  # heights of 1,000 px wide images
    assert choose_input_mode([(below, 1000)] * 10)[0] == "square"
    assert choose_input_mode([(above, 1000)] * 10)[0] == "aspect"
    # nine of ten images of one size and shape are one shape; eight of ten are not
    assert choose_input_mode([(600, 600)] * 9 + [(300, 900)])[0] == "square"
    assert choose_input_mode([(600, 600)] * 8 + [(300, 900)] * 2)[0] == "aspect"
    # within 10% of the shape and 25% of the size counts as the same
    assert choose_input_mode([(600, 600)] * 5 + [(600, 650)] * 3 + [(700, 700)] * 2)[0] == "square"


def test_auto_is_resolved_at_fit_and_says_why():
    strips = InputLayout("auto").fitted(16, [(500, 1250)] * 4)
    assert strips.mode == "aspect" and strips.scale == 256 / 500
    assert strips.chosen == "auto: aspect, the training images are long (2.50:1 landscape, at least 1.45:1)"
    assert strips.describe() == f"aspect kept, scale 0.512 ({strips.chosen})"
    square = InputLayout("auto").fitted(16, [(900, 900)] * 4)
    assert square.mode == "square" and square.scale is None and square.input_hw((900, 1800)) == (256, 256)
    assert InputLayout("auto", center_crop=224).fitted(16, [(500, 1250)]).mode == "square"  # a crop is square's
    assert InputLayout("auto", scale=0.5).fitted(16, [(900, 900)]).mode == "aspect"  # a scale is aspect's
    assert InputLayout("square").fitted(16, [(500, 1250)]).chosen is None  # asked for, not chosen
    assert InputLayout.from_dict(strips.to_dict()) == strips
    with pytest.raises(ValueError, match="no readable training images to choose the input mode from"):
        InputLayout("auto").fitted(16, [])


# ---------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------


def test_an_input_no_larger_than_a_tile_is_one_tile():
    layout = InputLayout("tile", tile_size=256).fitted(16, [])
    assert layout.tiles((240, 256), cell=8) == [Tile(0, 0, 240, 256, (0, 30), (0, 32))]
    assert InputLayout("aspect").tiles((240, 256), cell=8) is None  # one piece, no tiles


@pytest.mark.parametrize("tile, overlap", [(256, 64), (128, 32), (160, 96), (64, 0)])
def test_tiles_cover_the_input_and_own_every_cell_once_away_from_inner_borders(tile, overlap):
    cell, align = 8, 16
    for length in range(32, 1601, 16):
        spans = _axis_tiles(length, tile, overlap, align, cell)
        assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length  # from border to border
        owned = [own for _, _, own in spans]
        assert owned[0][0] == 0 and owned[-1][1] == length // cell
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(owned, owned[1:]))  # a partition, in order
        for (start, size, (first, last)), (next_start, _, _) in zip(spans, spans[1:]):
            assert start % align == 0 and size == min(tile, length)
            assert start + size - next_start >= overlap  # neighbours overlap by at least the asked overlap
        for k, (start, size, (first, last)) in enumerate(spans):
            assert start <= first * cell and last * cell <= start + size  # owned cells lie inside the tile
            if k > 0:  # an inner border: at least half the overlap away, less half a cell for rounding
                assert first * cell - start >= overlap / 2 - cell / 2
            if k < len(spans) - 1:
                assert start + size - last * cell >= overlap / 2 - cell / 2


class _PoolingTaps(torch.nn.Module):
    """A stand-in backbone with a small, known reach: each tap averages 8 and 16 px blocks."""

    def forward(self, images):
        return {"fine": F.avg_pool2d(images, 8), "coarse": F.avg_pool2d(images, 16)}


def test_stitched_tile_features_equal_the_whole_image_features():
    # The stand-in's features reach 40 px around a cell; every owned cell is at least
    # 96 / 2 - 4 = 44 px from its tile's inner border, so stitching must reproduce the whole
    # image exactly, including at the image borders (where tiles and image share the edge).
    features = PatchFeatures(_PoolingTaps(), ("fine", "coarse"))
    assert (features.cell, features.align) == (8, 16)
    layout = InputLayout("tile", tile_size=160, tile_overlap=96).fitted(16, [])
    images = torch.rand(2, 3, 320, 448, generator=torch.Generator().manual_seed(0))
    tiles = layout.tiles((320, 448), features.cell)
    assert len(tiles) == 4 * 6
    whole = features(images)
    stitched = features(images, tiles, tile_batch=5)
    assert stitched.shape == whole.shape == (2, 40, 56, 6)
    assert torch.allclose(stitched, whole, atol=1e-6)
    # Without the overlap's margin (cells cut at the tiles' own borders) the seams show.
    seams = InputLayout("tile", tile_size=160, tile_overlap=0).fitted(16, []).tiles((320, 448), features.cell)
    assert not torch.allclose(features(images, seams), whole, atol=1e-3)
