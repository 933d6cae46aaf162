"""Greedy k-center coreset selection (paper, section 3.2, algorithm 1).

The memory bank of all training patches is redundant: neighbouring patches of similar images
are nearly the same. The greedy k-center pick keeps the subset whose farthest point from the
subset is (within a factor 2 of the best possible) as close as possible, so every training patch
stays near a kept one. Distances are measured on a seeded random projection to 128 dimensions
(Johnson-Lindenstrauss), as the paper does, which keeps them nearly unchanged at a fraction of
the cost. The projection is held in float16 during a fit (half the memory; its rounding, 2^-11
of a coordinate, is far below the projection's own distortion); the selection reads it exactly.

Each pick must find the point farthest from all picks so far. The plain way touches all N points
at each of the M picks (N x M distance computations). On the CPU we touch only the points a new
pick can win, exactly, with the triangle inequality. Every point belongs to the cell of its
nearest pick a (its distance r), and each cell knows its largest r. For a new pick c,
d(x, c) >= d(a, c) - r, so whenever d(a, c) >= 2 r the new pick cannot be nearer than a and x
keeps its cell. A cell whose largest r is under half its centre's distance to c is skipped
whole, unread; in the cells left, each point is checked against its own r before a full
distance is computed. So a pick costs one distance per earlier pick (to test the cells) plus
the points near it, not all N: with the bank size fixed, the time grows linearly with the
number of training images. The picks are the plain loop's, ties going to the lowest index. On a
GPU the plain loop is fast enough and runs with no host synchronisation per pick.
"""

from __future__ import annotations

import types
from typing import Callable

import numba
import numpy as np
import torch
from numba.extending import overload

#: a cell is read when its centre is nearer the new pick than twice its largest radius, by this
#: factor on the squared distances: the test is computed in another summation order than the
#: distances it guards, so it errs towards reading a cell rather than skipping one it must read
READ_MARGIN = 1.001

#: float16 bit pattern -> float32 value, for the compiled loops (numba has no float16)
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


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
    """Indices of ``count`` rows of ``points`` (N, d), float32 or float16, chosen by greedy k-center selection.

    The first pick is a seeded random row; each further pick is the row farthest from all picks
    so far (ties go to the lowest index). With ``initial_centres`` (rows already in a memory
    bank, in the same projection), selection goes on as if those were picked already: the first
    pick is the row farthest from them. ``on_progress(n)`` is told of every ``n`` new picks.
    """
    total = points.shape[0]
    if not 0 < count <= total:
        raise ValueError(f"coreset size must be between 1 and {total}, got {count}")
    if points.dtype != torch.float16:
        points = points.float()
    points = points.contiguous()
    if initial_centres is not None:
        initial_centres = initial_centres.float().to(points.device).contiguous()
    start = None if initial_centres is None else _nearest_initial_centres(points, initial_centres)
    if points.device.type == "cpu":
        # float16 goes to the compiled loop as its bit patterns, read through a table.
        array = points.view(torch.int16).numpy().view(np.uint16) if points.dtype == torch.float16 else points.numpy()
        initial = None if initial_centres is None else (initial_centres.numpy(), start[0].numpy(), start[1].numpy())
        return torch.from_numpy(_greedy_cpu(array, count, seed, on_progress, initial))
    return _greedy_plain(points.float(), count, seed, on_progress, start).cpu()


def _nearest_initial_centres(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's squared distance to its nearest initial centre, and which centre that is."""
    from .search import NearestNeighbourIndex

    distances, owners = NearestNeighbourIndex(centres).search(points.float(), 1)
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


class _Cells:
    """The CPU loop's state: each point's nearest centre and squared distance to it, and per
    centre slot its cell (a linked list of its points), the cell's size, largest squared
    distance and the lowest index holding it."""

    def __init__(self, total: int, slots: int, dims: int) -> None:
        self.centres = np.empty((slots, dims), dtype=np.float32)
        self.nearest = np.empty(total, dtype=np.float32)
        self.owner = np.empty(total, dtype=np.int32)
        self.next = np.empty(total, dtype=np.int32)  # next point of the same cell, -1 at the end
        self.head = np.full(slots, -1, dtype=np.int32)
        self.size = np.zeros(slots, dtype=np.int64)
        self.largest = np.full(slots, -1.0, dtype=np.float32)
        self.farthest = np.zeros(slots, dtype=np.int64)
        self.gaps = np.empty(slots, dtype=np.float32)  # squared distance of each centre to the new one
        self.read = np.empty(slots, dtype=np.int32)  # the cells to read for the new centre
        self.moved = np.empty((slots, 4), dtype=np.int64)  # per cell read: (head, tail, count, farthest) of points won
        self.moved_largest = np.empty(slots, dtype=np.float32)

    def arrays(self) -> tuple:
        return (self.centres, self.nearest, self.owner, self.next, self.head, self.size, self.largest, self.farthest,
                self.gaps, self.read, self.moved, self.moved_largest)


def _greedy_cpu(points: np.ndarray, count: int, seed: int, on_progress, initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The cell-pruned loop; ``initial`` is (initial centres, each point's squared distance to
    its nearest one, which one that is)."""
    total, dims = points.shape
    tell = _report(on_progress, count)
    # Centre slots: the initial centres (if any) first, then the picks as they are made.
    offset = 0 if initial is None else len(initial[0])
    cells = _Cells(total, offset + count, dims)
    state = cells.arrays()
    picks = np.empty(count, dtype=np.int64)
    if initial is None:
        first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
        picks[0] = first
        _centre_from(points, _HALF_TO_FLOAT, first, cells.centres[0])
        _first_cell(points, _HALF_TO_FLOAT, *state)
        tell(0)
        done = 1
    else:
        cells.centres[:offset] = initial[0]
        cells.nearest[:] = initial[1]
        cells.owner[:] = initial[2]
        _initial_cells(*state)
        done = 0
    for step in range(done, count):
        pick = _farthest_cell(cells.largest, cells.farthest, offset + step)
        picks[step] = pick
        _centre_from(points, _HALF_TO_FLOAT, pick, cells.centres[offset + step])
        _add_centre(points, _HALF_TO_FLOAT, offset + step, *state)
        tell(step)
    return picks


def _coordinate(points, table, i, k):  # pragma: no cover - compiled code calls the overload below
    raise NotImplementedError("only for compiled code")


@overload(_coordinate)
def _coordinate_overload(points, table, i, k):
    """A point's coordinate as float32: read directly, or through the table for float16 bits."""
    if points.dtype == numba.types.uint16:
        return lambda points, table, i, k: table[points[i, k]]
    return lambda points, table, i, k: points[i, k]


@numba.njit(cache=True)
def _centre_from(points, table, index, out):  # pragma: no cover - compiled
    for k in range(points.shape[1]):
        out[k] = _coordinate(points, table, index, k)


@numba.njit(cache=True)
def _squared_distance(points, table, i, centre):  # pragma: no cover - compiled
    # One summation order for every distance that decides a point's cell: the plain loop's.
    total = np.float32(0.0)
    for k in range(centre.shape[0]):
        diff = _coordinate(points, table, i, k) - centre[k]
        total += diff * diff
    return total


@numba.njit(cache=True)
def _farther(value, index, best, best_index):  # pragma: no cover - compiled
    """Is (value, index) ahead of (best, best_index): larger, or as large at a lower index."""
    return value > best or (value == best and index < best_index)


@numba.njit(parallel=True, cache=True)
def _first_cell(points, table, centres, nearest, owner, next_, head, size, largest, farthest, gaps, read, moved, moved_largest):  # pragma: no cover - compiled
    """Every point joins the first centre's cell, in index order."""
    total = points.shape[0]
    centre = centres[0]
    for i in numba.prange(total):
        nearest[i] = _squared_distance(points, table, i, centre)
        owner[i] = 0
        next_[i] = i + 1 if i + 1 < total else -1
    head[0] = 0
    size[0] = total
    best, where = np.float32(-1.0), 0
    for i in range(total):
        if nearest[i] > best:
            best, where = nearest[i], i
    largest[0], farthest[0] = best, where


@numba.njit(cache=True)
def _initial_cells(centres, nearest, owner, next_, head, size, largest, farthest, gaps, read, moved, moved_largest):  # pragma: no cover - compiled
    """Cells of the initial centres from each point's nearest one, each in index order."""
    for i in range(nearest.shape[0] - 1, -1, -1):
        cell = owner[i]
        next_[i] = head[cell]
        head[cell] = i
        size[cell] += 1
        if _farther(nearest[i], i, largest[cell], farthest[cell]) or size[cell] == 1:
            largest[cell], farthest[cell] = nearest[i], i


@numba.njit(cache=True)
def _farthest_cell(largest, farthest, slots):  # pragma: no cover - compiled
    """The point farthest from its centre over all cells (lowest index on ties): the next pick."""
    best, where = np.float32(-1.0), 0
    for cell in range(slots):
        if largest[cell] >= 0 and _farther(largest[cell], farthest[cell], best, where):
            best, where = largest[cell], farthest[cell]
    return where


#: points in the cells read for one pick above which they are read on all threads; below it the
#: threads' start-up costs more than they save (and far more on a busy machine)
PARALLEL_READ_POINTS = 10_000


def _add_centre(points: np.ndarray, table: np.ndarray, slot: int, *state) -> None:
    """Make ``centres[slot]`` a centre: the points it is nearer to than their own move to its cell."""
    reads, volume = _cells_to_read(slot, *state)
    read_cells = _read_cells_parallel if volume > PARALLEL_READ_POINTS else _read_cells_serial
    read_cells(points, table, slot, reads, *state)
    _gather_won(slot, reads, *state)


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def _cells_to_read(slot, centres, nearest, owner, next_, head, size, largest, farthest, gaps, read, moved, moved_largest):  # pragma: no cover - compiled
    """The cells the new centre may win points from, listed in ``read``: their count and their points' count."""
    centre = centres[slot]
    reads, volume = 0, 0
    for j in range(slot):
        if largest[j] < 0:
            continue
        total = np.float32(0.0)
        for k in range(centre.shape[0]):
            diff = centres[j, k] - centre[k]
            total += diff * diff
        gaps[j] = total
        # d(a, c) >= 2 r for the cell's largest r: no point of the cell can be won.
        if total < 4.0 * largest[j] * READ_MARGIN:
            read[reads] = j
            reads += 1
            volume += size[j]
    return reads, volume


@numba.njit(cache=True)
def _append(next_, i, radius, head, tail, count, best, where):  # pragma: no cover - compiled
    """Link point ``i`` (at ``radius``) after ``tail`` of a list; the list's new (head, tail,
    count, largest radius, lowest index holding it)."""
    if tail == -1:
        head = i
    else:
        next_[tail] = i
    if _farther(radius, i, best, where):
        best, where = radius, i
    return head, i, count + 1, best, where


def _read_cells(points, table, slot, reads, centres, nearest, owner, next_, head, size, largest, farthest, gaps, read, moved, moved_largest):  # pragma: no cover - compiled
    """Split each cell read into the points it keeps and the points the new centre wins."""
    centre = centres[slot]
    for q in numba.prange(reads):
        cell = read[q]
        gap = gaps[cell]
        keep_head, keep_tail, kept, keep_best, keep_where = -1, -1, 0, np.float32(-1.0), 0
        won_head, won_tail, won, won_best, won_where = -1, -1, 0, np.float32(-1.0), 0
        i = head[cell]
        while i != -1:
            following = next_[i]
            radius = nearest[i]
            is_won = False
            if gap < 4.0 * radius * READ_MARGIN:
                distance = _squared_distance(points, table, i, centre)
                if distance < radius:
                    nearest[i] = distance
                    owner[i] = slot
                    radius = distance
                    is_won = True
            if is_won:
                won_head, won_tail, won, won_best, won_where = _append(next_, i, radius, won_head, won_tail, won, won_best, won_where)
            else:
                keep_head, keep_tail, kept, keep_best, keep_where = _append(next_, i, radius, keep_head, keep_tail, kept, keep_best, keep_where)
            i = following
        if keep_tail != -1:
            next_[keep_tail] = -1
        if won_tail != -1:
            next_[won_tail] = -1
        head[cell], size[cell], largest[cell], farthest[cell] = keep_head, kept, keep_best, keep_where
        moved[q, 0], moved[q, 1], moved[q, 2], moved[q, 3] = won_head, won_tail, won, won_where
        moved_largest[q] = won_best


def _compiled_twice(function: Callable) -> tuple[Callable, Callable]:
    """``function`` compiled for all threads (prange in parallel) and for one (prange as range).
    The serial copy gets its own name, so that numba's cache keeps the two apart."""
    serial = types.FunctionType(function.__code__, function.__globals__, f"{function.__name__}_serial")
    serial.__qualname__ = serial.__name__
    return numba.njit(parallel=True, cache=True)(function), numba.njit(cache=True)(serial)


_read_cells_parallel, _read_cells_serial = _compiled_twice(_read_cells)


@numba.njit(cache=True)
def _gather_won(slot, reads, centres, nearest, owner, next_, head, size, largest, farthest, gaps, read, moved, moved_largest):  # pragma: no cover - compiled
    """The new cell: the points won from each cell read, linked one run after another."""
    tail, best, where = -1, np.float32(-1.0), 0
    for q in range(reads):
        if moved[q, 2] == 0:
            continue
        if tail == -1:
            head[slot] = moved[q, 0]
        else:
            next_[tail] = moved[q, 0]
        tail = moved[q, 1]
        size[slot] += moved[q, 2]
        if _farther(moved_largest[q], moved[q, 3], best, where):
            best, where = moved_largest[q], moved[q, 3]
    largest[slot], farthest[slot] = best, where


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
