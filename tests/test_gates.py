"""The gates run as a user runs them (pytest in a subprocess) on a small thresholds file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from rtmbench.cache import file_sha256

pytestmark = pytest.mark.slow


def thresholds_file(tmp_path, checkpoint, accuracy: str, perf: str = "") -> str:
    text = f"""\
schema_version: 1
models:
  rtmdet-nano-synthetic:
    weights: {{path: {checkpoint}, sha256: {file_sha256(checkpoint)[:12]}}}
    dataset: {{kind: synthetic, seed: 5, num_images: 12}}
    accuracy:
{accuracy}
    perf:
{perf or '      []'}
"""
    path = tmp_path / "thresholds.yaml"
    path.write_text(text.replace("    perf:\n      []", "    perf: []"))
    return str(path)


def run_gates(tmp_path, *args, **popen) -> subprocess.CompletedProcess:
    """pytest on the accuracy gate in a subprocess; modules in ``tmp_path`` load with ``-p NAME``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp_path)]),
           "RTMBENCH_CACHE_DIR": str(tmp_path.parent / "cache")}
    for caller_setting in ("DATASETS_DIR", "PYTEST_ADDOPTS"):  # (CI's -q would change the output read)
        env.pop(caller_setting, None)
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_accuracy.py", "-p", "no:cacheprovider",
                           "--backend", "onnxruntime", "--precision", "fp32",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, **popen)


def test_unreachable_floor_fails_with_the_measured_value(tmp_path, reference):
    accuracy = """\
      - backends: [onnxruntime]
        precision: fp32
        mAP50: {expected: 0.99, tolerance: 0.0}
        mAP: {expected: 0.0, tolerance: 0.0}"""
    result = run_gates(tmp_path, "-m", "accuracy", "--thresholds",
                       thresholds_file(tmp_path, reference.checkpoint, accuracy))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed, 1 passed" in result.stdout
    line = next(l for l in result.stdout.splitlines() if "mAP50 = " in l and "target ≥ 0.9900" in l)
    assert "→ FAIL" in line and "margin -" in line
    assert "rtmbench gates" in result.stdout and "FAIL" in result.stdout.split("rtmbench gates")[1]


@pytest.mark.parametrize("rule_backend, args, relaxed_says, strict_says", [
    ("openvino", (), "no target", "--strict: rtmdet-nano-synthetic-onnxruntime-fp32-bs32"),
    ("igie", ("--backend", "igie", "-k", "igie"), "2 skipped",
     "--strict: rtmdet-nano-synthetic-igie-fp32-bs32 was asked for and cannot run: backend igie unavailable"),
], ids=["no-target", "a-backend-asked-for-that-cannot-run"])
def test_what_passes_relaxed_fails_strict(tmp_path, reference, rule_backend, args, relaxed_says, strict_says):
    accuracy = f"""\
      - backends: [{rule_backend}]
        precision: fp32
        mAP50: {{expected: 0.0, tolerance: 0.0}}"""
    path = thresholds_file(tmp_path, reference.checkpoint, accuracy)
    relaxed = run_gates(tmp_path, "-m", "accuracy", *args, "--thresholds", path)
    assert relaxed.returncode == 0 and relaxed_says in relaxed.stdout.split("rtmbench gates")[-1], \
        relaxed.stdout[-2000:]
    strict = run_gates(tmp_path, "-m", "accuracy", *args, "--thresholds", path, "--strict")
    assert strict.returncode == 1 and strict_says in strict.stdout, strict.stdout[-2000:]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_precision_asked_of_a_backend_without_it_is_named_in_the_summary(tmp_path, workers):
    result = run_gates(tmp_path, "-m", "accuracy", "--precision", "bf16", "-k", "no-such-case", *workers)
    assert "rtmdet-nano-synthetic-onnxruntime-bf16: backend onnxruntime has no bf16 (has fp32, fp16)" in \
        result.stdout.split("rtmbench gates")[-1], result.stdout[-2000:]


def test_real_model_without_data_is_an_error_with_instructions(tmp_path, reference):
    result = run_gates(tmp_path, "-m", "accuracy", "--model", "rtmdet-nano-person",
                       "--weights", str(reference.checkpoint))  # local weights: nothing to download
    assert result.returncode == 4  # a usage error before anything is built
    assert "set DATASETS_DIR or pass --data-root" in result.stderr
    # pytest-xdist: a worker's usage error would crash the controller; each case fails with the line
    sharded = run_gates(tmp_path, "-m", "accuracy", "--model", "rtmdet-nano-person",
                        "--weights", str(reference.checkpoint), "-n", "2")
    assert sharded.returncode == 1 and "INTERNALERROR" not in sharded.stdout + sharded.stderr
    failures = sharded.stdout.split("= FAILURES =")[1].split("short test summary")[0]  # (CI=true: untruncated)
    assert "2 failed" in sharded.stdout and failures.count("set DATASETS_DIR or pass --data-root") == 2, \
        sharded.stdout[-2000:]


def test_weights_that_cannot_be_fetched_stop_the_run_with_one_line(tmp_path, refused_port):
    result = run_gates(tmp_path, "-m", "accuracy", "--weights", f"http://127.0.0.1:{refused_port}/w-0123abcd.pth")
    assert result.returncode == 4, result.stdout[-2000:]  # a usage error before anything is built
    assert result.stderr.count("cannot reach the server") == 1 and "Offline? Download" in result.stderr


def test_malformed_thresholds_stop_the_run_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("schema_version: 1\nmodels: {m: {weights: 3}}\n")
    result = run_gates(tmp_path, "-m", "accuracy", "--thresholds", str(path))
    assert result.returncode == 4  # pytest's usage error
    assert f"{path}:2: models.m.weights" in result.stderr


def test_xdist_workers_give_the_same_metrics(tmp_path, reference):
    from rtmbench.results import load_results

    accuracy = """\
      - backends: [onnxruntime, torch]
        precision: fp32
        mAP50: {expected: 0.0, tolerance: 0.0}
        mAP: {expected: 0.0, tolerance: 0.0}"""
    path = thresholds_file(tmp_path, reference.checkpoint, accuracy)
    values = {}
    for workers in ("0", "2"):
        run_dir = tmp_path / f"n{workers}"
        run_dir.mkdir()
        result = run_gates(run_dir, "-m", "accuracy", "--thresholds", path, "--backend", "torch", "-n", workers)
        assert result.returncode == 0, result.stdout[-3000:]
        assert "rtmbench gates" in result.stdout  # the controller prints the workers' verdicts
        frame = load_results(run_dir / "results")
        values[workers] = dict(zip(frame["backend"] + " " + frame["metric"], frame["value"]))
    assert len(values["0"]) == 4 and values["2"] == values["0"]


# ------------------------------------------------------------------ bad input and faults (issue 12)

ZERO_FLOORS = """\
      - backends: [onnxruntime]
        precision: fp32
        mAP50: {expected: 0.0, tolerance: 0.01}
        mAP: {expected: 0.0, tolerance: 0.01}"""


def results_files(results_dir) -> list[str]:
    """Every file in the results folder (a partial write would show up as a .part file)."""
    return sorted(p.name for p in results_dir.iterdir()) if results_dir.exists() else []


def summary_of(result) -> str:
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout.split("rtmbench gates")[1]


def test_first_run_compared_to_last_is_stored_without_a_baseline(tmp_path, reference):
    path = thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS)
    first = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, "--compare-to", "last")
    assert first.returncode == 0, first.stdout[-3000:]
    assert "no baseline (first run): no run before" in summary_of(first)
    [stored] = results_files(tmp_path / "results")
    assert stored.startswith("run-") and stored.endswith(".csv")
    second = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, "--compare-to", "last")
    assert second.returncode == 0, second.stdout[-3000:]
    assert "compared with last:" in summary_of(second) and "no baseline" not in second.stdout
    assert len(results_files(tmp_path / "results")) == 2 and stored in results_files(tmp_path / "results")


def test_a_corrupt_results_file_is_named_and_this_run_still_stored(tmp_path, reference):
    from rtmbench.results import RunInfo, write_run

    results = tmp_path / "results"
    earlier = write_run(results, RunInfo.new(device="earlier host", versions={}), [
        {"model": "rtmdet-nano-synthetic", "backend": "onnxruntime", "precision": "fp32", "batch": 32,
         "metric": metric, "measured": 0.0, "target": 0.0, "verdict": "pass"} for metric in ("mAP50", "mAP")])
    corrupt = results / "run-20250101T000000000Z-corrupt.csv"
    corrupt.write_bytes(b"run_id,time,value\n\x00\xff\xfe torn write")
    result = run_gates(tmp_path, "-m", "accuracy", "--compare-to", "last",
                       "--thresholds", thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = summary_of(result)
    [line] = [l for l in summary.splitlines() if str(corrupt) in l]
    assert line.startswith("passed over") and "not a readable results file" in line
    assert "compared with last:" in summary and "(2 ok)" in summary  # with the latest readable run
    files = results_files(results)
    assert len(files) == 3 and {earlier.name, corrupt.name} < set(files)


def test_compare_to_last_passes_over_a_perf_run_in_between(tmp_path, reference):
    """The CI recipe: the accuracy gate after a perf run is compared with the accuracy run before it."""
    import datetime as dt

    from rtmbench.hostinfo import machine_fingerprint, package_versions
    from rtmbench.results import RunInfo, write_run

    def earlier_run(hours: float, rows: list[dict]) -> str:  # on this machine: no other-machine rule
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)
        info = RunInfo.new(versions={**package_versions(), **machine_fingerprint()}, now=now)
        write_run(tmp_path / "results", info, rows)
        return info.run_id

    case = {"model": "rtmdet-nano-synthetic", "backend": "onnxruntime", "precision": "fp32", "batch": 32}
    accuracy = earlier_run(2, [{**case, "metric": metric, "measured": 1.0, "target": 0.0, "verdict": "pass"}
                               for metric in ("mAP50", "mAP")])  # a perfect score: any real one is a drop
    earlier_run(1, [{**case, "metric": "images/s", "measured": 100.0, "target": None, "verdict": "no target",
                     "round_times": [0.32] * 20}])
    result = run_gates(tmp_path, "-m", "accuracy", "--compare-to", "last",
                       "--thresholds", thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS))
    assert result.returncode == 1, result.stdout[-3000:]
    summary = summary_of(result)
    assert f"baseline rows from {accuracy} (" in summary and "(2 REGRESSED)" in summary
    # the summary's last line, just above pytest's own "2 passed"
    assert summary.rstrip().splitlines()[-2:][0] == "REGRESSED against the baseline: the session fails (exit 1)"


def test_compare_to_a_corrupt_file_is_refused_before_anything_runs(tmp_path):
    corrupt = tmp_path / "baseline.csv"
    corrupt.write_text("not,a,results\nfile,at,all\n")
    result = run_gates(tmp_path, "-m", "accuracy", "--compare-to", str(corrupt))
    assert result.returncode == 4
    assert f"{corrupt}: not a results file (no column" in result.stderr
    assert results_files(tmp_path / "results") == []


@pytest.mark.parametrize("strict", [[], ["--strict"]], ids=["relaxed", "strict"])
def test_compare_to_an_unknown_run_id_is_a_usage_error(tmp_path, strict):
    result = run_gates(tmp_path, "-m", "accuracy", "--compare-to", "20990101T0000", *strict)
    assert result.returncode == 4
    assert "baseline '20990101T0000': no run id or path matches in" in result.stderr
    assert "passed" not in result.stdout and results_files(tmp_path / "results") == []


def test_results_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "results").write_text("a file, not a folder")
    result = run_gates(tmp_path, "-m", "accuracy")
    assert result.returncode == 4
    assert f"{tmp_path / 'results'}: --results-dir is not a folder" in result.stderr
    assert (tmp_path / "results").read_text() == "a file, not a folder"


def test_data_root_is_used_or_refused(tmp_path):
    missing = run_gates(tmp_path, "-m", "accuracy", "--data-root", "/does/not/exist")
    assert missing.returncode == 4 and "--data-root /does/not/exist: no such folder" in missing.stderr
    unused = run_gates(tmp_path, "-m", "accuracy", "--model", "rtmdet-nano-synthetic", "--data-root", tmp_path)
    assert unused.returncode == 4
    assert f"--data-root {tmp_path}: model rtmdet-nano-synthetic is evaluated on its generated" in unused.stderr
    assert results_files(tmp_path / "results") == []


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--max-images", "0"),
                                           ("--max-images", "-5"), ("--perf-rounds", "0"), ("--batch-size", "x")])
def test_degenerate_numbers_are_usage_errors(tmp_path, option, value):
    result = run_gates(tmp_path, "-m", "accuracy or perf", option, value)
    assert result.returncode == 4
    expected = f"{value!r} is not a whole number" if value == "x" else f"{value} is not ≥ 1"
    assert f"error: argument {option}: {expected}" in result.stderr
    assert results_files(tmp_path / "results") == []


@pytest.mark.parametrize("option, value, message", [
    ("--backend", "tensorrtt", "unknown backend 'tensorrtt'; known: onnxruntime"),
    ("--model", "rtmdet-huge", "unknown model 'rtmdet-huge'; known:"),
    ("--weights", "/nonexistent.pth", "--weights /nonexistent.pth: checkpoint file not found"),
    ("--onnx", "/nonexistent.onnx", "--onnx /nonexistent.onnx: ONNX file not found"),
])
def test_an_option_that_names_nothing_is_one_usage_error(tmp_path, option, value, message):
    result = run_gates(tmp_path, "-m", "accuracy", option, value)
    assert result.returncode == 4
    [line] = [l for l in result.stderr.splitlines() if message in l]
    assert "Traceback" not in result.stderr and results_files(tmp_path / "results") == []


def test_a_subset_is_not_judged_by_floors_measured_on_the_full_set(tmp_path, reference):
    """--max-images 4 of 12: the absolute floor (unreachable here) is not applied; the floor
    relative to torch fp32 on the same 4 images still is."""
    accuracy = """\
      - backends: [onnxruntime]
        precision: fp32
        mAP50: {expected: 0.99, tolerance: 0.0}
        max_drop: {mAP: 0.05}"""
    result = run_gates(tmp_path, "-m", "accuracy", "--max-images", "4",
                       "--thresholds", thresholds_file(tmp_path, reference.checkpoint, accuracy))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = summary_of(result)
    assert ("mAP50 on 4 images: no target: --max-images 4 evaluates a subset of the 12 images the floors were "
            "measured on; they are not applied") in summary
    [row] = [l.split() for l in summary.splitlines() if " mAP on 4 images " in l and l.startswith("rtmdet")]
    assert row[-1] == "pass" and row[-3] != "-"  # gated against torch fp32 on the same subset
    # another measurement than the full set's: a full run compared with last finds no baseline in it
    full = run_gates(tmp_path, "-m", "accuracy", "--compare-to", "last",
                     "--thresholds", thresholds_file(tmp_path, reference.checkpoint, accuracy))
    assert "no baseline (first run)" in summary_of(full) and "REGRESSED" not in summary_of(full)


def test_a_model_without_a_thresholds_entry_is_one_usage_error(tmp_path, reference):
    path = thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS)
    result = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, "--model", "rtmdet-nano-person")
    assert result.returncode == 4
    assert f"{path}: no entry for model 'rtmdet-nano-person' (has rtmdet-nano-synthetic)" in result.stderr
    assert "Traceback" not in result.stderr and results_files(tmp_path / "results") == []


def test_a_run_that_cannot_be_stored_still_prints_its_summary_and_fails(tmp_path, reference):
    """A full disk, simulated by a file-size limit of 64 bytes (CPython ignores SIGXFSZ, so the
    write fails with EFBIG). The first run warms the cache, so the limited run writes only results."""
    import resource

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    path = thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS)
    assert run_gates(tmp_path, "-m", "accuracy", "--thresholds", path).returncode == 0
    [stored] = results_files(tmp_path / "results")
    result = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, preexec_fn=file_size_limit)
    assert result.returncode == 1, result.stdout[-3000:]
    summary = summary_of(result)
    assert "rtmdet-nano-synthetic  onnxruntime" in summary  # the table is not lost
    assert (f"rtmbench: {tmp_path / 'results'}: this run's results could not be stored (File too large)"
            in summary)
    assert results_files(tmp_path / "results") == [stored]  # nothing half-written


def test_an_interrupted_run_is_not_stored_as_if_it_were_whole(tmp_path, reference):
    """Ctrl-C (KeyboardInterrupt, as SIGINT raises it) before the second of the two accuracy items."""
    plugin = tmp_path / "interrupt_second_item.py"
    plugin.write_text("def pytest_runtest_setup(item):\n"
                      "    if item.name.endswith('-mAP]'):\n"
                      "        raise KeyboardInterrupt\n")
    path = thresholds_file(tmp_path, reference.checkpoint, ZERO_FLOORS)
    result = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, "-p", "interrupt_second_item")
    assert result.returncode == 2, result.stdout[-3000:]  # pytest's "interrupted"
    summary = result.stdout.split("rtmbench gates")[1]
    assert "interrupted: the 1 results measured so far are not stored" in summary
    assert results_files(tmp_path / "results") == []


def test_an_option_given_twice_adds_no_case():
    from rtmbench.gate import Case, GateOptions, GateSession
    from rtmbench.thresholds import load_thresholds

    options = GateOptions(models=["rtmdet-nano-synthetic"] * 2, backends=["onnxruntime", "torch", "onnxruntime"],
                          precisions=["fp32", "fp32"])
    session = GateSession(options, load_thresholds(ROOT / "thresholds.yaml"))
    assert session.cases("accuracy") == [Case("rtmdet-nano-synthetic", "onnxruntime", "fp32", 32),
                                         Case("rtmdet-nano-synthetic", "torch", "fp32", 32)]


def test_onnx_given_skips_the_gated_cases_of_backends_that_run_the_weights_only():
    """torch-cuda would measure the checkpoint, not the file: its gated cases are skipped with
    that reason; the torch FP32 reference, and the harness's own checks, still run the weights."""
    from rtmbench.gate import Case, GateOptions, GateSession
    from rtmbench.thresholds import load_thresholds

    options = GateOptions(models=["rtmdet-nano-synthetic"], backends=None, precisions=None, onnx=Path("mine.onnx"))
    session = GateSession(options, load_thresholds(ROOT / "thresholds.yaml"))
    reasons = {backend: session.not_the_onnx_given(Case("rtmdet-nano-synthetic", backend, precision, 32))
               for backend, precision in (("torch-cuda", "fp16"), ("torch", "fp32"), ("onnxruntime", "fp16"))}
    assert reasons == {"torch-cuda": "backend torch-cuda runs the PyTorch model from the weights, not --onnx mine.onnx",
                       "torch": None, "onnxruntime": None}
