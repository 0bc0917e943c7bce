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


def summarize(times: np.ndarray, batch: int) -> dict[str, float]:
    """Median images/s and latency percentiles (ms per batch) of per-call times in seconds."""
    ms = np.asarray(times) * 1e3
    return {"images_per_s": batch / float(np.median(times)),
            "latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p90": float(np.percentile(ms, 90)),
            "latency_ms_p99": float(np.percentile(ms, 99)), "rounds": len(times)}


def measure(engine: Engine, batch: np.ndarray, rounds: int = 20, warmup: int = 3) -> dict[str, float]:
    """Both definitions for one engine: ``images_per_s_compute`` and ``images_per_s_end_to_end``."""
    engine.infer(batch)
    compute = summarize(time_calls(engine.infer_compute, rounds, warmup), len(batch))
    end_to_end = summarize(time_calls(lambda: engine.infer(batch), rounds, warmup), len(batch))
    return {"images_per_s_compute": compute["images_per_s"],
            "images_per_s_end_to_end": end_to_end["images_per_s"]}
