"""Greedy k-center coreset selection (paper, section 3.2, algorithm 1).

The memory bank of all training patches is redundant: neighbouring patches of similar images
are nearly the same. The greedy k-center pick keeps the subset whose farthest point from the
subset is (approximately, within a factor 2) as close as possible, so every training patch stays
near a kept one. Distances are measured on a random projection (Johnson-Lindenstrauss), which
keeps them nearly unchanged at a fraction of the cost.
"""

from __future__ import annotations

from typing import Callable

import torch


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with a seeded Gaussian matrix; unchanged when D <= dim."""
    if features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(features.device, features.dtype)


def greedy_coreset(
    features: torch.Tensor,
    count: int,
    seed: int = 0,
    projection_dim: int = 128,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``features`` chosen by greedy k-center selection.

    The first pick is a seeded random row; each further pick is the row farthest from all picks
    so far (ties go to the lowest index). ``on_progress(n)`` is told of every ``n`` new picks.
    """
    total = features.shape[0]
    if not 0 < count <= total:
        raise ValueError(f"coreset size must be between 1 and {total}, got {count}")
    points = random_projection(features.float(), projection_dim, seed)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(total, (1,), generator=generator))

    # Squared distance to the nearest pick so far, kept up to date with one pass per pick:
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, a matrix-vector product instead of an (N, D) difference.
    squared_norms = points.square().sum(dim=1)
    def squared_distances_to(index: torch.Tensor | int) -> torch.Tensor:
        centre = points[index]
        return torch.addmv(squared_norms, points, centre, alpha=-2.0).add_(squared_norms[index])

    # Picks stay on the device: no per-pick synchronisation with the host on a GPU.
    picks = torch.empty(count, dtype=torch.long, device=points.device)
    picks[0] = first
    nearest = squared_distances_to(first)
    report_every = max(1, count // 100)
    for step in range(1, count):
        farthest = torch.argmax(nearest)
        picks[step] = farthest
        torch.minimum(nearest, squared_distances_to(farthest), out=nearest)
        if on_progress is not None and step % report_every == 0:
            on_progress(report_every)
    if on_progress is not None:
        on_progress((count - 1) % report_every + 1)
    return picks.cpu()
