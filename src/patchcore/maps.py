"""Patch scores to an anomaly map (paper, section 3.3): upsample bilinearly, blur with a Gaussian.

Both steps are linear and act on rows and columns separately, so together they are one small
matrix per axis: map = A_h @ scores @ A_w^T, where A (size x grid) = blur @ upsample. Two tiny
matrix products replace an interpolation and a 33 x 33 convolution over every output pixel.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

#: the paper smooths the upsampled map with a Gaussian of sigma 4 (input pixels)
BLUR_SIGMA = 4.0


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian spanning 4 sigma each side (33 taps for sigma 4)."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


@lru_cache(maxsize=256)  # one per (grid, size) pair: few in the square mode, more when sizes vary
def map_matrix(grid: int, size: int, sigma: float) -> torch.Tensor:
    """The (size, grid) matrix taking one axis of patch scores to one axis of the blurred map.

    Built by pushing the identity through the two steps: bilinear upsampling (align_corners
    False, as ``F.interpolate``) then the Gaussian, with the image mirrored at its borders.
    """
    identity = torch.eye(grid, dtype=torch.float64)[:, None, :]  # (grid, 1, grid): one unit impulse per row
    columns = F.interpolate(identity, size=size, mode="linear", align_corners=False)  # (grid, 1, size)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        radius = kernel.numel() // 2
        columns = F.conv1d(F.pad(columns, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
    return columns[:, 0, :].T.float().contiguous()


def anomaly_maps(patch_scores: torch.Tensor, size_hw: tuple[int, int], sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Patch scores (B, h, w) upsampled bilinearly to (B, H, W) = ``size_hw`` and blurred with a Gaussian."""
    rows = map_matrix(patch_scores.shape[1], size_hw[0], sigma).to(patch_scores.device)
    cols = map_matrix(patch_scores.shape[2], size_hw[1], sigma).to(patch_scores.device)
    return rows @ patch_scores.float() @ cols.T
