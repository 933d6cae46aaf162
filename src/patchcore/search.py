"""Nearest neighbours in the memory bank, and the image score of the paper's eq. 7."""

from __future__ import annotations

from typing import Callable

import faiss
import numba
import numpy as np
import torch

from .kernels import squared_distance, start_compiled_threads
from .maps import anomaly_maps


INDEX_KINDS = ("exact", "ivf")


class LowerBoundIndex:
    """Lower bounds of the squared distances from queries to every bank entry, from
    the bank's leading principal components.

    Rotated onto the bank's principal axes (an orthonormal basis: distances do not change), a
    vector splits into its ``k`` leading coordinates x_k and the rest x_r, and

        ||q - b||^2 = ||q_k - b_k||^2 + ||q_r - b_r||^2 >= ||q_k - b_k||^2 + (|q_r| - |b_r|)^2,

    the squared distance between the (k + 1)-vectors [q_k, |q_r|] and [b_k, |b_r|]: one matrix
    product in k + 1 dimensions bounds every entry. Patch features keep most of their spread in
    few components, so the bound is tight: only the few entries whose bound is below the best
    distance found so far need measuring in full, and the nearest is certain.
    """

    def __init__(self, bank: torch.Tensor, components: int) -> None:
        self.mean = bank.double().mean(dim=0)
        centred = bank.float() - self.mean.float()
        # Principal axes: eigenvectors of the scatter matrix, largest variance first. Any
        # orthonormal axes give true bounds (float64 eigh keeps them orthonormal); the leading
        # ones of the data give tight ones, and float32 is plenty to find those.
        _, vectors = torch.linalg.eigh((centred.T @ centred).double())
        self.axes = vectors.flip(dims=[1])[:, :components].contiguous()
        self.reduced_bank = self.reduce(bank)
        self.bank_norms = self.reduced_bank.square().sum(dim=1)
        self.points = bank.float().contiguous().numpy()  # measured in full, for the few not ruled out

    def reduce(self, vectors: torch.Tensor) -> torch.Tensor:
        """[x_k, |x_r|] in float32, computed in float64 (|x_r|^2 = |x|^2 - |x_k|^2, Pythagoras)."""
        centred = vectors.double() - self.mean
        leading = centred @ self.axes
        rest = (centred.square().sum(dim=1) - leading.square().sum(dim=1)).clamp_(min=0).sqrt_()
        return torch.cat([leading, rest[:, None]], dim=1).float()

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, M) lower bounds, and each query's rounding allowance: the bounds are float32 from
        |q|^2 - 2 q.b + |b|^2, trusted only to within :data:`BOUND_ALLOWANCE` of those lengths."""
        reduced = self.reduce(queries)
        norms = reduced.square().sum(dim=1)
        bounds = torch.addmm(self.bank_norms[None, :], reduced, self.reduced_bank.T, alpha=-2.0).add_(norms[:, None])
        return bounds, BOUND_ALLOWANCE * (norms + self.bank_norms.max())

    def nearest(self, queries: torch.Tensor, skip: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Each query's nearest bank row (entries ``skip`` = (start, stop) left out) and how many
        entries it measured in full."""

        def search(chunk: torch.Tensor, nearest: np.ndarray, measured: np.ndarray) -> None:
            bounds, allowance = self.bounds(chunk)
            _nearest_within_bounds(bounds.numpy(), allowance.numpy(), self.points, chunk.numpy(), *skip, nearest, measured)

        return _in_chunks(queries, max(1, BOUND_CHUNK_ELEMENTS // len(self.points)), search)


#: relative rounding allowance of a lower bound, against the squared lengths it is computed from:
#: float32 rounding of |q|^2 - 2 q.b + |b|^2 over k + 1 terms stays far below 1e-5 of them
BOUND_ALLOWANCE = 1e-5


class ScanBounds:
    """The full scan as bounds: every squared distance by one blocked matrix product,
    |q|^2 - 2 q.b + |b|^2 in float32, then measured again from the differences for the few
    entries within the product's rounding of the smallest (the lowest row on a tie, as the
    bounded searches). Where the patches are alike (uniform surfaces), the cell and principal
    bounds rule out little and measuring entry by entry costs several times this scan: the index
    switches to it (:data:`SCAN_SHARE`). The answers are the same either way."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank.float().contiguous()
        self.norms = self.bank.square().sum(dim=1)
        # float32 rounding of a d-term dot product stays within d * 2^-24 of sum |q_i b_i|,
        # itself at most (|q|^2 + |b|^2) / 2: twice that, and never below the bounds' allowance
        self.relative = max(BOUND_ALLOWANCE, self.bank.shape[1] * 2.0**-23)
        self.points = self.bank.numpy()

    def nearest(self, queries: torch.Tensor, skip: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        def search(chunk: torch.Tensor, nearest: np.ndarray, measured: np.ndarray) -> None:
            norms = chunk.square().sum(dim=1)
            distances = torch.addmm(self.norms[None, :], chunk, self.bank.T, alpha=-2.0).add_(norms[:, None])
            allowance = self.relative * (norms + self.norms.max())
            _nearest_within_bounds(distances.numpy(), allowance.numpy(), self.points, chunk.numpy(), *skip, nearest, measured)

        return _in_chunks(queries, max(1, BOUND_CHUNK_ELEMENTS // len(self.points)), search)


@numba.njit(parallel=True, cache=True)
def _nearest_within_bounds(bounds, allowance, bank, queries, skip_start, skip_stop, nearest, measured):  # pragma: no cover - compiled
    """Each query's nearest entry, entries skip_start..skip_stop-1 left out: start from the entry
    of lowest bound, then measure in full only the entries whose bound (less the allowance) does
    not exceed the best distance so far."""
    for q in numba.prange(bounds.shape[0]):
        row, query = bounds[q], queries[q]
        where = -1
        for j in range(row.shape[0]):
            if (j < skip_start or j >= skip_stop) and (where < 0 or row[j] < row[where]):
                where = j
        best = squared_distance(bank, where, query)
        count = 1
        for j in range(row.shape[0]):
            # d(q, j)^2 >= bound - allowance > best: j cannot be nearer (kept exact: no ties lost).
            if j != where and (j < skip_start or j >= skip_stop) and row[j] - allowance[q] <= best:
                distance = squared_distance(bank, j, query)
                count += 1
                if distance < best or (distance == best and j < where):
                    best, where = distance, j
        nearest[q] = where
        measured[q] = count


class CellBoundIndex:
    """Lower bounds of the distances from queries to bank entries, from k-means cells of the
    bank and the triangle inequality.

    The bank is split by k-means into cells, and each entry b keeps r_b = |b - c|, its distance
    to its cell's centre c. For a query q,

        |q - b| >= | |q - c| - r_b |,

    so an entry can be nearer than the best distance found so far only if r_b lies within that
    distance of |q - c|, and a cell only if |q - c| less its largest r_b is below it. Entries are
    stored cell by cell in increasing r_b, so in each cell it cannot rule out a query reads only
    the run of entries around |q - c|. Patch features lie much closer to their nearest bank entry
    than the cells are wide, so a query measures a few hundred entries of tens of thousands.
    Nothing is approximated: the bounds are true (less rounding allowances), so the nearest entry
    found is the one a full scan finds.
    """

    def __init__(self, bank: torch.Tensor) -> None:
        points = bank.float().contiguous().numpy()
        count, dims = points.shape
        # About sqrt(M) cells (each cell costs every query one centre distance, and smaller cells
        # rule out more entries); faiss asks for at least 39 points per cell. Where the centres
        # lie changes only how many entries are measured, never the answer.
        cells = max(1, min(round(CELLS_PER_ROOT * count**0.5), count // 39))
        kmeans = faiss.Kmeans(dims, cells, niter=10, seed=1, max_points_per_centroid=64)
        kmeans.train(points)
        centres = kmeans.centroids
        _, assigned = faiss.knn(points, centres, 1)
        cell = assigned[:, 0]
        radius = np.empty(count, dtype=np.float64)
        for first in range(0, count, 65536):  # in float64, a block at a time
            block = slice(first, first + 65536)
            radius[block] = np.sqrt(np.square(points[block].astype(np.float64) - centres[cell[block]]).sum(axis=1))
        order = np.lexsort((radius, cell))
        #: bank row of each stored entry, and the entries, cell by cell in increasing radius
        self.original = order.astype(np.int64)
        self.points = np.ascontiguousarray(points[order])
        self.radii = radius[order].astype(np.float32)
        self.cell_starts = np.searchsorted(cell[order], np.arange(cells + 1)).astype(np.int64)
        # A cell's largest radius is its last entry's; an empty cell gets -inf, so it is never read.
        ends = self.cell_starts[1:]
        self.cell_radii = np.where(ends > self.cell_starts[:-1], self.radii[np.maximum(ends - 1, 0)], -np.inf).astype(np.float32)
        self.centres = torch.from_numpy(centres)
        self.centre_norms = self.centres.square().sum(dim=1)

    def nearest(self, queries: torch.Tensor, skip: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Each query's nearest bank row (entries ``skip`` = (start, stop) left out) and how many
        entries it measured; -1 for a query that measured more than :data:`RESCAN_FRACTION` of
        the bank before its bounds closed in, which the caller finishes by the full scan."""
        limit = int(RESCAN_FRACTION * len(self.points))

        def search(chunk: torch.Tensor, nearest: np.ndarray, measured: np.ndarray) -> None:
            norms = chunk.square().sum(dim=1)
            # Squared distances to the centres in float32 by |q|^2 - 2 q.c + |c|^2, trusted to
            # within BOUND_ALLOWANCE of those lengths (as LowerBoundIndex's bounds).
            centre_distances = torch.addmm(self.centre_norms[None, :], chunk, self.centres.T, alpha=-2.0).add_(norms[:, None])
            allowance = BOUND_ALLOWANCE * (norms + self.centre_norms.max())
            _nearest_in_cells(
                centre_distances.numpy(), allowance.numpy(), self.cell_starts, self.cell_radii, self.radii, self.points, self.original,
                chunk.numpy(), *skip, limit, nearest, measured,
            )

        return _in_chunks(queries, max(1, BOUND_CHUNK_ELEMENTS // len(self.centres)), search)


def _in_chunks(queries: torch.Tensor, rows: int, search: Callable[[torch.Tensor, np.ndarray, np.ndarray], None]) -> tuple[np.ndarray, np.ndarray]:
    """``search(chunk, nearest, measured)`` over ``rows`` queries at a time (their bounds take
    memory per query), filling one array of nearest rows and one of entries measured."""
    nearest = np.empty(len(queries), dtype=np.int64)
    measured = np.empty(len(queries), dtype=np.int64)
    for first in range(0, len(queries), rows):
        part = slice(first, first + rows)
        search(queries[part], nearest[part], measured[part])
    return nearest, measured


#: a best distance is widened by this relative margin before entries are ruled out by it: the
#: float32 distances and radii it is compared with are rounded far below it
REACH_MARGIN = 1e-4
#: k-means cells per square root of the bank size
CELLS_PER_ROOT = 2.0


@numba.njit(inline="always")
def _measure_run(points, original, radii, query, start, stop, step, low, high, skip_start, skip_stop, best, reach, where, count):  # pragma: no cover - compiled
    """Measure a cell's entries from ``start`` towards ``stop`` (radii rising for step 1, falling
    for -1) until the triangle bound passes ``reach``; returns the updated best."""
    for j in range(start, stop, step):
        radius = radii[j]
        if (radius - high if step > 0 else low - radius) > reach:
            break  # this entry's bound passes the reach, and every later one's is larger
        row = original[j]
        if row >= skip_start and row < skip_stop:
            continue
        distance = squared_distance(points, j, query)
        count += 1
        if distance < best or (distance == best and row < where):
            best, where = distance, row
            reach = np.sqrt(best) * (1.0 + REACH_MARGIN)
    return best, reach, where, count


@numba.njit(parallel=True, cache=True)
def _nearest_in_cells(centre_distances, allowance, cell_starts, cell_radii, radii, points, original, queries, skip_start, skip_stop, limit, nearest, measured):  # pragma: no cover - compiled
    """Each query's nearest entry by :class:`CellBoundIndex`'s bounds: its nearest centre's cell
    first (a close first best rules out most cells), then every cell the bounds cannot rule out."""
    cells = cell_starts.shape[0] - 1
    for q in numba.prange(queries.shape[0]):
        query, row = queries[q], centre_distances[q]
        low = np.empty(cells, dtype=np.float32)  # |q - c| less and plus its rounding allowance
        high = np.empty(cells, dtype=np.float32)
        first = 0
        for c in range(cells):
            low[c] = np.sqrt(max(row[c] - allowance[q], 0.0))
            high[c] = np.sqrt(row[c] + allowance[q])
            if row[c] < row[first]:
                first = c
        best, reach, where, count = np.inf, np.inf, -1, 0
        for step in range(cells + 1):
            c = first if step == 0 else step - 1
            if (step > 0 and c == first) or low[c] - cell_radii[c] > reach:
                continue
            start, stop = cell_starts[c], cell_starts[c + 1]
            middle = start + np.searchsorted(radii[start:stop], low[c])
            best, reach, where, count = _measure_run(points, original, radii, query, middle, stop, 1, low[c], high[c], skip_start, skip_stop, best, reach, where, count)
            best, reach, where, count = _measure_run(points, original, radii, query, middle - 1, start - 1, -1, low[c], high[c], skip_start, skip_stop, best, reach, where, count)
            if count > limit:
                where = -1  # far from everything: the full scan measures faster
                break
        nearest[q] = where
        measured[q] = count


@numba.njit(cache=True)
def _nearest_candidates(bank, queries, candidates, nearest):  # pragma: no cover - compiled
    """Each query's nearest of its candidate rows, by the bounded searches' own distance."""
    for q in range(queries.shape[0]):
        best, where = np.inf, -1
        for row in candidates[q]:
            distance = squared_distance(bank, row, queries[q])
            if distance < best or (distance == best and row < where):
                best, where = distance, row
        nearest[q] = where


class NearestNeighbourIndex:
    """L2 nearest-neighbour search over the memory bank.

    ``exact`` (the default): on the CPU, each query's nearest entry is found by lower bounds, and
    only the entries the bounds cannot rule out are measured in full, so the answer is the full
    scan's at a fraction of its cost. Features of :data:`BOUNDED_MIN_DIMS` dimensions or more
    (Wide ResNet-50) are bounded from the bank's leading principal components
    (:class:`LowerBoundIndex`), narrower ones (MobileNetV2) from k-means cells and the triangle
    inequality (:class:`CellBoundIndex`). Searches for k > 1 and ``bounds=False`` use the full
    scan, faiss's brute-force ``knn``. On a GPU a chunked matrix product in torch, so that no
    second GPU library is needed.

    ``ivf`` (approximate, CPU): faiss's ``IndexIVFFlat``. The bank is split by k-means into about
    2 sqrt(M) cells and each query scans the :data:`IVF_PROBES` cells nearest to it. Patch
    features are tightly clustered, so this finds the exact nearest entry for nearly every patch
    (recall measured by ``benchmarks/speed.py``) at a fraction of the cost of a full scan.
    """

    #: distances per chunk on the GPU (2^27 floats = 512 MB): bounds the (queries, bank) matrix
    GPU_CHUNK_ELEMENTS = 2**27
    #: cells an approximate (IVF) query visits
    IVF_PROBES = 8

    def __init__(self, bank: torch.Tensor, kind: str = "exact", bounds: bool = True) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        self.bank = bank.float().contiguous()
        self.device = bank.device
        self.kind = kind
        dims = self.bank.shape[1]
        self._bounded = False
        if kind == "ivf":
            if self.device.type != "cpu":
                raise ValueError("the approximate (ivf) index runs on the CPU only; use the exact index on a GPU")
            # faiss asks for at least 39 training points per cell.
            cells = max(1, min(int(2 * len(self.bank) ** 0.5), len(self.bank) // 39))
            self._faiss = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, cells)
            self._faiss.train(self.bank.numpy())  # k-means with faiss's fixed seed: deterministic
            self._faiss.nprobe = min(self.IVF_PROBES, cells)
            self._faiss.add(self.bank.numpy())
        elif self.device.type == "cpu":
            # Built on the first search that uses it, not when a model loads.
            self._bounds: LowerBoundIndex | CellBoundIndex | ScanBounds | None = None
            self._bounded = bounds
            #: queries searched by their bounds, the bank entries measured in full for them, and
            #: those of the cell bounds that were finished by the full scan
            self.queries_bounded = self.entries_measured = self.queries_rescanned = 0
            #: whether the bounds gave way to the scan (:class:`ScanBounds`, :data:`SCAN_SHARE`)
            self.scanning = False
            #: queries still to be scanned without building the bounds (:meth:`expect`), and
            #: those scanned so (a loop of one-image predicts builds the bounds once they pay)
            self._scan_before_bounds = self._scanned_before_bounds = 0
        else:
            self._squared_norms = self.bank.square().sum(dim=1)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: torch.Tensor, k: int = 1, exclude: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank entries of each query: (distances, indices), both (Q, k), nearest first.

        Each distance depends on its query and bank entry only, never on the other queries.

        ``exclude`` = (start, stop) leaves the bank entries start..stop-1 out, exactly: how a
        training image is scored against the bank without its own entries (leave-one-image-out).
        Indices still count in the whole bank.
        """
        queries = queries.to(self.device, torch.float32).contiguous()
        if exclude is not None and len(self) - (exclude[1] - exclude[0]) < 1:
            raise ValueError("leaving those entries out leaves an empty memory bank")
        if k == 1 and self._bounded:
            indices = self._bounded_nearest(queries, exclude)
        elif exclude is not None:
            squared, indices = self._search_excluding(queries, k, *exclude)
        elif self.device.type == "cpu":
            k = min(k, len(self))
            if self.kind == "ivf":
                squared, indices = self._faiss.search(queries.numpy(), k)
            else:  # faiss's brute force on the bank itself: no second copy of it
                squared, indices = faiss.knn(queries.numpy(), self.bank.numpy(), k)
            squared, indices = torch.from_numpy(squared), torch.from_numpy(indices)
            if self.kind == "ivf" and bool((indices < 0).any()):
                # The probed cells held fewer than k entries: repeat the nearest one found.
                missing = indices < 0
                squared = torch.where(missing, squared[:, :1], squared)
                indices = torch.where(missing, indices[:, :1], indices)
        else:
            squared, indices = matmul_search(self.bank, self._squared_norms, queries, min(k, len(self)), self._chunk_rows())
        return self._exact_distances(queries, indices.long())

    def expect(self, queries: int) -> None:
        """Say how many queries are coming (a hint; the answers never change). Fewer than
        :data:`BOUNDS_PAY_AFTER` are scanned, without building the bounds: a one-image predict does
        not pay the cells' k-means (0.9 s on bottle's bank, against 0.11 s to scan 784 patches'
        queries). The queries scanned so count against that limit, hint after hint, and the first
        search beyond it builds the bounds, as every search does unasked."""
        if self._bounded and self._bounds is None:
            fits = self._scanned_before_bounds + queries < BOUNDS_PAY_AFTER
            self._scan_before_bounds = queries if fits else 0

    def _bounded_nearest(self, queries: torch.Tensor, exclude: tuple[int, int] | None = None) -> torch.Tensor:
        """Each query's nearest bank entry (Q, 1), exactly, measuring in full only the entries
        that the bounds cannot rule out; entries ``exclude`` = (start, stop) left out."""
        start, stop = exclude if exclude is not None else (0, 0)
        start_compiled_threads()
        if self._bounds is None and len(queries) <= self._scan_before_bounds:
            # Few queries expected: the scan answers them (the same answers), and the bounds'
            # counters stay theirs. The scan keeps no more than the bank's norms.
            self._scan_before_bounds -= len(queries)
            self._scanned_before_bounds += len(queries)
            return torch.from_numpy(ScanBounds(self.bank).nearest(queries, (start, stop))[0])[:, None]
        if self._bounds is None:
            components = leading_components(self.bank.shape[1])
            self._bounds = LowerBoundIndex(self.bank, components) if components else CellBoundIndex(self.bank)
        nearest, measured = self._bounds.nearest(queries, (start, stop))
        # A query far from every entry (a foreign image) would measure much of the bank one entry
        # at a time: the cell bounds give it up (-1) and faiss's blocked scan finishes it.
        rescan = np.flatnonzero(nearest < 0)
        if len(rescan):
            nearest[rescan] = self._rescan(queries[rescan], exclude)
            self.queries_rescanned += len(rescan)
        self.queries_bounded += len(queries)
        self.entries_measured += int(measured.sum())
        if not self.scanning:
            self._scan_if_bounds_do_not_pay()
        return torch.from_numpy(nearest)[:, None]

    def _scan_if_bounds_do_not_pay(self) -> None:
        """After :data:`SCAN_AFTER_QUERIES` queries, switch to the scan for good if the bounds
        have measured more than :data:`SCAN_SHARE` of the bank per query (the counts so far are
        all the bounds': the scan has not been used yet)."""
        if self.queries_bounded >= SCAN_AFTER_QUERIES and self.entries_measured > SCAN_SHARE * len(self) * self.queries_bounded:
            self._bounds, self.scanning = ScanBounds(self.bank), True

    def _rescan(self, queries: torch.Tensor, exclude: tuple[int, int] | None) -> np.ndarray:
        """Each query's nearest bank row by the full scan: faiss's few nearest candidates, of
        which the nearest measured as the bounded search measures (the lowest row on a tie).

        faiss ranks by |q|^2 - 2 q.b + |b|^2 in float32, with a rounding that depends on how many
        queries come together, and whether a query is rescanned depends on the order its cells
        were read in: measured again, the answer is the bounded search's, whichever path it took."""
        count = min(RESCAN_CANDIDATES, len(self))  # _search_excluding takes at most the entries kept
        if exclude is not None:
            candidates = self._search_excluding(queries, count, *exclude)[1].numpy()
        else:
            candidates = faiss.knn(queries.numpy(), self.bank.numpy(), count)[1]
        nearest = np.empty(len(queries), dtype=np.int64)
        _nearest_candidates(self.bank.numpy(), queries.numpy(), np.ascontiguousarray(candidates, dtype=np.int64), nearest)
        return nearest

    def _exact_distances(self, queries: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances to the entries found, computed again as ||q - b||, nearest first.

        The searches rank by |q|^2 - 2 q.b + |b|^2, whose float32 rounding depends on how the
        matrix product is blocked, and so on how many queries came together: an image's score
        would change in the fifth digit with the images batched beside it. Taken directly from
        the difference, each distance depends on its query and entry alone (and is more exact).
        """
        distances = torch.linalg.vector_norm(self.bank[indices] - queries[:, None, :], dim=2)
        if indices.shape[1] > 1:
            distances, order = distances.sort(dim=1, stable=True)
            indices = torch.gather(indices, 1, order)
        return distances, indices

    def _search_excluding(self, queries: torch.Tensor, k: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in the bank without entries start..stop-1 (squared distances)."""
        k = min(k, len(self) - (stop - start))
        if self.device.type != "cpu":
            return matmul_search(self.bank, self._squared_norms, queries, k, self._chunk_rows(), exclude=(start, stop))
        # On the CPU: faiss's brute-force search (the same BLAS kernel as IndexFlatL2) on the two
        # kept slices of the bank, which are views, then the k best of both.
        parts = []
        for first, last in ((0, start), (stop, len(self))):
            if last > first:
                squared, found = faiss.knn(queries.numpy(), self.bank[first:last].numpy(), min(k, last - first))
                parts.append((torch.from_numpy(squared), torch.from_numpy(found) + first))
        squared = torch.cat([p[0] for p in parts], dim=1)
        indices = torch.cat([p[1] for p in parts], dim=1)
        squared, order = torch.topk(squared, k, dim=1, largest=False)
        return squared, torch.gather(indices, 1, order)

    def _chunk_rows(self) -> int:
        return max(1, self.GPU_CHUNK_ELEMENTS // len(self))


#: bounds per chunk of queries (2^24 floats = 64 MB)
BOUND_CHUNK_ELEMENTS = 2**24


#: principal components the bounds use (Wide ResNet-50's 1536-d features: 12x fewer dimensions)
BOUND_COMPONENTS = 128
#: narrower features are bounded by k-means cells instead: at 128 dimensions (MobileNetV2) the
#: principal bounds, at a quarter of the width, cost as much as faiss's full scan
#: (benchmarks/search.py, "principal bounds" column)
BOUNDED_MIN_DIMS = 4 * BOUND_COMPONENTS
#: a cell-bounded query that has measured more than this share of the bank is finished by the
#: full scan, whose blocked matrix product measures entries several times faster. On real images,
#: even of another product, hardly a query gets there (a rescan costs a small-batch scan, which
#: made 1/8 slower than 1/2 on every shared set); it bounds a query far from everything.
RESCAN_FRACTION = 0.5
#: candidates the full scan hands back for such a query, measured again from the differences
RESCAN_CANDIDATES = 8
#: the bounds give way to the scan (ScanBounds) once they have measured more than this share of
#: the bank per query: measuring entry by entry costs about 12x an entry of the blocked scan
#: (generated long strips, square mode, MobileNetV2: the cell bounds measured 2,924 of 6,144
#: entries a query in 56 ms an image, the scan all of them in 8 ms), so past 1/12 the scan is
#: faster; on bottle the bounds measure 3% (607 of 21,238) and are kept
SCAN_SHARE = 1 / 12
#: queries the bounds answer before that is judged (a 32 x 32 image's patches)
SCAN_AFTER_QUERIES = 1024
#: fewer queries than this, expected in all (NearestNeighbourIndex.expect), are scanned rather
#: than paying to build the bounds: on bottle's bank (21,238 x 128) the cells' k-means took 0.9 s
#: and the scan 0.11 s more than the cells a 784-query image, so building pays after about 6,000
#: queries; both grow with the bank. 4,096 is four 32 x 32 images.
BOUNDS_PAY_AFTER = 4096


def leading_components(dims: int) -> int:
    """Principal components the bounded search uses for features of ``dims``: 0 when the cell bounds are used instead."""
    return BOUND_COMPONENTS if dims >= BOUNDED_MIN_DIMS else 0


def matmul_search(
    bank: torch.Tensor, squared_norms: torch.Tensor, queries: torch.Tensor, k: int, rows: int, exclude: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest squared distances by |q|^2 - 2 q.b + |b|^2, ``rows`` queries at a time;
    bank entries ``exclude`` = (start, stop) are left out."""
    distances, indices = [], []
    for chunk in queries.split(rows):
        squared = torch.addmm(squared_norms[None, :], chunk, bank.T, alpha=-2.0)
        squared += chunk.square().sum(dim=1, keepdim=True)
        if exclude is not None:
            squared[:, exclude[0] : exclude[1]] = float("inf")
        values, found = torch.topk(squared, k, dim=1, largest=False)
        distances.append(values)
        indices.append(found)
    return torch.cat(distances), torch.cat(indices)


def reweighted_image_scores(
    index: NearestNeighbourIndex,
    features: torch.Tensor,
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    num_neighbors: int,
    exclude: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Image scores by eq. 7: the largest patch score, damped when its nearest bank entry is itself unusual.

    For each image, take the test patch m_test* with the largest score s*, its nearest bank entry
    m*, and the ``num_neighbors`` bank entries N_b(m*) nearest to m* (m* included). Then

        s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(||m_test* - m||)) * s*

    The weight is large when m_test* is far from all of m*'s neighbourhood (a real anomaly) and
    small when m* sits in a dense, well-covered region. ``features`` is (B, P, D),
    ``patch_scores`` and ``nearest`` are (B, P). With ``exclude``, N_b(m*) is taken in the bank
    without those entries (leave-one-image-out scoring).
    """
    batch = torch.arange(features.shape[0])
    worst = patch_scores.argmax(dim=1)
    top_scores = patch_scores[batch, worst]
    if num_neighbors <= 1:  # N_b(m*) = {m*}: the weight is always 0, so eq. 7 is off
        return top_scores
    worst_features = features[batch, worst].to(index.device, torch.float32)
    _, neighbourhoods = index.search(index.bank[nearest[batch, worst].to(index.device)], num_neighbors, exclude=exclude)
    distances = torch.linalg.vector_norm(index.bank[neighbourhoods] - worst_features[:, None, :], dim=2)
    # exp(s*) / sum exp(d) computed as exp(s* - logsumexp(d)) so that large distances don't overflow.
    weights = 1.0 - torch.exp(top_scores.to(distances) - torch.logsumexp(distances, dim=1))
    return (weights * top_scores.to(distances)).cpu()


@torch.inference_mode()
def score_patches(
    index: NearestNeighbourIndex, features: torch.Tensor, input_hw: tuple[int, int], num_neighbors: int, exclude: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (B,) and anomaly maps (B, H, W) from patch features (B, h, w, D) of inputs of ``input_hw``.

    Each patch's score is its distance to the nearest bank entry; the image's is the largest,
    re-weighted by eq. 7; the map is the patch scores upsampled and blurred (``maps.py``).
    ``exclude`` leaves a run of bank entries out of every search (leave-one-image-out).
    """
    size, grid = features.shape[0], features.shape[1:3]
    flat = features.reshape(size, -1, features.shape[-1])
    distances, nearest = index.search(flat.reshape(-1, flat.shape[-1]), k=1, exclude=exclude)
    patch_scores = distances[:, 0].reshape(size, -1)
    image_scores = reweighted_image_scores(index, flat, patch_scores, nearest[:, 0].reshape(size, -1), num_neighbors, exclude)
    maps = anomaly_maps(patch_scores.reshape(size, *grid), input_hw)
    return image_scores.cpu().float(), maps.cpu()
