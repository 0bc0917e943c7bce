"""COCO bbox metrics for a model's detections, with pycocotools or faster-coco-eval.

Metric names (a contract other tools read): mAP (AP@[.5:.95]), mAP50, mAP75, mAP_small,
mAP_medium, mAP_large, AR100, AR300, AR1000, AR_small, AR_medium, AR_large: mmdet's CocoMetric,
which produced the published figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.coco import CocoDataset
from .model import ModelSpec
from .runner import StageTimes, load_letterboxed, run_detector, to_coco_results

# mmdet's CocoMetric sets COCOeval's maxDets to its proposal_nums, (100, 300, 1000), and reads
# pycocotools' summary: mAP at 100 detections per image (summarize's fixed default), the others at
# the last, 1000 (max_per_img, 300, caps them). faster-coco-eval summarizes mAP at the last too,
# so the metrics are read from the accumulated arrays, the same for both evaluators.
MAX_DETS = (100, 300, 1000)
# name → (AP, else AR; IoU threshold, None for .50:.95; area range; detections per image)
METRICS = {
    "mAP": (True, None, "all", 100), "mAP50": (True, 0.5, "all", 1000), "mAP75": (True, 0.75, "all", 1000),
    "mAP_small": (True, None, "small", 1000), "mAP_medium": (True, None, "medium", 1000),
    "mAP_large": (True, None, "large", 1000),
    "AR100": (False, None, "all", 100), "AR300": (False, None, "all", 300), "AR1000": (False, None, "all", 1000),
    "AR_small": (False, None, "small", 1000), "AR_medium": (False, None, "medium", 1000),
    "AR_large": (False, None, "large", 1000),
}
METRIC_NAMES = tuple(METRICS)
# COCOeval's area ranges (px²)
AREA_RANGES = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
EVALUATORS = ("pycocotools", "faster-coco-eval")


def _load_gt(annotation_file: Path, evaluator: str):
    with contextlib.redirect_stdout(io.StringIO()):
        if evaluator == "pycocotools":
            from pycocotools.coco import COCO
        else:
            from faster_coco_eval import COCO
        return COCO(str(annotation_file))


def coco_metrics(annotation_file: str | Path, results: Sequence[dict], category_ids: Sequence[int],
                 evaluator: str = "faster-coco-eval", image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO bbox metrics of ``results`` (COCO results rows) on ``category_ids``.

    ``image_ids`` restricts the evaluation (default: every image in the annotation file).
    Detections of other categories are ignored, as mmdet's CocoMetric does.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}")
    gt = _load_gt(Path(annotation_file), evaluator)
    ids = list(image_ids) if image_ids is not None else sorted(gt.getImgIds())
    wanted = set(category_ids)
    # Shallow copies: loadRes adds keys to the rows it is given (a deep copy of 1.5 M rows: 8 s)
    rows = [dict(r) for r in results if r["category_id"] in wanted]
    if not rows:  # loadRes rejects an empty list
        return _metrics_of_no_detections(gt, ids, category_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(rows)
        if evaluator == "pycocotools":
            from pycocotools.cocoeval import COCOeval
            coco_eval = COCOeval(gt, dt, "bbox")
        else:
            from faster_coco_eval import COCOeval_faster
            coco_eval = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
        coco_eval.params.catIds = list(category_ids)
        coco_eval.params.imgIds = ids
        coco_eval.params.maxDets = list(MAX_DETS)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return {name: _summarized(coco_eval, *METRICS[name]) for name in METRIC_NAMES}


def _summarized(coco_eval, average_precision: bool, iou: float | None, area: str, max_dets: int) -> float:
    """One of COCOeval's summary figures, as its ``summarize`` computes it; NaN where it reports
    -1 (nothing to measure: no ground truth in the area range)."""
    params = coco_eval.params
    # precision: [IoU, recall, class, area, maxDets]; recall: [IoU, class, area, maxDets]
    values = coco_eval.eval["precision" if average_precision else "recall"]
    values = values[..., params.areaRngLbl.index(area), list(params.maxDets).index(max_dets)]
    if iou is not None:
        values = values[np.isclose(params.iouThrs, iou)]
    values = values[values > -1]
    return float(values.mean()) if values.size else float("nan")


def _metrics_of_no_detections(gt, image_ids: list[int], category_ids: Sequence[int]) -> dict[str, float]:
    """What COCOeval gives when nothing was detected: 0 where the ground truth has boxes to find
    (not crowds) in the metric's area range, NaN (its -1) where it has none."""
    areas = [a["area"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, catIds=list(category_ids)))
             if not a.get("iscrowd", 0)]

    def found_nothing(name: str) -> float:
        low, high = AREA_RANGES[METRICS[name][2]]
        return 0.0 if any(low <= area <= high for area in areas) else float("nan")

    return {name: found_nothing(name) for name in METRIC_NAMES}


def write_results(path: str | Path, results: Sequence[dict]) -> None:
    """Write COCO results JSON atomically (re-scorable with pycocotools' ``loadRes``)."""
    from .fsutil import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(list(results)))


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    results: list[dict]  # COCO results rows
    times: StageTimes
    dataset: dict  # the dataset's fingerprint

    def images_per_s(self) -> dict[str, float]:
        return self.times.images_per_s()


def evaluate_engine(dataset: CocoDataset, engine, spec: ModelSpec, batch_size: int = 32,
                    max_images: int | None = None, workers: int | None = None, corrupt: str = "warn",
                    evaluator: str = "faster-coco-eval", progress: bool = True, loader=load_letterboxed,
                    decode_in: str = "auto", **test_cfg) -> EvalResult:
    """Run ``engine`` over the dataset (or its first ``max_images``) and score it.

    ``loader``, ``decode_in`` and ``test_cfg`` are :func:`rtmbench.runner.run_detector`'s.
    """
    items = dataset.items(max_images)
    times = StageTimes()
    # Rows are made after the loop: made inside it, they would run on the engine's thread.
    predictions = list(run_detector(items, engine, spec, batch_size, workers=workers, corrupt=corrupt,
                                    progress=progress, times=times, loader=loader, decode_in=decode_in,
                                    **test_cfg))
    results = [row for pred in predictions for row in to_coco_results(pred, pred.key, dataset.category_ids)]
    metrics = coco_metrics(dataset.annotation_file, results, dataset.category_ids, evaluator,
                           image_ids=[image_id for image_id, _ in items])
    return EvalResult(metrics, results, times, dataset.fingerprint(max_images))
