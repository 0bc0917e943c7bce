"""Decoding and NMS on small hand-made tensors, where the right answer is known by construction."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rtmbench.data import ImageMeta
from rtmbench.postprocess import batched_nms, distance2bbox, grid_priors, nms, postprocess
from rtmbench.fidelity import identical
from rtmbench.model import model_table

# numba is in requirements.txt; the GPU machine's image lacks it (tools/gpu_check.sh runs this file there).
NUMBA = pytest.param("numba", marks=pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                                       reason="numba is not installed"))
IMPLEMENTATIONS = [NUMBA, "numpy", "torch"]
# The fast implementations against the reference; torch on every device this machine has.
FAST = [pytest.param(*NUMBA.values, None, marks=NUMBA.marks)] + [
    ("torch", d) for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])]


def test_priors_are_top_left_grid_points_row_major():
    priors = grid_priors([(2, 3), (1, 1)], [8, 16])
    expected = [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0]]
    np.testing.assert_array_equal(priors, expected)


def test_distance_decode_clamps_to_the_padded_shape():
    points = np.array([[10.0, 10.0], [300.0, 310.0]], np.float32)
    dist = np.array([[5, 6, 7, 8], [20, 20, 40, 40]], np.float32)
    boxes = distance2bbox(points, dist, max_shape=(320, 320))
    np.testing.assert_array_equal(boxes, [[5, 4, 17, 18], [280, 290, 320, 320]])


def test_nms_suppresses_only_above_the_threshold():
    # IoU of box 1 with box 0 is exactly 0.5: kept at threshold 0.5, suppressed below it.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.49), [0, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.49, max_keep=1), [0])


def test_batched_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1]), 0.65), [0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 0]), 0.65), [0])


def single_level_outputs(logit_at: dict, distances: tuple) -> dict:
    """One image, three levels for a 32×32 input; chosen cells of level 0 get a logit."""
    out = {}
    for i, size in enumerate((4, 2, 1)):
        out[f"cls_score_{i}"] = np.full((1, 1, size, size), -20.0, np.float32)
        out[f"bbox_pred_{i}"] = np.zeros((1, 4, size, size), np.float32)
    for (y, x), logit in logit_at.items():
        out["cls_score_0"][0, 0, y, x] = logit
        out["bbox_pred_0"][0, :, y, x] = distances
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_postprocess_decodes_rescales_and_filters(implementation):
    outputs = single_level_outputs({(1, 2): 2.0, (3, 3): -8.0}, (4, 4, 4, 4))
    (dets,) = postprocess(outputs, [ImageMeta((64, 64), (0.5, 0.5))], input_size=(32, 32),
                          implementation=implementation)
    # (1, 2) is the prior at x=16, y=8; box (12, 4, 20, 12) at input scale, ×2 in the original.
    np.testing.assert_allclose(dets.boxes, [[24, 8, 40, 24]])
    np.testing.assert_allclose(dets.scores, [1 / (1 + np.exp(-2.0))], rtol=1e-6)
    # sigmoid(-8) = 3.4e-4 is under score_thr 0.001, unless the threshold is lowered.
    (dets,) = postprocess(outputs, [ImageMeta((64, 64), (0.5, 0.5))], input_size=(32, 32), score_thr=1e-4,
                          implementation=implementation)
    assert len(dets) == 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_postprocess_drops_degenerate_boxes_and_caps_per_image(implementation):
    outputs = single_level_outputs({(0, 0): 3.0, (2, 2): 2.0, (0, 3): 1.0}, (0, 0, 0, 4))
    (dets,) = postprocess(outputs, [ImageMeta((32, 32), (1.0, 1.0))], input_size=(32, 32),
                          implementation=implementation)
    assert len(dets) == 0  # zero width: mmdet's min_bbox_size=0 removes boxes with w <= 0
    outputs = single_level_outputs({(0, 0): 3.0, (2, 2): 2.0, (0, 3): 1.0}, (4, 4, 4, 4))
    (dets,) = postprocess(outputs, [ImageMeta((32, 32), (1.0, 1.0))], input_size=(32, 32), max_per_img=2,
                          implementation=implementation)
    assert dets.scores.tolist() == sorted(dets.scores.tolist(), reverse=True) and len(dets) == 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outputs_for_fewer_images_than_metas_are_refused(implementation):
    """Spread over more images, one image's maps would become two images' detections (numba
    would read past the arrays' end, unchecked)."""
    outputs = single_level_outputs({(1, 2): 2.0}, (4, 4, 4, 4))
    metas = [ImageMeta((64, 64), (0.5, 0.5))] * 2
    with pytest.raises(ValueError, match=r"^level 0: cls_score \(1, 1, 4, 4\) and bbox_pred \(1, 4, 4, 4\) for 2 images"):
        postprocess(outputs, metas, input_size=(32, 32), implementation=implementation)
    outputs["bbox_pred_1"] = outputs["bbox_pred_1"][:, :, :1]
    with pytest.raises(ValueError, match=r"^level 1: cls_score \(1, 1, 2, 2\) and bbox_pred \(1, 4, 1, 2\)"):
        postprocess(outputs, metas[:1], input_size=(32, 32), implementation=implementation)


@pytest.mark.filterwarnings("error")
def test_a_very_negative_logit_is_a_zero_score_without_an_overflow_warning():
    outputs = single_level_outputs({(1, 2): 2.0, (0, 0): -100.0}, (4, 4, 4, 4))  # fp16 engines reach -100
    (dets,) = postprocess(outputs, [ImageMeta((64, 64), (0.5, 0.5))], input_size=(32, 32), score_thr=0.0,
                          implementation="numpy")
    assert len(dets) == 1  # its score is 0, not above score_thr 0


def assert_identical(actual, expected):
    assert len(actual) == len(expected)
    assert all(identical(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("seed", range(20))
def test_compiled_nms_equals_the_reference_on_ties_and_threshold_edges(seed):
    """Quantized boxes and scores: many exactly equal scores (order must stay stable) and IoUs
    exactly at the threshold (0.5 below: equal is kept)."""
    greedy_nms = pytest.importorskip("rtmbench.postprocess_kernel", reason="numba is not installed").greedy_nms
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    xy = rng.integers(0, 40, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.choice([2, 4, 8], (n, 2)).astype(np.float32)], axis=1)
    scores = rng.integers(1, 8, n).astype(np.float32) / 8
    for threshold in (0.5, 0.65):
        for max_keep in (n, 5):
            expected = nms(boxes, scores, threshold, max_keep)
            np.testing.assert_array_equal(greedy_nms(boxes, scores, np.float32(threshold), max_keep), expected)


@pytest.mark.parametrize("implementation, device", FAST)
@pytest.mark.parametrize("seed", range(5))
def test_fast_postprocess_equals_the_reference_on_random_multiclass_maps(seed, implementation, device):
    rng = np.random.default_rng(seed)
    outputs = {}
    for i, size in enumerate((8, 4, 2)):
        outputs[f"cls_score_{i}"] = rng.normal(-2, 2, (3, 3, size, size)).astype(np.float32)
        outputs[f"bbox_pred_{i}"] = rng.uniform(0, 24, (3, 4, size, size)).astype(np.float32)
    metas = [ImageMeta((60, 70), (64 / 70, 55 / 60)), ImageMeta((64, 64), (1.0, 1.0)), ImageMeta((10, 90), (64 / 90, 7 / 10))]
    for cfg in ({}, {"score_thr": 0.3, "max_per_img": 7}, {"min_bbox_size": 5.0, "iou_threshold": 0.3},
                {"nms_pre": 10, "min_bbox_size": -1.0}, {"score_thr": 0.999}):
        expected = postprocess(outputs, metas, (64, 64), implementation="numpy", **cfg)
        actual = postprocess(outputs, metas, (64, 64), implementation=implementation, device=device, **cfg)
        assert_identical(actual, expected)


@pytest.mark.parametrize("implementation, device", FAST)
def test_fast_postprocess_equals_the_reference_on_mmdet_vectors(reference, nano_spec, implementation, device):
    outputs, metas = reference.raw_outputs, reference.metas()
    assert_identical(postprocess(outputs, metas, nano_spec.input_size, implementation=implementation, device=device),
                     postprocess(outputs, metas, nano_spec.input_size, implementation="numpy"))


def test_torch_postprocess_hands_too_many_candidates_to_the_host(monkeypatch, reference, nano_spec):
    from rtmbench import postprocess_torch

    monkeypatch.setattr(postprocess_torch, "MAX_CANDIDATES", 10)
    outputs, metas = reference.raw_outputs, reference.metas()
    assert postprocess_torch.detect_batch(np.zeros((1, 20), np.float32) + 0.5, np.zeros((1, 20, 4), np.float32),
                                          np.zeros((20, 2), np.float32), 1, np.ones((1, 4), np.float32),
                                          np.full(4, 320, np.float32), 0.001, 30000, 0.65, 300, 0.0, "cpu") is None
    assert_identical(postprocess(outputs, metas, nano_spec.input_size, implementation="torch"),
                     postprocess(outputs, metas, nano_spec.input_size, implementation="numpy"))


@pytest.mark.parametrize("installed", [pytest.param(True, marks=NUMBA.marks), False])
def test_auto_prefers_numba_then_the_engines_device_then_numpy(monkeypatch, reference, nano_spec, installed):
    from rtmbench import postprocess as module, postprocess_torch

    calls = []
    kernel = importlib.import_module("rtmbench.postprocess_kernel").detect_batch if installed else None
    monkeypatch.setattr(module, "_compiled_kernel", lambda: kernel and (lambda *a: calls.append("numba") or kernel(*a)))
    monkeypatch.setattr(module, "_detect_image_numpy", lambda *a, f=module._detect_image_numpy: calls.append("numpy") or f(*a))
    monkeypatch.setattr(postprocess_torch, "detect_batch", lambda *a, f=postprocess_torch.detect_batch, **k: calls.append("torch") or f(*a, **k))
    outputs, metas = reference.raw_outputs, reference.metas()
    for device in ("cpu", None):
        calls.clear()
        postprocess(outputs, metas, nano_spec.input_size, device=device)
        assert set(calls) == {"numba" if installed else "torch" if device else "numpy"}, device


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_warm_up_runs_the_implementation_once_on_a_dummy_batch(monkeypatch, implementation):
    from rtmbench import postprocess as module

    seen = []
    monkeypatch.setattr(module, "postprocess", lambda outputs, metas, *a, **k: seen.append((outputs, k)))
    module.warm_up(implementation=implementation, device="cpu")
    (outputs, kwargs), = seen
    assert kwargs == {"implementation": implementation, "device": "cpu"}
    # the dummy batch is a valid input with candidates: it reaches every step of the real one
    detections = postprocess(outputs, [ImageMeta((64, 64), (1.0, 1.0))], (64, 64), implementation=implementation, device="cpu")
    assert len(detections) == 1 and len(detections[0]) > 0


@pytest.mark.parametrize("spec", model_table().values(), ids=model_table())
def test_top_k_over_all_levels_is_mmdets_per_level_top_k(spec):
    """mmdet keeps the top nms_pre candidates of each feature level, postprocess those of all
    levels: the same only while one level alone cannot hold more than nms_pre."""
    height, width = spec.input_size
    priors = sum(-(-height // stride) * -(-width // stride) for stride in spec.strides)
    assert priors * spec.num_classes <= spec.test_cfg.nms_pre
