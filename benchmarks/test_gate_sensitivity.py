"""The accuracy gate must fail for the deployment bugs it exists to catch.

Each mutation runs the real pipeline (decode → letterbox → engine → postprocess → COCO metrics)
of the default model on its evaluation set with one thing done wrong, and a gated metric must
fall below its floor. Prints every metric with and without each mutation. Mutations too small
for the gate to see (``BELOW_GATE_RESOLUTION``) are findings, asserted to pass.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from rtmbench.backends import Engine
from rtmbench.backends.torch_ref import TorchEngine
from rtmbench.data.preprocess import ImageMeta, decode_image
from rtmbench.evaluate import evaluate_engine
from rtmbench.runner import load_letterboxed

pytestmark = pytest.mark.selftest  # of the harness, not of an engine: CI runs it, `-m accuracy` does not


def swapped_channels(path, spec):
    """RGB fed where the model expects BGR."""
    img, meta = load_letterboxed(path, spec)
    return np.ascontiguousarray(img[..., ::-1]), meta


def centered_letterbox(path, spec):
    """Resized image centred in the pad (postprocessing still assumes top-left)."""
    img = decode_image(path.read_bytes())
    h, w = img.shape[:2]
    size_h, size_w = spec.input_size
    scale = min(size_h / h, size_w / w)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    canvas = np.full((size_h, size_w, 3), spec.pad_value, np.uint8)
    top, left = (size_h - new_h) // 2, (size_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = cv2.resize(img, (new_w, new_h))
    return canvas, ImageMeta((h, w), (new_w / w, new_h / h))


def scale_factor_off_by_2_percent(path, spec):
    img, meta = load_letterboxed(path, spec)
    return img, ImageMeta(meta.ori_shape, (meta.scale_factor[0] * 1.02, meta.scale_factor[1] * 1.02))


class WithoutStride(Engine):
    """Box distances handed to the decoder in feature-map units (the stride multiply lost)."""

    def __init__(self, inner: Engine, strides):
        super().__init__(inner.precision)
        self.inner, self.strides = inner, strides

    def _run(self, batch):
        outputs = dict(self.inner.infer(batch))
        for i, stride in enumerate(self.strides):
            outputs[f"bbox_pred_{i}"] = outputs[f"bbox_pred_{i}"] / stride
        return outputs


def perturbed_conv_engine(gate, case, relative: float = 0.05):
    """The model with one convolution's weights scaled by 1 + ``relative``: a miscompiled or
    corrupted kernel in the middle of the backbone."""
    from rtmbench.checkpoint import load_weights
    from rtmbench.model import RTMDet

    model = RTMDet(gate.spec(case.model))
    load_weights(model, gate.weights(case.model))
    with torch.no_grad():
        model.backbone.stage2[1].final_conv.conv.weight.mul_(1 + relative)
    return TorchEngine(model, "fp32")


MUTATIONS = ["rgb_as_bgr", "no_mean_std", "centered_letterbox", "scale_factor_2pct",
             "decode_without_stride", "nms_iou_0.3", "conv_weight_5pct"]
# Findings about the gate: mutations whose effect is below the spread the floors must allow
# honest engines. They are kept, asserting they pass, so a change in their effect shows up.
BELOW_GATE_RESOLUTION = {"conv_weight_5pct"}


@pytest.fixture(scope="module")
def honest(gate, onnxruntime_fp32):
    case = onnxruntime_fp32
    if (why := gate.subset_note(case.model)) is not None:
        pytest.skip(why)
    rule = gate.thresholds.accuracy_rule(case.model, case.backend, case.precision)
    if rule is None:
        pytest.fail(f"{gate.thresholds.path}: no accuracy rule for {case.id}: nothing to test against")
    return case, rule, gate.evaluate(case).metrics


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutation_against_the_gate(gate, honest, mutation):
    case, rule, honest_metrics = honest
    spec = gate.spec(case.model)
    engine = gate.engine(case).engine
    kwargs = {}
    if mutation == "rgb_as_bgr":
        kwargs["loader"] = swapped_channels
    elif mutation == "no_mean_std":
        spec = dataclasses.replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    elif mutation == "centered_letterbox":
        kwargs["loader"] = centered_letterbox
    elif mutation == "scale_factor_2pct":
        kwargs["loader"] = scale_factor_off_by_2_percent
    elif mutation == "decode_without_stride":
        engine = WithoutStride(engine, spec.strides)
    elif mutation == "nms_iou_0.3":
        kwargs["iou_threshold"] = 0.3
    elif mutation == "conv_weight_5pct":
        engine = perturbed_conv_engine(gate, case)
    mutated = evaluate_engine(gate.dataset(case.model), engine, spec, case.batch,
                              gate.options.max_images, progress=False, **kwargs).metrics
    floors = {m: getattr(rule, m).minimum for m in ("mAP50", "mAP") if getattr(rule, m) is not None}
    print(f"\n{mutation}: " + ", ".join(
        f"{m} {honest_metrics[m]:.4f} → {mutated[m]:.4f} (floor {floors[m]:.4f})" for m in floors))
    caught = any(mutated[m] < floor for m, floor in floors.items())
    if mutation in BELOW_GATE_RESOLUTION:
        assert not caught, f"{mutation} now fails the gate: move it out of BELOW_GATE_RESOLUTION"
    else:
        assert caught, f"{mutation} left every gated metric above its floor: {mutated}"
