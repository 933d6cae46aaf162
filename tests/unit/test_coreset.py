"""Greedy k-center selection against a brute-force reference."""

import numpy as np
import pytest
import torch

from patchcore import coreset
from patchcore.coreset import _greedy_plain, _nearest_initial_centres, coverage_radius, greedy_coreset, random_projection, repair_coreset


def brute_force_greedy(points: torch.Tensor, count: int, first: int | None, initial: torch.Tensor | None = None) -> list[int]:
    """Algorithm 1 of the paper, literally: each pick maximises the distance to its nearest centre.

    With ``initial`` centres, the first pick is the point farthest from them."""
    centres = torch.empty(0, points.shape[1], dtype=torch.float64) if initial is None else initial.double()
    picks = [] if first is None else [first]
    while len(picks) < count:
        chosen = torch.cat([centres, points[picks].double()])
        distances = torch.cdist(points.double(), chosen).min(dim=1).values
        picks.append(int(torch.argmax(distances)))
    return picks


def assert_each_pick_is_the_farthest(points: torch.Tensor, picks: list[int], tolerance: float = 1e-5) -> None:
    """Each pick is the point farthest from the picks before it, by float64 distances, up to the
    float32 rounding of the loop's own (``tolerance``, relative, on squared distances): among
    thousands of picks, two points' distances may tie to within 1e-7 and either may come first.
    The check follows the loop's own picks, so one near-tie does not derail the rest."""
    x = points.double()
    nearest = (x - x[picks[0]]).square().sum(dim=1)
    for step, pick in enumerate(picks[1:], start=1):
        farthest = float(nearest.max())
        assert float(nearest[pick]) >= farthest * (1 - tolerance), f"pick {step}: {pick} at {float(nearest[pick])}, farthest {int(nearest.argmax())} at {farthest}"
        nearest = torch.minimum(nearest, (x - x[pick]).square().sum(dim=1))


def cpu_loop_with_counts(points: torch.Tensor, count: int, seed: int) -> tuple[list[int], dict[str, int]]:
    """The CPU loop's picks on float16 points, and what it did (entries read, distances, close-ups)."""
    counts: dict[str, int] = {}
    return greedy_coreset(points.half(), count, seed=seed, counts=counts).tolist(), counts


@pytest.fixture
def points() -> torch.Tensor:
    return torch.randn(600, 16, generator=torch.Generator().manual_seed(3))


def test_first_pick_is_the_seeded_random_row(points):
    expected = int(torch.randint(len(points), (1,), generator=torch.Generator().manual_seed(11)))
    assert int(greedy_coreset(points, 5, seed=11)[0]) == expected


def test_each_pick_is_the_farthest_remaining_point(points):
    picks = greedy_coreset(points, 60, seed=5).tolist()
    assert picks == brute_force_greedy(points, 60, picks[0])
    assert len(set(picks)) == 60


def test_same_seed_same_picks_other_seed_other_start(points):
    assert torch.equal(greedy_coreset(points, 40, seed=7), greedy_coreset(points, 40, seed=7))
    assert int(greedy_coreset(points, 1, seed=7)[0]) != int(greedy_coreset(points, 1, seed=8)[0])


def test_selection_on_projection_matches_brute_force_on_the_same_projection():
    wide = torch.randn(400, 512, generator=torch.Generator().manual_seed(1))
    projected = random_projection(wide, 128, seed=2)
    assert projected.shape == (400, 128)
    picks = greedy_coreset(projected, 30, seed=2).tolist()
    assert picks == brute_force_greedy(projected, 30, picks[0])


def test_projection_keeps_distances_nearly():
    wide = torch.randn(200, 1536, generator=torch.Generator().manual_seed(4))
    ratio = torch.pdist(random_projection(wide, 128, seed=0)) / torch.pdist(wide)
    # Johnson-Lindenstrauss: with 128 dims, distances stay within about +-30% (mean ~1).
    assert abs(float(ratio.mean()) - 1.0) < 0.03
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.4


def test_features_no_wider_than_projection_are_used_as_they_are(points):
    assert random_projection(points, 128, seed=0) is points


def test_coverage_radius_is_within_twice_the_optimum_bound(points):
    # k-center greedy is a 2-approximation; the radius must at least shrink as picks grow.
    radii = []
    for count in (10, 50, 200):
        picks = greedy_coreset(points, count, seed=0)
        radii.append(float(torch.cdist(points, points[picks]).min(dim=1).values.max()))
    assert radii[0] > radii[1] > radii[2]


def test_progress_counts_every_pick(points):
    told = []
    greedy_coreset(points, 237, seed=0, on_progress=told.append)
    assert sum(told) == 237


@pytest.mark.parametrize("count", [0, 601])
def test_bad_sizes(points, count):
    with pytest.raises(ValueError, match=r"coreset size must be between 1 and 600, got " + str(count)):
        greedy_coreset(points, count)


def test_selection_carries_on_from_initial_centres(points):
    bank = torch.randn(40, 16, generator=torch.Generator().manual_seed(9))
    picks = greedy_coreset(points, 50, seed=0, initial_centres=bank).tolist()
    assert picks == brute_force_greedy(points, 50, None, initial=bank)


def test_the_device_loop_picks_the_same_points(points):
    # The GPU path (one full pass per pick, no pruning) run here on the CPU tensor.
    assert _greedy_plain(points, 80, 4, None, None).tolist() == greedy_coreset(points, 80, seed=4).tolist()
    bank = points[:5] + 0.1
    start = _nearest_initial_centres(points, bank)
    assert _greedy_plain(points, 30, 0, None, start).tolist() == greedy_coreset(points, 30, initial_centres=bank).tolist()


def test_clustered_data_with_duplicates_matches_brute_force():
    # Real patches come in tight clusters with exact duplicates: the pruning must stay exact there.
    generator = torch.Generator().manual_seed(12)
    centres = torch.randn(30, 8, generator=generator) * 10
    cloud = centres[torch.randint(30, (3000,), generator=generator)] + 0.05 * torch.randn(3000, 8, generator=generator)
    cloud[1500:1600] = cloud[:100]
    picks = greedy_coreset(cloud, 200, seed=1).tolist()
    assert picks == brute_force_greedy(cloud, 200, picks[0])


@pytest.mark.parametrize("parallel_above", [0, 10**9])
def test_float16_points_on_all_threads_or_one_match_brute_force(monkeypatch, parallel_above):
    # How a fit hands the projection over (float16), with the cells read on all threads (0) or on one.
    monkeypatch.setattr(coreset, "PARALLEL_READ_POINTS", parallel_above)
    generator = torch.Generator().manual_seed(21)
    centres = torch.randn(40, 12, generator=generator) * 5
    cloud = (centres[torch.randint(40, (4000,), generator=generator)] + 0.2 * torch.randn(4000, 12, generator=generator)).half()
    cloud[3000:3050] = cloud[10:60]  # exact duplicates: ties go to the lowest index
    picks = greedy_coreset(cloud, 300, seed=3).tolist()
    assert picks == brute_force_greedy(cloud.float(), 300, picks[0])
    bank = cloud[:7].float() + 0.5
    picks = greedy_coreset(cloud, 120, initial_centres=bank).tolist()
    assert picks == brute_force_greedy(cloud.float(), 120, None, initial=bank)


@pytest.mark.parametrize("parallel_above", [0, 10**9])
def test_cells_read_in_small_chunks_and_closed_up_match_brute_force(monkeypatch, parallel_above):
    # A cell longer than a chunk is read in pieces (on all threads, or on one); the pool fills and
    # is closed up. Chunks of 50 entries make both happen on a few thousand points.
    monkeypatch.setattr(coreset, "CHUNK", 50)
    monkeypatch.setattr(coreset, "PARALLEL_READ_POINTS", parallel_above)
    generator = torch.Generator().manual_seed(23)
    centres = torch.randn(25, 10, generator=generator) * 4
    cloud = (centres[torch.randint(25, (5000,), generator=generator)] + 0.3 * torch.randn(5000, 10, generator=generator)).half()
    cloud[4000:4100] = cloud[:100]  # exact duplicates: ties go to the lowest index
    picks, counts = cpu_loop_with_counts(cloud, 400, seed=4)
    assert picks == brute_force_greedy(cloud.float(), 400, picks[0])
    assert counts["close_ups"] >= 1


def test_thousands_of_picks_on_clustered_data_are_exact_and_pruned():
    # Many picks on clustered points: each the farthest (float64), and the pruning skips most of
    # the work of the plain loop (a distance from every point to every pick).
    generator = torch.Generator().manual_seed(31)
    centres = torch.randn(300, 16, generator=generator) * 3
    cloud = centres[torch.randint(300, (40000,), generator=generator)] + 0.5 * torch.randn(40000, 16, generator=generator)
    picks, counts = cpu_loop_with_counts(cloud, 3000, seed=0)
    assert_each_pick_is_the_farthest(cloud.half(), picks)
    assert len(set(picks)) == 3000
    plain_work = 40000 * 3000
    assert counts["entries_read"] < 0.2 * plain_work
    assert counts["distances"] < 0.1 * plain_work


@pytest.fixture(scope="module")
def bottle_projection(data_root) -> torch.Tensor:
    """The float16 projection a fit hands the selection: MobileNetV2 patches of 12 bottle images."""
    from patchcore.backbones import get_spec
    from patchcore.fitting import FitOptions, FitPipeline
    from patchcore.layout import InputLayout

    images = sorted((data_root / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:12]
    pipeline, sizes, _ = FitPipeline.begin("mobilenet_v2", get_spec("mobilenet_v2").default_layers, None, InputLayout(), images, FitOptions())
    patches = pipeline.extract(images, sizes)
    patches.close()
    return patches.points


#: on these patches each pick of either loop is the float64 farthest to within this (measured: 0)
REAL_PATCHES_TOLERANCE = 2e-7


def test_each_pick_on_real_patch_features_is_the_farthest(bottle_projection):
    # Real patches sit in tight clusters where the skip rules decide most of the work: an unsound
    # rule (say 3 r instead of 2 r) changes picks here, where random data would not notice.
    count = 1500
    picks, counts = cpu_loop_with_counts(bottle_projection, count, seed=0)
    assert_each_pick_is_the_farthest(bottle_projection, picks, REAL_PATCHES_TOLERANCE)
    assert counts["distances"] < 0.25 * len(bottle_projection) * count


def test_the_device_loop_on_real_patch_features_picks_the_farthest(bottle_projection):
    # The GPU path, run here on the CPU. Distances from |x|^2 - 2 x.c + |c|^2 would fall 1.3e-6
    # short of the farthest on these patches; from the differences they do not.
    picks = _greedy_plain(bottle_projection.float(), 1500, 0, None, None).tolist()
    assert_each_pick_is_the_farthest(bottle_projection, picks, REAL_PATCHES_TOLERANCE)


def _cover(points: torch.Tensor, picks: torch.Tensor, rows: np.ndarray) -> float:
    """The largest distance of the given rows to their nearest pick."""
    return float(torch.cdist(points[torch.from_numpy(rows)], points[picks]).min(dim=1).values.max())


def test_the_coverage_radius_bounds_every_row_and_is_near_the_largest():
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32))
    picks = greedy_coreset(points, 300, seed=0)
    radius = coverage_radius(points, picks)
    cover = _cover(points, picks, np.arange(3000))
    assert cover <= radius + 1e-5 and cover > 0.8 * radius


def test_a_repaired_coreset_covers_the_rows_left_as_the_first_did():
    points = torch.from_numpy(np.random.default_rng(1).normal(size=(3000, 16)).astype(np.float32))
    picks = greedy_coreset(points, 300, seed=0)
    radius = coverage_radius(points, picks)
    removed = np.zeros(3000, dtype=bool)
    removed[::7] = True  # the rows of images set aside, spread among the others
    picks = torch.sort(picks).values
    repaired = repair_coreset(points, picks, removed, radius)
    left = np.flatnonzero(~removed)
    assert not removed[repaired.numpy()].any()  # nothing of the removed rows stays
    assert set(picks[~torch.from_numpy(removed)[picks]].tolist()) <= set(repaired.tolist())  # the other picks all do
    assert torch.equal(repaired, torch.sort(repaired).values)
    assert _cover(points, repaired, left) <= radius + 1e-5
    # without the repair (the removed picks only dropped), some rows left would lose their cover
    assert _cover(points, picks[~torch.from_numpy(removed)[picks]], left) > radius
    assert len(repaired) < len(picks)  # and it needs fewer picks than were removed here


def test_a_repair_picks_what_a_greedy_pass_over_every_row_left_picks_in_any_chunks(monkeypatch):
    # The repair looks only at rows near a dropped pick and keeps only those no kept pick covers;
    # a greedy pass over every row left, from the kept picks, must choose the very same rows.
    # Caught: a chunk's rows not offset by its start; the removed rows kept as candidates.
    points = torch.from_numpy(np.random.default_rng(3).normal(size=(2000, 8)).astype(np.float32))
    picks = torch.sort(greedy_coreset(points, 200, seed=0)).values
    radius = coverage_radius(points, picks)
    removed = np.zeros(2000, dtype=bool)
    removed[300:700] = True  # two images' rows
    kept = picks[~torch.from_numpy(removed)[picks]]
    left = torch.from_numpy(np.flatnonzero(~removed))
    nearest = torch.cdist(points[left].double(), points[kept].double()).min(dim=1).values
    added = []
    while float(nearest.max()) > radius:
        farthest = int(torch.argmax(nearest))
        added.append(int(left[farthest]))
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(points[left].double() - points[left[farthest]].double(), dim=1))
    expected = torch.sort(torch.cat([kept, torch.tensor(added, dtype=kept.dtype)])).values
    assert len(added) > 3
    for chunk_rows in (1 << 15, 256, 999):
        assert torch.equal(repair_coreset(points, picks, removed, radius, chunk_rows=chunk_rows), expected)
    # with many picks dropped the rows near them are found by the search instead of the product
    dropped = int(torch.from_numpy(removed)[picks].sum())
    monkeypatch.setattr(coreset, "REPAIR_PRODUCT_CENTRES", dropped - 1)
    assert torch.equal(repair_coreset(points, picks, removed, radius), expected)


def test_a_repair_with_nothing_removed_changes_nothing():
    points = torch.from_numpy(np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32))
    picks = torch.sort(greedy_coreset(points, 50, seed=0)).values
    assert torch.equal(repair_coreset(points, picks, np.zeros(500, dtype=bool), coverage_radius(points, picks)), picks)


def test_the_repairs_product_never_misses_a_row_at_the_edge_of_reach():
    # Rows at the radius from a centre far from the origin, where |x|^2 - 2 x.c + |c|^2 loses
    # most digits to cancellation: the widened product must keep every one of them (and a
    # row well outside stays out). Caught: REPAIR_ROUNDING = 0.
    generator = np.random.default_rng(4)
    centres = torch.from_numpy((100.0 + generator.normal(size=(3, 128))).astype(np.float32))
    directions = generator.normal(size=(3000, 128))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows = torch.from_numpy((centres[0].double().numpy() + 2.0 * directions).astype(np.float32))
    radius = float(torch.linalg.vector_norm(rows.double() - centres[0].double(), dim=1).max())
    reach = coreset._Reach(centres, radius)
    assert bool(reach.within(rows).all())
    far = rows[:1] + 10.0
    assert not bool(reach.within(far).any())
