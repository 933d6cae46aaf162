"""Evaluation metrics for anomaly detection.

Image level: AUROC and F1 on per-image anomaly scores (label 0 = good,
1 = defective). Pixel level: AUROC on anomaly maps and AUPRO, the area under
the per-region-overlap curve defined for the MVTec AD benchmark (Bergmann et
al., IJCV 2021).

The image metrics use scikit-learn: they see one score per image. The pixel
metrics are hand-written because they see every pixel of full-resolution maps
(tens of millions of values, images of different sizes) and need the same
ordering of those pixels: both come exactly, with every distinct score as a
threshold, from ONE sort of all pixels, shared when :func:`compute_metrics`
asks for both (``benchmarks/pixel_metrics.py`` times it against
scikit-learn's ``roc_auc_score``). The tests cross-check them against
``roc_auc_score`` and a brute-force AUPRO.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Union

import numpy as np
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "f1_at_threshold",
    "best_f1",
    "aupro",
    "compute_metrics",
]

_ONE_CLASS_MSG = "AUROC needs both good and defective samples"
_NO_REGION_MSG = "AUPRO needs at least one defect region in the masks"
_NO_FREE_MSG = "AUPRO needs defect-free pixels to measure false positives"
_NAN_MSG = "anomaly maps contain NaN"

# Masks or maps of a test set: an (N, H, W) array (or one (H, W) image), or a
# sequence of 2-D arrays whose sizes may differ from image to image.
Images = Union[np.ndarray, Sequence[np.ndarray]]

# Pixels handled per step of the sweep over the sorted keys: bounds the
# temporaries (a few arrays of this length) whatever the number of pixels.
_SWEEP_CHUNK = 1 << 20

# 8-connectivity: pixels touching only at a corner belong to the same region,
# as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_binary_labels(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a flat bool array, rejecting values other than 0/1."""
    arr = np.asarray(labels).ravel()
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("labels must contain only 0 (good) and 1 (defective)")
        arr = arr.astype(bool)
    return arr


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-image labels and scores; return them as flat arrays."""
    y = _as_binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    return y, s


def _split_images(images: Images) -> list[np.ndarray]:
    """One 2-D array per image (views of an (N, H, W) array, no copies)."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(image) for image in images]
        if all(a.ndim == 2 for a in arrays):
            return arrays
        if not all(a.ndim <= 1 for a in arrays):
            bad = next(i for i, a in enumerate(arrays) if a.ndim != 2)
            raise ValueError(
                f"masks and maps must be 2-D images, got shape {arrays[bad].shape} at image {bad}"
            )
        # Nested lists of numbers: one image written out as lists, as before.
    arr = np.asarray(images)
    if arr.ndim == 2:
        return [arr]
    if arr.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W), got {arr.shape}")
    return list(arr)


def _pixel_inputs(masks: Images, maps: Images) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate masks/maps; return (mask, map) pairs, one per image.

    Accepts arrays of shape (N, H, W) (a single (H, W) image too) or sequences
    of 2-D arrays; mask i and map i must have the same shape. Masks are
    returned as bool (non-zero = defect); maps as given.
    """
    if not isinstance(masks, (list, tuple)) and not isinstance(maps, (list, tuple)):
        m, a = np.asarray(masks), np.asarray(maps)
        if m.shape != a.shape:
            raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
        masks, maps = m, a
    mask_list = _split_images(masks)
    map_list = _split_images(maps)
    if len(mask_list) != len(map_list):
        raise ValueError(
            f"masks and maps differ in number of images: {len(mask_list)} vs {len(map_list)}"
        )
    pairs = []
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        if m.shape != a.shape:
            raise ValueError(f"masks and maps differ in shape at image {i}: {m.shape} vs {a.shape}")
        # Masks loaded from images may be 0/255; anything non-zero is defect.
        pairs.append((m if m.dtype == bool else m != 0, a))
    return pairs


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of per-image anomaly scores.

    Args:
        labels: shape (N,), 0 for good and 1 for defective images.
        scores: shape (N,), higher means more anomalous.

    Raises:
        ValueError: if only one class is present.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        raise ValueError(_ONE_CLASS_MSG)
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Images, maps: Images) -> float:
    """Area under the ROC curve over all pixels of all images.

    Every distinct score is a threshold and tied pixels enter together; the
    area is the trapezoid rule over those points, as scikit-learn's
    ``roc_auc_score`` computes it (here in exact integer arithmetic). Scores
    are compared as float32 (see :func:`aupro`).

    Args:
        masks: shape (N, H, W), or a sequence of N 2-D arrays whose sizes may
            differ; bool or 0/1 ground truth (non-zero = defect).
        maps: anomaly maps of the same shape(s), higher means more anomalous.

    Raises:
        ValueError: if every pixel is defective or every pixel is good, the
            shapes differ, or a map contains NaN.
    """
    auroc, _ = _pixel_metrics(masks, maps, auroc=True, fpr_limit=None)
    assert auroc is not None
    return auroc


def f1_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 score of the defect class when images with ``score >= threshold`` are flagged."""
    y, s = _image_inputs(labels, scores)
    predicted = s >= threshold
    return float(f1_score(y, predicted, zero_division=0))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold reaching it.

    The threshold follows the ``score >= threshold`` convention of
    :func:`f1_at_threshold`, so ``f1_at_threshold(labels, scores, t)`` gives
    back the same F1. If several thresholds tie, the highest one is returned.

    Raises:
        ValueError: if there is no defective sample (F1 is undefined).
    """
    y, s = _image_inputs(labels, scores)
    if not y.any():
        raise ValueError("F1 needs at least one defective sample")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last precision/recall pair (1, 0) has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    # precision + recall is 0 when nothing flagged is a true defect; F1 is 0 then.
    f1 = np.divide(
        2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0
    )
    # Thresholds come in increasing order; take the last maximum so that ties
    # resolve to the strictest (highest) threshold.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(thresholds[best])


def _ordered_uint32(amap: np.ndarray) -> np.ndarray:
    """The scores of ``amap`` as float32, mapped to uint32 in the same order.

    Raises:
        ValueError: if ``amap`` contains NaN (it has no place in the order).
    """
    # Adding +0.0 turns -0.0 into +0.0: the two compare equal, so must tie.
    scores = np.asarray(amap, dtype=np.float32) + np.float32(0.0)
    if np.isnan(scores).any():
        raise ValueError(_NAN_MSG)
    # IEEE floats order like sign-magnitude integers. Non-negative: set the
    # sign bit so they rank above all negatives. Negative: flip every bit so
    # a larger magnitude ranks lower. (The int32 shift copies the sign bit.)
    flip = (scores.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return scores.view(np.uint32) ^ flip


def _sorted_keys(
    images: list[tuple[np.ndarray, np.ndarray]], label_regions: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One uint64 per pixel, ``score << 32 | region id``, sorted ascending.

    The high half is the float32 score as an order-preserving uint32, so
    sorting the keys sorts the pixels by score and carries each pixel's region
    id along without an argsort and gathers. Region id 0 is a defect-free
    pixel; with ``label_regions`` the ids 1.. number the 8-connected
    components of each image's mask, one image after the other (a region never
    spans two images), otherwise every defect pixel has id 1.

    Returns:
        ``(keys, areas)``: the sorted keys and the pixel count of each region
        (``areas[k - 1]`` for id ``k``; empty without ``label_regions``).
    """
    keys = np.empty(sum(m.size for m, _ in images), dtype=np.uint64)
    areas: list[np.ndarray] = []
    n_regions = 0
    offset = 0
    for mask, amap in images:
        if label_regions:
            ids, count = ndimage.label(mask, structure=_EIGHT_CONNECTED, output=np.int32)
            areas.append(np.bincount(ids.ravel(), minlength=count + 1)[1:])
            np.add(ids, n_regions, out=ids, where=mask)  # local -> global numbering
            n_regions += count
            ids = ids.view(np.uint32)
        else:
            ids = mask.view(np.uint8)
        out = keys[offset : offset + mask.size]
        out[:] = _ordered_uint32(amap).ravel()
        out <<= np.uint64(32)
        out |= ids.ravel()
        offset += mask.size
    keys.sort()  # in place: the only full-size array of the computation
    return keys, (np.concatenate(areas) if areas else np.zeros(0, dtype=np.int64))


def _pixel_metrics(
    masks: Images, maps: Images, *, auroc: bool, fpr_limit: float | None
) -> tuple[float | None, float | None]:
    """Pixel AUROC (if ``auroc``) and AUPRO (if ``fpr_limit`` is set) from one sort.

    Walks the sorted pixels from the highest score down, one chunk at a time.
    The end of each run of tied scores is one point of both curves: ROC
    (defect pixels above vs defect-free pixels above) and PRO (each region
    pixel adds 1 / (area * n_regions) to PRO, so a fully covered region adds
    1 / n_regions).
    """
    images = _pixel_inputs(masks, maps)
    n_total = sum(m.size for m, _ in images)
    n_pos = sum(int(np.count_nonzero(m)) for m, _ in images)
    n_neg = n_total - n_pos
    if auroc and (n_pos == 0 or n_neg == 0):
        raise ValueError(_ONE_CLASS_MSG)
    if fpr_limit is not None:
        if n_pos == 0:
            raise ValueError(_NO_REGION_MSG)
        if n_neg == 0:
            raise ValueError(_NO_FREE_MSG)

    keys, areas = _sorted_keys(images, label_regions=fpr_limit is not None)
    pro_weight = None
    if fpr_limit is not None:
        pro_weight = np.empty(areas.size + 1, dtype=np.float64)
        pro_weight[0] = 0.0
        pro_weight[1:] = 1.0 / (areas.astype(np.float64) * areas.size)

    # The two uint32 halves of each key, as strided views (no copies); reversed
    # so that index order is descending score = lowering the threshold.
    halves = keys.view(np.uint32).reshape(-1, 2)[::-1]
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    region_ids, levels = halves[:, low], halves[:, high]

    tp = fp = 0  # defect / defect-free pixels seen so far (Python ints)
    tp_point = fp_point = 0  # the same, at the last curve point (a run end)
    roc_twice = 0  # 2 * AUROC * n_pos * n_neg, exact in integers
    pro_seen = 0.0  # PRO weight of the pixels seen so far
    fpr_point = pro_point = 0.0  # last PRO curve point, starting at (0, 0)
    pro_area = 0.0
    pro_done = pro_weight is None
    for start in range(0, n_total, _SWEEP_CHUNK):
        if pro_done and not auroc:
            break  # AUPRO alone needs only the pixels up to the FPR limit
        stop = min(start + _SWEEP_CHUNK, n_total)
        ids = region_ids[start:stop]

        # A run of ties ends where the next (lower) score differs; the last
        # pixel always ends one. Only run ends are points of the curves:
        # tied pixels all pass a threshold at once.
        run_end = np.empty(stop - start, dtype=bool)
        if stop < n_total:
            np.not_equal(levels[start:stop], levels[start + 1 : stop + 1], out=run_end)
        else:
            np.not_equal(levels[start : stop - 1], levels[start + 1 : stop], out=run_end[:-1])
            run_end[-1] = True
        ends = np.flatnonzero(run_end)
        del run_end

        pos_seen = np.cumsum(ids != 0, dtype=np.int64)
        tp_ends = tp + pos_seen[ends]
        fp_ends = fp + (ends + 1) - pos_seen[ends]
        tp += int(pos_seen[-1])
        fp += (stop - start) - int(pos_seen[-1])
        del pos_seen

        if ends.size and auroc:
            # Trapezoids between consecutive points, times 2 * n_pos * n_neg.
            tp_before = np.concatenate(([tp_point], tp_ends[:-1]))
            roc_twice += int(np.dot(np.diff(fp_ends, prepend=fp_point), tp_ends + tp_before))

        if not pro_done:
            assert pro_weight is not None and fpr_limit is not None
            pro_cum = pro_weight[ids]
            np.cumsum(pro_cum, out=pro_cum)
            pro_ends = pro_seen + pro_cum[ends]
            pro_seen += float(pro_cum[-1])
            del pro_cum
            # Floating-point summation can overshoot 1 by a few ulps.
            np.minimum(pro_ends, 1.0, out=pro_ends)
            fpr_ends = fp_ends / n_neg
            # Points with fpr <= limit are integrated as they are; the curve
            # ends at fpr 1, so for a limit < 1 some later point lies beyond
            # it and PRO is interpolated there.
            n_in = int(np.searchsorted(fpr_ends, fpr_limit, side="right"))
            x = np.concatenate(([fpr_point], fpr_ends[:n_in]))
            y = np.concatenate(([pro_point], pro_ends[:n_in]))
            if n_in < fpr_ends.size:
                x0, x1 = x[-1], fpr_ends[n_in]
                y0, y1 = y[-1], pro_ends[n_in]
                x = np.append(x, fpr_limit)
                y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
                pro_done = True
            pro_area += float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
            fpr_point, pro_point = float(x[-1]), float(y[-1])

        if ends.size:
            tp_point, fp_point = int(tp_ends[-1]), int(fp_ends[-1])

    auroc_value = roc_twice / (2 * n_pos * n_neg) if auroc else None
    aupro_value = pro_area / fpr_limit if fpr_limit is not None else None
    return auroc_value, aupro_value


def aupro(masks: Images, maps: Images, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AUPRO).

    Each 8-connected component of a ground-truth mask is a region (a region
    never spans two images). At a threshold ``t``, PRO(t) is the mean over
    all regions of all images of the fraction of the region's pixels with
    ``map >= t``, and FPR(t) is the fraction of all defect-free pixels (good
    images included) with ``map >= t``. The curve is integrated with the
    trapezoid rule from FPR 0 to ``fpr_limit`` (PRO linearly interpolated at
    the limit) and divided by ``fpr_limit``, so a perfect map scores 1.0.

    The curve is computed exactly, one point per distinct score, from one sort
    of all pixels rather than from a fixed grid of thresholds. Scores are
    compared as float32: maps of other dtypes are converted, so float64 maps
    that differ only below float32 precision tie (and values beyond the
    float32 range become infinite).

    Args:
        masks: shape (N, H, W), or a sequence of N 2-D arrays whose sizes may
            differ; bool or 0/1 ground truth (non-zero = defect).
        maps: anomaly maps of the same shape(s), higher means more anomalous.
        fpr_limit: upper FPR integration bound, in (0, 1].

    Raises:
        ValueError: if there is no defect region, no defect-free pixel,
            ``fpr_limit`` is outside (0, 1], the shapes differ, or a map
            contains NaN.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    _, value = _pixel_metrics(masks, maps, auroc=False, fpr_limit=fpr_limit)
    assert value is not None
    return value


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: Images,
    maps: Images,
    threshold: float | None,
) -> dict[str, float | None]:
    """All image- and pixel-level metrics in one dictionary.

    Args:
        labels: shape (N,), 0 good / 1 defective.
        scores: shape (N,), per-image anomaly scores.
        masks: shape (N, H, W), or a sequence of N 2-D arrays whose sizes may
            differ (each image at its own resolution): ground-truth masks.
        maps: anomaly maps of the same shape(s).
        threshold: image decision threshold; ``image_f1`` is None without one.

    Returns:
        Keys ``image_auroc``, ``pixel_auroc``, ``image_f1``, ``image_f1_max``,
        ``image_f1_max_threshold`` and ``pixel_aupro``, as Python floats.
    """
    f1_max, f1_max_threshold = best_f1(labels, scores)
    auroc = image_auroc(labels, scores)
    # Both pixel metrics from one sort of all pixels (AUPRO at FPR <= 0.3).
    pixel_auroc_value, pixel_aupro_value = _pixel_metrics(masks, maps, auroc=True, fpr_limit=0.3)
    return {
        "image_auroc": auroc,
        "pixel_auroc": pixel_auroc_value,
        "image_f1": None if threshold is None else f1_at_threshold(labels, scores, threshold),
        "image_f1_max": f1_max,
        "image_f1_max_threshold": f1_max_threshold,
        "pixel_aupro": pixel_aupro_value,
    }
