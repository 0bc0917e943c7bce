"""The report a person reads after an upgrade, on a synthetic three-run history (no engines):
the latest verdict of every case, what changed between two runs, one history panel per engine."""

from __future__ import annotations

import base64
import datetime as dt
import struct

import numpy as np
import pandas as pd
import pytest

from rtmbench.cli import main
from rtmbench.report import (_engine_figure, _marker_label, latest_verdicts, markdown_summary, report_plots,
                             scope_history, what_changed)
from rtmbench import results as results_module
from rtmbench.results import RunInfo, compare, load_results, write_run

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
NOW = pd.Timestamp(T0 + dt.timedelta(days=3))
OPENVINO = "2024.4.0-16579-c3152d32c9c-releases/2024/4"
ACCURACY_ENGINES = (("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("openvino", "fp32"))


def accuracy_row(backend: str, precision: str, metric: str, value: float) -> dict:
    target = 0.35 if metric == "mAP" else 0.62
    return {"model": "m", "backend": backend, "precision": precision, "batch": 32, "metric": metric,
            "measured": value, "target": target, "verdict": "pass" if value >= target else "FAIL", "detail": ""}


def perf_row(backend: str, seconds_per_batch: float, seed: int) -> dict:
    times = (seconds_per_batch * np.random.default_rng(seed).lognormal(0, 0.03, 20)).tolist()
    return {"model": "m", "backend": backend, "precision": "fp32", "batch": 32, "metric": "images/s",
            "measured": 32 / float(np.median(times)), "target": None, "verdict": "no target", "detail": "",
            "round_times": times}


def run(root, days: float, onnxruntime: str, rows: list[dict]) -> str:
    info = RunInfo.new(device="Test CPU", versions={"onnxruntime": onnxruntime, "openvino": OPENVINO,
                                                    "driver": "550.1"}, now=T0 + dt.timedelta(days=days))
    write_run(root, info, rows)
    return info.run_id


@pytest.fixture
def history(tmp_path):
    """Run 1: accuracy on 3 engines (ONNX Runtime fp16 mAP FAILs); run 2: images/s on 2 engines;
    run 3: images/s on ONNX Runtime alone, after an upgrade from 1.20.1 to 1.21.0 (15 % slower)."""
    accuracy = [accuracy_row(b, p, metric, value) for b, p in ACCURACY_ENGINES
                for metric, value in (("mAP50", 0.637), ("mAP", 0.340 if p == "fp16" else 0.358))]
    ids = [run(tmp_path, 0, "1.20.1", accuracy),
           run(tmp_path, 1, "1.20.1", [perf_row("onnxruntime", 0.100, 1), perf_row("openvino", 0.125, 2)]),
           run(tmp_path, 2, "1.21.0", [perf_row("onnxruntime", 0.115, 3)])]
    return tmp_path, ids, load_results(tmp_path)


def rows_of(results, run_id):
    return results[results["run_id"] == run_id]


def test_summary_holds_every_case_with_its_latest_verdict(history):
    _, ids, results = history
    summary = latest_verdicts(results, NOW)
    cases = {(r.backend, r.precision, r.metric): (r.verdict, r.run, r.age) for r in summary.itertuples()}
    assert cases == {
        ("onnxruntime", "fp16", "mAP"): ("FAIL", "#1", "3 d"), ("onnxruntime", "fp16", "mAP50"): ("pass", "#1", "3 d"),
        ("onnxruntime", "fp32", "mAP"): ("pass", "#1", "3 d"), ("onnxruntime", "fp32", "mAP50"): ("pass", "#1", "3 d"),
        ("openvino", "fp32", "mAP"): ("pass", "#1", "3 d"), ("openvino", "fp32", "mAP50"): ("pass", "#1", "3 d"),
        ("onnxruntime", "fp32", "images/s"): ("no target", "#3", "24 h"),
        ("openvino", "fp32", "images/s"): ("no target", "#2", "2 d")}
    assert summary["verdict"].iloc[0] == "FAIL"  # failures first
    latest_ort = summary[(summary["backend"] == "onnxruntime") & (summary["metric"] == "images/s")]
    assert latest_ort["value"].item() == pytest.approx(rows_of(results, ids[2])["value"].item())
    text = markdown_summary(results, now=NOW)
    assert text.count("| m |") == 8 and "latest of 3" in text


def test_a_version_change_between_two_runs_is_named(history):
    _, ids, results = history
    baseline, current = rows_of(results, ids[1]), rows_of(results, ids[2])
    changes = what_changed(baseline, current, compare(current, baseline))
    assert changes.provenance.values.tolist() == [["onnxruntime", "1.20.1", "1.21.0"]]
    assert changes.comparison["verdict"].tolist() == ["REGRESSED", "missing"]  # regressions first
    text = markdown_summary(results, changes, now=NOW)
    assert "| onnxruntime | 1.20.1 | 1.21.0 |" in text
    assert f"what changed: {ids[1]}" in text and "REGRESSED" in text


def test_fields_one_run_does_not_know_are_no_change(history):
    """Run 1 ran no backend that reports a version of its own, nor weights; run 2 did."""
    _, ids, results = history
    run2 = rows_of(results, ids[1]).assign(backend_version="9.9", weights_sha256="ab" * 32)
    changes = what_changed(rows_of(results, ids[0]), run2, compare(run2, rows_of(results, ids[0])))
    assert changes.provenance["field"].tolist() == ["onnxruntime", "openvino"]  # the backends' own versions
    assert "weights m" not in changes.provenance["field"].tolist()


def test_scope_by_runs_and_since(history):
    _, ids, results = history
    assert set(scope_history(results, last_runs=2)["run_id"]) == set(ids[1:])
    assert set(scope_history(results, since=pd.Timestamp(T0 + dt.timedelta(days=2)))["run_id"]) == {ids[2]}
    assert set(scope_history(results, last_runs=1, since=pd.Timestamp(T0))["run_id"]) == {ids[2]}


def test_cli_report_scope_options(history, capsys):
    root, ids, _ = history
    assert main(["report", str(root), "--runs", "2", "--compare", "last"]) == 1  # run 3 regressed against run 2
    out = capsys.readouterr().out
    assert "latest of 2" in out and "| m | openvino | fp32 | Test CPU | 32 | images/s |" in out
    assert "| mAP |" not in out  # run 1 is out of scope
    # the scope is what is shown: the baseline still comes from the whole history
    assert main(["report", str(root), "--runs", "1", "--compare", "last"]) == 1
    assert "latest of 1" in capsys.readouterr().out
    assert main(["report", str(root), "--since", "2025-03-02T12:00"]) == 0
    assert "latest of 2" in capsys.readouterr().out
    assert main(["report", str(root), "--since", "2099-01-01"]) == 2
    assert "no run in the history matches the scope (since 2099-01-01 00:00:00+00:00)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(root), "--since", "yesterday-ish"])


def test_cli_report_names_where_its_tolerances_come_from(history, tmp_path, monkeypatch, capsys):
    root, _, _ = history
    monkeypatch.chdir(tmp_path)  # no thresholds.yaml here
    main(["report", str(root), "--compare", "last"])
    assert "rtmbench: accuracy tolerance 0.005 (no thresholds.yaml here" in capsys.readouterr().err
    assert main(["report", str(root), "--thresholds", str(tmp_path / "missing.yaml")]) == 2  # checked, compare or not
    assert "missing.yaml" in capsys.readouterr().err
    (tmp_path / "thresholds.yaml").write_text("schema_version: 2\n")  # another tool's, or an old one
    assert main(["report", str(root)]) == 0  # not read where nothing is compared


def test_cli_report_reads_each_results_file_once(history, monkeypatch, capsys):
    root, ids, _ = history
    read = []
    monkeypatch.setattr(results_module, "_read_one", lambda path, read_one=results_module._read_one:
                        read.append(path) or read_one(path))
    assert main(["report", str(root), "--compare", "last"]) == 1
    assert len(read) == len(set(read)) == len(ids)


def png_width(data: str) -> int:
    return struct.unpack(">I", base64.b64decode(data)[16:20])[0]


def test_history_panels_per_engine_same_width(history):
    _, _, results = history
    plots = report_plots(results)
    assert [p[0] for p in plots] == ["history-m-test-cpu-onnxruntime-fp16", "history-m-test-cpu-onnxruntime-fp32",
                                     "history-m-test-cpu-openvino-fp32", "latency-bs32"]
    assert len({png_width(data) for _, _, data in plots}) == 1


def test_history_panel_axes_and_version_marker(history):
    _, ids, results = history
    ort = results[(results["backend"] == "onnxruntime") & (results["precision"] == "fp32")]
    fig = _engine_figure(ort, {run_id: i for i, run_id in enumerate(ids, start=1)}, {"openvino"}, "title")
    throughput, map50, map_ = fig.axes  # mAP50 and mAP each on its own axis
    assert [t.get_text() for t in throughput.get_xticklabels()] == ["#2\n03-02 12:00", "#3\n03-03 12:00"]
    assert [t.get_text() for t in map50.get_xticklabels()] == ["#1\n03-01 12:00"]  # no empty x positions
    assert (map50.get_title(), map_.get_title()) == ("mAP50", "mAP")
    # the upgrade between runs 2 and 3: one dashed line, labelled short, once
    assert [t.get_text().strip() for ax in fig.axes for t in ax.texts] == ["onnxruntime → 1.21.0"]


def test_version_markers_are_short():
    changes = [("openvino", OPENVINO, "2025.0.0-17942-1f68be9f594-releases/2025/0"), ("driver", "550.54", "560.35"),
               ("onnxruntime", "1.20.1", None)]
    assert _marker_label(changes[:1]) == "openvino → 2025.0.0"
    assert _marker_label(changes) == "openvino → 2025.0.0, driver → 560.35 +1"
    assert _marker_label(changes[2:]) == "onnxruntime → not installed"
    # a local tag can be all that changed; a sha256 prefix is no version number
    assert _marker_label([("torch", "2.11.0+cu128", "2.11.0+cu130")]) == "torch → 2.11.0+cu130"
    assert _marker_label([("weights m", "1234abcd5678", "05d8511e1234")]) == "weights m → 05d8511e1234"
    assert _marker_label([("onnxruntime", "1.20.0rc1", "1.20.1rc1")]) == "onnxruntime → 1.20.1rc1"  # not 1.20
