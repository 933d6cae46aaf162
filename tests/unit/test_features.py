"""Locally aware patch features (paper, section 3.1) against the formula written out here.

The backbone is a tiny fixed conv stack with two taps at strides 8 and 16, shaped like
torchvision's ``create_feature_extractor`` output (a dict of named maps); each stride-2 layer
pads by 1 and so rounds odd sides up, as ResNet and MobileNet stages do.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from patchcore.features import PatchFeatures


class _ConvTaps(nn.Module):
    """Four seeded 3x3 stride-2 convs: "fine" after three (stride 8, 4 channels), "coarse" after four (stride 16, 5)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in ((3, 4), (4, 4), (4, 4), (4, 5)))
        for conv in self.convs:
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / 3
            conv.bias.data = torch.randn(conv.bias.shape, generator=generator)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images
        for conv in self.convs[:3]:
            x = torch.tanh(conv(x))
        return {"fine": x, "coarse": torch.tanh(self.convs[3](x))}


class _OnesTaps(nn.Module):
    """Constant maps of ones on the stride-8 and stride-16 grids: only the borders can change them."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        return {
            "fine": torch.ones(b, 2, math.ceil(h / 8), math.ceil(w / 8)),
            "coarse": torch.ones(b, 3, math.ceil(h / 16), math.ceil(w / 16)),
        }


def neighbourhood_mean(tap: torch.Tensor) -> torch.Tensor:
    """Each cell's 3x3 neighbourhood summed over nine shifts of a zero-padded copy, over 9:
    the cells outside the map count as zeros (PyTorch's ``count_include_pad=True``)."""
    h, w = tap.shape[-2:]
    padded = torch.nn.functional.pad(tap, (1, 1, 1, 1))
    return sum(padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation with half-pixel centres
    (``align_corners=False``): output i samples input x = (i + 0.5) size_in / size_out - 0.5,
    clamped at 0, between floor(x) and the next cell (the last repeated at the far border)."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        x = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(math.floor(x), size_in - 1)
        high = min(low + 1, size_in - 1)
        matrix[i, low] += 1 - (x - low)
        matrix[i, high] += x - low
    return matrix


def expected_patches(taps: dict[str, torch.Tensor], layers: tuple[str, ...]) -> torch.Tensor:
    """Section 3.1 in float64: average each tap over 3x3, bring the coarser ones to the finest grid
    bilinearly, join along channels in ``layers`` order, one row per patch: (B, h, w, D)."""
    pooled = [neighbourhood_mean(taps[layer].double()) for layer in layers]
    h, w = max(p.shape[-2] for p in pooled), max(p.shape[-1] for p in pooled)
    joined = [bilinear_matrix(p.shape[-2], h) @ p @ bilinear_matrix(p.shape[-1], w).T for p in pooled]
    return torch.cat(joined, dim=1).permute(0, 2, 3, 1)


def test_the_stand_in_backbone_reads_as_strides_8_and_16():
    features = PatchFeatures(_ConvTaps(), ("fine", "coarse"))
    assert (features.cell, features.align) == (8, 16)
    assert features.grid_hw((64, 64)) == (8, 8)
    assert features.grid_hw((72, 100)) == (9, 13)  # 100 / 8 = 12.5: stride-2 layers round up


@pytest.mark.parametrize("input_hw", [(64, 64), (72, 100), (40, 136)])
def test_patch_features_are_3x3_means_upsampled_and_joined(input_hw):
    images = torch.rand(2, 3, *input_hw, generator=torch.Generator().manual_seed(1))
    extractor = _ConvTaps()
    with torch.no_grad():
        taps = extractor(images)
    features = PatchFeatures(extractor, ("fine", "coarse"))
    patches = features(images)
    h, w = features.grid_hw(input_hw)
    assert patches.shape == (2, h, w, 4 + 5)
    expected = expected_patches(taps, ("fine", "coarse"))
    assert float((patches.double() - expected).abs().max()) < 1e-5
    # The neighbourhood matters at this tolerance: the raw taps are far from their 3x3 means.
    assert float((taps["fine"].permute(0, 2, 3, 1).double() - expected[..., :4]).abs().max()) > 0.1


def test_channels_follow_the_order_of_the_layers():
    images = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    extractor = _ConvTaps()
    with torch.no_grad():
        taps = extractor(images)
    patches = PatchFeatures(extractor, ("coarse", "fine"))(images)
    assert patches.shape == (1, 6, 10, 5 + 4)  # still on the finest grid, coarse channels first
    assert float((patches.double() - expected_patches(taps, ("coarse", "fine"))).abs().max()) < 1e-5


def test_cells_outside_the_map_count_as_zeros_in_the_mean():
    # A map of ones averages to 1 inside, 6/9 along the edges and 4/9 in the corners.
    patches = PatchFeatures(_OnesTaps(), ("fine", "coarse"))(torch.zeros(1, 3, 48, 64))
    fine = patches[0, :, :, 0]
    assert fine.shape == (6, 8)
    assert torch.allclose(fine[1:-1, 1:-1], torch.ones(4, 6))
    assert torch.allclose(fine[0, 1:-1], torch.full((6,), 6 / 9)) and torch.allclose(fine[1:-1, -1], torch.full((4,), 6 / 9))
    assert torch.allclose(fine[[0, 0, -1, -1], [0, -1, 0, -1]], torch.full((4,), 4 / 9))
    assert torch.equal(patches[..., 1], patches[..., 0])  # both fine channels alike
    # The coarse 3 x 4 map of ones pools to 4/9, 6/9 and 1 at its corner, edge and centre cells,
    # then spreads bilinearly over the 6 x 8 grid: its first row and column stay at the corner value.
    coarse = patches[0, :, :, 2]
    assert float(coarse[0, 0]) == pytest.approx(4 / 9, abs=1e-6)
    assert float(coarse.max()) < 1 and float(coarse.min()) == pytest.approx(4 / 9, abs=1e-6)
