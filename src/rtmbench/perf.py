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
WARMUP_CALLS = 3  # untimed calls before a measurement at the least; the fastest sizes the timed rounds
# ... and they last this share of the minimum time at the least: three calls of 5 ms (batch 1 on
# a CPU) sized the rounds on 15 ms, which one preempted call on a busy machine skews
WARMUP_SHARE = 0.1
ROUNDS_MARGIN = 1.25  # timed rounds aim this far past the minimum time (H200: 1.99 s of 2 s without)
MAX_ROUNDS = 100_000  # of warm-up or timed calls (a call of ~0 s would never add up to a minimum time)


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
    """Samples for the percentile to lie above the smallest: 10 for p90, 100 for p99 (in
    hundredths: ``1 / (1 - 0.9)`` is 10.000000000000002 in floating point)."""
    return int(np.ceil(100 / (100 - percentile)))


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


def rounds_for(seconds_per_call: float, min_rounds: int, min_seconds: float, cap: int | None = None) -> int:
    """Timed rounds that satisfy both minimums (MLPerf's minimum query count and duration), the
    time with :data:`ROUNDS_MARGIN` to spare: calls sized on a few warm-up ones often get faster.
    At most ``cap`` (default :data:`MAX_ROUNDS`)."""
    cap = MAX_ROUNDS if cap is None else cap
    return int(min(cap, max(min_rounds, np.ceil(ROUNDS_MARGIN * min_seconds / max(seconds_per_call, 1e-9)))))


def invalid_reason(times: np.ndarray, min_rounds: int, min_seconds: float) -> str | None:
    """Why per-call ``times`` are too few or too short to count (MLPerf's INVALID), or None."""
    problems = []
    if len(times) < min_rounds:
        problems.append(f"{len(times)} timed rounds < {min_rounds}")
    if (total := float(np.sum(times))) < min_seconds:
        problems.append(f"{total:.2f} s timed < {min_seconds:g} s")
    return "; ".join(problems) or None


def warm_up(call, min_seconds: float) -> np.ndarray:
    """Seconds per untimed ``call()``: :data:`WARMUP_CALLS` calls, and more until they take
    :data:`WARMUP_SHARE` of ``min_seconds``."""
    times = list(time_calls(call, WARMUP_CALLS, warmup=0))
    total = sum(times)
    while total < WARMUP_SHARE * min_seconds and len(times) < MAX_ROUNDS:
        times.extend(time_calls(call, 1, warmup=0))
        total += times[-1]
    return np.asarray(times)


def time_valid_rounds(call, min_rounds: int, min_seconds: float, rounds: int | None = None) -> np.ndarray:
    """Seconds per ``call()`` after :func:`warm_up`: over ``rounds`` timed calls (which may then
    be too few: see :func:`invalid_reason`), or by default over :func:`rounds_for` sized on the
    warm-up's fastest call, with more rounds until ``min_seconds`` are timed (as MLPerf's loadgen
    runs until its minimum duration): the calls may get faster still."""
    warm = warm_up(call, min_seconds)
    if rounds is not None:
        return time_calls(call, rounds, warmup=0)
    times = time_calls(call, rounds_for(float(warm.min()), min_rounds, min_seconds), warmup=0)
    while (short := min_seconds - float(times.sum())) > 0 and len(times) < MAX_ROUNDS:
        more = rounds_for(float(np.median(times)), 1, short, cap=MAX_ROUNDS - len(times))
        times = np.concatenate([times, time_calls(call, more, warmup=0)])
    return times


def measure(engine: Engine, batch: np.ndarray, min_rounds: int, min_seconds: float,
            rounds: int | None = None) -> dict:
    """Both definitions for one engine, each timed as :func:`time_valid_rounds`:
    ``images_per_s_compute`` / ``images_per_s_end_to_end``, and under ``compute`` /
    ``end_to_end`` the rounds, timed seconds, latency percentiles (:func:`summarize`) and
    ``invalid``: why the measurement does not count, or None."""
    engine.infer(batch)
    figures: dict = {}
    for definition, call in (("compute", engine.infer_compute), ("end_to_end", lambda: engine.infer(batch))):
        times = time_valid_rounds(call, min_rounds, min_seconds, rounds)
        summary = summarize(times, len(batch))
        figures[f"images_per_s_{definition}"] = summary.pop("images_per_s")
        figures[definition] = {**summary, "timed_seconds": float(times.sum()),
                               "invalid": invalid_reason(times, min_rounds, min_seconds)}
    return figures
