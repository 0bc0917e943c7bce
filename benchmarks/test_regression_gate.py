"""The comparison across runs catches a slowed engine and a mutated pipeline, and raises no
false alarm on unchanged reruns on this (noisy, shared) machine."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from rtmbench.backends import Engine
from rtmbench.evaluate import evaluate_engine
from rtmbench.gate import Case, Verdict
from rtmbench.perf import random_batch, time_calls
from rtmbench.results import RunInfo, compare, to_frame

pytestmark = pytest.mark.perf
BATCH, ROUNDS, RERUNS = 8, 12, 5


class Slowed(Engine):
    """Test-only wrapper: the same engine with ``delay`` seconds added to every call."""

    def __init__(self, inner: Engine, delay: float):
        super().__init__(inner.precision)
        self.inner, self.delay = inner, delay

    def _run(self, batch):
        time.sleep(self.delay)
        return self.inner.infer(batch)


def throughput_row(case: Case, times: np.ndarray, batch: int) -> dict:
    verdict = Verdict(case, "images/s", batch / float(np.median(times)), None, "no target")
    return {**verdict.as_row(), "round_times": times.tolist(), "device": "this machine"}


def interleaved_rows(case: Case, engines: list[Engine], batch: np.ndarray) -> list[dict]:
    """One throughput row per engine from rounds taken in turn (round i of every engine, then
    round i + 1, …): the drift of a shared machine hits all alike, as it would not between runs
    on a quiet one. What is left to tell apart is the engines, and round-to-round noise."""
    for engine in engines:
        engine.infer(batch)
        time_calls(engine.infer_compute, 2, warmup=0)
    times = np.empty((len(engines), ROUNDS))
    for i in range(ROUNDS):
        for k, engine in enumerate(engines):
            start = time.perf_counter()
            engine.infer_compute()
            times[k, i] = time.perf_counter() - start
    return [throughput_row(case, t, len(batch)) for t in times]


def frame(rows):
    return to_frame(RunInfo.new(device="this machine", versions={}), rows)


@pytest.fixture(scope="module")
def ort(gate, onnxruntime_fp32):
    case = dataclasses.replace(onnxruntime_fp32, batch=BATCH)
    return case, gate.engine(case).engine, random_batch(BATCH, gate.spec(case.model).input_size)


def test_slowed_engine_regresses_and_reruns_do_not(ort):
    case, engine, batch = ort
    engine.infer(batch)
    per_call = float(np.median(time_calls(engine.infer_compute, 3, warmup=1)))
    base, *unchanged, slow = interleaved_rows(case, [engine] * (1 + RERUNS) + [Slowed(engine, 0.25 * per_call)], batch)
    baseline = frame([base])
    reruns = [compare(frame([row]), baseline) for row in unchanged]
    slowed = compare(frame([slow]), baseline)
    for r in reruns:
        print(f"\nunchanged rerun: {r['verdict'][0]}: {r['reason'][0]}", end="")
    print(f"\nslowed by 25 %: {slowed['verdict'][0]}: {slowed['reason'][0]}")
    assert [r["verdict"][0] for r in reruns] == ["ok"] * RERUNS  # no false alarm
    assert slowed["verdict"].tolist() == ["REGRESSED"]


def test_mutated_accuracy_regresses_only_the_changed_case(gate, ort):
    """Two cases per run; the second run mutates one of them (at most 3 boxes per image)."""
    case, engine, _ = ort
    other = Case(case.model, case.backend, case.precision, 2 * BATCH)
    dataset, spec = gate.dataset(case.model), gate.spec(case.model)

    def rows(c: Case, **test_cfg):
        metrics = evaluate_engine(dataset, engine, spec, c.batch, max_images=200, progress=False,
                                  **test_cfg).metrics
        return [Verdict(c, m, metrics[m], None, "no target").as_row() | {"device": "this machine"}
                for m in ("mAP50", "mAP")]

    baseline = frame(rows(case) + rows(other))
    unchanged = compare(frame(rows(case) + rows(other)), baseline, accuracy_tolerance=0.005)
    mutated = compare(frame(rows(case, max_per_img=3) + rows(other)), baseline, accuracy_tolerance=0.005)
    print("\n" + mutated[["batch", "metric", "baseline", "current", "verdict"]].to_string())
    assert (unchanged["verdict"] == "ok").all()
    flagged = mutated.loc[mutated["verdict"] == "REGRESSED"]
    assert set(flagged["batch"]) == {case.batch} and "mAP" in set(flagged["metric"])
