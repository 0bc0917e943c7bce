"""The throughput gate: median images/s at batch 32 against the device's target (or a ratio to
a reference backend measured in the same run), timed with pytest-benchmark in pedantic mode, on
real preprocessed images of the model's dataset.

A number counts only when valid (MLPerf's idea): enough timed rounds and seconds (else INVALID,
``--strict`` fails it), and the outputs of the first and last timed calls within the precision's
tolerance of the FP32 reference, with an image repeated in the batch answered alike (else FAIL:
fast but wrong). On an NVIDIA GPU, SM clock, temperature and throttle reasons are sampled while
timed; throttling is named in the verdict's detail.

``extra_info`` (kept in --benchmark-json) carries: images_per_s (the gated median),
images_per_s_compute, images_per_s_end_to_end, latency_ms_p50/p90/p99, gflops, device, driver
(GPU engines), versions,
engine_key, engine_path, onnx_path.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import VERDICT_PROPERTY, skip_unless_runnable
from rtmbench.hostinfo import gpu_telemetry, package_versions
from rtmbench.perf import GFLOP_PER_IMAGE, invalid_reason, summarize, time_calls, warm_up

pytestmark = pytest.mark.perf


def test_throughput(gate, perf_case, benchmark, record_property):
    skip_unless_runnable(gate, perf_case)
    handle = gate.engine(perf_case)
    engine = handle.engine
    device = handle.description["device"]
    rule = gate.thresholds.perf_rule(perf_case.model, perf_case.backend, perf_case.precision,
                                     perf_case.batch, gate.options.device or device)
    definition = rule.definition if rule is not None else "compute"
    first_outputs, calls = gate.perf_calls(perf_case)
    other = "end_to_end" if definition == "compute" else "compute"
    validity = gate.validity(perf_case.model)
    with gate.device_lock(device), gpu_telemetry(handle.description) as telemetry:
        other_times = gate.time_rounds(perf_case.model, calls[other])
        warm = warm_up(calls[definition], validity.min_seconds)
        # sized on the fastest warm-up call: pytest-benchmark's rounds cannot be topped up if calls speed up
        rounds = gate.rounds_to_time(perf_case.model, float(warm.min()))
        benchmark.pedantic(calls[definition], rounds=rounds, warmup_rounds=0, iterations=1)
        # pytest-benchmark keeps no timings when disabled (--benchmark-disable, xdist): time ourselves.
        gated = (np.asarray(benchmark.stats.stats.data) if benchmark.stats is not None
                 else time_calls(calls[definition], rounds, warmup=0))
        last_outputs = engine.last_outputs()
    figures = {definition: summarize(gated, perf_case.batch), other: summarize(other_times, perf_case.batch)}
    images_per_s = figures[definition]["images_per_s"]
    for measured in figures:  # both definitions, for ratio targets that take this case as their reference
        gate.throughput[(perf_case, measured)] = figures[measured]["images_per_s"]
    verdict = gate.check_throughput(
        perf_case, images_per_s, device, definition, gate.reference_throughput,
        invalid=invalid_reason(gated, validity.min_rounds, validity.min_seconds),
        wrong_outputs=gate.check_outputs(perf_case, [first_outputs, last_outputs]))
    if (note := telemetry.verdict_note()) is not None and verdict.status != "FAIL":
        verdict.detail += f"; {note}"
    extra = {"images_per_s": images_per_s, "definition": definition, "rounds": len(gated),
             "timed_seconds": float(np.sum(gated)),
             "images_per_s_compute": figures["compute"]["images_per_s"],
             "images_per_s_end_to_end": figures["end_to_end"]["images_per_s"],
             **{k: v for k, v in figures[definition].items() if k.startswith("latency")},
             "gflops": images_per_s * GFLOP_PER_IMAGE.get(perf_case.model, float("nan")),
             "device": device, "driver": handle.description.get("platform", {}).get("driver"),
             "gpu_telemetry": telemetry.summary(), "versions": package_versions(), "engine_key": handle.key,
             "engine_path": str(handle.path) if handle.path else None,
             "onnx_path": str(handle.onnx) if handle.onnx else None,
             "engine": handle.description, "target": verdict.target, "verdict": verdict.status,
             "detail": verdict.detail}
    benchmark.extra_info.update(extra)
    record_property(VERDICT_PROPERTY, {**verdict.as_row(), **gate.provenance(perf_case),
                                       "round_times": gated.tolist()})
    print(f"\n{perf_case.id}: {images_per_s:.1f} images/s ({definition}, {len(gated)} rounds, "
          f"{extra['timed_seconds']:.1f} s), {extra['gflops']:.1f} GFLOP/s, end-to-end "
          f"{extra['images_per_s_end_to_end']:.1f} images/s → {verdict.status}" + (f"; {note}" if note else ""))
    if verdict.status in ("no target", "INVALID") and gate.options.strict:
        pytest.fail(f"--strict: {verdict.message()}", pytrace=False)
    assert verdict.passed, verdict.message()
