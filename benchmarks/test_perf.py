"""The throughput gate: median images/s at batch 32 against the device's target (or a ratio to
a reference backend measured in the same run), timed with pytest-benchmark in pedantic mode.

``extra_info`` (kept in --benchmark-json) carries: images_per_s (the gated median),
images_per_s_compute, images_per_s_end_to_end, latency_ms_p50/p90/p99, gflops, device, driver
(GPU engines), versions,
engine_key, engine_path, onnx_path.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import VERDICT_PROPERTY
from rtmbench.hostinfo import package_versions
from rtmbench.perf import GFLOP_PER_IMAGE, random_batch, summarize, time_calls

pytestmark = pytest.mark.perf
WARMUP_ROUNDS = 3


def test_throughput(gate, perf_case, benchmark, record_property):
    if (why := gate.unavailable_reason(perf_case)) is not None:
        pytest.skip(why)
    handle = gate.engine(perf_case)
    engine = handle.engine
    batch = random_batch(perf_case.batch, gate.spec(perf_case.model).input_size)
    device = handle.description["device"]
    rule = gate.thresholds.perf_rule(perf_case.model, perf_case.backend, perf_case.precision,
                                     perf_case.batch, gate.options.device or device)
    definition = rule.definition if rule is not None else "compute"
    engine.infer(batch)  # stages the input for infer_compute
    calls = {"compute": engine.infer_compute, "end_to_end": lambda: engine.infer(batch)}
    rounds = gate.options.rounds
    other = "end_to_end" if definition == "compute" else "compute"
    with gate.device_lock(device):
        benchmark.pedantic(calls[definition], rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        # pytest-benchmark keeps no timings when disabled (--benchmark-disable, xdist): time ourselves.
        gated = (np.asarray(benchmark.stats.stats.data) if benchmark.stats is not None
                 else time_calls(calls[definition], rounds, WARMUP_ROUNDS))
        other_times = time_calls(calls[other], max(rounds // 2, 5), WARMUP_ROUNDS)
    figures = {definition: summarize(gated, perf_case.batch), other: summarize(other_times, perf_case.batch)}
    images_per_s = figures[definition]["images_per_s"]
    gate.throughput[perf_case] = images_per_s
    verdict = gate.check_throughput(perf_case, images_per_s, device, definition, gate.reference_throughput)
    extra = {"images_per_s": images_per_s, "definition": definition,
             "images_per_s_compute": figures["compute"]["images_per_s"],
             "images_per_s_end_to_end": figures["end_to_end"]["images_per_s"],
             **{k: v for k, v in figures[definition].items() if k.startswith("latency")},
             "gflops": images_per_s * GFLOP_PER_IMAGE.get(perf_case.model, float("nan")),
             "device": device, "driver": handle.description.get("platform", {}).get("driver"),
             "versions": package_versions(), "engine_key": handle.key,
             "engine_path": str(handle.path) if handle.path else None,
             "onnx_path": str(handle.onnx) if handle.onnx else None,
             "engine": handle.description, "target": verdict.target, "verdict": verdict.status}
    benchmark.extra_info.update(extra)
    record_property(VERDICT_PROPERTY, {**verdict.as_row(), **gate.provenance(perf_case),
                                       "round_times": gated.tolist()})
    print(f"\n{perf_case.id}: {images_per_s:.1f} images/s ({definition}), "
          f"{extra['gflops']:.1f} GFLOP/s, end-to-end {extra['images_per_s_end_to_end']:.1f} images/s")
    if verdict.status == "no target" and gate.options.strict:
        pytest.fail(f"--strict: {verdict.message()}", pytrace=False)
    assert verdict.passed, verdict.message()
