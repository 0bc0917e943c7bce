"""The synthetic COCO dataset: layout, determinism, pycocotools compatibility and content."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtmbench.data import synthetic
from rtmbench.errors import RtmbenchError

NUM_IMAGES = 200
ANNOTATION_KEYS = {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "num_keypoints",
                   "keypoints", "segmentation"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 200-image val split (a few seconds); returns the annotation file."""
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), seed=0,
                              num_images=NUM_IMAGES, progress=False)


@pytest.fixture(scope="module")
def coco_json(dataset) -> dict:
    return json.loads(dataset.read_text())


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_schema(dataset, coco_json):
    root = dataset.parents[1]
    assert dataset == root / "annotations" / "person_keypoints_val2017.json"
    assert sorted(p.name for p in dataset.parent.iterdir()) == [dataset.name]  # no temp file left
    assert set(coco_json) == {"info", "licenses", "images", "annotations", "categories"}
    assert coco_json["licenses"] == []
    assert coco_json["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]
    images = coco_json["images"]
    assert [im["id"] for im in images] == list(range(1, NUM_IMAGES + 1))
    assert [im["file_name"] for im in images] == [f"{i:012d}.jpg" for i in range(1, NUM_IMAGES + 1)]
    assert sorted(p.name for p in (root / "images" / "val2017").iterdir()) == \
        [im["file_name"] for im in images]

    annotations = coco_json["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    for ann in annotations:
        assert set(ann) == ANNOTATION_KEYS
        assert (ann["category_id"], ann["num_keypoints"], ann["keypoints"], ann["segmentation"]) \
            == (1, 0, [], [])
        assert ann["iscrowd"] in (0, 1)
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, float) for v in ann["bbox"])
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
        assert 0 < ann["area"] <= w * h


def test_images_decode_with_the_sizes_in_the_json(dataset, coco_json):
    image_dir = dataset.parents[1] / "images" / "val2017"
    for image in coco_json["images"]:
        decoded = cv2.imread(str(image_dir / image["file_name"]), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape == (image["height"], image["width"], 3)


def test_same_seed_gives_identical_bytes_and_image_k_ignores_the_count(tmp_path):
    roots = {name: tmp_path / name for name in ("a", "b", "five", "seed8", "train")}
    synthetic.generate(roots["a"], 7, 10, progress=False)
    synthetic.generate(roots["b"], 7, 10, progress=False)
    synthetic.generate(roots["five"], 7, 5, progress=False)
    synthetic.generate(roots["seed8"], 7 + 1, 5, progress=False)
    synthetic.generate(roots["train"], 7, 5, split="train", progress=False)
    a, five = files_bytes(roots["a"]), files_bytes(roots["five"])
    assert a == files_bytes(roots["b"])

    images = [f"images/val2017/{k:012d}.jpg" for k in range(1, 6)]
    assert [a[name] for name in images] == [five[name] for name in images]
    json_a = json.loads(a["annotations/person_keypoints_val2017.json"])
    json_five = json.loads(five["annotations/person_keypoints_val2017.json"])
    assert json_a["images"][:5] == json_five["images"]
    assert [x for x in json_a["annotations"] if x["image_id"] <= 5] == json_five["annotations"]

    seed8 = files_bytes(roots["seed8"])
    assert all(seed8[name] != five[name] for name in images)
    train = files_bytes(roots["train"])
    assert all(train[name.replace("val", "train")] != five[name] for name in images)


def test_ground_truth_as_detections_scores_ap_one_in_pycocotools(dataset, coco_json, capsys):
    gt = COCO(str(dataset))
    detections = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
                  for a in coco_json["annotations"] if not a["iscrowd"]]
    evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # AP, AP50, AP75, AP small, medium, large: all 1.0 (a missing size class would give -1).
    np.testing.assert_allclose(evaluator.stats[:6], 1.0)


def test_content_mix(coco_json):
    annotations = coco_json["annotations"]
    with_persons = {a["image_id"] for a in annotations}
    assert len(with_persons) < NUM_IMAGES  # person-free images exist
    assert any(a["iscrowd"] for a in annotations)
    areas = np.array([a["area"] for a in annotations if not a["iscrowd"]])
    small, large = np.mean(areas < 32 ** 2), np.mean(areas >= 96 ** 2)
    assert small >= 0.1 and large >= 0.1 and 1 - small - large >= 0.1

    shapes = [(im["width"], im["height"]) for im in coco_json["images"]]
    assert any(w > h for w, h in shapes) and any(h > w for w, h in shapes)
    assert any(max(w, h) >= 2.5 * min(w, h) for w, h in shapes)  # strips
    assert any(max(w, h) < 320 for w, h in shapes)


def test_person_heads_are_skin_toned_and_mannequin_heads_blue(dataset):
    # Checked on the written JPEGs; render_image draws the same images and knows the heads.
    image_dir = dataset.parents[1] / "images" / "val2017"
    checked = {True: 0, False: 0}
    for image_id in range(1, 61):
        rendering = synthetic.render_image(synthetic.image_rng(0, "val", image_id))
        decoded = cv2.imread(str(image_dir / f"{image_id:012d}.jpg"))
        np.testing.assert_array_equal(decoded.shape, rendering.image.shape)
        for head in rendering.heads:
            if head.visible and head.radius >= 4:
                blue, _, red = decoded[head.centre[1], head.centre[0]].astype(int)
                assert (red > blue) == head.is_person, (image_id, head)
                checked[head.is_person] += 1
    assert checked[True] >= 20 and checked[False] >= 5


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(RtmbenchError, match="split"):
        synthetic.generate(tmp_path, 0, 1, split="test", progress=False)
    with pytest.raises(RtmbenchError, match="num-images"):
        synthetic.generate(tmp_path, 0, 0, progress=False)
    with pytest.raises(RtmbenchError, match="seed"):
        synthetic.generate(tmp_path, -1, 1, progress=False)


def test_an_interrupted_run_leaves_no_annotation_file(tmp_path, monkeypatch):
    ann_path = synthetic.generate(tmp_path, 0, 2, progress=False)
    real_write = synthetic.write_image

    def fail_on_second(image_dir, seed, split, image_id, config):
        if image_id == 2:
            raise KeyboardInterrupt
        return real_write(image_dir, seed, split, image_id, config)

    monkeypatch.setattr(synthetic, "write_image", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, 1, 2, progress=False)
    assert not ann_path.exists()
    assert list(ann_path.parent.iterdir()) == []
