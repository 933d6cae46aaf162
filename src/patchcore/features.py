"""Locally aware patch features (paper, section 3.1).

Each tapped feature map is averaged over a 3x3 neighbourhood, so that a patch's feature also
describes its surroundings without losing resolution; the deeper (coarser) map is upsampled
to the finer grid and the two are joined per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchFeatures(nn.Module):
    """Image batch (B, 3, S, S) -> patch features (B, h, w, D) on the finest tapped grid."""

    def __init__(self, extractor: nn.Module, layers: tuple[str, ...], neighbourhood: int = 3) -> None:
        super().__init__()
        # Channels-last is the layout oneDNN and tensor cores run convolutions fastest in.
        self.extractor = extractor.to(memory_format=torch.channels_last)
        self.layers = tuple(layers)
        self.neighbourhood = neighbourhood

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        taps = self.extractor(images.contiguous(memory_format=torch.channels_last))
        # Stride 1 and "same" padding keep every patch position: aggregation, not downsampling.
        pooled = [F.avg_pool2d(taps[layer], self.neighbourhood, stride=1, padding=self.neighbourhood // 2) for layer in self.layers]
        grid = pooled[0].shape[-2:]
        joined = torch.cat(
            [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled],
            dim=1,
        )
        return joined.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D), one row per patch
