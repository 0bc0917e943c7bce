"""The per-image half of :func:`rtmbench.postprocess.postprocess` for a whole batch at once, in
PyTorch, on the engine's device (a GPU engine postprocesses at its own speed, not the host's).

Same float32 arithmetic as the NumPy reference, so the detections are identical: a stable
descending sort of the scores the host computed, the same decode / clamp / rescale / size filter /
class offsets, and the greedy NMS result obtained without a sequential loop. Greedy NMS keeps box
j (in score order) iff no kept box before it overlaps j by IoU > threshold; iterating
``keep[j] = not any(keep[i] and suppresses[i, j] for i < j)`` from "all kept" fixes one more
leading box per step and stops at the unique fixed point, which is the greedy result.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

MAX_CANDIDATES = 4096  # per image; above this the [B, K, K] IoU matrix is too large: use the host


def detect_batch(scores: np.ndarray, distances: np.ndarray, priors: np.ndarray, num_classes: int,
                 rescales: np.ndarray, clamp: np.ndarray, score_thr: float, nms_pre: int,
                 iou_threshold: float, max_per_img: int, min_bbox_size: float,
                 device: str | torch.device) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Detections of B images, or None when an image has more than :data:`MAX_CANDIDATES`.

    scores: float32[B, P * C] sigmoid scores (prior-major); distances: float32[B, P, 4]; priors:
    float32[P, 2]; rescales: float32[B, 4] = 1 / (sx, sy, sx, sy) per image; clamp: float32[4] =
    (w, h, w, h) of the padded input. Returns per image (boxes float32[K, 4] xyxy in original
    pixels, scores float32[K], labels int64[K]), best first, as ``postprocess_kernel.detect_image``.
    """
    score_thr, iou_threshold = np.float32(score_thr), np.float32(iou_threshold)
    counts = (scores > score_thr).sum(axis=1)
    width = int(min(counts.max(initial=0), nms_pre))
    if width > MAX_CANDIDATES:
        return None
    batch = len(scores)
    if width == 0:
        return [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))] * batch
    with torch.inference_mode(), _own_stream(torch.device(device)):
        flat = torch.from_numpy(scores).to(device)
        candidate = flat > float(score_thr)
        # Stable descending sort with non-candidates last: candidates in the reference's order.
        order = torch.sort(torch.where(candidate, flat, -1.0), dim=1, descending=True, stable=True)[1][:, :width]
        top_scores = torch.gather(flat, 1, order)
        is_candidate = torch.gather(candidate, 1, order)
        prior, labels = order // num_classes, order % num_classes
        dist = torch.gather(torch.from_numpy(distances).to(device), 1, prior[..., None].expand(-1, -1, 4))
        points = torch.from_numpy(priors).to(device)[prior]
        corners = torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=2)
        clamp_t = torch.from_numpy(clamp).to(device)
        boxes = torch.minimum(torch.clamp(corners, min=0.0), clamp_t) * torch.from_numpy(rescales).to(device)[:, None]
        valid = is_candidate
        if min_bbox_size >= 0:
            size_floor = torch.tensor(np.float32(min_bbox_size), device=device)
            valid = valid & ((boxes[..., 2] - boxes[..., 0]) > size_floor) & ((boxes[..., 3] - boxes[..., 1]) > size_floor)
        keep = _greedy_nms(boxes, labels, valid, iou_threshold)
        rank = torch.cumsum(keep, dim=1)
        keep &= rank <= max_per_img
        kept = [k.cpu().numpy() for k in keep]
        boxes, top_scores, labels = boxes.cpu().numpy(), top_scores.cpu().numpy(), labels.cpu().numpy()
    return [(boxes[b][kept[b]], top_scores[b][kept[b]], labels[b][kept[b]].astype(np.int64)) for b in range(batch)]


_streams = threading.local()


def _own_stream(device: torch.device):
    """On a GPU, this thread's own CUDA stream: postprocessing then waits only for its own work,
    not for the engine's next batch queued on the default stream."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    streams = _streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(streams[device])


def _greedy_nms(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                iou_threshold: np.float32) -> torch.Tensor:
    """bool[B, K]: which of the score-ordered ``boxes`` float32[B, K, 4] greedy NMS keeps.

    Boxes of different ``labels`` are offset apart per image (max coordinate of the image's valid
    boxes + 1) as mmcv's batched_nms, so the float32 IoUs are the reference's.
    """
    masked = torch.where(valid[..., None], boxes, torch.finfo(boxes.dtype).min)
    offset = masked.amax(dim=(1, 2)) + 1.0
    shifted = boxes + (labels.to(boxes.dtype) * offset[:, None])[..., None]
    x1, y1, x2, y2 = shifted.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    widths = torch.clamp(torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]), min=0.0)
    heights = torch.clamp(torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]), min=0.0)
    inter = widths * heights
    iou = inter / (areas[:, :, None] + areas[:, None, :] - inter)
    del widths, heights, inter
    size = boxes.shape[1]
    later = torch.ones(size, size, dtype=torch.bool, device=boxes.device).triu(1)
    suppresses = ((iou > float(iou_threshold)) & later & valid[:, :, None] & valid[:, None, :]).to(torch.float32)
    del iou
    keep = valid.clone()
    while True:
        suppressed = torch.bmm(keep.to(torch.float32)[:, None, :], suppresses)[:, 0] > 0
        update = valid & ~suppressed
        if torch.equal(update, keep):
            return keep
        keep = update
