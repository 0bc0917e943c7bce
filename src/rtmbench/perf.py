"""Throughput timing of engines, with the two definitions kept apart.

- compute: ``Engine.infer_compute`` (inputs already where the engine reads them), the figure
  vendors publish (IGIE's time_evaluator, trtexec's GPU compute);
- end-to-end: ``Engine.infer`` on a host batch, outputs back on the host.
images/s = batch / seconds per call; medians over rounds, after untimed warm-up calls.
"""

from __future__ import annotations

import time

import numpy as np

from .backends import Engine

GFLOP_PER_IMAGE = {"rtmdet-nano-person": 0.616, "rtmdet-nano-synthetic": 0.616}  # at 320×320


def random_batch(batch: int, input_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """float32[batch, 3, H, W] in the range normalized images take."""
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, *input_size)).astype(np.float32)


def time_calls(fn, rounds: int, warmup: int = 2) -> np.ndarray:
    """Seconds per call of ``fn()`` over ``rounds`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = np.empty(rounds)
    for i in range(rounds):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times


# A percentile p is reported only from at least 1 / (1 - p) samples: below that, the "p99" of
# 30 samples is just their maximum.
PERCENTILES = (50, 90, 99)


def min_samples(percentile: float) -> int:
    return int(np.ceil(1 / (1 - percentile / 100)))


def summarize(times: np.ndarray, batch: int) -> dict[str, float | None]:
    """Median images/s and latency percentiles (ms per batch) of per-call times in seconds;
    a percentile the sample count cannot estimate is None (``latency_note`` says why)."""
    ms = np.asarray(times) * 1e3
    summary: dict = {"images_per_s": batch / float(np.median(times)), "rounds": len(times)}
    for p in PERCENTILES:
        summary[f"latency_ms_p{p}"] = float(np.percentile(ms, p)) if len(ms) >= min_samples(p) else None
    if missing := [f"p{p} needs {min_samples(p)}" for p in PERCENTILES if summary[f"latency_ms_p{p}"] is None]:
        summary["latency_note"] = f"not estimable from {len(ms)} rounds: {', '.join(missing)}"
    return summary


def rounds_for(seconds_per_call: float, min_rounds: int, min_seconds: float, cap: int = 100_000) -> int:
    """Timed rounds that satisfy both minimums (MLPerf's minimum query count and duration)."""
    return int(min(cap, max(min_rounds, np.ceil(min_seconds / max(seconds_per_call, 1e-9)))))


def invalid_reason(times: np.ndarray, min_rounds: int, min_seconds: float) -> str | None:
    """Why per-call ``times`` are too few or too short to count (MLPerf's INVALID), or None."""
    problems = []
    if len(times) < min_rounds:
        problems.append(f"{len(times)} timed rounds < {min_rounds}")
    if (total := float(np.sum(times))) < min_seconds:
        problems.append(f"{total:.2f} s timed < {min_seconds:g} s")
    return "; ".join(problems) or None


def measure(engine: Engine, batch: np.ndarray, rounds: int = 20, warmup: int = 3) -> dict[str, float]:
    """Both definitions for one engine: ``images_per_s_compute`` and ``images_per_s_end_to_end``."""
    engine.infer(batch)
    compute = summarize(time_calls(engine.infer_compute, rounds, warmup), len(batch))
    end_to_end = summarize(time_calls(lambda: engine.infer(batch), rounds, warmup), len(batch))
    return {"images_per_s_compute": compute["images_per_s"],
            "images_per_s_end_to_end": end_to_end["images_per_s"]}
