"""The gates run as a user runs them (pytest in a subprocess) on a small thresholds file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def run_gates(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RTMBENCH_CACHE_DIR": str(tmp_path.parent / "cache")}
    env.pop("DATASETS_DIR", None)
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_accuracy.py", "-p", "no:cacheprovider",
                           "--backend", "onnxruntime", "--precision", "fp32",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=ROOT, capture_output=True, text=True, env=env)


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


def test_no_target_passes_but_strict_fails_it(tmp_path, reference):
    accuracy = """\
      - backends: [openvino]
        precision: fp32
        mAP50: {expected: 0.0, tolerance: 0.0}"""
    path = thresholds_file(tmp_path, reference.checkpoint, accuracy)
    relaxed = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path)
    assert relaxed.returncode == 0, relaxed.stdout[-2000:]
    assert "no target" in relaxed.stdout.split("rtmbench gates")[1]
    strict = run_gates(tmp_path, "-m", "accuracy", "--thresholds", path, "--strict")
    assert strict.returncode == 1 and "--strict: rtmdet-nano-synthetic-onnxruntime-fp32-bs32" in strict.stdout


def test_real_model_without_data_is_an_error_with_instructions(tmp_path):
    result = run_gates(tmp_path, "-m", "accuracy", "--model", "rtmdet-nano-person",
                       "--weights", str(tmp_path / "absent.pth"))
    assert result.returncode == 4  # a usage error before anything is built
    assert "set DATASETS_DIR or pass --data-root" in result.stderr


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
