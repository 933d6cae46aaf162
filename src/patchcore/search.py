"""Nearest neighbours in the memory bank, and the image score of the paper's eq. 7."""

from __future__ import annotations

import faiss
import numba
import numpy as np
import torch

from .coreset import _squared_distance


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


#: relative rounding allowance of a lower bound, against the squared lengths it is computed from:
#: float32 rounding of |q|^2 - 2 q.b + |b|^2 over k + 1 terms stays far below 1e-5 of them
BOUND_ALLOWANCE = 1e-5


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
        best = _squared_distance(bank, where, query)
        count = 1
        for j in range(row.shape[0]):
            # d(q, j)^2 >= bound - allowance > best: j cannot be nearer (kept exact: no ties lost).
            if j != where and (j < skip_start or j >= skip_stop) and row[j] - allowance[q] <= best:
                distance = _squared_distance(bank, j, query)
                count += 1
                if distance < best or (distance == best and j < where):
                    best, where = distance, j
        nearest[q] = where
        measured[q] = count


class NearestNeighbourIndex:
    """L2 nearest-neighbour search over the memory bank.

    ``exact`` (the default): on the CPU, each query's nearest entry is found by bounds from the
    bank's leading principal components (:class:`LowerBoundIndex`): every entry is bounded in a
    few dimensions and only those the bounds cannot rule out are measured in full, so the answer
    is the full scan's, at a fraction of its cost. Features narrower than
    :data:`BOUNDED_MIN_DIMS`, searches for k > 1 and ``bounds=False`` use the full scan, faiss's
    ``IndexFlatL2``. On a GPU a chunked matrix product in torch, so that no second GPU library
    is needed.

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
            self._faiss = faiss.IndexFlatL2(dims)
            self._faiss.add(self.bank.numpy())
            # Built on the first search that uses it, not when a model loads.
            self._bounds: LowerBoundIndex | None = None
            self._bounded = bounds and leading_components(dims) > 0
            #: queries searched by their bounds, and the bank entries measured in full for them
            self.queries_bounded = self.entries_measured = 0
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
        elif hasattr(self, "_faiss"):
            k = min(k, len(self))
            squared, indices = self._faiss.search(queries.numpy(), k)
            squared, indices = torch.from_numpy(squared), torch.from_numpy(indices)
            if self.kind == "ivf" and bool((indices < 0).any()):
                # The probed cells held fewer than k entries: repeat the nearest one found.
                missing = indices < 0
                squared = torch.where(missing, squared[:, :1], squared)
                indices = torch.where(missing, indices[:, :1], indices)
        else:
            squared, indices = matmul_search(self.bank, self._squared_norms, queries, min(k, len(self)), self._chunk_rows())
        return self._exact_distances(queries, indices.long())

    def _bounded_nearest(self, queries: torch.Tensor, exclude: tuple[int, int] | None = None) -> torch.Tensor:
        """Each query's nearest bank entry (Q, 1), exactly, measuring in full only the entries
        that the principal-component bounds cannot rule out (:class:`LowerBoundIndex`);
        entries ``exclude`` = (start, stop) left out."""
        start, stop = exclude if exclude is not None else (0, 0)
        if self._bounds is None:
            self._bounds = LowerBoundIndex(self.bank, leading_components(self.bank.shape[1]))
        nearest = np.empty(len(queries), dtype=np.int64)
        measured = np.empty(len(queries), dtype=np.int64)
        rows = max(1, BOUND_CHUNK_ELEMENTS // len(self))
        bank = self.bank.numpy()
        for first in range(0, len(queries), rows):
            chunk = queries[first : first + rows]
            bounds, allowance = self._bounds.bounds(chunk)
            _nearest_within_bounds(bounds.numpy(), allowance.numpy(), bank, chunk.numpy(), start, stop, nearest[first : first + rows], measured[first : first + rows])
        self.queries_bounded += len(queries)
        self.entries_measured += int(measured.sum())
        return torch.from_numpy(nearest)[:, None]

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
#: narrower features are searched by the full scan: at 128 dimensions (MobileNetV2) the bounds,
#: at a quarter of the width, cost as much as faiss's scan (benchmarks/search.py, "forced" column)
BOUNDED_MIN_DIMS = 4 * BOUND_COMPONENTS


def leading_components(dims: int) -> int:
    """Principal components the bounded search uses for features of ``dims``: 0 when it does not pay."""
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
