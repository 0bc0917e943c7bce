"""Fidelity of each engine to the PyTorch FP32 reference, per head output, on real images of the
model's evaluation set: where reduced precision moves the numbers, and whether detections survive.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import VERDICT_PROPERTY, skip_unless_runnable
from rtmbench.data.preprocess import normalize
from rtmbench.fidelity import OUTPUT_TOLERANCE, identical, match_rate, output_errors
from rtmbench.gate import Case, Verdict
from rtmbench.postprocess import postprocess
from rtmbench.runner import load_letterboxed

pytestmark = pytest.mark.fidelity

MIN_MATCH = {"fp32": 0.99, "fp16": 0.90, "bf16": 0.80}  # detections with score ≥ 0.3, IoU ≥ 0.9


@pytest.fixture(scope="module")
def images(gate):
    return gate.first_batch(gate.options.models[0], gate.options.batch_size)


@pytest.mark.accuracy  # one batch per engine: `-m accuracy` catches drift that mAP cannot see
def test_engine_fidelity(gate, accuracy_case, images, record_property):
    skip_unless_runnable(gate, accuracy_case)
    inputs, metas = images
    spec = gate.spec(accuracy_case.model)
    reference_case = Case(accuracy_case.model, "torch", "fp32", accuracy_case.batch)
    expected = gate.engine(reference_case).engine.infer(inputs)
    actual = gate.engine(accuracy_case).engine.infer(inputs)
    errors = output_errors(actual, expected)
    confident = dict(score_thr=0.3)
    ref_dets = postprocess(expected, metas, spec.input_size, spec.strides, **confident)
    dets = postprocess(actual, metas, spec.input_size, spec.strides, **confident)
    matched = float(np.mean([match_rate(d, r, min_iou=0.9, max_score_diff=0.05) for d, r in zip(dets, ref_dets)]))
    record_property("output_errors", errors)
    record_property("detection_match", matched)
    print(f"\n{accuracy_case.id}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + f"; detections matched {matched:.1%}")
    precision = accuracy_case.precision
    worst = max(errors, key=errors.get)
    within = errors[worst] <= OUTPUT_TOLERANCE[precision]
    # stored with the run, so that a history or report shows this failure as the summary did
    verdict = Verdict(accuracy_case, "detections matched", matched, MIN_MATCH[precision],
                      "pass" if within and matched >= MIN_MATCH[precision] else "FAIL",
                      f"head maps: {worst} {errors[worst]:.1e} of range (tolerance {OUTPUT_TOLERANCE[precision]:.0e})")
    record_property(VERDICT_PROPERTY, {**verdict.as_row(), **gate.provenance(accuracy_case)})
    assert within, errors
    assert matched >= MIN_MATCH[precision]


def _first_available(gate, backends: list[str]) -> Case:
    model = gate.options.models[0]
    reasons = []
    for backend in backends:
        case = Case(model, backend, "fp32", gate.options.batch_size)
        if (why := gate.unavailable_reason(case)) is None:
            return case
        reasons.append(why)
    pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("implementation", ["numba", "torch"])
def test_fast_postprocess_is_exact_on_the_dataset(gate, implementation):
    """Every image of the model's evaluation set: the fast postprocess gives the NumPy reference's
    detections bit for bit. ``torch`` runs on a GPU engine's device (torch-cuda's outputs)."""
    if implementation == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    engines = ["torch-cuda"] if implementation == "torch" else ["onnxruntime", "torch"]
    case = _first_available(gate, engines)
    engine = gate.engine(case).engine
    spec = gate.spec(case.model)
    items = gate.dataset(case.model).items(gate.options.max_images)
    mismatched = []
    for start in range(0, len(items), case.batch):
        chunk = items[start:start + case.batch]
        pixels, metas = zip(*(load_letterboxed(path, spec) for _, path in chunk))
        outputs = engine.infer(normalize(np.stack(pixels), spec.mean, spec.std))
        fast = postprocess(outputs, metas, spec.input_size, spec.strides, implementation=implementation,
                           device=engine.postprocess_device)
        expected = postprocess(outputs, metas, spec.input_size, spec.strides, implementation="numpy")
        mismatched += [str(path) for (_, path), a, e in zip(chunk, fast, expected) if not identical(a, e)]
    print(f"\n{implementation} postprocess on {case.id} outputs: {len(items) - len(mismatched)}/{len(items)} identical")
    assert not mismatched, f"{len(mismatched)} images differ, first {mismatched[:3]}"
