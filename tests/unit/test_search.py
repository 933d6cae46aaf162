"""Nearest-neighbour scores and eq. 7 against brute force."""

import math

import pytest
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
    assert float(distances.max()) == 0.0


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_distances_are_exact_and_do_not_depend_on_the_other_queries(kind):
    """Features far from the origin and close together, as patch features are: the |q|^2 - 2 q.b
    + |b|^2 ranking form loses digits there, and how many depends on the batch of queries."""
    generator = torch.Generator().manual_seed(3)
    centre = 40.0 * torch.randn(128, generator=generator)
    bank = centre + torch.randn(2000, 128, generator=generator)
    # 4,000 queries together take faiss's BLAS path, a few hundred its direct one
    queries = bank[torch.arange(4000) % 2000] + 0.05 * torch.randn(4000, 128, generator=generator)
    index = NearestNeighbourIndex(bank, kind)
    distances, indices = index.search(queries, k=3)
    exact = torch.linalg.vector_norm(bank.double()[indices] - queries.double()[:, None, :], dim=2)
    assert float(((distances.double() - exact).abs() / exact).max()) < 1e-6
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())  # still nearest first
    # The nearest entry is far clearer than the rounding, so its distance must not move with the batch.
    for rows in (slice(0, 1), slice(7, 20), slice(100, 400), slice(1000, 4000)):
        alone, alone_indices = index.search(queries[rows], k=1)
        assert torch.equal(alone[:, 0], distances[rows, 0]) and torch.equal(alone_indices[:, 0], indices[rows, 0])


def test_k_larger_than_bank_is_capped():
    distances, indices = NearestNeighbourIndex(make_bank(3)).search(make_bank(2, seed=9), k=9)
    assert distances.shape == (2, 3) and indices.shape == (2, 3)


def brute_force_eq7(bank, features, b, exclude=None):
    """Eq. 7 written out per image with plain loops; ``exclude`` = (start, stop) bank rows left out."""
    scores = []
    for image in features:
        distances = torch.cdist(image.double(), bank.double())
        if exclude is not None:
            distances[:, exclude[0] : exclude[1]] = math.inf
        nearest_distance, nearest = distances.min(dim=1)
        worst = int(nearest_distance.argmax())
        s_star = float(nearest_distance[worst])
        m_star = int(nearest[worst])
        around = torch.cdist(bank[m_star][None].double(), bank.double())[0]
        if exclude is not None:
            around[exclude[0] : exclude[1]] = math.inf
        neighbourhood = around.topk(b, largest=False).indices
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
    # m* is the nearest bank entry, so each of the b neighbours is at least s* away: every term of
    # the sum is >= exp(s*), the ratio lies in (0, 1/b] and the weight in [1 - 1/b, 1). The image
    # score is below the largest patch score, and not far below.
    top = distances[:, 0].reshape(3, 64).max(dim=1).values
    assert bool((scores < top).all()) and bool((scores >= (1 - 1 / 9) * top - 1e-5).all())


def eq7_inputs(bank: torch.Tensor, features: torch.Tensor) -> tuple[NearestNeighbourIndex, torch.Tensor, torch.Tensor]:
    """The index and the (B, P) patch scores and nearest entries that scoring hands to eq. 7."""
    index = NearestNeighbourIndex(bank)
    images, patches, dims = features.shape
    distances, nearest = index.search(features.reshape(-1, dims), k=1)
    return index, distances[:, 0].reshape(images, patches), nearest[:, 0].reshape(images, patches)


@pytest.mark.parametrize("b", [2, 3, 5, 9, 20])
def test_the_eq7_weight_lies_in_one_minus_one_over_b_to_one(b):
    # The weight is the image score over the largest patch score; checked against float64 eq. 7.
    bank = make_bank(300, 6, seed=14)
    features = 2.0 * make_bank(4 * 32, 6, seed=15).reshape(4, 32, 6)
    index, patch, nearest = eq7_inputs(bank, features)
    scores = reweighted_image_scores(index, features, patch, nearest, num_neighbors=b)
    expected = brute_force_eq7(bank, features, b)
    assert torch.allclose(scores.double(), expected, rtol=1e-5, atol=1e-6)
    weights = scores.double() / patch.max(dim=1).values.double()
    assert bool((weights >= 1 - 1 / b - 1e-6).all()) and bool((weights < 1).all())
    # Strictly inside here (no two neighbours tie): an unweighted score would sit on 1.
    assert float(weights.max()) < 1 - 1e-3


@pytest.mark.parametrize("b", [2, 4, 9])
def test_the_eq7_weight_is_one_minus_one_over_b_when_all_neighbours_are_equally_far(b):
    # Bank: r e_1 .. r e_9 (pairwise r sqrt 2 apart) and entries far away. A test patch at the
    # origin is r from each of the nine, so whichever is m*, its b nearest entries (itself and
    # b - 1 of the others) are all r from the patch: the sum is b exp(r) and s = (1 - 1/b) r.
    r = 2.0
    bank = torch.cat([r * torch.eye(9), 100.0 + make_bank(50, 9, seed=16)])
    features = torch.cat([torch.zeros(1, 9), bank[[3, 20, 41]]])[None]  # the others sit on bank entries: score 0
    index, patch, nearest = eq7_inputs(bank, features)
    assert patch[0].tolist() == [r, 0.0, 0.0, 0.0]
    scores = reweighted_image_scores(index, features, patch, nearest, num_neighbors=b)
    assert float(scores[0]) == pytest.approx((1 - 1 / b) * r, rel=1e-6)
    assert float(brute_force_eq7(bank, features, b)[0]) == pytest.approx((1 - 1 / b) * r, rel=1e-12)


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
    with pytest.raises(ValueError, match="unknown index 'hnsw'; choose one of: exact, ivf"):
        NearestNeighbourIndex(make_bank(), "hnsw")


# ---------------------------------------------------------------------------------------------
# Leave-one-image-out: the bank without one image's entries


def brute_force_excluding(bank, queries, k, start, stop):
    """k nearest in float64 over the bank rows outside [start, stop), indices in the whole bank."""
    distances = torch.cdist(queries.double(), bank.double())
    distances[:, start:stop] = math.inf
    return distances.topk(k, dim=1, largest=False)


@pytest.mark.parametrize("start, stop", [(0, 120), (200, 260), (380, 500), (250, 251)])
def test_search_excluding_a_run_matches_brute_force(start, stop):
    bank, queries = make_bank(), make_bank(300, seed=7)
    index = NearestNeighbourIndex(bank)
    distances, indices = index.search(queries, k=9, exclude=(start, stop))
    expected = brute_force_excluding(bank, queries, 9, start, stop)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(distances.double(), expected.values, atol=1e-4)
    assert not bool(((indices >= start) & (indices < stop)).any())


def test_search_excluding_finds_what_the_left_out_entries_hid():
    # Queries that are bank entries: without exclusion each finds itself at distance 0; with its
    # own run left out it must find the nearest other entry, as brute force does.
    bank = make_bank(400, 16, seed=8)
    index = NearestNeighbourIndex(bank)
    own = bank[100:150]
    distances, indices = index.search(own, k=1, exclude=(100, 150))
    expected = brute_force_excluding(bank, own, 1, 100, 150)
    assert torch.equal(indices, expected.indices)
    assert float(distances.min()) > 1.0  # nothing found at distance 0: the entries themselves are out
    plain = index.search(own, k=1)
    assert torch.equal(plain[1][:, 0], torch.arange(100, 150))


def test_search_excluding_on_the_gpu_path_matches_brute_force():
    # The matrix-product path (used on GPUs) with the excluded columns set to infinity.
    from patchcore.search import matmul_search

    bank, queries = make_bank(), make_bank(90, seed=10)
    squared, indices = matmul_search(bank, bank.square().sum(dim=1), queries, 5, rows=32, exclude=(40, 300))
    expected = brute_force_excluding(bank, queries, 5, 40, 300)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(squared.clamp(min=0).sqrt().double(), expected.values, atol=1e-4)


def test_leaving_everything_out_is_refused():
    with pytest.raises(ValueError, match="leaving those entries out leaves an empty memory bank"):
        NearestNeighbourIndex(make_bank(10)).search(make_bank(2, seed=1), k=1, exclude=(0, 10))


def test_image_scores_follow_eq7_without_the_images_own_entries():
    # The image's own entries 150..213 each have a near twin at 300.. outside the run, so m*
    # (a twin) has the image's own entry among its nearest bank neighbours unless they are
    # left out of N_b(m*) too.
    bank = make_bank(400, 8, seed=11)
    bank[300:364] = bank[150:214] + 0.05 * make_bank(64, 8, seed=13)
    features = bank[150:214].reshape(1, 64, 8) + 0.01 * make_bank(64, 8, seed=12).reshape(1, 64, 8)
    index = NearestNeighbourIndex(bank)
    own = (150, 214)
    distances, nearest = index.search(features.reshape(-1, 8), k=1, exclude=own)
    patch = distances[:, 0].reshape(1, 64)
    scores = reweighted_image_scores(index, features, patch, nearest[:, 0].reshape(1, 64), num_neighbors=9, exclude=own)
    assert torch.allclose(scores.double(), brute_force_eq7(bank, features, 9, exclude=own), atol=1e-5)
    # With the entries the image came from in the bank, it would score near zero.
    assert float(scores[0]) > 2 * float(index.search(features.reshape(-1, 8), k=1)[0].max())


def test_each_images_bank_entries_are_one_run_of_the_sorted_picks():
    import numpy as np

    from patchcore.model import own_runs

    picks = np.array([0, 5, 9, 10, 15, 29, 31])  # rows of 3 images of 10 patches, then a 4th of 5
    starts = np.array([0, 10, 20, 30, 35])
    assert own_runs(picks, starts).tolist() == [0, 3, 5, 6, 7]  # image 2 owns only row 29


def clustered_features(count: int, dims: int, seed: int) -> torch.Tensor:
    """Points spread like patch features: clusters, with a spread that falls off over the
    directions as a CNN's does (so a nearest entry can still differ beyond the leading axes)."""
    generator = torch.Generator().manual_seed(seed)
    scales = 4.0 / (1.0 + torch.arange(dims) / 4.0)
    centres = torch.randn(40, dims, generator=generator) * scales
    spread = torch.randn(count, dims, generator=generator) * scales * 0.3
    return 5.0 + centres[torch.randint(40, (count,), generator=generator)] + spread


@pytest.mark.parametrize("dims, components", [(64, 16), (512, 128), (1536, 128)])
def test_the_bounded_search_finds_the_exact_nearest_entry_measuring_few(monkeypatch, dims, components):
    # The exact CPU index bounds every entry from the bank's leading principal components and
    # measures in full only those it cannot rule out: the answer must be brute force's.
    from patchcore import search

    monkeypatch.setattr(search, "BOUND_COMPONENTS", components)
    monkeypatch.setattr(search, "BOUNDED_MIN_DIMS", min(dims, 4 * components))
    bank, queries = clustered_features(3000, dims, seed=1), clustered_features(500, dims, seed=2)
    queries[:40] = bank[100:140]  # exact hits: distance 0
    index = NearestNeighbourIndex(bank)
    distances, indices = index.search(queries, k=1)
    exact = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    expected, expected_indices = exact.min(dim=1)
    assert torch.equal(indices[:, 0], expected_indices)
    assert float(((distances[:, 0].double() - expected).abs() / expected.clamp(min=1e-12)).max()) < 1e-5
    assert float(distances[:40].max()) == 0.0
    # Every query was bounded, and far fewer entries measured than a full scan's 3,000 each.
    assert index.queries_bounded == 500
    assert index.entries_measured < 0.1 * 500 * 3000


def test_narrow_features_are_bounded_by_cells_and_wide_ones_by_principal_components():
    # At MobileNetV2's 128 dimensions principal bounds cost as much as the scan: cells instead.
    from patchcore import search

    narrow = NearestNeighbourIndex(clustered_features(2000, 128, seed=1))
    narrow.search(clustered_features(50, 128, seed=2), k=1)
    assert isinstance(narrow._bounds, search.CellBoundIndex) and narrow.queries_bounded == 50
    wide = NearestNeighbourIndex(clustered_features(500, 1536, seed=1))
    wide.search(clustered_features(50, 1536, seed=2), k=1)
    assert isinstance(wide._bounds, search.LowerBoundIndex) and wide.queries_bounded == 50
    scan = NearestNeighbourIndex(clustered_features(2000, 128, seed=1), bounds=False)
    scan.search(clustered_features(50, 128, seed=2), k=1)
    assert scan._bounds is None and scan.queries_bounded == 0


def brute_force_nearest(queries: torch.Tensor, bank: torch.Tensor, exclude: tuple[int, int] | None = None):
    """float64 nearest distances and rows, the lowest row on a tie (numpy's argmin)."""
    import numpy as np

    exact = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist").numpy()
    if exclude is not None:
        exact[:, exclude[0] : exclude[1]] = np.inf
    rows = exact.argmin(axis=1)
    return torch.from_numpy(exact[np.arange(len(rows)), rows]), torch.from_numpy(rows)


@pytest.mark.parametrize("dims", [16, 128])
def test_the_cell_bounds_find_the_exact_nearest_entry_measuring_few(dims):
    # Bank and queries drawn from the same clusters, as a test image's patches and the bank are.
    points = clustered_features(6600, dims, seed=5)
    bank, queries = points[:6000].clone(), points[6000:].clone()
    bank[3000:3010] = bank[10:20]  # duplicate entries: the lower row wins, as brute force's argmin
    queries[:40] = bank[100:140]  # exact hits: distance 0
    queries[40:50] = bank[10:20]
    queries[50:90] = bank[200:240] + 1e-3 * clustered_features(40, dims, seed=7)  # near hits
    index = NearestNeighbourIndex(bank)
    distances, indices = index.search(queries, k=1)
    expected, expected_rows = brute_force_nearest(queries, bank)
    assert torch.equal(indices[:, 0], expected_rows)
    assert float(((distances[:, 0].double() - expected).abs() / expected.clamp(min=1e-12)).max()) < 1e-5
    assert float(distances[:50].max()) == 0.0
    assert index.queries_bounded == 600 and index.queries_rescanned == 0
    # Far fewer entries measured than the full scan's 6,000 a query.
    assert index.entries_measured < 0.05 * 600 * 6000


def test_the_cell_bounds_leave_entries_out_exactly_and_rescan_far_queries(monkeypatch):
    # Leave-one-image-out with narrow features: the run left out is never found, even by
    # queries that are those very entries. Queries far from every entry measure the whole
    # bank by their bounds, so they are finished by the full scan, whose candidates are measured
    # again: the same answer, whichever queries are searched together. (Some 677 away, two
    # entries of the far queries lie 1.8e-8 apart, below float32's resolution: the distance is
    # checked there, not which of the two is found.)
    points = clustered_features(3300, 128, seed=8)
    bank, queries = points[:3000].clone(), points[3000:].clone()
    queries[:30] = bank[500:530]
    queries[250:] += 60.0  # 50 queries far outside the bank
    # They measure between a tenth and a half of this bank by their bounds (real images' patches far fewer):
    # past a tenth, the full scan takes over.
    from patchcore import search

    monkeypatch.setattr(search, "RESCAN_FRACTION", 0.1)
    index = NearestNeighbourIndex(bank)
    for exclude in [None, (400, 2400)]:  # most of the bank left out: far queries' nearest too
        distances, indices = index.search(queries, k=1, exclude=exclude)
        expected, expected_rows = brute_force_nearest(queries, bank, exclude)
        assert torch.equal(indices[:250, 0], expected_rows[:250])
        assert float(((distances[:, 0].double() - expected).abs() / expected.clamp(min=1e-12)).max()) < 1e-5
        if exclude is None:
            assert index.queries_rescanned == 50  # the far ones, and only they
    assert not bool(((indices >= 400) & (indices < 2400)).any())
    assert index.queries_bounded == 600 and index.queries_rescanned > 50
    # faiss's own ranking of far queries changes with the batch; the answer does not.
    alone = torch.cat([index.search(queries[i : i + 1], k=1)[1] for i in range(250, 300)])
    assert torch.equal(alone, index.search(queries, k=1)[1][250:])


def test_the_bounded_search_leaves_entries_out_exactly():
    # Leave-one-image-out scoring with wide features: the run of entries left out is never
    # found, even for queries that are those very entries, and the rest is brute force's.
    bank, queries = clustered_features(2000, 512, seed=3), clustered_features(300, 512, seed=4)
    queries[:30] = bank[500:530]
    index = NearestNeighbourIndex(bank)
    distances, indices = index.search(queries, k=1, exclude=(480, 560))
    assert index.queries_bounded == 300
    exact = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    exact[:, 480:560] = float("inf")
    expected, expected_indices = exact.min(dim=1)
    assert torch.equal(indices[:, 0], expected_indices)
    assert not bool(((indices >= 480) & (indices < 560)).any())
    assert float(((distances[:, 0].double() - expected).abs() / expected).max()) < 1e-5
    with pytest.raises(ValueError, match="leaving those entries out leaves an empty memory bank"):
        index.search(queries[:2], k=1, exclude=(0, 2000))


def test_a_compiled_search_leaves_torchs_thread_count_as_the_user_set_it():
    # numba's OpenMP pool sets the process's thread count to its own when it starts; the
    # backbone's features change in the last bits with it, so a Ray actor's one thread (or a
    # user's OMP_NUM_THREADS=1) must still hold after the first search. A fresh process: the
    # pool starts once per process.
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from patchcore.search import NearestNeighbourIndex\n"
        "before = torch.get_num_threads()\n"
        "bank = torch.rand(4000, 128)\n"
        "NearestNeighbourIndex(bank).search(bank[:100] + 0.01, k=1)\n"
        "print(before, torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("dims", [128, 512])
def test_where_the_bounds_rule_out_little_the_index_scans_and_answers_the_same(dims):
    """Alike patches (a uniform surface: one blob, no clusters) far from the origin, where the
    blocked product's rounding is largest: after the first image's queries have measured most of
    the bank, the index scans, and every answer, left-out runs, exact hits and duplicate
    entries included, is still brute force's (lowest row on a tie)."""
    generator = torch.Generator().manual_seed(11)
    centre = 30.0 * torch.randn(dims, generator=generator)
    bank = centre + torch.randn(3000, dims, generator=generator)
    bank[2000:2010] = bank[10:20]  # duplicates: the lower row wins
    queries = centre + torch.randn(3000, dims, generator=generator)
    queries[1100:1140] = bank[100:140]  # exact hits, after the switch
    queries[1140:1150] = bank[10:20]
    queries[1150:1200] = bank[200:250] + 1e-4 * torch.randn(50, dims, generator=generator)  # near hits
    index = NearestNeighbourIndex(bank)
    first, _ = index.search(queries[:1024], k=1)
    assert index.scanning  # the bounds measured more than SCAN_SHARE of the bank per query
    for exclude in [None, (1500, 2500)]:
        distances, indices = index.search(queries, k=1, exclude=exclude)
        expected, expected_rows = brute_force_nearest(queries, bank, exclude)
        assert torch.equal(indices[:, 0], expected_rows)
        assert float(((distances[:, 0].double() - expected).abs() / expected.clamp(min=1e-12)).max()) < 1e-5
    assert torch.equal(first, index.search(queries[:1024], k=1)[0])  # the same before and after
    assert float(distances[1100:1150].max()) == 0.0


def test_clustered_patches_keep_the_bounds():
    points = clustered_features(7024, 128, seed=5)
    index = NearestNeighbourIndex(points[:6000].clone())
    index.search(points[6000:].clone(), k=1)
    index.search(points[6000:].clone(), k=1)
    assert not index.scanning and index.entries_measured < 0.05 * 2048 * 6000


def test_a_few_expected_queries_are_scanned_without_building_the_bounds():
    # A fast start (issue 23): a one-image predict does not pay the cells' k-means. Caught: the
    # scan branch of _bounded_nearest removed (the bounds built at once), or its budget not spent
    # (every later search scanned too).
    from patchcore import search

    bank, queries = clustered_features(3000, 128, seed=1), clustered_features(900, 128, seed=2)
    bounded = NearestNeighbourIndex(bank)
    expected = bounded.search(queries, k=1)
    few = NearestNeighbourIndex(bank)
    few.expect(600)
    first = few.search(queries[:300], k=1, exclude=(100, 400))
    assert few._bounds is None and few.queries_bounded == 0  # scanned, nothing built
    assert torch.equal(first[1], bounded.search(queries[:300], k=1, exclude=(100, 400))[1])
    second = few.search(queries[300:600], k=1)
    assert few._bounds is None
    third = few.search(queries[600:], k=1)  # beyond what was expected: the bounds are built
    assert isinstance(few._bounds, search.CellBoundIndex) and few.queries_bounded == 300
    assert torch.equal(torch.cat([second[1], third[1]]), expected[1][300:]) and torch.equal(second[0], expected[0][300:600])
    many = NearestNeighbourIndex(bank)
    many.expect(search.BOUNDS_PAY_AFTER)  # enough that the bounds pay: built on the first search
    many.search(queries[:10], k=1)
    assert isinstance(many._bounds, search.CellBoundIndex)
    # One small hint after another (a loop of one-image predicts) adds up: the bounds are built
    # once the queries scanned would have paid for them. Caught: the scanned queries not counted.
    loop = NearestNeighbourIndex(bank)
    calls = math.ceil(search.BOUNDS_PAY_AFTER / 300)
    for call in range(calls):
        loop.expect(300)
        assert torch.equal(loop.search(queries[:300], k=1)[1], expected[1][:300])
        assert (loop._bounds is None) == (call < calls - 1)
