"""What the harness itself costs: its timing wrapper against a bare ONNX Runtime loop, and the
detection loop's stage overlap. Both print their ratios; medians from interleaved rounds."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rtmbench.gate import Case
from rtmbench.perf import random_batch
from rtmbench.runner import StageTimes, load_letterboxed, run_detector

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module")
def ort_case(gate):
    case = Case(gate.options.models[0], "onnxruntime", "fp32", gate.options.batch_size)
    if (why := gate.unavailable_reason(case)) is not None:
        pytest.skip(why)
    return case


def test_harness_overhead_vs_bare_session_run(gate, ort_case):
    """infer_compute (what test_perf times) against session.run on the same ORT session."""
    engine = gate.engine(ort_case).engine
    batch = random_batch(ort_case.batch, gate.spec(ort_case.model).input_size)
    session, names = engine.session, engine.output_names
    engine.infer(batch)
    bare_call = lambda: session.run(names, {engine.input_name: batch})  # noqa: E731
    for _ in range(3):
        bare_call()
        engine.infer_compute()
    bare, harness = [], []
    for _ in range(gate.options.rounds):  # interleaved, so drift hits both alike
        for fn, times in ((bare_call, bare), (engine.infer_compute, harness)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratio = np.median(bare) / np.median(harness)
    print(f"\nharness / bare session.run images/s: {ratio:.3f} "
          f"(bare {ort_case.batch / np.median(bare):.1f}, harness {ort_case.batch / np.median(harness):.1f})")
    assert ratio >= 0.97


def test_detection_loop_overlaps_its_stages(gate, ort_case):
    """Whole loop ≥ 0.9 × 1 / (1/decode + 1/infer) images/s on 1,000 generated images: on CPU
    the stages share the cores, so the loop must at least lose no time between them."""
    from rtmbench.data.coco import open_coco
    from rtmbench.data.synthetic import generate

    spec = gate.spec(ort_case.model)
    root = gate.cache.get_or_build("datasets", {"bench-1000": 1, "seed": 99}, "synthetic-bench-1000",
                                   lambda tmp: generate(tmp, 99, 1000, "val", progress=False))
    items = open_coco(root).items()
    engine = gate.engine(ort_case).engine
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda item: load_letterboxed(item[1], spec), items))
    decode = len(items) / (time.perf_counter() - start)
    batch = random_batch(ort_case.batch, spec.input_size)
    batches = -(-len(items) // ort_case.batch)
    start = time.perf_counter()
    for _ in range(batches):
        engine.infer(batch)
    infer = len(items) / (time.perf_counter() - start)
    times = StageTimes()
    for _ in run_detector(items, engine, spec, ort_case.batch, progress=False, times=times):
        pass
    whole = len(items) / times.wall
    sequential = 1 / (1 / decode + 1 / infer)
    print(f"\ndecode {decode:.1f}, infer {infer:.1f}, whole loop {whole:.1f} images/s; "
          f"whole / sequential bound = {whole / sequential:.2f}")
    assert whole >= 0.9 * sequential
