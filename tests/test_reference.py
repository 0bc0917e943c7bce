"""The core against mmdet's own outputs: checkpoint layout, preprocessing, model, postprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtmbench.data import decode_image, letterbox, normalize
from rtmbench.fidelity import match_rate, relative_max_error
from rtmbench.model import OUTPUT_NAMES
from rtmbench.postprocess import postprocess


def preprocess_reference_images(reference, spec):
    padded, metas = zip(*(letterbox(decode_image(p.read_bytes()), spec.input_size, spec.pad_value)
                          for p in reference.image_paths))
    return normalize(np.stack(padded), spec.mean, spec.std), list(metas)


def test_checkpoint_keys_are_mmdet_keys(reference, reference_model):
    state = torch.load(reference.checkpoint, weights_only=True)["state_dict"]
    assert list(reference_model.state_dict()) == list(state)
    assert sum(p.numel() for p in reference_model.parameters()) == 994_423


def test_preprocessing_reproduces_mmdet_inputs_bit_for_bit(reference, nano_spec):
    inputs, metas = preprocess_reference_images(reference, nano_spec)
    np.testing.assert_array_equal(inputs, reference.golden["inputs"])
    for meta, recorded in zip(metas, reference.info["images"]):
        assert meta.ori_shape == tuple(recorded["ori_shape"])
        assert meta.scale_factor == pytest.approx(recorded["scale_factor"], abs=1e-12)


def test_the_loops_per_image_normalize_reproduces_mmdet_inputs_bit_for_bit(reference, nano_spec):
    """What the detection loop's decoders run, image by image or a batch at a time (numba's
    kernel where installed), on the reference images and on random ones of odd sizes."""
    from rtmbench.data.preprocess import _normalize_numpy, normalize_into

    for i, path in enumerate(reference.image_paths):
        image, _ = letterbox(decode_image(path.read_bytes()), nano_spec.input_size, nano_spec.pad_value)
        out = np.empty((3, *nano_spec.input_size), np.float32)
        normalize_into(image, out, nano_spec.mean, nano_spec.std)
        np.testing.assert_array_equal(out, reference.golden["inputs"][i])
    rng = np.random.default_rng(0)
    for shape in ((7, 5, 3), (64, 33, 3), (9, 9, 1)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mean, std = tuple(rng.uniform(0, 255, shape[2])), tuple(rng.uniform(1, 80, shape[2]))
        out, expected = np.empty((2, shape[2], *shape[:2]), np.float32)
        normalize_into(image, out, mean, std)
        _normalize_numpy(image, expected, mean, std)
        assert out.tobytes() == expected.tobytes(), shape
    batch = rng.integers(0, 256, (5, 17, 9, 3), dtype=np.uint8)  # a batch at once, as decode processes' is
    out, expected = np.empty((2, 5, 3, 17, 9), np.float32)
    normalize_into(batch, out, nano_spec.mean, nano_spec.std)
    _normalize_numpy(batch, expected, nano_spec.mean, nano_spec.std)
    assert out.tobytes() == expected.tobytes()


def test_model_reproduces_mmdet_head_outputs(reference, reference_model):
    with torch.inference_mode():
        outputs = reference_model(torch.from_numpy(reference.golden["inputs"]))
    for name, out in zip(OUTPUT_NAMES, outputs):
        assert relative_max_error(out.numpy(), reference.golden[name]) <= 5e-4, name


def test_whole_torch_path_reproduces_mmdet_head_outputs_exactly(reference, nano_spec, reference_model):
    """Our preprocessing + model at the reference batch: mmdet's head maps bit for bit (the
    reference checkpoint is ill-conditioned; a 1-ULP input difference grows to 7e-4 of range)."""
    inputs, _ = preprocess_reference_images(reference, nano_spec)
    with torch.inference_mode():
        outputs = reference_model(torch.from_numpy(inputs))
    for name, out in zip(OUTPUT_NAMES, outputs):
        np.testing.assert_array_equal(out.numpy(), reference.golden[name], err_msg=name)


def assert_same_detections_up_to_ties(ours, golden):
    assert len(ours) == len(golden)
    np.testing.assert_allclose(ours.scores, golden.scores, atol=1e-5, rtol=0)  # NumPy's exp, not torch's sigmoid
    np.testing.assert_array_equal(ours.labels, golden.labels)
    # Boxes equal mmdet's bit for bit (its rescale: times float32(1 / scale factor)), position by
    # position except where equal scores were ordered differently.
    for score in np.unique(golden.scores):
        rows = np.flatnonzero(golden.scores == score)
        mine = ours.boxes[rows][np.lexsort(ours.boxes[rows].T)]
        theirs = golden.boxes[rows][np.lexsort(golden.boxes[rows].T)]
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("implementation", ["numba", "numpy"])
def test_postprocess_reproduces_mmdet_detections(reference, nano_spec, implementation):
    dets = postprocess(reference.raw_outputs, reference.metas(), nano_spec.input_size,
                       implementation=implementation)
    for ours, golden in zip(dets, reference.detections(), strict=True):
        assert_same_detections_up_to_ties(ours, golden)


def test_postprocess_ignores_batch_padding_rows(reference, nano_spec):
    padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in reference.raw_outputs.items()}
    assert len(postprocess(padded, reference.metas(), nano_spec.input_size)) == 6


def test_whole_pipeline_matches_mmdet_detections(reference, nano_spec, reference_model):
    inputs, metas = preprocess_reference_images(reference, nano_spec)
    with torch.inference_mode():
        outputs = dict(zip(OUTPUT_NAMES, (o.numpy() for o in reference_model(torch.from_numpy(inputs)))))
    dets = postprocess(outputs, metas, nano_spec.input_size)
    for ours, golden in zip(dets, reference.detections(), strict=True):
        assert match_rate(ours, golden, min_iou=0.99, max_score_diff=1e-3) >= 0.99


def test_a_non_square_input_size_is_refused(nano_spec):
    """mmcv's keep-ratio scale fits the long side to the larger target: a 1000×100 image in a
    320×640 input would be resized to 640×64 and silently cut."""
    import dataclasses

    with pytest.raises(ValueError, match=r"input_size \[320, 640\]; only a square one is supported"):
        dataclasses.replace(nano_spec, input_size=(320, 640))
