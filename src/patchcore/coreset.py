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

What makes the CPU loop fast is memory order, not arithmetic: each cell is one contiguous run
of (point, distance) entries in a pool, so a cell is read front to back; the points it wins go
to a new run at the pool's end. Distances convert float16 with the CPU's own instruction and sum
in vector lanes; every distance comes from one function, so they compare exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import types
from typing import Callable

import numba
import numpy as np
import torch

from .kernels import as_float, squared_distance, start_compiled_threads
from .search import NearestNeighbourIndex

#: a cell is read when its centre is nearer the new pick than twice its largest radius, by this
#: factor on the squared distances: the triangle inequality holds for exact distances, not for
#: their float32 roundings, so the test errs towards reading a cell rather than skipping one
READ_MARGIN = 1.001


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
    counts: dict[str, int] | None = None,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``points`` (N, d), float32 or float16, chosen by greedy k-center selection.

    The first pick is a seeded random row; each further pick is the row farthest from all picks
    so far (ties go to the lowest index). With ``initial_centres`` (rows already in a memory
    bank, in the same projection), selection goes on as if those were picked already: the first
    pick is the row farthest from them. ``on_progress(n)`` is told of every ``n`` new picks.
    ``counts``, if given, receives what the CPU loop did (see :func:`_greedy_cpu`).
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
        # float16 goes to the compiled loop as its bit patterns, which the CPU converts (numba has no float16).
        array = points.view(torch.int16).numpy().view(np.uint16) if points.dtype == torch.float16 else points.numpy()
        initial = None if initial_centres is None else (initial_centres.numpy(), start[0].numpy(), start[1].numpy())
        return torch.from_numpy(_greedy_cpu(array, count, seed, on_progress, initial, counts))
    return _greedy_plain(points.float(), count, seed, on_progress, start).cpu()


def _nearest_initial_centres(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's squared distance to its nearest initial centre, and which centre that is."""
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
    """The CPU loop's state. Each centre slot has a cell: the points nearer to it than to any
    other centre, held as one contiguous segment of a pool of (point index, squared distance to
    the centre) entries, so that reading a cell is a sequential scan. A new centre's cell is
    appended at the pool's end and the cells it took points from close up; when the pool is
    full, every cell moves down over the holes. Per slot: the segment's start and size, the
    cell's largest squared distance and the lowest point index holding it."""

    def __init__(self, total: int, slots: int, dims: int) -> None:
        capacity = 2 * total  # the live entries (total) and room for one more pick's cell (at most total)
        self.centres = np.empty((slots, dims), dtype=np.float32)
        self.index = np.empty(capacity, dtype=np.int32)
        self.radius = np.empty(capacity, dtype=np.float32)
        self.fill = np.zeros(1, dtype=np.int64)  # the pool's used length
        self.start = np.zeros(slots, dtype=np.int64)
        self.size = np.zeros(slots, dtype=np.int64)
        self.largest = np.full(slots, -1.0, dtype=np.float32)
        self.farthest = np.zeros(slots, dtype=np.int64)
        self.gaps = np.empty(slots, dtype=np.float32)  # squared distance of each centre to the new one
        self.read = np.empty(slots, dtype=np.int32)  # the cells to read for the new centre
        self.first_chunk = np.empty(slots + 1, dtype=np.int64)  # each cell read's chunks
        self.destination = np.empty(slots, dtype=np.int64)  # where each cell read's won points go
        self.chunk = CHUNK
        chunks = slots + capacity // self.chunk + 2
        self.chunk_begin = np.empty(chunks, dtype=np.int64)
        self.chunk_end = np.empty(chunks, dtype=np.int64)
        self.chunk_cell = np.empty(chunks, dtype=np.int32)
        self.chunk_won = np.empty(chunks, dtype=np.int64)
        self.chunk_keep_best = np.empty(chunks, dtype=np.float32)
        self.chunk_keep_where = np.empty(chunks, dtype=np.int64)
        self.chunk_won_best = np.empty(chunks, dtype=np.float32)
        self.chunk_won_where = np.empty(chunks, dtype=np.int64)
        self.chunk_distances = np.empty(chunks, dtype=np.int64)
        # what the loop did, for tests and benchmarks: pool entries read, distances computed, close-ups
        self.entries_read = self.distances = self.close_ups = 0

    def arrays(self) -> tuple:
        return (self.centres, self.index, self.radius, self.fill, self.start, self.size, self.largest, self.farthest,
                self.gaps, self.read, self.first_chunk, self.destination, self.chunk_begin, self.chunk_end,
                self.chunk_cell, self.chunk_won, self.chunk_keep_best, self.chunk_keep_where, self.chunk_won_best,
                self.chunk_won_where, self.chunk_distances)


#: pool entries per unit of work when cells are read on all threads (a large cell is split)
CHUNK = 16384


def _greedy_cpu(points: np.ndarray, count: int, seed: int, on_progress, initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None, counts: dict[str, int] | None = None) -> np.ndarray:
    """The cell-pruned loop; ``initial`` is (initial centres, each point's squared distance to
    its nearest one, which one that is). ``counts``, if given, receives what the loop did:
    pool entries read, distances computed (not counting the first cell's) and close-ups."""
    total, dims = points.shape
    start_compiled_threads()
    tell = _report(on_progress, count)
    # Centre slots: the initial centres (if any) first, then the picks as they are made.
    offset = 0 if initial is None else len(initial[0])
    cells = _Cells(total, offset + count, dims)
    state = cells.arrays()
    picks = np.empty(count, dtype=np.int64)
    if initial is None:
        first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
        picks[0] = first
        _centre_from(points, first, cells.centres[0])
        _first_cell(points, *state)
        tell(0)
        done = 1
    else:
        cells.centres[:offset] = initial[0]
        _initial_cells(initial[1], initial[2].astype(np.int64), *state)
        done = 0
    for step in range(done, count):
        pick = _farthest_cell(cells.largest, cells.farthest, offset + step)
        picks[step] = pick
        _centre_from(points, pick, cells.centres[offset + step])
        _add_centre(points, offset + step, cells, state)
        tell(step)
    if counts is not None:
        counts.update(entries_read=cells.entries_read, distances=cells.distances, close_ups=cells.close_ups)
    return picks


@numba.njit(cache=True)
def _centre_from(points, index, out):  # pragma: no cover - compiled
    for k in range(out.shape[0]):
        out[k] = as_float(points[index, k])


@numba.njit(cache=True)
def _farther(value, index, best, best_index):  # pragma: no cover - compiled
    """Is (value, index) ahead of (best, best_index): larger, or as large at a lower index."""
    return value > best or (value == best and index < best_index)


@numba.njit(parallel=True, cache=True)
def _first_cell(points, centres, index, radius, fill, start, size, largest, farthest, *rest):  # pragma: no cover - compiled
    """Every point joins the first centre's cell, in index order."""
    total = points.shape[0]
    centre = centres[0]
    for i in numba.prange(total):
        index[i] = i
        radius[i] = squared_distance(points, i, centre)
    best, where = np.float32(-1.0), 0
    for i in range(total):
        if radius[i] > best:
            best, where = radius[i], i
    start[0], size[0], largest[0], farthest[0], fill[0] = 0, total, best, where, total


@numba.njit(cache=True)
def _initial_cells(nearest, owner, centres, index, radius, fill, start, size, largest, farthest, *rest):  # pragma: no cover - compiled
    """Cells of the initial centres from each point's nearest one, each in index order."""
    total = nearest.shape[0]
    for i in range(total):
        size[owner[i]] += 1
    position = 0
    for cell in range(centres.shape[0]):
        start[cell] = position
        position += size[cell]
    cursor = start.copy()
    for i in range(total):
        cell = owner[i]
        index[cursor[cell]], radius[cursor[cell]] = i, nearest[i]
        cursor[cell] += 1
        if _farther(nearest[i], i, largest[cell], farthest[cell]):
            largest[cell], farthest[cell] = nearest[i], i
    fill[0] = total


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


def _add_centre(points: np.ndarray, slot: int, cells: _Cells, state: tuple) -> None:
    """Make ``centres[slot]`` a centre: the points it is nearer to than their own move to its cell."""
    reads, volume = _cells_to_read(slot, *state)
    if cells.fill[0] + volume > len(cells.index):
        _close_up(slot, *state)
        cells.close_ups += 1
    _chunks_of(reads, cells.chunk, *state)
    parallel = volume > PARALLEL_READ_POINTS
    (_read_chunks_parallel if parallel else _read_chunks_serial)(points, slot, reads, *state)
    cells.entries_read += volume
    cells.distances += int(cells.chunk_distances[: cells.first_chunk[reads]].sum())
    _new_cell(slot, reads, *state)
    (_move_won_parallel if parallel else _move_won_serial)(reads, *state)


@numba.njit(cache=True)
def _cells_to_read(slot, centres, index, radius, fill, start, size, largest, farthest, gaps, read, *rest):  # pragma: no cover - compiled
    """The cells the new centre may win points from, listed in ``read``: their count and their points' count."""
    centre = centres[slot]
    reads, volume = 0, 0
    for j in range(slot):
        if largest[j] < 0:
            continue
        total = squared_distance(centres, j, centre)
        gaps[j] = total
        # d(a, c) >= 2 r for the cell's largest r: no point of the cell can be won.
        if total < 4.0 * largest[j] * READ_MARGIN:
            read[reads] = j
            reads += 1
            volume += size[j]
    return reads, volume


@numba.njit(cache=True)
def _close_up(slots, centres, index, radius, fill, start, size, *rest):  # pragma: no cover - compiled
    """Move every cell's segment down over the holes left by points that changed cells."""
    # Slot order is pool order (each new cell goes at the end, and this keeps the order), so a
    # segment only ever moves down over entries already moved or free.
    cursor = 0
    for cell in range(slots):
        count = size[cell]
        if count == 0:
            continue
        source = start[cell]
        for p in range(count):
            index[cursor + p], radius[cursor + p] = index[source + p], radius[source + p]
        start[cell] = cursor
        cursor += count
    fill[0] = cursor


@numba.njit(cache=True)
def _chunks_of(reads, chunk, centres, index, radius, fill, start, size, largest, farthest, gaps, read, first_chunk, destination, chunk_begin, chunk_end, chunk_cell, *rest):  # pragma: no cover - compiled
    """Split the cells read into chunks of at most ``chunk`` entries, so that one large cell is read on all threads."""
    chunks = 0
    for q in range(reads):
        cell = read[q]
        first_chunk[q] = chunks
        begin, end = start[cell], start[cell] + size[cell]
        while begin < end:
            chunk_begin[chunks], chunk_end[chunks], chunk_cell[chunks] = begin, min(begin + chunk, end), cell
            chunks += 1
            begin += chunk
    first_chunk[reads] = chunks


def _read_chunks(points, slot, reads, centres, index, radius, fill, start, size, largest, farthest, gaps, read, first_chunk, destination, chunk_begin, chunk_end, chunk_cell, chunk_won, chunk_keep_best, chunk_keep_where, chunk_won_best, chunk_won_where, chunk_distances):  # pragma: no cover - compiled
    """Find the points the new centre wins in each chunk: their entries get the new distance
    and a negative index (-1 - i); the chunk's count won and farthest kept and won point."""
    centre = centres[slot]
    for c in numba.prange(first_chunk[reads]):
        gap = gaps[chunk_cell[c]]
        won, distances = 0, 0
        keep_best, keep_where, won_best, won_where = np.float32(-1.0), 0, np.float32(-1.0), 0
        for p in range(chunk_begin[c], chunk_end[c]):
            r, i = radius[p], index[p]
            # d(x, c) >= d(a, c) - r: unless d(a, c) < 2 r, the new centre is not nearer than a.
            if gap < 4.0 * r * READ_MARGIN:
                distance = squared_distance(points, i, centre)
                distances += 1
                if distance < r:
                    radius[p], index[p] = distance, -1 - i
                    won += 1
                    if _farther(distance, i, won_best, won_where):
                        won_best, won_where = distance, i
                    continue
            if _farther(r, i, keep_best, keep_where):
                keep_best, keep_where = r, i
        chunk_won[c], chunk_distances[c] = won, distances
        chunk_keep_best[c], chunk_keep_where[c], chunk_won_best[c], chunk_won_where[c] = keep_best, keep_where, won_best, won_where


@numba.njit(cache=True)
def _new_cell(slot, reads, centres, index, radius, fill, start, size, largest, farthest, gaps, read, first_chunk, destination, chunk_begin, chunk_end, chunk_cell, chunk_won, chunk_keep_best, chunk_keep_where, chunk_won_best, chunk_won_where, chunk_distances):  # pragma: no cover - compiled
    """The new centre's cell: a segment at the pool's end, with room for each cell read's points won, in read order."""
    total, best, where = 0, np.float32(-1.0), 0
    for q in range(reads):
        destination[q] = fill[0] + total
        for c in range(first_chunk[q], first_chunk[q + 1]):
            total += chunk_won[c]
            if chunk_won[c] > 0 and _farther(chunk_won_best[c], chunk_won_where[c], best, where):
                best, where = chunk_won_best[c], chunk_won_where[c]
    start[slot], size[slot], largest[slot], farthest[slot] = fill[0], total, best, where
    fill[0] += total


def _move_won(reads, centres, index, radius, fill, start, size, largest, farthest, gaps, read, first_chunk, destination, chunk_begin, chunk_end, chunk_cell, chunk_won, chunk_keep_best, chunk_keep_where, chunk_won_best, chunk_won_where, chunk_distances):  # pragma: no cover - compiled
    """Copy each cell's won entries to the new cell's segment, and close up the entries it keeps."""
    for q in numba.prange(reads):
        first, last = first_chunk[q], first_chunk[q + 1]
        won = 0
        for c in range(first, last):
            won += chunk_won[c]
        if won == 0:
            continue
        cell = read[q]
        kept, moved = start[cell], destination[q]
        best, where = np.float32(-1.0), 0
        for c in range(first, last):
            for p in range(chunk_begin[c], chunk_end[c]):
                i = index[p]
                if i < 0:
                    index[moved], radius[moved] = -1 - i, radius[p]
                    moved += 1
                else:
                    index[kept], radius[kept] = i, radius[p]
                    kept += 1
            if _farther(chunk_keep_best[c], chunk_keep_where[c], best, where):
                best, where = chunk_keep_best[c], chunk_keep_where[c]
        size[cell] = kept - start[cell]
        largest[cell], farthest[cell] = best, where  # -1 when the cell was emptied
def _compiled_twice(function: Callable) -> tuple[Callable, Callable]:
    """``function`` compiled for all threads (prange in parallel) and for one (prange as range).
    The serial copy gets its own name, so that numba's cache keeps the two apart."""
    serial = types.FunctionType(function.__code__, function.__globals__, f"{function.__name__}_serial")
    serial.__qualname__ = serial.__name__
    return numba.njit(parallel=True, cache=True)(function), numba.njit(cache=True)(serial)


_read_chunks_parallel, _read_chunks_serial = _compiled_twice(_read_chunks)
_move_won_parallel, _move_won_serial = _compiled_twice(_move_won)


def _greedy_plain(points: torch.Tensor, count: int, seed: int, on_progress, start: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One full distance pass per pick, all on the device (a GPU)."""
    tell = _report(on_progress, count)

    def squared_distances_to(index: torch.Tensor | int) -> torch.Tensor:
        # From the differences, not as |x|^2 - 2 x.c + |c|^2: that form loses a small distance's
        # digits to cancellation (on bottle's patches, picks 1e-6 short of the farthest, parting
        # from the greedy order within a few hundred picks).
        centre = points[index].reshape(1, -1)
        return torch.cdist(points, centre, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square_()

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


def coverage_radius(points: torch.Tensor, picks: torch.Tensor) -> float:
    """How far, at most, any row of ``points`` is from its nearest pick, for ``picks`` in the order
    :func:`greedy_coreset` chose them: the last pick's distance to the nearest earlier one. Each
    pick is the row farthest from the picks before it, so once it is taken no row is farther."""
    if len(picks) < 2:
        return float("inf")
    chosen = points[picks].float()
    return float(torch.linalg.vector_norm(chosen[:-1] - chosen[-1], dim=1).min())


#: distances per chunk of the repair's matrix product (2^22 floats = 16 MB)
REPAIR_CHUNK_ELEMENTS = 2**22
#: dropped picks up to which the repair finds the rows near them by a plain matrix product
REPAIR_PRODUCT_CENTRES = 512
#: relative widening of the product's squared distances: float32 rounding of |x|^2 - 2 x.c + |c|^2
#: over 128 terms stays within 128 * 2^-24 (under 1e-5) of |x|^2 + |c|^2
REPAIR_ROUNDING = 1e-4
#: chunks after which the repair hands the memory they freed back to the operating system
REPAIR_TRIM_EVERY = 16
#: the C library, for malloc_trim (None where there is none to load)
_C_LIBRARY = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _return_freed_memory() -> None:
    """Hand freed memory back to the operating system where the C library can (glibc's
    ``malloc_trim``). A chunk's temporaries (its float32 rows, their distances, the search's
    per-thread arrays) come in sizes that differ chunk to chunk; glibc keeps what they free for
    reuse, and on 10,000 images the heap grew by 0.57 GB over the repair's 312 chunks, past the
    fit's peak. Trimming after every chunk held the repair to the memory it started with."""
    trim = getattr(_C_LIBRARY, "malloc_trim", None)
    if trim is not None:
        trim(0)


class _Reach:
    """Which rows may lie within ``radius`` of some centre: every row that does, and at most a few
    more (within the matrix product's rounding) when there are few centres."""

    def __init__(self, centres: torch.Tensor, radius: float) -> None:
        self.centres, self.radius = centres, radius
        self.index = NearestNeighbourIndex(centres) if len(centres) > REPAIR_PRODUCT_CENTRES else None
        self.norms = centres.square().sum(dim=1)

    def within(self, rows: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            return self.index.search(rows, 1)[0][:, 0] <= self.radius
        row_norms = rows.square().sum(dim=1)
        squared = torch.addmm(self.norms[None, :], rows, self.centres.T, alpha=-2.0).add_(row_norms[:, None])
        return squared.amin(dim=1) - REPAIR_ROUNDING * (row_norms + self.norms.max()) <= self.radius * self.radius


def repair_coreset(points: torch.Tensor, picks: torch.Tensor, removed: np.ndarray, radius: float, chunk_rows: int = 1 << 15) -> torch.Tensor:
    """The coreset ``picks`` (rows of ``points``, increasing) without the ``removed`` rows, with new
    picks among the others until every row not removed is again within ``radius`` of a pick.

    Only the rows within ``radius`` of a removed pick can have lost their cover (every row was
    within ``radius`` of some pick), and of them only those no kept pick covers; the farthest of
    those is picked, greedily, as :func:`greedy_coreset` would: the coverage the first selection
    guaranteed, without selecting it again over all the rows, in memory for the lost rows only.
    """
    removed_rows = torch.from_numpy(removed)
    dropped, kept = picks[removed_rows[picks]], picks[~removed_rows[picks]]
    if len(dropped) == 0:
        return picks
    near_kept = NearestNeighbourIndex(points[kept].float()) if len(kept) else None
    # The rows within reach of a dropped pick: for a few picks by one matrix product a chunk,
    # widened by its rounding so that none is missed (the search's cells and threads would hold
    # more memory than the product: 10,000 images, 21 picks dropped, 0.23 against 0.13 GB); for
    # many by the search, whose bounds then pay. The kept picks' search decides which lost cover.
    near_dropped = _Reach(points[dropped].float(), radius)
    if near_dropped.index is None:  # the product's distances: at most REPAIR_CHUNK_ELEMENTS a chunk
        chunk_rows = max(1, min(chunk_rows, REPAIR_CHUNK_ELEMENTS // len(dropped)))
    uncovered, nearest_kept = [], []
    for number, start in enumerate(range(0, len(points), chunk_rows)):  # float32 a chunk at a time: the projection stays float16
        if number % REPAIR_TRIM_EVERY == REPAIR_TRIM_EVERY - 1:
            _return_freed_memory()
        chunk = points[start : start + chunk_rows].float()
        near_a_dropped = near_dropped.within(chunk) & ~removed_rows[start : start + chunk_rows]
        rows = torch.nonzero(near_a_dropped)[:, 0]
        # Only rows that no kept pick covers either need a new one: keeping just them holds the
        # repair's memory to what was lost, not to the (large) ball around each dropped pick.
        nearest = near_kept.search(chunk[rows], 1)[0][:, 0] if near_kept is not None else torch.full((len(rows),), float("inf"))
        lost = nearest > radius
        uncovered.append(rows[lost] + start)
        nearest_kept.append(nearest[lost])
    candidates, nearest = torch.cat(uncovered), torch.cat(nearest_kept)
    if len(candidates) == 0:
        return kept
    candidate_points = points[candidates].float()
    added = []
    while True:
        farthest = int(torch.argmax(nearest))
        if float(nearest[farthest]) <= radius:
            break
        added.append(int(candidates[farthest]))
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(candidate_points - candidate_points[farthest], dim=1))
    return torch.sort(torch.cat([kept, torch.tensor(added, dtype=kept.dtype)])).values
