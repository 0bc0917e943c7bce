"""Only valid numbers: validity minimums (INVALID), outputs checked while timed (fast but wrong
fails), the machine's fingerprint and GPU telemetry (with a fake NVML), comparisons across
machines labelled."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rtmbench import hostinfo
from rtmbench.gate import Case, Verdict
from rtmbench.perf import invalid_reason, rounds_for, summarize
from rtmbench.results import ACROSS_MACHINES

ROOT = Path(__file__).resolve().parents[1]
CASE = Case("rtmdet-nano-synthetic", "onnxruntime", "fp32", 32)


def test_percentiles_are_reported_only_when_estimable():
    few = summarize(np.full(30, 0.1), 32)
    assert few["latency_ms_p50"] == pytest.approx(100) and few["latency_ms_p90"] == pytest.approx(100)
    assert few["latency_ms_p99"] is None and "p99 needs 100" in few["latency_note"]
    assert summarize(np.full(10, 0.1), 32)["latency_ms_p90"] is not None  # 10 is enough for p90
    assert summarize(np.full(9, 0.1), 32)["latency_ms_p90"] is None
    many = summarize(np.linspace(0.1, 0.2, 100), 32)
    assert many["latency_ms_p99"] is not None and "latency_note" not in many


def test_too_few_rounds_or_too_short_a_time_is_invalid():
    assert invalid_reason(np.full(20, 0.1), 20, 2.0) is None
    assert invalid_reason(np.full(19, 0.2), 20, 2.0) == "19 timed rounds < 20"
    assert invalid_reason(np.full(25, 0.01), 20, 2.0) == "0.25 s timed < 2 s"
    assert rounds_for(0.2, 20, 2.0) == 20 and rounds_for(0.0025, 20, 2.0) == 1000  # 2 s with 25 % to spare


def _clock_with_calls(monkeypatch, seconds_per_call):
    """perf's clock, advanced only by ``call()``: call n (from 1) takes ``seconds_per_call(n, now)``."""
    from rtmbench import perf

    clock, calls = [0.0], []

    def call():
        calls.append(None)
        clock[0] += seconds_per_call(len(calls), clock[0])

    monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return call, calls


def test_auto_sized_rounds_stay_valid_when_calls_speed_up_after_warm_up(gate, monkeypatch):
    """Rounds sized on warm-up calls of 0.024 s that then take 0.02 s (on the H200 such runs
    ended at 1.99 s of 2 s) still meet the minimum time. With --perf-rounds the count is kept."""
    from rtmbench import perf

    call, _ = _clock_with_calls(monkeypatch, lambda n, now: 0.024 if n <= perf.WARMUP_CALLS else 0.02)
    monkeypatch.setattr(gate.options, "rounds", None)
    validity = gate.validity(CASE.model)
    times = gate.time_rounds(CASE.model, call)
    assert invalid_reason(times, validity.min_rounds, validity.min_seconds) is None
    # sized on the warm-up's fastest call, 0.02 s (± the clock's rounding)
    assert abs(len(times) - perf.rounds_for(0.02, validity.min_rounds, validity.min_seconds)) <= 1
    monkeypatch.setattr(gate.options, "rounds", 7)
    assert len(gate.time_rounds(CASE.model, call)) == 7


def test_a_warm_up_slowed_by_a_busy_machine_gets_rounds_added_until_the_minimum_time(gate, monkeypatch):
    """The warm-up runs for a tenth of the minimum time, not three calls; calls that then run
    twice as fast (the machine's other job stopped) are timed until the minimum time is met."""
    from rtmbench import perf

    validity = gate.validity(CASE.model)
    warm_up_seconds = perf.WARMUP_SHARE * validity.min_seconds
    call, calls = _clock_with_calls(monkeypatch, lambda n, now: 0.04 if now < warm_up_seconds - 1e-9 else 0.02)
    monkeypatch.setattr(gate.options, "rounds", None)
    times = gate.time_rounds(CASE.model, call)
    warm_up_calls = len(calls) - len(times)
    assert warm_up_calls == round(warm_up_seconds / 0.04) > perf.WARMUP_CALLS
    sized = perf.rounds_for(0.04, validity.min_rounds, validity.min_seconds)
    assert sized * 0.02 < validity.min_seconds < times.sum()  # the sized rounds alone: INVALID
    assert invalid_reason(times, validity.min_rounds, validity.min_seconds) is None
    assert times.sum() <= perf.ROUNDS_MARGIN * validity.min_seconds  # topped up, not overrun


def test_calls_that_take_no_time_end_at_the_round_limit(monkeypatch):
    """A call of 0 s (a stub, a clock too coarse) never adds up to the minimum time: warm-up and
    top-up stop at MAX_ROUNDS each, and the measurement is INVALID, not a hang."""
    from rtmbench import perf

    monkeypatch.setattr(perf, "MAX_ROUNDS", 50)
    call, calls = _clock_with_calls(monkeypatch, lambda n, now: 0.0)
    times = perf.time_valid_rounds(call, 20, 2.0)
    assert len(times) == 50 and len(calls) == 100
    assert invalid_reason(times, 20, 2.0) == "0.00 s timed < 2 s"


def test_invalid_and_fast_but_wrong_verdicts(gate):
    reference = lambda case, definition: 1.0  # noqa: E731
    invalid = gate.check_throughput(CASE, 500.0, "cpu", "compute", reference, invalid="3 timed rounds < 20")
    assert invalid.status == "INVALID" and invalid.passed and "3 timed rounds < 20" in invalid.detail
    wrong = gate.check_throughput(CASE, 500.0, "cpu", "compute", reference, invalid="too short",
                                  wrong_outputs="last timed call's outputs differ")
    assert wrong.status == "FAIL" and not wrong.passed and wrong.detail.startswith("fast but wrong")


def test_a_ratio_target_compares_by_the_same_definition(gate, monkeypatch):
    """The reference case is asked for the images/s of the definition the case was timed by,
    and the gate times the reference that way (end to end: host batch in, outputs out)."""
    from rtmbench.thresholds import PerfRule

    rule = PerfRule(device="*", backend="onnxruntime", precision="fp32", definition="end_to_end",
                    ratio_to={"backend": "torch", "precision": "fp32", "min_ratio": 2.5})
    monkeypatch.setattr(gate.thresholds, "perf_rule", lambda *args: rule)
    asked = []

    def reference(case, definition):
        asked.append((case.backend, case.precision, definition))
        return 100.0

    verdict = gate.check_throughput(CASE, 300.0, "cpu", "end_to_end", reference)
    assert asked == [("torch", "fp32", "end_to_end")] and verdict.status == "pass" and "ratio 3.00" in verdict.detail
    torch_case = Case(CASE.model, "torch", "fp32", 4)
    calls = []
    monkeypatch.setattr(gate, "time_rounds", lambda model, call: calls.append(call) or np.full(20, 0.1))
    assert gate.reference_throughput(torch_case, "end_to_end") == pytest.approx(40.0)
    assert calls[0] != gate.engine(torch_case).engine.infer_compute  # timed end to end, not the compute call


def test_no_target_names_what_has_none(gate):
    verdict = gate.check_throughput(Case(CASE.model, "onnxruntime", "fp32", 8), 300.0, "cpu", "compute",
                                    lambda case, definition: 100.0)
    assert verdict.status == "no target"
    assert verdict.detail == "no perf target for onnxruntime fp32 at batch 8 on device 'cpu' in thresholds.yaml"


def test_outputs_are_checked_against_the_reference_and_within_the_batch(gate):
    inputs = gate.perf_inputs(CASE.model, 4)
    np.testing.assert_array_equal(inputs[-1], inputs[0])  # an image repeated in the batch
    reference = gate.engine(Case(CASE.model, "torch", "fp32", 4)).engine.infer(inputs)
    case = Case(CASE.model, "onnxruntime", "fp32", 4)
    assert gate.check_outputs(case, [reference, reference]) is None
    scaled = {k: v * 1.5 for k, v in reference.items()}
    assert "last timed call's outputs differ from torch fp32" in gate.check_outputs(case, [reference, scaled])
    # Within an fp16 engine's tolerance of the reference (1 % of range), but row 3 ≠ row 0.
    moved = {k: v.copy() for k, v in reference.items()}
    moved["bbox_pred_0"][-1] += 0.01 * np.abs(reference["bbox_pred_0"]).max()
    fp16 = Case(CASE.model, "onnxruntime", "fp16", 4)
    assert "the same image at rows 0 and 3" in gate.check_outputs(fp16, [moved, reference])


class FakeNvml:
    """NVML as nvidia-ml-py exposes it, for one GPU whose clock drops under a power cap."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    class NVMLError_NotSupported(Exception):  # noqa: N801 (pynvml's name)
        pass

    def __init__(self, reasons=(0x1, 0x1, 0x4)):
        self.reasons, self.calls = list(reasons), 0
        self.open = 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlSystemGetDriverVersion(self):
        return b"580.159"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes):
        assert uuid == b"GPU-5f0c2a9e-0000-4000-8000-000000000001", uuid
        return "gpu0"

    def nvmlDeviceGetName(self, gpu):
        return "NVIDIA H200"

    def nvmlDeviceGetPowerManagementLimit(self, gpu):
        return 700_000

    def nvmlDeviceGetApplicationsClock(self, gpu, clock):
        return 1980

    def nvmlDeviceGetPersistenceMode(self, gpu):
        return 1

    def nvmlDeviceGetClockInfo(self, gpu, clock):
        self.calls += 1
        return 1980 if self.calls < 3 else 1410

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        return 60 + self.calls

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, gpu):
        return self.reasons[min(self.calls, len(self.reasons)) - 1]


def test_fingerprint_names_the_machine_and_its_gpu():
    nvml = FakeNvml()
    fingerprint = hostinfo.machine_fingerprint(nvml)
    assert fingerprint["machine.cores"] == len(os.sched_getaffinity(0)) and fingerprint["machine.cpu"]
    assert fingerprint["machine.gpu0"] == "NVIDIA H200" and fingerprint["machine.gpu0.power_limit_w"] == 700
    assert fingerprint["driver"] == "580.159" and fingerprint["cuda_driver"] == "13.0"
    assert nvml.open == 0  # shut down again
    assert "machine.gpu0" not in hostinfo.machine_fingerprint(FakeNvmlMissing())


class FakeNvmlOfAGeForce(FakeNvml):
    """Application clocks and persistence mode: NVML's "Not Supported" there."""

    def nvmlDeviceGetApplicationsClock(self, gpu, clock=None):
        raise self.NVMLError_NotSupported("Not Supported")

    nvmlDeviceGetPersistenceMode = nvmlDeviceGetApplicationsClock


def test_fingerprint_keeps_what_a_gpu_does_not_answer_as_unknown():
    fingerprint = hostinfo.machine_fingerprint(FakeNvmlOfAGeForce())
    assert fingerprint["machine.gpu0.app_clock_sm_mhz"] is None and fingerprint["machine.gpu0.persistence"] is None
    assert fingerprint["machine.gpu0"] == "NVIDIA H200" and fingerprint["machine.gpu0.power_limit_w"] == 700


class FakeNvmlMissing:
    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


def test_telemetry_samples_while_timed_and_names_throttling():
    nvml = FakeNvml()
    with hostinfo.gpu_telemetry({"gpu_index": 0, "gpu_uuid": "GPU-5f0c2a9e-0000-4000-8000-000000000001"},
                                nvml) as telemetry:
        while nvml.calls < 4:
            pass
    summary = telemetry.summary()
    assert summary["samples"] >= 3 and summary["sm_clock_mhz_min"] == 1410 and summary["sm_clock_mhz_max"] == 1980
    assert telemetry.throttled == ["sw_power_cap"] and "gpu_idle" in summary["clock_event_reasons"]
    assert telemetry.verdict_note() == "throttled while timed: sw_power_cap"
    assert nvml.open == 0
    with hostinfo.gpu_telemetry({"device": "a CPU"}, FakeNvml()) as cpu:
        pass
    assert cpu.summary() is None and cpu.throttled == [] and cpu.verdict_note() is None


class FakeNvmlWithoutThatGpu(FakeNvml):
    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("Not Found")


@pytest.mark.parametrize("nvml", [FakeNvmlWithoutThatGpu(), FakeNvmlMissing()], ids=["gpu-not-found", "no-nvml"])
def test_a_gpu_that_cannot_be_watched_is_said_in_the_verdict(nvml):
    with hostinfo.gpu_telemetry({"gpu_index": 0, "gpu_uuid": "MIG-5f0c2a9e"}, nvml) as telemetry:
        pass
    assert telemetry.samples == [] and telemetry.summary() == {"error": telemetry.error}
    note = telemetry.verdict_note()
    assert note.startswith("GPU telemetry failed (") and note.endswith("): throttling not checked")
    assert ("Not Found" if isinstance(nvml, FakeNvmlWithoutThatGpu) else "no NVML here") in note


def test_a_baseline_from_another_machine_is_labelled_not_a_regression(gate, tmp_path, monkeypatch):
    from rtmbench.results import RunInfo, write_run

    def throughput_rows(seconds):
        verdict = Verdict(CASE, "images/s", 32 / seconds, None, "no target")
        return [{**verdict.as_row(), "round_times": list(np.random.default_rng(0).normal(seconds, seconds / 100, 30))}]

    other = {**hostinfo.machine_fingerprint(), "machine.cores": 64}
    other_machine = write_run(tmp_path, RunInfo.new(device="cpu", versions=other), throughput_rows(0.1))
    _, comparison, notes = gate.record_run(throughput_rows(0.2), tmp_path, "last")  # half as fast
    assert comparison["verdict"].tolist() == [ACROSS_MACHINES]
    assert any("another machine (cores: 64 → " in note for note in notes)
    assert any(note.startswith("what changed since the baseline: ") and "machine.cores 64 → " in note
               for note in notes)
    monkeypatch.setattr(gate.options, "compare_across_machines", True)
    _, comparison, _ = gate.record_run(throughput_rows(0.2), tmp_path, str(other_machine))
    assert comparison["verdict"].tolist() == ["REGRESSED"]


def run_perf_gate(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RTMBENCH_CACHE_DIR": str(tmp_path.parent / "cache")}
    for caller_setting in ("DATASETS_DIR", "PYTEST_ADDOPTS"):  # (CI's -q would change the output read)
        env.pop(caller_setting, None)
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_perf.py", "-p", "no:cacheprovider",
                           "--backend", "onnxruntime", "--precision", "fp32",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def _thresholds_without_perf_targets(folder: Path) -> Path:
    """thresholds.yaml with no perf target for the embedded default: whether a measurement is
    valid must not hang on a speed ratio timed on a machine shared with other jobs."""
    import yaml

    data = yaml.safe_load((ROOT / "thresholds.yaml").read_text())
    model = data["models"][CASE.model]
    model["weights"]["path"] = str(ROOT / model["weights"]["path"])
    del model["perf"]
    folder.mkdir(parents=True)
    (path := folder / "thresholds.yaml").write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_the_default_perf_run_is_valid_and_too_few_rounds_are_invalid(tmp_path):
    from rtmbench.results import load_results

    thresholds = _thresholds_without_perf_targets(tmp_path / "no-targets")
    valid = run_perf_gate(tmp_path / "default", "--thresholds", str(thresholds))
    assert valid.returncode == 0, valid.stdout[-3000:]
    stored = load_results(tmp_path / "default" / "results")
    assert stored["verdict"].tolist() == ["no target"], valid.stdout[-3000:]
    times = stored["round_times"].iloc[0]
    assert len(times) >= 20 and sum(times) >= 2.0  # the default validity rules: 20 rounds, 2 s
    short = run_perf_gate(tmp_path / "short", "--perf-rounds", "3")
    assert short.returncode == 0, short.stdout[-3000:]
    assert load_results(tmp_path / "short" / "results")["verdict"].tolist() == ["INVALID"]
    assert "INVALID: not a valid measurement: 3 timed rounds < 20" in short.stdout
    strict = run_perf_gate(tmp_path / "strict", "--perf-rounds", "3", "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stdout


@pytest.mark.slow
def test_a_fast_engine_with_a_scaled_conv_fails_the_perf_gate(tmp_path, gate):
    import onnx
    from onnx import numpy_helper

    from rtmbench.artifacts import cached_onnx

    model = onnx.load(cached_onnx(gate.spec(CASE.model), gate.weights(CASE.model), gate.cache))
    weights = {i.name: i for i in model.graph.initializer}
    first_conv = next(node for node in model.graph.node if node.op_type == "Conv")
    tensor = weights[first_conv.input[1]]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.5, tensor.name))
    mutated = tmp_path / "scaled-first-conv.onnx"
    onnx.save(model, mutated)
    result = run_perf_gate(tmp_path, "--onnx", str(mutated), "--perf-min-seconds", "0.5")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "fast but wrong: first timed call's outputs differ from torch fp32" in result.stdout
