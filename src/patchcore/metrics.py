"""Evaluation metrics for anomaly detection.

Image level: AUROC and F1 on per-image anomaly scores (label 0 = good,
1 = defective). Pixel level: AUROC on anomaly maps and AUPRO, the area under
the per-region-overlap curve defined for the MVTec AD benchmark (Bergmann et
al., IJCV 2021).
"""

from __future__ import annotations

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


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks/maps of shape (N, H, W) (a single (H, W) image is accepted)."""
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W), got {m.shape}")
    if m.dtype != bool:
        # Masks loaded from images may be 0/255; anything non-zero is defect.
        m = m != 0
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return m, a


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


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images.

    Args:
        masks: shape (N, H, W), bool or 0/1 ground truth (non-zero = defect).
        maps: shape (N, H, W), anomaly maps, higher means more anomalous.

    Raises:
        ValueError: if every pixel is defective or every pixel is good.
    """
    m, a = _pixel_inputs(masks, maps)
    y = m.ravel()
    if y.all() or not y.any():
        raise ValueError(_ONE_CLASS_MSG)
    # ravel() is a view for contiguous input, so the only large copies are the
    # ones sklearn makes internally (a sort of ~N*H*W values).
    return float(roc_auc_score(y, a.ravel()))


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


def _pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR curve: one point per distinct score, plus (0, 0).

    Returns ``(fpr, pro)``, both float64 and non-decreasing.
    """
    n_images = masks.shape[0]
    # Give every connected component a globally unique id (0 = defect-free).
    region_ids = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i in range(n_images):
        labelled, count = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        if count:
            region_ids[i] = np.where(labelled > 0, labelled + n_regions, 0)
            n_regions += count
    if n_regions == 0:
        raise ValueError(_NO_REGION_MSG)

    region_ids = region_ids.ravel()
    areas = np.bincount(region_ids, minlength=n_regions + 1)
    n_free = int(areas[0])
    if n_free == 0:
        raise ValueError("AUPRO needs defect-free pixels to measure false positives")

    # Each region pixel adds 1 / (area * n_regions) to PRO: once all of a
    # region's pixels are above the threshold, that region adds 1 / n_regions.
    pro_weight = np.empty(n_regions + 1, dtype=np.float64)
    pro_weight[0] = 0.0
    pro_weight[1:] = 1.0 / (areas[1:].astype(np.float64) * n_regions)

    scores = maps.ravel()
    # Descending order = lowering the threshold one pixel at a time.
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_ids = region_ids[order]
    del region_ids
    sorted_scores = scores[order]
    del order

    pro = pro_weight[sorted_ids]
    np.cumsum(pro, out=pro)  # in place: one float64 array of N*H*W, not two
    # Counting free pixels with integers keeps FPR exact until the final divide.
    fpr_counts = np.cumsum(sorted_ids == 0)
    del sorted_ids

    # With tied scores every pixel of the run is above the threshold at once,
    # so only the last index of each run is a real point on the curve.
    run_ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    keep = np.append(run_ends, sorted_scores.size - 1)
    del sorted_scores

    fpr = np.concatenate(([0.0], fpr_counts[keep] / n_free))
    pro = np.concatenate(([0.0], pro[keep]))
    # Floating-point summation can overshoot 1 by a few ulps.
    np.minimum(pro, 1.0, out=pro)
    return fpr, pro


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AUPRO).

    Each 8-connected component of a ground-truth mask is a region. At a
    threshold ``t``, PRO(t) is the mean over all regions of all images of the
    fraction of the region's pixels with ``map >= t``, and FPR(t) is the
    fraction of all defect-free pixels (good images included) with
    ``map >= t``. The curve is integrated with the trapezoid rule from FPR 0
    to ``fpr_limit`` (PRO linearly interpolated at the limit) and divided by
    ``fpr_limit``, so a perfect map scores 1.0.

    The curve is computed exactly from one sort of all pixels rather than
    from a fixed grid of thresholds.

    Args:
        masks: shape (N, H, W), bool or 0/1 ground truth (non-zero = defect).
        maps: shape (N, H, W), anomaly maps, higher means more anomalous.
        fpr_limit: upper FPR integration bound, in (0, 1].

    Raises:
        ValueError: if there is no defect region, no defect-free pixel, or
            ``fpr_limit`` is outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixel_inputs(masks, maps)
    fpr, pro = _pro_curve(m, a)

    # Points with fpr <= limit are integrated as they are; the last point of
    # the curve always has fpr == 1, so for limit < 1 there is a next point
    # with fpr strictly above the limit to interpolate towards.
    n_in = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x = fpr[:n_in]
    y = pro[:n_in]
    if n_in < fpr.size:
        x0, x1 = fpr[n_in - 1], fpr[n_in]
        y0, y1 = pro[n_in - 1], pro[n_in]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_limit)

    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float | None,
) -> dict[str, float | None]:
    """All image- and pixel-level metrics in one dictionary.

    Args:
        labels: shape (N,), 0 good / 1 defective.
        scores: shape (N,), per-image anomaly scores.
        masks: shape (N, H, W), ground-truth defect masks.
        maps: shape (N, H, W), anomaly maps.
        threshold: image decision threshold; ``image_f1`` is None without one.

    Returns:
        Keys ``image_auroc``, ``pixel_auroc``, ``image_f1``, ``image_f1_max``,
        ``image_f1_max_threshold`` and ``pixel_aupro``, as Python floats.
    """
    f1_max, f1_max_threshold = best_f1(labels, scores)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "image_f1": None if threshold is None else f1_at_threshold(labels, scores, threshold),
        "image_f1_max": f1_max,
        "image_f1_max_threshold": f1_max_threshold,
        "pixel_aupro": aupro(masks, maps),
    }
