"""COCO metrics and the COCO-layout reader on small hand-made datasets."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from rtmbench.data.coco import open_coco
from rtmbench.errors import RtmbenchError
from rtmbench.evaluate import METRIC_NAMES, coco_metrics


def write_coco(root, boxes_per_image, image_size=(240, 320), categories=("person",), kind="person_keypoints",
               split="val2017", layout="images"):
    """A COCO-layout dataset of plain JPEGs; boxes_per_image: list of lists of xywh person boxes."""
    image_dir = root / "images" / split if layout == "images" else root / split
    image_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, start=1):
        name = f"{i:012d}.jpg"
        cv2.imwrite(str(image_dir / name), np.full((*image_size, 3), 90, np.uint8))
        images.append({"id": i, "file_name": name, "height": image_size[0], "width": image_size[1]})
        for box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": k + 1, "name": n, "supercategory": n} for k, n in enumerate(categories)]
    ann_file = root / "annotations" / f"{kind}_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_file


BOXES = [[(10, 20, 60, 120), (150, 30, 40, 90)], [], [(5, 5, 200, 180)], [(100, 100, 12, 20)]]


def ground_truth_as_results(boxes_per_image, shift_for=lambda box: 0.0):
    return [{"image_id": i, "category_id": 1, "score": 1.0,
             "bbox": [box[0] + shift_for(box), box[1], box[2], box[3]]}
            for i, boxes in enumerate(boxes_per_image, start=1) for box in boxes]


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
def test_perfect_detections_score_one(tmp_path, evaluator):
    ann = write_coco(tmp_path, BOXES)
    results = ground_truth_as_results(BOXES)
    metrics = coco_metrics(ann, results, [1], evaluator)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    assert set(metrics) == set(METRIC_NAMES)
    assert results == ground_truth_as_results(BOXES)  # the caller's rows are left as they were


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
def test_shifted_boxes_lose_exactly_the_thresholds_they_fall_below(tmp_path, evaluator):
    # A box shifted by dx along x has IoU (w - dx) / (w + dx) with its ground truth; pick dx for
    # IoU 0.72: it passes the thresholds .50 … .70 (5 of 10) and fails .75 … .95.
    ann = write_coco(tmp_path, BOXES)
    target_iou = 0.72
    results = ground_truth_as_results(BOXES, lambda box: box[2] * (1 - target_iou) / (1 + target_iou))
    metrics = coco_metrics(ann, results, [1], evaluator)
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["mAP75"] == pytest.approx(0.0)
    assert metrics["mAP"] == pytest.approx(5 / 10)


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
@pytest.mark.parametrize("boxes", [BOXES, [[(5, 5, 200, 180)], []], [[], []]], ids=["all-sizes", "large", "none"])
def test_no_detections_score_as_cocoeval_scores_a_detection_that_matches_nothing(tmp_path, evaluator, boxes):
    """0 where there was something to find, NaN where the ground truth has nothing in that range."""
    ann = write_coco(tmp_path, boxes)
    stray = [{"image_id": 2, "category_id": 1, "score": 0.5, "bbox": [300.0, 220.0, 10.0, 10.0]}]
    expected = coco_metrics(ann, stray, [1], evaluator)
    assert coco_metrics(ann, [], [1], evaluator) == pytest.approx(expected, nan_ok=True)
    assert (expected["mAP"] == 0.0) == bool(boxes[0]) and (expected["mAP_small"] == 0.0) == (boxes is BOXES)


def test_reader_layouts_and_category_mapping(tmp_path):
    write_coco(tmp_path / "seed", BOXES)
    dataset = open_coco(tmp_path / "seed")
    assert [image_id for image_id, _ in dataset.items()] == [1, 2, 3, 4]  # person-free image 2 included
    assert dataset.fingerprint()["images"] == 4 and len(dataset.annotation_sha256) == 64
    write_coco(tmp_path / "zip", BOXES, categories=("bicycle", "person"), kind="instances", layout="flat")
    dataset = open_coco(tmp_path / "zip", annotation="instances")
    assert dataset.category_ids == [2] and dataset.image_dir == tmp_path / "zip" / "val2017"


@pytest.mark.parametrize("damage, message", [
    (lambda data: data["images"][2].pop("file_name"), "images[2] has no 'file_name'"),
    (lambda data: data["images"][0].pop("id"), "images[0] has no 'id'"),
    (lambda data: data["categories"][0].pop("name"), "categories[0] has no 'name'"),
    (lambda data: data["categories"].insert(0, "person"), "categories[0] is not an object"),
    (lambda data: data.update(images={"1": "000000000001.jpg"}), "images is not a list"),
    (lambda data: data["images"][1].update(file_name=None), "images[1] 'file_name' is not a string (None)"),
    (lambda data: data["categories"].append({"id": 9, "name": 3}), "categories[1] 'name' is not a string (3)"),
    # found before the loop, not by the evaluator after it (pycocotools: KeyError; faster-coco-eval scores on)
    (lambda data: data["annotations"][1].pop("area"), "annotations[1] has no 'area'"),
    (lambda data: data["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] 'bbox' is not [x, y, w, h] ([1, 2, 3])"),
    (lambda data: data.pop("annotations"), "not a COCO annotation file (KeyError: 'annotations')"),
])
def test_incomplete_annotation_records_are_one_line_naming_the_record(tmp_path, damage, message):
    ann = write_coco(tmp_path, BOXES)
    data = json.loads(ann.read_text())
    damage(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(RtmbenchError) as info:
        open_coco(tmp_path)
    assert str(info.value) == f"{ann}: {message}"


@pytest.mark.parametrize("damage, message", [
    ("no_root", "dataset root not found"),
    ("no_annotations", "annotation file not found"),
    ("missing_image", "1 of 4 images listed in person_keypoints_val2017.json are missing"),
    ("bad_json", "not a COCO annotation file"),
    ("no_person", "no category named person"),
])
def test_bad_datasets_are_one_clear_line(tmp_path, damage, message):
    root = tmp_path / "data"
    ann = write_coco(root, BOXES, categories=("cat",) if damage == "no_person" else ("person",))
    if damage == "no_root":
        root = tmp_path / "elsewhere"
    elif damage == "no_annotations":
        ann.unlink()
    elif damage == "missing_image":
        (root / "images" / "val2017" / "000000000003.jpg").unlink()
    elif damage == "bad_json":
        ann.write_text("{")
    with pytest.raises(RtmbenchError, match=message) as info:
        open_coco(root)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
def test_metrics_are_mmdets_coco_metric_mAP_at_100_detections_the_rest_at_1000(tmp_path, evaluator):
    """mmdet's CocoMetric (maxDets 100/300/1000, pycocotools' summary): on an image of 150 people
    found perfectly, mAP counts the top 100 detections, mAP50 and AR300 all 150."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    crowd = [[(x * 21 + 1, y * 16 + 1, 20, 15) for x in range(15) for y in range(10)]]
    ann = write_coco(tmp_path, crowd, image_size=(240, 320))
    results = [{**row, "score": 1 - i / 1000} for i, row in enumerate(ground_truth_as_results(crowd))]
    metrics = coco_metrics(ann, results, [1], evaluator)
    assert metrics["mAP50"] == pytest.approx(1.0) and metrics["AR300"] == pytest.approx(1.0)
    assert metrics["mAP"] < 0.7 and metrics["AR100"] == pytest.approx(100 / 150)
    gt = COCO(str(ann))
    mmdet = COCOeval(gt, gt.loadRes(results), "bbox")  # as mmdet's CocoMetric configures and reads it
    mmdet.params.maxDets = [100, 300, 1000]
    mmdet.evaluate(), mmdet.accumulate(), mmdet.summarize()
    assert list(metrics.values()) == pytest.approx([s if s >= 0 else float("nan") for s in mmdet.stats], nan_ok=True)
