"""A COCO-sized evaluation (5,000 images, as val2017) with ONNX Runtime FP32, timed as a user
runs it: ``rtmbench eval`` from process start to metrics, engine and dataset already cached."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.perf

COCO_VAL_IMAGES = 5000
MAX_WALL_S = 45.0  # on the 2-core development machine; the goal


def test_coco_sized_eval_is_well_under_a_minute(gate, onnxruntime_fp32, tmp_path, run_cli):
    from rtmbench.data.synthetic import generate

    model = onnxruntime_fp32.model
    root = gate.cache.get_or_build("datasets", {"coco-sized": COCO_VAL_IMAGES, "seed": 5}, "synthetic-5000",
                                   lambda tmp: generate(tmp, 5, COCO_VAL_IMAGES, "val", progress=False))
    handle = gate.engine(onnxruntime_fp32)  # built and cached before the clock starts
    out = tmp_path / "eval.json"
    with gate.device_lock(handle.description["device"]):
        start = time.perf_counter()
        run_cli("eval", "--model", model, "--weights", gate.weights(model), "--data-root", root,
                "--backend", "onnxruntime", "--precision", "fp32", "--json", out, "--cache-dir", gate.cache.root)
        wall = time.perf_counter() - start
    report = json.loads(out.read_text())
    rates = report["images_per_s"]
    print(f"\nrtmbench eval of {COCO_VAL_IMAGES} images: {wall:.1f} s wall, loop {rates['whole_loop']:.0f} "
          f"images/s (engine {rates['infer']:.0f}), mAP {report['metrics']['mAP']:.4f}")
    assert report["dataset"]["images"] == COCO_VAL_IMAGES
    assert wall <= MAX_WALL_S, f"{wall:.1f} s > {MAX_WALL_S} s"
