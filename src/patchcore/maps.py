"""Patch scores to an anomaly map (paper, section 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

#: the paper smooths the upsampled map with a Gaussian of sigma 4 (input pixels)
BLUR_SIGMA = 4.0


def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Patch scores (B, h, w) upsampled bilinearly to (B, size, size) and blurred with a Gaussian.

    The kernel spans 4 sigma each side (33 px for sigma 4), enough for the tails to vanish.
    """
    upsampled = F.interpolate(patch_scores[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        upsampled = gaussian_blur(upsampled, kernel_size=[2 * int(4 * sigma + 0.5) + 1] * 2, sigma=[sigma, sigma])
    return upsampled[:, 0]
