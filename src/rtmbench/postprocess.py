"""RTMDet test-time decoding, exactly mmdet's ``predict_by_feat`` semantics: the NumPy reference
here, the same per-image steps compiled with numba (``postprocess_kernel``) and batched in torch
for a GPU engine's device (``postprocess_torch``), all giving identical detections.

Per image: sigmoid scores → keep scores > ``score_thr`` → top ``nms_pre`` by score → decode the
distances at the kept priors, clamped to the padded input → multiply by float32(1 / scale
factor), as mmdet rescales (not clipped to the image) → drop boxes no wider/taller than
``min_bbox_size`` → per-class greedy NMS (suppress IoU > ``iou_threshold``) → first ``max_per_img``.
mmdet takes the top ``nms_pre`` per feature level, here over all levels: the same wherever
priors × classes ≤ ``nms_pre`` (2,100 × 1 ≤ 30,000 for every model in models.yaml; tested).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .data.preprocess import ImageMeta

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Detections:
    """One image's detections, best first.

    boxes: float32[N, 4] xyxy in original-image pixels; scores: float32[N] in (0, 1];
    labels: int64[N] model class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def grid_priors(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int]) -> np.ndarray:
    """Prior points of every level, concatenated: float32[sum(H*W), 2] as (x*stride, y*stride).

    Row-major within a level (index = y * W + x), matching the head maps' flattening.
    """
    points = []
    for (h, w), stride in zip(featmap_sizes, strides):
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) * stride,
                             np.arange(w, dtype=np.float32) * stride, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
    return np.concatenate(points)


def flatten_levels(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-level maps float32[B, C, H, W] → float32[B, sum(H*W), C]."""
    return np.concatenate([m.reshape(m.shape[0], m.shape[1], -1).transpose(0, 2, 1) for m in maps], axis=1)


def distance2bbox(points: np.ndarray, distances: np.ndarray,
                  max_shape: tuple[int, int] | None = None) -> np.ndarray:
    """points float32[N, 2] (x, y) and distances float32[..., N, 4] (left, top, right, bottom)
    → boxes float32[..., N, 4] xyxy, clamped to [0, width] × [0, height] of ``max_shape`` = (h, w).
    """
    boxes = np.concatenate([points - distances[..., :2], points + distances[..., 2:]], axis=-1)
    if max_shape is not None:
        upper = np.array([max_shape[1], max_shape[0], max_shape[1], max_shape[0]], boxes.dtype)
        boxes = np.clip(boxes, 0, upper)
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS as mmcv's ``nms``: boxes float32[N, 4] xyxy, scores float32[N].

    Visits boxes by descending score (stable among equal scores) and suppresses every later box
    whose IoU with a kept one is > ``iou_threshold``. Stopping after ``max_keep`` kept boxes gives
    the same first ``max_keep`` as running to the end. Returns int64[K] indices, best first.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size and (max_keep is None or len(keep) < max_keep):
        i, rest = order[0], order[1:]
        keep.append(i)
        inter = (np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
                 * np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Per-class NMS in one pass: boxes of different labels are offset so they never overlap."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = labels.astype(boxes.dtype)[:, None] * (boxes.max() + 1)
    return nms(boxes + offsets, scores, iou_threshold, max_keep)


IMPLEMENTATIONS = ("auto", "numba", "numpy", "torch")


@functools.cache
def _compiled_kernel():
    """numba's :func:`~rtmbench.postprocess_kernel.detect_batch`, or None (with one warning)."""
    try:
        from .postprocess_kernel import detect_batch
    except ImportError as exc:
        log.warning("numba is not importable (%s): postprocessing runs on a GPU engine's device, "
                    "else the NumPy reference, about 25x slower (pip install numba)", exc)
        return None
    return detect_batch


def _detect_image_numpy(flat_scores, distances, priors, num_classes, rescale, clamp, score_thr,
                        nms_pre, iou_threshold, max_per_img, min_bbox_size):
    """The reference for one image; arguments and results as ``postprocess_kernel.detect_image``."""
    candidates = np.flatnonzero(flat_scores > score_thr)
    candidates = candidates[np.argsort(-flat_scores[candidates], kind="stable")[:nms_pre]]
    prior_idx, labels = np.divmod(candidates, num_classes)
    boxes = distance2bbox(priors[prior_idx], distances[prior_idx], (clamp[1], clamp[0])) * rescale
    scores = flat_scores[candidates]
    if min_bbox_size >= 0:
        valid = ((boxes[:, 2] - boxes[:, 0]) > min_bbox_size) & ((boxes[:, 3] - boxes[:, 1]) > min_bbox_size)
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = batched_nms(boxes, scores, labels, iou_threshold, max_per_img)
    return boxes[keep], scores[keep], labels[keep].astype(np.int64)


def postprocess(outputs: Mapping[str, np.ndarray], metas: Sequence[ImageMeta],
                input_size: tuple[int, int] = (320, 320), strides: Sequence[int] = (8, 16, 32),
                score_thr: float = 0.001, nms_pre: int = 30000, iou_threshold: float = 0.65,
                max_per_img: int = 300, min_bbox_size: float = 0.0,
                implementation: str = "auto", device: str | None = None) -> list[Detections]:
    """Raw head outputs of a batch → one :class:`Detections` per image in ``metas``.

    outputs: ``cls_score_{i}`` float[B, C, H_i, W_i] logits and ``bbox_pred_{i}`` float[B, 4, H_i, W_i]
    distances in input pixels, i = level of ``strides``; rows past ``len(metas)`` (batch padding)
    are ignored. input_size: (height, width) of the padded network input, the box clamp bound.
    Defaults are RTMDet's test_cfg. ``implementation`` (all give identical detections):
    ``numpy``, the reference; ``numba``, compiled; ``torch``, the whole batch at once on ``device``
    (a GPU engine's, falling back to the host above ``postprocess_torch.MAX_CANDIDATES``
    candidates per image); ``auto``, numba when importable, else torch when a ``device`` is
    given, else numpy. (numba on one host core outruns torch on an H200 at RTMDet's ~1,700
    candidates per image: it checks each box against at most ``max_per_img`` kept ones, where
    the batched torch NMS compares all pairs.)
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "numba" if _compiled_kernel() is not None else "torch" if device is not None else "numpy"
    if not metas:
        return []
    levels = range(len(strides))
    cls_maps = [np.asarray(outputs[f"cls_score_{i}"], np.float32)[:len(metas)] for i in levels]
    reg_maps = [np.asarray(outputs[f"bbox_pred_{i}"], np.float32)[:len(metas)] for i in levels]
    for i, (cls, reg) in enumerate(zip(cls_maps, reg_maps)):  # a short batch would mix images up
        if min(len(cls), len(reg)) < len(metas) or cls.shape[2:] != reg.shape[2:] or reg.shape[1:2] != (4,):
            raise ValueError(f"level {i}: cls_score {cls.shape} and bbox_pred {reg.shape} for {len(metas)} "
                             f"images; expected [>= {len(metas)}, C, H, W] and [>= {len(metas)}, 4, H, W]")
    priors = grid_priors([m.shape[2:] for m in cls_maps], strides)
    with np.errstate(over="ignore"):  # exp of a logit below -88 is inf in float32: a score of 0, as it should be
        scores = 1.0 / (1.0 + np.exp(-flatten_levels(cls_maps)))  # [B, N, C]
    distances = np.ascontiguousarray(flatten_levels(reg_maps))  # [B, N, 4]
    num_classes = scores.shape[2]
    scores = scores.reshape(len(metas), -1)
    height, width = input_size
    clamp = np.array([width, height, width, height], np.float32)
    rescales = np.array([[1 / sx, 1 / sy, 1 / sx, 1 / sy] for sx, sy in (m.scale_factor for m in metas)],
                        np.float32).reshape(-1, 4)  # mmdet's: the reciprocal in double, then float32
    thresholds = (np.float32(score_thr), nms_pre, np.float32(iou_threshold), max_per_img, np.float32(min_bbox_size))
    if implementation == "torch":
        from .postprocess_torch import detect_batch

        batch = detect_batch(scores, distances, priors, num_classes, rescales, clamp, *thresholds,
                             device=device or "cpu")
        if batch is not None:
            return [Detections(*image) for image in batch]
    kernel = None if implementation == "numpy" else _compiled_kernel()
    if kernel is not None:
        boxes, kept_scores, labels, counts = kernel(scores, distances, priors, num_classes, rescales, clamp,
                                                    *thresholds)
        ends = np.cumsum(counts)[:-1]
        return [Detections(*image) for image in zip(np.split(boxes, ends), np.split(kept_scores, ends),
                                                     np.split(labels, ends))]
    if implementation == "numba":
        raise ImportError("numba is not installed (pip install numba)")
    return [Detections(*_detect_image_numpy(scores[b], distances[b], priors, num_classes, rescales[b], clamp,
                                            *thresholds))
            for b in range(len(metas))]


def warm_up(strides: Sequence[int] = (8, 16, 32), implementation: str = "auto", device: str | None = None) -> None:
    """Postprocess one tiny dummy batch, so that what :func:`postprocess` does once per process
    (compiling numba's kernel or loading it from its cache, starting CUDA) happens before a
    timed loop instead of inside it."""
    outputs = {}
    for i in range(len(strides)):
        outputs[f"cls_score_{i}"] = np.zeros((1, 1, 2, 2), np.float32)
        outputs[f"bbox_pred_{i}"] = np.ones((1, 4, 2, 2), np.float32)
    postprocess(outputs, [ImageMeta((64, 64), (1.0, 1.0))], (64, 64), strides,
                implementation=implementation, device=device)
