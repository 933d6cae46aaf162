"""Tests for patchcore.metrics: hand-worked values, sklearn agreement and a
brute-force cross-check of the exact AUPRO computation.

The pixel metrics are hand-written (one shared sort of uint64 keys); the
cross-checks use many ties, negative scores, images of different sizes and
tiny sweep chunks so that runs of ties straddle chunk ends."""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore import metrics
from patchcore.metrics import (
    aupro,
    best_f1,
    compute_metrics,
    f1_at_threshold,
    image_auroc,
    pixel_auroc,
)

# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


def test_image_auroc_hand_case() -> None:
    # Pairs (defect, good): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3/4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_image_auroc_counts_ties_as_half() -> None:
    # Pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.2) = 1 -> 1.5 / 2.
    assert image_auroc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2])) == 0.75


def test_image_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=50)
    scores = rng.normal(size=50) + labels
    result = image_auroc(labels, scores)
    assert isinstance(result, float)
    assert result == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.fixture(params=[None, 1, 7], ids=["chunk-default", "chunk-1", "chunk-7"])
def sweep_chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run with the default sweep chunk and with tiny ones (ties across chunk ends)."""
    if request.param is not None:
        monkeypatch.setattr(metrics, "_SWEEP_CHUNK", request.param)


def _flat(images: Sequence[np.ndarray]) -> np.ndarray:
    """All pixels of differently sized images, image after image."""
    return np.concatenate([np.ravel(image) for image in images])


def test_pixel_auroc_hand_case() -> None:
    masks = np.array([[[0, 1], [0, 1]]], dtype=bool)
    maps = np.array([[[0.1, 0.35], [0.4, 0.8]]])
    assert pixel_auroc(masks, maps) == 0.75


def test_pixel_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 16)) < 0.2
    maps = rng.random((4, 16, 16)).astype(np.float32) + 0.5 * masks
    result = pixel_auroc(masks, maps)
    assert isinstance(result, float)
    assert result == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_auroc_one_class_errors() -> None:
    with pytest.raises(ValueError, match="^AUROC needs both good and defective samples$"):
        image_auroc(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="^AUROC needs both good and defective samples$"):
        image_auroc(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="^AUROC needs both good and defective samples$"):
        pixel_auroc(np.zeros((2, 3, 3), dtype=bool), np.random.default_rng(2).random((2, 3, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn_with_ties_and_negatives(seed: int, sweep_chunk: None) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 17, 23)) < 0.25
    # Two decimals over about [-1, 1.2]: ~200 levels for 1173 pixels, many
    # shared by defect and good pixels, half of them negative.
    maps = np.round(rng.normal(size=masks.shape) * 0.35 + 0.2 * masks, 2)
    assert np.unique(maps).size < maps.size / 4 and (maps < 0).mean() > 0.3
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps.astype(np.float32)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_list_of_sizes_matches_sklearn(sweep_chunk: None) -> None:
    rng = np.random.default_rng(5)
    shapes = [(12, 20), (5, 20), (9, 7), (1, 31)]
    masks = [rng.random(shape) < 0.3 for shape in shapes]
    maps = [np.round(rng.normal(size=m.shape) * 0.3 + 0.15 * m, 2) for m in masks]
    expected = roc_auc_score(_flat(masks), _flat(maps))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # Tuples and 0/255 masks are accepted too.
    masks_255 = tuple((m * 255).astype(np.uint8) for m in masks)
    assert pixel_auroc(masks_255, tuple(maps)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_over_the_whole_float32_range(sweep_chunk: None) -> None:
    # Magnitudes from float32 subnormals to near its maximum, both signs, and
    # both zeros: the uint32 order must be the float order everywhere.
    rng = np.random.default_rng(11)
    n = 2000
    signs = rng.choice([-1.0, 1.0], size=n)
    maps = (signs * 10.0 ** rng.uniform(-44, 38, size=n)).astype(np.float32)
    maps[:60] = 0.0
    maps[60:120] = -0.0
    # Defect more likely the higher the score, so misordering moves the area.
    rank = np.argsort(np.argsort(maps, kind="stable"), kind="stable")
    masks = rng.random(n) < rank / n
    images_masks = [masks[:1200].reshape(30, 40), masks[1200:].reshape(20, 40)]
    images_maps = [maps[:1200].reshape(30, 40), maps[1200:].reshape(20, 40)]
    expected = roc_auc_score(masks, maps.astype(np.float64))
    assert pixel_auroc(images_masks, images_maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_extreme_values_hand_case() -> None:
    # Defect: inf (beats both good), -3e38 (beats -inf, loses to 0) -> 3/4.
    masks = np.array([[1, 0, 0, 1]], dtype=bool)
    maps = np.array([[np.inf, -np.inf, 0.0, -3e38]], dtype=np.float32)
    assert pixel_auroc(masks, maps) == 0.75


def test_pixel_auroc_zeros_of_both_signs_tie() -> None:
    # -0.0 == 0.0, so the pair is a tie (1/2), as in sklearn.
    for scores in ([-0.0, 0.0], [0.0, -0.0]):
        maps = np.array([scores], dtype=np.float32)
        assert pixel_auroc(np.array([[True, False]]), maps) == 0.5


def test_pixel_auroc_single_image_forms() -> None:
    # One (H, W) image, as an array or as nested lists.
    assert pixel_auroc(np.array([[0, 1], [0, 1]]), np.array([[0.1, 0.35], [0.4, 0.8]])) == 0.75
    assert pixel_auroc([[0, 1], [0, 1]], [[0.1, 0.35], [0.4, 0.8]]) == 0.75


def test_pixel_scores_are_compared_as_float32() -> None:
    # Documented: float64 maps that differ only below float32 precision tie.
    masks = np.array([[False, True]])
    assert pixel_auroc(masks, np.array([[1.0, 1.0 + 1e-9]])) == 0.5
    assert pixel_auroc(masks, np.array([[1.0, 1.0 + 1e-6]])) == 1.0


# ---------------------------------------------------------------------------
# F1
# ---------------------------------------------------------------------------

# Worked by hand, predicted = score >= t, F1 = 2TP / (2TP + FP + FN):
#   t=0.5: TP1 FP0 FN2 -> 2/5      t=0.4: TP2 FP0 FN1 -> 4/5
#   t=0.3: TP2 FP1 FN1 -> 4/6      t=0.2: TP3 FP1 FN0 -> 6/7  (best)
#   t=0.1: TP3 FP2 FN0 -> 6/8
F1_LABELS = np.array([0, 1, 0, 1, 1])
F1_SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5])


def test_f1_at_threshold_hand_case() -> None:
    assert f1_at_threshold(F1_LABELS, F1_SCORES, 0.3) == pytest.approx(2 / 3, abs=1e-12)
    # A threshold between scores behaves like the next score up (0.4).
    assert f1_at_threshold(F1_LABELS, F1_SCORES, 0.35) == pytest.approx(4 / 5, abs=1e-12)
    # Nothing flagged: F1 is 0 rather than a 0/0 warning.
    assert f1_at_threshold(F1_LABELS, F1_SCORES, 0.9) == 0.0


def test_best_f1_hand_case() -> None:
    f1, threshold = best_f1(F1_LABELS, F1_SCORES)
    assert f1 == pytest.approx(6 / 7, abs=1e-12)
    assert threshold == 0.2
    assert f1_at_threshold(F1_LABELS, F1_SCORES, threshold) == pytest.approx(f1, abs=1e-12)


def test_best_f1_skips_zero_precision_and_recall() -> None:
    # Top score is a good image: at t=0.9 precision = recall = 0 (0/0 guard);
    # best is t=0.2 (everything flagged): TP2 FP1 -> 4/5.
    f1, threshold = best_f1(np.array([0, 1, 1]), np.array([0.9, 0.3, 0.2]))
    assert f1 == pytest.approx(4 / 5, abs=1e-12)
    assert threshold == 0.2


def test_best_f1_needs_a_defect() -> None:
    with pytest.raises(ValueError, match="^F1 needs at least one defective sample$"):
        best_f1(np.array([0, 0]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 images, two regions, 20 defect-free pixels, four score levels.

    Image 0, region A (8 px): rows 0-1. Scores: 4 px at 0.8, 4 px at 0.5.
    Image 1, region B (4 px): (0,0),(0,1),(1,2),(1,3) -- (0,1) and (1,2) touch
    only at a corner, so under 8-connectivity this is ONE region. All 0.9.
    Free pixels (20): 2 at 0.8, 6 at 0.5, 12 at 0.1.

    Curve (FPR, PRO), PRO = mean over the 2 regions:
      t=0.9: B complete, no free        -> (0,    (0 + 1)/2)   = (0,   1/2)
      t=0.8: A half, 2 free             -> (2/20, (1/2 + 1)/2) = (1/10, 3/4)
      t=0.5: A complete, 8 free         -> (8/20, 1)          = (2/5, 1)
      t=0.1: all 20 free                -> (1, 1)
    The 0.8 level mixes region and free pixels: tie handling must jump
    straight from (0, 1/2) to (1/10, 3/4) whatever the pixel order.
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.full((2, 4, 4), 0.1)

    masks[0, 0:2, :] = True
    maps[0, 0, :] = 0.8
    maps[0, 1, :] = 0.5

    for r, c in [(0, 0), (0, 1), (1, 2), (1, 3)]:
        masks[1, r, c] = True
        maps[1, r, c] = 0.9

    free_08 = [(0, 2, 0), (1, 3, 3)]
    free_05 = [(0, 2, 1), (0, 2, 2), (0, 3, 0), (1, 2, 0), (1, 2, 1), (1, 3, 0)]
    for idx in free_08:
        assert not masks[idx]
        maps[idx] = 0.8
    for idx in free_05:
        assert not masks[idx]
        maps[idx] = 0.5
    assert (~masks).sum() == 20
    return masks, maps


def test_aupro_hand_case_with_interpolation() -> None:
    masks, maps = _hand_case()
    # Up to FPR 0.3, which falls between the points at 1/10 and 2/5:
    #   [0, 1/10]:   (1/10) * (1/2 + 3/4) / 2             = 1/16
    #   PRO(0.3) = 3/4 + (1/4) * (3/10 - 1/10)/(2/5 - 1/10) = 11/12
    #   [1/10, 3/10]: (1/5) * (3/4 + 11/12) / 2           = 1/6
    #   area = 1/16 + 1/6 = 11/48, normalised: (11/48) / (3/10) = 55/72
    # (With 4-connectivity B would split in two and the result would differ.)
    expected = Fraction(55, 72)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(float(expected), abs=1e-9)


def test_aupro_hand_case_other_limits() -> None:
    masks, maps = _hand_case()
    # Limit exactly on a curve point: area 1/16 over 1/10 -> 5/8.
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(5 / 8, abs=1e-9)
    # Limit 0.25: PRO(1/4) = 3/4 + (1/4)(3/20)/(3/10) = 7/8;
    # area = 1/16 + (3/20)(3/4 + 7/8)/2 = 1/16 + 39/320 = 59/320; / (1/4) = 59/80.
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(59 / 80, abs=1e-9)
    # Whole curve: 1/16 + (3/10)(3/4 + 1)/2 + (3/5)(1) = 1/16 + 21/80 + 3/5 = 37/40.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(37 / 40, abs=1e-9)


def test_aupro_hand_case_is_order_independent() -> None:
    # Permuting images must not change anything (ties cross image boundaries).
    masks, maps = _hand_case()
    assert aupro(masks[::-1], maps[::-1]) == pytest.approx(55 / 72, abs=1e-9)


def test_aupro_perfect_maps() -> None:
    masks, _ = _hand_case()
    # Curve (0,0) -> (0,1) -> (1,1): area equals the limit.
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, masks.astype(np.float64), fpr_limit=0.05) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_maps() -> None:
    masks, _ = _hand_case()
    # Every free pixel ranks above every defect pixel: PRO stays 0 until FPR 1.
    assert aupro(masks, (~masks).astype(np.float64)) == 0.0


def test_aupro_constant_map() -> None:
    masks, _ = _hand_case()
    # One tie run: the curve is (0,0) -> (1,1), a straight diagonal (no jump
    # at FPR 1 is assumed, the trapezoid joins the two points).
    # PRO(0.3) = 0.3, area = 0.3 * 0.3 / 2 = 0.045, normalised 0.045 / 0.3 = 0.15.
    maps = np.full(masks.shape, 0.7)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    # In general the diagonal gives limit / 2.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_counts_good_images_in_fpr() -> None:
    masks, maps = _hand_case()
    # Add a good image whose 16 pixels all score 0.8: 36 free pixels now.
    # Curve: (0,1/2) -> (18/36, 3/4) -> (24/36, 1) -> (1, 1).
    # Up to 0.3: PRO(0.3) = 1/2 + (1/4)(0.3 / 0.5) = 13/20;
    # area = 0.3 * (1/2 + 13/20) / 2 = 69/400; / 0.3 = 23/40.
    masks3 = np.concatenate([masks, np.zeros((1, 4, 4), dtype=bool)])
    maps3 = np.concatenate([maps, np.full((1, 4, 4), 0.8)])
    assert aupro(masks3, maps3) == pytest.approx(23 / 40, abs=1e-9)


def test_aupro_errors() -> None:
    with pytest.raises(ValueError, match="^AUPRO needs at least one defect region in the masks$"):
        aupro(np.zeros((2, 4, 4), dtype=bool), np.random.default_rng(3).random((2, 4, 4)))
    masks, maps = _hand_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, maps[:, :3])


def _brute_force_aupro(
    masks: np.ndarray | Sequence[np.ndarray],
    maps: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float,
) -> float:
    """Slow reference: evaluate PRO and FPR directly at every distinct score.

    ``masks``/``maps``: an (N, H, W) array or a list of 2-D arrays of any sizes;
    regions are labelled image by image.
    """
    regions = []  # (image index, bool mask of one connected component)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]

    points = [(0.0, 0.0)]
    for t in np.unique(_flat(maps))[::-1]:
        above = [image >= t for image in maps]
        pro = np.mean([above[i][region].mean() for i, region in regions])
        fpr = _flat([a[~np.asarray(m, dtype=bool)] for a, m in zip(above, masks)]).mean()
        points.append((fpr, pro))

    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
        else:
            break
    return area / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = 4, 20, 20
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # last image stays good
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h - 3), rng.integers(0, w - 3)
            dr, dc = rng.integers(1, 6), rng.integers(1, 6)
            masks[i, r : r + dr, c : c + dc] = True
        # A diagonal streak, to exercise 8-connectivity.
        r, c = rng.integers(0, h - 5), rng.integers(0, w - 5)
        for k in range(rng.integers(2, 5)):
            masks[i, r + k, c + k] = True
    # Two decimals -> plenty of ties, some shared by defect and free pixels.
    maps = np.round(rng.random((n, h, w)) * 0.7 + 0.3 * masks, 2)

    for limit in (0.05, 0.3, 0.77, 1.0):
        expected = _brute_force_aupro(masks, maps, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    # float32 maps give the same curve as long as the distinct levels survive.
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(
        _brute_force_aupro(masks, maps.astype(np.float32), 0.3), abs=1e-9
    )


def _random_images(
    rng: np.random.Generator, shapes: Sequence[tuple[int, int]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks with rectangles and diagonal streaks; float32 maps with many ties and negatives."""
    masks, maps = [], []
    for h, w in shapes:
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
            mask[r : r + rng.integers(1, 6), c : c + rng.integers(1, 6)] = True
        r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
        for k in range(rng.integers(2, 5)):
            mask[r + k, c + k] = True
        masks.append(mask)
        maps.append(np.round(rng.normal(size=(h, w)) * 0.3 + 0.3 * mask, 2).astype(np.float32))
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_list_of_sizes_matches_brute_force(seed: int, sweep_chunk: None) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = _random_images(rng, [(23, 17), (9, 30)])
    assert np.unique(_flat(maps)).size < _flat(maps).size / 2 and (_flat(maps) < 0).any()
    for limit in (0.05, 0.3, 0.77, 1.0):
        expected = _brute_force_aupro(masks, maps, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def _edge_regions_case(transpose: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images of one height, region A on image 0's right edge, B on image 1's left.

    Image 0 (3x3): A = (0, 2), 1 px, score 0.9. Image 1 (3x5): B = column 0,
    3 px, score 0.5. Placed side by side, A and B would touch and merge.
    Free pixels (8 + 12 = 20): (2, 0) of image 0 and (2, 4) of image 1 at 0.7,
    the rest at 0.1. Transposed, the images share a width and A (bottom row)
    would merge with B (top row) if stacked vertically.

    Two regions, curve (FPR, PRO): t=0.9 (0, 1/2); t=0.7 (1/10, 1/2);
    t=0.5 (1/10, 1); t=0.1 (1, 1). Up to 0.3: 1/10 * 1/2 + 2/10 * 1 = 1/4,
    normalised 5/6. Merged into one 4-px region, PRO at t=0.9 would be 1/4
    and the result 3/4.
    """
    masks = [np.zeros((3, 3), dtype=bool), np.zeros((3, 5), dtype=bool)]
    maps = [np.full((3, 3), 0.1), np.full((3, 5), 0.1)]
    masks[0][0, 2] = True
    maps[0][0, 2] = 0.9
    masks[1][:, 0] = True
    maps[1][:, 0] = 0.5
    maps[0][2, 0] = 0.7
    maps[1][2, 4] = 0.7
    if transpose:
        masks, maps = [m.T for m in masks], [a.T for a in maps]
    return masks, maps


@pytest.mark.parametrize("transpose", [False, True])
def test_aupro_regions_never_span_images(transpose: bool) -> None:
    masks, maps = _edge_regions_case(transpose)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(5 / 6, abs=1e-12)
    assert _brute_force_aupro(masks, maps, 0.3) == pytest.approx(5 / 6, abs=1e-12)
    # The merged layout really would differ: one region of 4 px gives 3/4.
    stacked = np.concatenate if transpose else np.hstack
    joined_masks, joined_maps = stacked(masks), stacked(maps)
    assert aupro(joined_masks, joined_maps, fpr_limit=0.3) == pytest.approx(3 / 4, abs=1e-12)


def test_pixel_shape_mismatch_errors() -> None:
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    masks = [np.zeros((256, 400), dtype=bool) for _ in range(4)]
    for m in masks[1::2]:
        m[10:20, 10:20] = True
    maps = [np.zeros((256, 400), dtype=np.float32) for _ in range(3)]
    maps.append(np.zeros((89, 400), dtype=np.float32))
    expected = "masks and maps differ in shape at image 3: (256, 400) vs (89, 400)"
    message = "^" + re.escape(expected) + "$"
    with pytest.raises(ValueError, match=message):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match=message):
        aupro(masks, maps)
    with pytest.raises(ValueError, match=message):
        compute_metrics(labels, scores, masks, maps, threshold=0.5)
    # An (N, H, W) array against a list is compared image by image too.
    with pytest.raises(ValueError, match=message):
        aupro(np.stack(masks), maps)
    with pytest.raises(ValueError, match="^masks and maps differ in number of images: 4 vs 3$"):
        pixel_auroc(masks, maps[:3])
    with pytest.raises(ValueError, match="2-D"):
        pixel_auroc(masks, [np.zeros((2, 256, 400))] * 4)


def test_pixel_nan_errors() -> None:
    masks, maps = _random_images(np.random.default_rng(4), [(10, 12), (7, 9)])
    maps[1] = maps[1].copy()
    maps[1][3, 4] = np.nan
    with pytest.raises(ValueError, match="^anomaly maps contain NaN$"):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="^anomaly maps contain NaN$"):
        aupro(masks, maps)
    with pytest.raises(ValueError, match="^anomaly maps contain NaN$"):
        compute_metrics(np.array([0, 1]), np.array([0.2, 0.7]), masks, maps, threshold=0.5)
    with pytest.raises(ValueError, match="^anomaly maps contain NaN$"):
        pixel_auroc(np.stack([masks[0]] * 2), np.stack([maps[0], np.full((10, 12), np.nan)]))


# ---------------------------------------------------------------------------
# compute_metrics
# ---------------------------------------------------------------------------


def test_compute_metrics() -> None:
    masks, maps = _hand_case()
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.3, 0.5, 0.1])
    masks4 = np.concatenate([masks, np.zeros((2, 4, 4), dtype=bool)])
    maps4 = np.concatenate([maps, np.full((2, 4, 4), 0.1)])

    result = compute_metrics(labels, scores, masks4, maps4, threshold=0.4)
    assert set(result) == {
        "image_auroc",
        "pixel_auroc",
        "image_f1",
        "image_f1_max",
        "image_f1_max_threshold",
        "pixel_aupro",
    }
    assert all(type(v) is float for v in result.values())
    # Pairs (defect, good): 0.9 beats both, 0.3 beats only 0.1 -> 3/4.
    assert result["image_auroc"] == 0.75
    assert result["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks4.ravel(), maps4.ravel()), abs=1e-12
    )
    # t=0.4 flags 0.9 and 0.5: TP1 FP1 FN1 -> 1/2.
    assert result["image_f1"] == pytest.approx(0.5, abs=1e-12)
    # Best: t=0.3 flags 0.9, 0.5, 0.3: TP2 FP1 -> 4/5 (t=0.9 gives 2/3).
    assert result["image_f1_max"] == pytest.approx(0.8, abs=1e-12)
    assert result["image_f1_max_threshold"] == 0.3
    # The two good images add 32 free pixels at the lowest level (0.1), so the
    # curve up to FPR 0.3 is the hand case squeezed by 20/52 in FPR:
    # points (0,1/2), (2/52, 3/4), (8/52, 1), (1, 1).
    # Area: (2/52)(5/4)/2 + (6/52)(7/4)/2 + (0.3 - 8/52) * 1 = 5/208 + 21/208 + 0.3 - 32/208.
    expected = (Fraction(26 - 32, 208) + Fraction(3, 10)) / Fraction(3, 10)
    assert result["pixel_aupro"] == pytest.approx(float(expected), abs=1e-9)

    assert compute_metrics(labels, scores, masks4, maps4, threshold=None)["image_f1"] is None


def test_compute_metrics_list_of_sizes(sweep_chunk: None) -> None:
    rng = np.random.default_rng(8)
    masks, maps = _random_images(rng, [(14, 20), (6, 20), (11, 5)])
    # A good image of yet another size.
    masks.append(np.zeros((8, 8), dtype=bool))
    maps.append(np.round(rng.normal(size=(8, 8)) * 0.3, 2).astype(np.float32))
    labels = np.array([1, 1, 1, 0])
    scores = np.array([0.9, 0.4, 0.7, 0.5])

    result = compute_metrics(labels, scores, masks, maps, threshold=0.5)
    assert all(type(v) is float for v in result.values())
    expected_auroc = roc_auc_score(_flat(masks), _flat(maps))
    assert result["pixel_auroc"] == pytest.approx(expected_auroc, abs=1e-12)
    assert result["pixel_aupro"] == pytest.approx(_brute_force_aupro(masks, maps, 0.3), abs=1e-9)
    assert result["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result["pixel_aupro"] == aupro(masks, maps)


def test_compute_metrics_sorts_pixels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_sorted_keys = metrics._sorted_keys

    def counting_sorted_keys(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_sorted_keys(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics, "_sorted_keys", counting_sorted_keys)
    masks, maps = _hand_case()
    compute_metrics(np.array([1, 0]), np.array([0.9, 0.3]), masks, maps, threshold=None)
    assert len(calls) == 1
