"""COCO bbox metrics for a model's detections, with pycocotools or faster-coco-eval.

Metric names (a contract other tools read): mAP (AP@[.5:.95]), mAP50, mAP75, mAP_small,
mAP_medium, mAP_large, AR1, AR10, AR100, AR_small, AR_medium, AR_large.
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

METRIC_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
# COCOeval's area ranges (px²) by metric suffix: mAP / AR are "", mAP_small / AR_small "small", …
AREA_RANGES = {"": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
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
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = np.asarray(coco_eval.stats[:len(METRIC_NAMES)], dtype=float)
    # COCOeval reports -1 where a size range has no ground truth: NaN says 'not measurable'.
    return {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, stats)}


def _metrics_of_no_detections(gt, image_ids: list[int], category_ids: Sequence[int]) -> dict[str, float]:
    """What COCOeval gives when nothing was detected: 0 where the ground truth has boxes to find
    (not crowds) in the metric's area range, NaN (its -1) where it has none."""
    areas = [a["area"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, catIds=list(category_ids)))
             if not a.get("iscrowd", 0)]

    def found_nothing(name: str) -> float:
        low, high = AREA_RANGES[name.partition("_")[2]]
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
