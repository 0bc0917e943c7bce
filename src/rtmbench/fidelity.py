"""Compare two engines' outputs: raw head maps and final detections."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .postprocess import Detections

# Largest error of any head map against the FP32 reference, as a fraction of that map's range,
# for an engine running at that precision on a well-trained model. fp32: rounding-order
# differences only. fp16/bf16: 10 (7) bits of mantissa through ~60 layers; detections decide
# whether the error matters (benchmarks/test_fidelity.py).
OUTPUT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


def relative_max_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|: the error in units of the tensor's range."""
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(np.asarray(actual, np.float64) - reference).max()) / scale


def output_errors(actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """:func:`relative_max_error` for every output name of ``reference``."""
    return {name: relative_max_error(actual[name], ref) for name, ref in reference.items()}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix float64[N, M] of xyxy boxes a[N, 4] and b[M, 4]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(inter / (area_a[:, None] + area_b[None, :] - inter))


def match_rate(actual: Detections, reference: Detections, min_iou: float = 0.99,
               max_score_diff: float = 1e-3) -> float:
    """Fraction of ``reference`` detections matched one-to-one by ``actual`` ones with the same
    label, IoU ≥ ``min_iou`` and |Δscore| ≤ ``max_score_diff`` (greedy, best reference first).
    """
    if len(reference) == 0:
        return 1.0 if len(actual) == 0 else 0.0
    iou = box_iou(reference.boxes, actual.boxes)
    ok = ((iou >= min_iou) & (np.abs(reference.scores[:, None] - actual.scores[None, :]) <= max_score_diff)
          & (reference.labels[:, None] == actual.labels[None, :]))
    used = np.zeros(len(actual), bool)
    matched = 0
    for i in np.argsort(-reference.scores, kind="stable"):
        candidates = np.flatnonzero(ok[i] & ~used)
        if candidates.size:
            used[candidates[np.argmax(iou[i, candidates])]] = True
            matched += 1
    return matched / len(reference)


def identical(actual: Detections, expected: Detections) -> bool:
    """Same boxes, scores and labels, bit for bit, in the same order and dtypes."""
    return all(getattr(actual, f).dtype == getattr(expected, f).dtype
               and np.array_equal(getattr(actual, f), getattr(expected, f)) for f in ("boxes", "scores", "labels"))
