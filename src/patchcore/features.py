"""Locally aware patch features (paper, section 3.1).

Each tapped feature map is averaged over a 3x3 neighbourhood, so that a patch's feature also
describes its surroundings without losing resolution; the deeper (coarser) map is upsampled
to the finer grid and the two are joined per patch. Large images can go through in tiles whose
features are stitched into one grid (``layout.py`` plans the tiles).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layout import InputLayout, Tile


class PatchFeatures(nn.Module):
    """Image batch (B, 3, H, W) -> patch features (B, h, w, D) on the finest tapped grid."""

    #: side of the blank image used to read the tapped layers' strides
    PROBE_SIZE = 64

    def __init__(self, extractor: nn.Module, layers: tuple[str, ...], neighbourhood: int = 3) -> None:
        super().__init__()
        # Channels-last is the layout oneDNN and tensor cores run convolutions fastest in.
        self.extractor = extractor.to(memory_format=torch.channels_last)
        self.layers = tuple(layers)
        self.neighbourhood = neighbourhood
        with torch.inference_mode():
            taps = self.extractor(torch.zeros(1, 3, self.PROBE_SIZE, self.PROBE_SIZE))
        strides = [self.PROBE_SIZE // taps[layer].shape[-1] for layer in self.layers]
        #: input pixels per cell of the feature grid (the finest tapped stride, 8 for layer2)
        self.cell = min(strides)
        #: input sides that are multiples of this line up with every tapped grid (16 for layer3)
        self.align = max(strides)

    def grid_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the feature grid of an input of ``input_hw`` (stride-2 layers round up)."""
        return math.ceil(input_hw[0] / self.cell), math.ceil(input_hw[1] / self.cell)

    def of_inputs(self, inputs: torch.Tensor, layout: InputLayout, tile_batch: int = 8) -> torch.Tensor:
        """Patch features (B, h, w, D) of a batch of same-size inputs laid out by ``layout``:
        through tiles in the tile mode, ``tile_batch`` at a time; on this module's device."""
        tiles = layout.tiles(tuple(inputs.shape[-2:]), self.cell)
        return self(inputs.to(next(self.parameters()).device), tiles, tile_batch)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, tiles: Sequence[Tile] | None = None, tile_batch: int = 8) -> torch.Tensor:
        """Patch features of whole images, or stitched from ``tiles`` (then ``tile_batch`` tiles at a time)."""
        if tiles is None:
            return self.of_whole_images(images)
        size = images.shape[0]
        crops = torch.cat([images[:, :, t.top : t.top + t.height, t.left : t.left + t.width] for t in tiles])  # tile-major
        outputs = torch.cat([self.of_whole_images(chunk) for chunk in crops.split(tile_batch)])
        # The last tile owns the grid's far corner: its ends are the grid's size.
        stitched = outputs.new_empty((size, tiles[-1].own_rows[1], tiles[-1].own_cols[1], outputs.shape[-1]))
        for number, tile in enumerate(tiles):
            features = outputs[number * size : (number + 1) * size]
            (r0, r1), (c0, c1) = tile.own_rows, tile.own_cols
            top, left = tile.top // self.cell, tile.left // self.cell
            stitched[:, r0:r1, c0:c1] = features[:, r0 - top : r1 - top, c0 - left : c1 - left]
        return stitched

    def of_whole_images(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, D) of whole images, in one piece (no tiles)."""
        taps = self.extractor(images.contiguous(memory_format=torch.channels_last))
        # Stride 1 and "same" padding keep every patch position: aggregation, not downsampling.
        pooled = [F.avg_pool2d(taps[layer], self.neighbourhood, stride=1, padding=self.neighbourhood // 2) for layer in self.layers]
        grid = max(p.shape[-2:] for p in pooled)  # the finest tapped grid
        joined = torch.cat(
            [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled],
            dim=1,
        )
        return joined.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D), one row per patch
