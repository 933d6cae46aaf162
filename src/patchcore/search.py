"""Nearest neighbours in the memory bank, and the image score of the paper's eq. 7."""

from __future__ import annotations

import faiss
import torch


INDEX_KINDS = ("exact", "ivf")


class NearestNeighbourIndex:
    """L2 nearest-neighbour search over the memory bank.

    ``exact`` (the default): on the CPU faiss's ``IndexFlatL2`` (blocked BLAS, bounded memory),
    on a GPU a chunked matrix product in torch, so that no second GPU library is needed.

    ``ivf`` (approximate, CPU): faiss's ``IndexIVFFlat``. The bank is split by k-means into about
    2 sqrt(M) cells and each query scans the :data:`IVF_PROBES` cells nearest to it. Patch
    features are tightly clustered, so this finds the exact nearest entry for nearly every patch
    (recall measured by ``benchmarks/speed.py``) at a fraction of the cost of a full scan.
    """

    #: distances per chunk on the GPU (2^27 floats = 512 MB): bounds the (queries, bank) matrix
    GPU_CHUNK_ELEMENTS = 2**27
    #: cells an approximate (IVF) query visits
    IVF_PROBES = 8

    def __init__(self, bank: torch.Tensor, kind: str = "exact") -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        self.bank = bank.float().contiguous()
        self.device = bank.device
        self.kind = kind
        dims = self.bank.shape[1]
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
        if exclude is not None:
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
        kept = len(self) - (stop - start)
        if kept < 1:
            raise ValueError("leaving those entries out leaves an empty memory bank")
        k = min(k, kept)
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
