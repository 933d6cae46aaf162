"""Nearest-neighbour scores and eq. 7 against brute force."""

import math

import torch

from patchcore.search import NearestNeighbourIndex, reweighted_image_scores


def make_bank(rows=500, dims=24, seed=0):
    return torch.randn(rows, dims, generator=torch.Generator().manual_seed(seed))


def test_search_matches_brute_force():
    bank, queries = make_bank(), make_bank(300, seed=1)
    distances, indices = NearestNeighbourIndex(bank).search(queries, k=4)
    exact = torch.cdist(queries.double(), bank.double())
    expected_distances, expected_indices = exact.topk(4, dim=1, largest=False)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(distances.double(), expected_distances, atol=1e-4)


def test_a_bank_entry_is_its_own_nearest_at_distance_zero():
    bank = make_bank()
    distances, indices = NearestNeighbourIndex(bank).search(bank[:50], k=1)
    assert torch.equal(indices[:, 0], torch.arange(50))
    assert float(distances.max()) < 1e-3


def test_k_larger_than_bank_is_capped():
    distances, indices = NearestNeighbourIndex(make_bank(3)).search(make_bank(2, seed=9), k=9)
    assert distances.shape == (2, 3) and indices.shape == (2, 3)


def brute_force_eq7(bank, features, b):
    """Eq. 7 written out per image with plain loops."""
    scores = []
    for image in features:
        distances = torch.cdist(image.double(), bank.double())
        nearest_distance, nearest = distances.min(dim=1)
        worst = int(nearest_distance.argmax())
        s_star = float(nearest_distance[worst])
        m_star = int(nearest[worst])
        neighbourhood = torch.cdist(bank[m_star][None].double(), bank.double())[0].topk(b, largest=False).indices
        denominator = sum(math.exp(float(torch.dist(image[worst].double(), bank[m].double()))) for m in neighbourhood)
        scores.append((1 - math.exp(s_star) / denominator) * s_star)
    return torch.tensor(scores, dtype=torch.float64)


def test_image_scores_follow_eq7():
    bank = make_bank(400, 8, seed=2)
    features = make_bank(3 * 64, 8, seed=3).reshape(3, 64, 8) * 1.5
    index = NearestNeighbourIndex(bank)
    distances, nearest = index.search(features.reshape(-1, 8), k=1)
    scores = reweighted_image_scores(index, features, distances[:, 0].reshape(3, 64), nearest[:, 0].reshape(3, 64), num_neighbors=9)
    assert torch.allclose(scores.double(), brute_force_eq7(bank, features, 9).double(), atol=1e-4)
    # The weight lies in (0, 1 - 1/b]: the image score is below the largest patch score.
    assert bool((scores < distances[:, 0].reshape(3, 64).max(dim=1).values).all())


def test_one_neighbour_gives_the_plain_largest_patch_score():
    bank = make_bank(100, 8)
    features = make_bank(2 * 16, 8, seed=5).reshape(2, 16, 8)
    index = NearestNeighbourIndex(bank)
    distances, nearest = index.search(features.reshape(-1, 8), k=1)
    patch = distances[:, 0].reshape(2, 16)
    scores = reweighted_image_scores(index, features, patch, nearest[:, 0].reshape(2, 16), num_neighbors=1)
    assert torch.equal(scores, patch.max(dim=1).values)


def test_the_gpu_matmul_search_matches_brute_force_in_small_chunks():
    from patchcore.search import matmul_search

    bank, queries = make_bank(), make_bank(70, seed=4)
    squared, indices = matmul_search(bank, bank.square().sum(dim=1), queries, 3, rows=16)
    expected = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(squared.clamp(min=0).sqrt().double(), expected.values, atol=1e-4)


def test_ivf_finds_the_exact_neighbour_on_clustered_data():
    generator = torch.Generator().manual_seed(6)
    centres = torch.randn(40, 16, generator=generator) * 5
    bank = centres[torch.randint(40, (4000,), generator=generator)] + 0.3 * torch.randn(4000, 16, generator=generator)
    queries = centres[torch.randint(40, (500,), generator=generator)] + 0.3 * torch.randn(500, 16, generator=generator)
    exact = NearestNeighbourIndex(bank, "exact").search(queries)[1][:, 0]
    approximate_index = NearestNeighbourIndex(bank, "ivf")
    assert approximate_index._faiss.nlist == 102 and approximate_index._faiss.nprobe == 8  # min(2 sqrt(4000), 4000 // 39)
    recall = float((approximate_index.search(queries)[1][:, 0] == exact).float().mean())
    assert recall >= 0.99


def test_unknown_index_kind():
    import pytest

    with pytest.raises(ValueError, match="unknown index 'hnsw'; choose one of: exact, ivf"):
        NearestNeighbourIndex(make_bank(), "hnsw")
