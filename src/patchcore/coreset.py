"""Greedy k-center coreset selection (paper, section 3.2, algorithm 1).

The memory bank of all training patches is redundant: neighbouring patches of similar images
are nearly the same. The greedy k-center pick keeps the subset whose farthest point from the
subset is (within a factor 2 of the best possible) as close as possible, so every training patch
stays near a kept one. Distances are measured on a seeded random projection to 128 dimensions
(Johnson-Lindenstrauss), as the paper does, which keeps them nearly unchanged at a fraction of
the cost.

Each pick must find the point farthest from all picks so far. The plain way touches all N points
at each of the M picks (N x M distance computations). On the CPU we skip most of them, exactly,
with the triangle inequality: every point remembers its nearest pick a and the distance r to it.
For a new pick c, d(x, c) >= d(a, c) - r, so whenever d(a, c) >= 2 r the new pick cannot be
nearer than a and x is left alone. Per pick, d(a, c) is computed for the picks so far and every
point is checked against its bound (12 bytes read instead of its 512-byte feature); a full
distance is computed only for the points the bound does not rule out (about 1% of them on MVTec
bottle). The picks are the plain loop's. The check still visits every point at every pick, so
the cost grows with N x M, at a much smaller constant. On a GPU the plain loop is fast enough
and runs with no host synchronisation per pick.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np
import torch

#: points per parallel chunk in the CPU kernel; each chunk reports its own farthest point
CHUNK = 4096


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with a seeded Gaussian matrix; unchanged when D <= dim."""
    if features.shape[1] <= dim:
        return features
    return features @ projection_matrix(features.shape[1], dim, seed).to(features.device, features.dtype)


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """The (in_dim, out_dim) Gaussian matrix, scaled so that lengths are kept on average."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def greedy_coreset(
    points: torch.Tensor,
    count: int,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    initial_centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``points`` (N, d) chosen by greedy k-center selection.

    The first pick is a seeded random row; each further pick is the row farthest from all picks
    so far (ties go to the lowest index). With ``initial_centres`` (rows already in a memory
    bank, in the same projection), selection goes on as if those were picked already: the first
    pick is the row farthest from them. ``on_progress(n)`` is told of every ``n`` new picks.
    """
    total = points.shape[0]
    if not 0 < count <= total:
        raise ValueError(f"coreset size must be between 1 and {total}, got {count}")
    points = points.float().contiguous()
    if initial_centres is not None:
        initial_centres = initial_centres.float().to(points.device).contiguous()
    start = None if initial_centres is None else _nearest_initial_centres(points, initial_centres)
    if points.device.type == "cpu":
        initial = None if initial_centres is None else (initial_centres.numpy(), start[0].numpy(), start[1].numpy())
        return torch.from_numpy(_greedy_cpu(points.numpy(), count, seed, on_progress, initial))
    return _greedy_plain(points, count, seed, on_progress, start).cpu()


def _nearest_initial_centres(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's squared distance to its nearest initial centre, and which centre that is."""
    from .search import NearestNeighbourIndex

    distances, owners = NearestNeighbourIndex(centres).search(points, 1)
    return distances[:, 0].square(), owners[:, 0]


def _report(on_progress: Callable[[int], None] | None, count: int) -> Callable[[int], None]:
    """A callback for the loop, telling ``on_progress`` of new picks about every 1% of them."""
    every = max(1, count // 100)
    reported = 0

    def tell(step: int) -> None:
        nonlocal reported
        done = step + 1
        if on_progress is not None and (done % every == 0 or done == count):
            on_progress(done - reported)
            reported = done

    return tell


def _greedy_cpu(points: np.ndarray, count: int, seed: int, on_progress, initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The pruned loop; ``initial`` is (initial centres, each point's squared distance to its
    nearest one, which one that is)."""
    total = points.shape[0]
    tell = _report(on_progress, count)
    # Centre slots: the initial centres (if any) first, then the picks as they are made.
    offset = 0 if initial is None else len(initial[0])
    centres = np.empty((offset + count, points.shape[1]), dtype=np.float32)
    if initial is None:
        nearest = np.full(total, np.inf, dtype=np.float32)  # squared distance to the nearest centre
        owner = np.zeros(total, dtype=np.int64)  # which centre slot that is
        first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    else:
        centres[:offset] = initial[0]
        nearest, owner = initial[1].astype(np.float32), initial[2].astype(np.int64)
        first = int(np.argmax(nearest))
    picks = np.empty(count, dtype=np.int64)
    gaps = np.empty(offset + count, dtype=np.float32)  # squared distance of each centre to the new one
    chunk_best = np.empty((total + CHUNK - 1) // CHUNK, dtype=np.float32)
    chunk_where = np.empty_like(chunk_best, dtype=np.int64)
    pick = first
    for step in range(count):
        picks[step] = pick
        slot = offset + step
        centres[slot] = points[pick]
        pick = _add_centre(points, centres, slot, nearest, owner, gaps, chunk_best, chunk_where)
        tell(step)
    return picks


@numba.njit(parallel=True, fastmath=False, cache=True)
def _add_centre(points, centres, slot, nearest, owner, gaps, chunk_best, chunk_where):  # pragma: no cover - compiled
    """Make ``centres[slot]`` a centre: update every point's nearest centre; return the farthest point."""
    dims = points.shape[1]
    centre = centres[slot]
    # Squared distance from the new centre to every earlier one.
    for j in numba.prange(slot):
        total = np.float32(0.0)
        for k in range(dims):
            diff = centres[j, k] - centre[k]
            total += diff * diff
        gaps[j] = total
    chunks = chunk_best.shape[0]
    size = points.shape[0]
    for chunk in numba.prange(chunks):
        start = chunk * CHUNK
        stop = min(start + CHUNK, size)
        best = np.float32(-1.0)
        where = start
        for i in range(start, stop):
            radius = nearest[i]
            # d(a, c) >= 2 r, i.e. gap >= 4 r^2, means c cannot be nearer than a: skip x.
            if radius == np.inf or gaps[owner[i]] < 4.0 * radius:
                total = np.float32(0.0)
                for k in range(dims):
                    diff = points[i, k] - centre[k]
                    total += diff * diff
                if total < radius:
                    nearest[i] = total
                    owner[i] = slot
                    radius = total
            if radius > best:
                best = radius
                where = i
        chunk_best[chunk] = best
        chunk_where[chunk] = where
    # Farthest point overall; strict ">" in index order keeps the lowest index on ties.
    best = np.float32(-1.0)
    where = 0
    for chunk in range(chunks):
        if chunk_best[chunk] > best:
            best = chunk_best[chunk]
            where = chunk_where[chunk]
    return where


def _greedy_plain(points: torch.Tensor, count: int, seed: int, on_progress, start: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One full distance pass per pick, all on the device (a GPU): |x - c|^2 = |x|^2 - 2 x.c + |c|^2."""
    tell = _report(on_progress, count)
    squared_norms = points.square().sum(dim=1)

    def squared_distances_to(index: torch.Tensor | int) -> torch.Tensor:
        return torch.addmv(squared_norms, points, points[index], alpha=-2.0).add_(squared_norms[index])

    if start is not None:
        nearest = start[0].clone()
        first: torch.Tensor | int = torch.argmax(nearest)
    else:
        first = int(torch.randint(points.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
        nearest = torch.full((points.shape[0],), float("inf"), device=points.device)
    picks = torch.empty(count, dtype=torch.long, device=points.device)
    pick = first
    for step in range(count):
        picks[step] = pick
        torch.minimum(nearest, squared_distances_to(pick), out=nearest)
        pick = torch.argmax(nearest)  # stays on the device: no per-pick synchronisation
        tell(step)
    return picks
