"""The results store and the run-to-run comparison, on synthetic rows (no engines)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from rtmbench.cli import main
from rtmbench.results import (ACROSS_MACHINES, COLUMNS, NoBaseline, RunInfo, accuracy_tolerances, compare,
                              find_baseline, full_set_metric, has_regression, load_results, other_machine_note,
                              round_times, short_commit, subset_metric, to_frame, write_run)
from rtmbench.thresholds import load_thresholds

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
ROUND_SECONDS = 0.100  # one batch of 32


def run_info(hours: float = 0, device: str = "Test CPU") -> RunInfo:
    info = RunInfo.new(device=device, versions={"onnxruntime": "1.20.0", "driver": "550.1"},
                       now=T0 + dt.timedelta(hours=hours))
    return info


def noisy_rounds(seed: int, scale: float = 1.0, sigma: float = 0.03, n: int = 30) -> list[float]:
    """Per-round seconds: lognormal around ROUND_SECONDS × scale (realistic run-to-run jitter)."""
    rng = np.random.default_rng(seed)
    return (ROUND_SECONDS * scale * rng.lognormal(0.0, sigma, n)).tolist()


def perf_row(times, batch: int = 32, backend: str = "onnxruntime", **extra) -> dict:
    return {"model": "m", "backend": backend, "precision": "fp32", "batch": batch, "metric": "images/s",
            "measured": batch / float(np.median(times)), "target": None, "margin": None,
            "verdict": "no target", "detail": "", "round_times": times, **extra}


def acc_row(metric: str, value: float, backend: str = "onnxruntime") -> dict:
    return {"model": "m", "backend": backend, "precision": "fp32", "batch": 32, "metric": metric,
            "measured": value, "target": 0.3, "margin": value - 0.3, "verdict": "pass", "detail": "floor"}


def frame(rows, hours: float = 0):
    return to_frame(run_info(hours), rows)


def verdict_of(cmp, metric: str, batch: int = 32):
    row = cmp[(cmp["metric"] == metric) & (cmp["batch"] == batch)].iloc[0]
    return row["verdict"], row["reason"]


# ------------------------------------------------------------------ store


def test_round_trip(tmp_path):
    times = noisy_rounds(0)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [{"name": "test_throughput[m-onnxruntime-fp32-bs8]",
                                                 "param": "m-onnxruntime-fp32-bs8",
                                                 "stats": {"data": [0.03, 0.031, 0.029]}}]}))
    rows = [acc_row("mAP", 0.41), acc_row("mAP50", 0.62),
            perf_row(times, weights_sha256="1e5", device="Some GPU"),
            {**perf_row([0.03]), "batch": 8, "round_times": None}]  # round times from the benchmark JSON
    info = run_info()
    path = write_run(tmp_path / "results", info, rows, benchmark_json=bench)

    assert path.name == f"run-{info.run_id}.csv"
    assert {p.name for p in path.parent.iterdir()} == {path.name, f"run-{info.run_id}.benchmark.json"}
    df = load_results(tmp_path / "results")
    assert list(df.columns) == COLUMNS and len(df) == 4
    assert set(df["run_id"]) == {info.run_id} and df["time"].iloc[0] == T0
    assert df["commit"].iloc[0] == info.commit  # this checkout's HEAD (None outside git)
    acc = df[df["metric"] == "mAP"].iloc[0]
    assert acc["value"] == pytest.approx(0.41) and acc["target"] == pytest.approx(0.3)
    assert acc["round_times"] is None and acc["device"] == "Test CPU" and acc["backend_version"] == "1.20.0"
    assert json.loads(acc["versions"])["driver"] == "550.1"
    perf = df[(df["metric"] == "images/s") & (df["batch"] == 32)].iloc[0]
    assert perf["weights_sha256"] == "1e5"  # stays text, not the float 100000
    assert perf["device"] == "Some GPU"
    assert perf["round_times"] == [float(t) for t in times]  # read back as the list of floats it was
    np.testing.assert_allclose(round_times(perf["round_times"]), times)
    bs8 = df[df["batch"] == 8].iloc[0]
    assert bs8["round_times"] == [0.03, 0.031, 0.029]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_a_run_records_its_commit_and_whether_the_checkout_was_changed(tmp_path):
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True,  # noqa: E731
                                       capture_output=True, text=True).stdout.strip()
    assert RunInfo.new(repo_dir=tmp_path).commit is None  # not a checkout
    git("init", "-q")
    (tmp_path / "tracked.py").write_text("x = 1\n")
    git("add", "tracked.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("results\n")  # outputs beside the code change nothing
    assert RunInfo.new(repo_dir=tmp_path).commit == head
    (tmp_path / "tracked.py").write_text("x = 2\n")
    commit = RunInfo.new(repo_dir=tmp_path).commit
    assert commit == head + "-dirty"
    assert short_commit(commit) == head[:12] + "-dirty" and short_commit(head) == head[:12]
    assert short_commit(None) == "unknown"


def test_run_ids_are_unique_and_sortable():
    a, b = RunInfo.new(now=T0), RunInfo.new(now=T0)
    assert a.run_id != b.run_id and a.run_id.startswith("20250301T120000000Z-")
    assert RunInfo.new(now=T0 + dt.timedelta(seconds=1)).run_id > a.run_id


def test_concurrent_writers_both_land(tmp_path):
    """Writers started at the same instant (same timestamp) never clash or leave partial files."""
    barrier = threading.Barrier(4)
    written = []

    def writer(seed):
        info = RunInfo.new(device="Test CPU", versions={}, now=T0)
        rows = [perf_row(noisy_rounds(seed)), acc_row("mAP", 0.4)]
        barrier.wait()
        written.append((info.run_id, write_run(tmp_path, info, rows)))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({path for _, path in written}) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(path.name for _, path in written)
    df = load_results(tmp_path)
    assert set(df["run_id"]) == {run_id for run_id, _ in written} and len(df) == 8


def test_load_merges_files_sorted_by_time(tmp_path):
    later = write_run(tmp_path / "a", run_info(2), [acc_row("mAP", 0.40)])
    earlier = write_run(tmp_path / "b", run_info(1), [acc_row("mAP", 0.39)])
    df = load_results([later, tmp_path / "b"])
    assert df["value"].tolist() == pytest.approx([0.39, 0.40])
    assert df["run_id"].tolist() == [earlier.stem.removeprefix("run-"), later.stem.removeprefix("run-")]


def test_load_errors_are_one_line(tmp_path):
    from rtmbench.errors import RtmbenchError

    with pytest.raises(RtmbenchError, match="no results files"):
        load_results(tmp_path)
    (tmp_path / "run-x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RtmbenchError, match="not a results file"):
        load_results(tmp_path)
    (tmp_path / "run-x.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(RtmbenchError, match=r"run-x\.csv: not a results file \(a header and no rows\)$"):
        load_results(tmp_path)


def baseline_runs(results, spec: str, current_run_id: str | None = None) -> list[str]:
    return find_baseline(results, spec, current_run_id).run_ids


def test_find_baseline(tmp_path):
    ids = [write_run(tmp_path, run_info(h), [acc_row("mAP", 0.4)]).stem.removeprefix("run-") for h in (1, 2, 3)]
    assert baseline_runs(tmp_path, "last", current_run_id=ids[2]) == [ids[1]]
    assert baseline_runs(tmp_path, "last", current_run_id=ids[1]) == [ids[0]]
    assert baseline_runs(tmp_path, "last") == [ids[2]]  # the current run is not stored yet
    assert baseline_runs(tmp_path, ids[0]) == [ids[0]]
    assert baseline_runs(tmp_path, ids[0][:-2]) == [ids[0]]  # a unique prefix
    assert baseline_runs(tmp_path, str(tmp_path / f"run-{ids[1]}.csv")) == [ids[1]]
    assert set(find_baseline(tmp_path, ids[0]).rows["run_id"]) == {ids[0]}
    with pytest.raises(NoBaseline, match="no run before"):
        find_baseline(tmp_path, "last", current_run_id=ids[0])
    with pytest.raises(NoBaseline, match="no run id"):
        find_baseline(tmp_path, "20990101")


def test_last_is_the_latest_earlier_measurement_of_each_metric_whichever_run_made_it(tmp_path):
    """The CI recipe: an accuracy run, then a perf run, then the next accuracy run is compared
    with the first one, not with the perf run in between."""
    ids = [write_run(tmp_path, run_info(hours), rows).stem.removeprefix("run-") for hours, rows in (
        (1, [acc_row("mAP", 0.45), perf_row(noisy_rounds(1))]), (2, [acc_row("mAP", 0.44), acc_row("mAP50", 0.6)]),
        (3, [perf_row(noisy_rounds(2))]), (4, [acc_row("mAP", 0.39), acc_row("mAP50", 0.6), acc_row("mAR", 0.5)]))]
    baseline = find_baseline(tmp_path, "last", current_run_id=ids[3])
    assert baseline.run_ids == [ids[1]]
    assert sorted(baseline.rows["metric"]) == ["mAP", "mAP50"]  # mAR: never measured before, new
    assert find_baseline(tmp_path, "last", current_run_id=ids[2]).run_ids == [ids[0]]  # perf: the first run's
    assert find_baseline(tmp_path, ids[2]).run_ids == [ids[2]]  # a run id is that run, whatever it measured
    mixed = write_run(tmp_path, run_info(5), [acc_row("mAP", 0.39), perf_row(noisy_rounds(3))])
    baseline = find_baseline(tmp_path, "last", current_run_id=mixed.stem.removeprefix("run-"))
    assert baseline.run_ids == [ids[2], ids[3]]  # each row its own run's, oldest first
    assert dict(zip(baseline.rows["metric"], baseline.rows["run_id"])) == {"images/s": ids[2], "mAP": ids[3]}
    never = write_run(tmp_path, run_info(6), [acc_row("mAP", 0.4, backend="openvino")])
    with pytest.raises(NoBaseline, match=f"^no run before {never.stem.removeprefix('run-')} measured any of its "
                                         f"1 metrics in {tmp_path}$"):
        find_baseline(tmp_path, "last", current_run_id=never.stem.removeprefix("run-"))


def test_the_gate_compares_last_per_metric_across_a_perf_run_in_between(gate, tmp_path):
    """What --compare-to last does at the end of a pytest session (conftest: record_run)."""
    from rtmbench.hostinfo import machine_fingerprint, package_versions

    def this_machine(hours: float) -> RunInfo:  # the fingerprint the gate records: no other-machine rule
        return RunInfo.new(versions={**package_versions(), **machine_fingerprint()}, now=T0 + dt.timedelta(hours=hours))

    accuracy = write_run(tmp_path, this_machine(1), [acc_row("mAP", 0.45), acc_row("mAP50", 0.65)])
    write_run(tmp_path, this_machine(2), [perf_row(noisy_rounds(1))])
    _, comparison, notes = gate.record_run([acc_row("mAP", 0.40), acc_row("mAP50", 0.65)], tmp_path, "last")
    assert dict(zip(comparison["metric"], comparison["verdict"])) == {"mAP": "REGRESSED", "mAP50": "ok"}
    assert f"baseline rows from {accuracy.stem.removeprefix('run-')} (2025-03-01 13:00 UTC)" in notes


def test_cli_report_compares_last_per_metric_across_a_perf_run_in_between(tmp_path, capsys):
    ids = [write_run(tmp_path, run_info(hours), rows).stem.removeprefix("run-") for hours, rows in (
        (1, [acc_row("mAP", 0.45)]), (2, [perf_row(noisy_rounds(1))]), (3, [acc_row("mAP", 0.40)]))]
    assert main(["report", str(tmp_path), "--compare", "last"]) == 1
    out = capsys.readouterr().out
    assert f"what changed: {ids[0]} (2025-03-01 13:00 UTC) → {ids[2]}" in out
    assert "comparison with the baseline (1 REGRESSED)" in out


# ------------------------------------------------------------------ compare: accuracy


def test_accuracy_drop_beyond_tolerance_regresses_that_metric_only():
    base = frame([acc_row("mAP", 0.400), acc_row("mAP50", 0.600), perf_row(noisy_rounds(1))])
    cur = frame([acc_row("mAP", 0.392), acc_row("mAP50", 0.597), perf_row(noisy_rounds(2))], hours=1)
    cmp = compare(cur, base)
    assert cmp.loc[cmp["verdict"] == "REGRESSED", "metric"].tolist() == ["mAP"]
    verdict, reason = verdict_of(cmp, "mAP")
    assert "fell 0.0080 > tolerance 0.0050" in reason
    assert verdict_of(cmp, "mAP50")[0] == "ok"
    assert has_regression(cmp)
    row = cmp[cmp["metric"] == "mAP"].iloc[0]
    assert row["delta"] == pytest.approx(-0.008) and row["rel_delta"] == pytest.approx(-0.02)


THRESHOLDS = """schema_version: 1
models:
  m:
    weights: {path: w.pth, sha256: 0123456789abcdef}
    dataset: {kind: synthetic, seed: 0, num_images: 10}
    accuracy:
      - precision: fp32
        mAP: {expected: 0.40, tolerance: 0.02}
        mAP50: {expected: 0.60, tolerance: 0.002}
"""


def test_accuracy_tolerance_from_thresholds_and_suspicious_gain(tmp_path):
    from rtmbench.thresholds import load_thresholds

    path = tmp_path / "thresholds.yaml"
    path.write_text(THRESHOLDS)
    base = frame([acc_row("mAP", 0.400), acc_row("mAP50", 0.600)])
    cur = frame([acc_row("mAP", 0.390), acc_row("mAP50", 0.605)], hours=1)
    tolerances = accuracy_tolerances(load_thresholds(path), cur)
    assert tolerances == {("m", "onnxruntime", "fp32", "mAP"): 0.02, ("m", "onnxruntime", "fp32", "mAP50"): 0.002}
    cmp = compare(cur, base, tolerances)
    assert verdict_of(cmp, "mAP")[0] == "ok"  # -0.010 within 0.02 (the default 0.005 would flag it)
    assert verdict_of(cmp, "mAP50")[0] == "suspicious gain"  # +0.005 > 2 × 0.002
    assert verdict_of(compare(cur, base, {"mAP": 0.001, "mAP50": 0.01}), "mAP")[0] == "REGRESSED"


def test_new_and_missing_metrics():
    base = frame([acc_row("mAP", 0.4), acc_row("mAP50", 0.6)])
    cur = frame([acc_row("mAP", 0.4), perf_row(noisy_rounds(0))], hours=1)
    cmp = compare(cur, base)
    assert dict(zip(cmp["metric"], cmp["verdict"])) == {"mAP": "ok", "mAP50": "missing", "images/s": "new"}
    assert not has_regression(cmp)


# ------------------------------------------------------------------ compare: throughput


def test_twenty_percent_slower_rounds_regress():
    base = frame([perf_row(noisy_rounds(10))])
    cur = frame([perf_row(noisy_rounds(11, scale=1.2))], hours=1)
    verdict, reason = verdict_of(compare(cur, base), "images/s")
    assert verdict == "REGRESSED"
    assert "Mann–Whitney U=" in reason and "significant" in reason and "median images/s -1" in reason


@pytest.mark.parametrize("seed", range(5))
def test_unchanged_rerun_is_no_false_alarm(seed):
    base = frame([perf_row(noisy_rounds(100))])
    cur = frame([perf_row(noisy_rounds(200 + seed))], hours=1)
    verdict, reason = verdict_of(compare(cur, base), "images/s")
    assert verdict == "ok", reason


def test_large_but_noisy_difference_is_not_significant():
    # Few rounds with 40 % jitter: the median falls well past 5 % but the rounds overlap heavily.
    base_times = noisy_rounds(3, sigma=0.4, n=8)
    cur_times = noisy_rounds(4, scale=1.1, sigma=0.4, n=8)
    base, cur = frame([perf_row(base_times)]), frame([perf_row(cur_times)], hours=1)
    cmp = compare(cur, base)
    assert cmp["rel_delta"].iloc[0] < -0.05  # the test's premise: a large drop of the median
    verdict, reason = verdict_of(cmp, "images/s")
    assert verdict == "ok"
    assert "not significant" in reason and "Mann–Whitney U=" in reason


def test_without_round_times_the_relative_drop_decides():
    base = frame([{**perf_row([0.1]), "round_times": None}])
    slow = frame([{**perf_row([0.12]), "round_times": None}], hours=1)
    same = frame([{**perf_row([0.101]), "round_times": None}], hours=1)
    verdict, reason = verdict_of(compare(slow, base), "images/s")
    assert verdict == "REGRESSED" and "no per-round times" in reason
    verdict, reason = verdict_of(compare(same, base), "images/s")
    assert verdict == "ok" and "no per-round times" in reason


def test_each_batch_size_is_compared_separately():
    base = frame([perf_row(noisy_rounds(1)), perf_row(noisy_rounds(2), batch=8)])
    cur = frame([perf_row(noisy_rounds(3)), perf_row(noisy_rounds(4, scale=1.3), batch=8)], hours=1)
    cmp = compare(cur, base)
    assert verdict_of(cmp, "images/s", batch=32)[0] == "ok"
    assert verdict_of(cmp, "images/s", batch=8)[0] == "REGRESSED"


# ------------------------------------------------------------------ compare: machines


def machine_run(hours: float, cores: int) -> RunInfo:
    return RunInfo.new(device="Test CPU", versions={"onnxruntime": "1.20.0", "machine.cores": cores},
                       now=T0 + dt.timedelta(hours=hours))


def test_each_baseline_row_is_judged_by_the_machine_of_its_own_run():
    """Baseline rows from two runs: images/s from a 64-core machine, mAP from this 16-core one."""
    base = pd.concat([to_frame(machine_run(0, cores=64), [perf_row(noisy_rounds(1))]),
                      to_frame(machine_run(1, cores=16), [acc_row("mAP", 0.40)])])
    cur = to_frame(machine_run(2, cores=16), [perf_row(noisy_rounds(2, scale=1.3)), acc_row("mAP", 0.39)])
    cmp = compare(cur, base)
    assert verdict_of(cmp, "mAP") == ("REGRESSED", "mAP fell 0.0100 > tolerance 0.0050")
    verdict, reason = verdict_of(cmp, "images/s")
    assert verdict == ACROSS_MACHINES and reason.endswith(" [other machine: cores: 64 → 16]")
    assert other_machine_note(cmp, across_machines=False).startswith(
        "the baseline ran on another machine (cores: 64 → 16): images/s differences are shown")
    across = compare(cur, base, across_machines=True)
    assert across["verdict"].tolist().count("REGRESSED") == 2 and other_machine_note(across, True) is None
    # accuracy is the engine's, whichever host measured it: a drop against another machine regresses
    elsewhere = compare(cur, to_frame(machine_run(1, cores=64), [acc_row("mAP", 0.40)]))
    verdict, reason = verdict_of(elsewhere, "mAP")
    assert verdict == "REGRESSED" and reason.endswith(" [other machine: cores: 64 → 16]")
    assert other_machine_note(elsewhere, across_machines=False) is None  # no images/s row was let off


def test_last_takes_this_machines_valid_measurements_first(tmp_path, capsys):
    """A results folder shared by a fleet: machine A, then B, then two runs of A that were no valid
    measurement, then A again, slower and less accurate."""
    def stored(hours, cores, rows):
        return write_run(tmp_path, machine_run(hours, cores), rows).stem.removeprefix("run-")

    a_first = stored(1, 16, [acc_row("mAP", 0.40), perf_row(noisy_rounds(1))])
    b = stored(2, 64, [acc_row("mAP", 0.40), perf_row(noisy_rounds(2))])
    stored(3, 16, [perf_row(noisy_rounds(3, scale=2, n=3), verdict="INVALID",
                            detail="not a valid measurement: 3 rounds")])
    stored(4, 16, [perf_row(noisy_rounds(4, scale=0.5), verdict="FAIL", detail="fast but wrong: cls_score_0 moved")])
    a_again = stored(5, 16, [acc_row("mAP", 0.30), perf_row(noisy_rounds(5, scale=1.3))])
    baseline = find_baseline(tmp_path, "last", current_run_id=a_again)
    assert dict(zip(baseline.rows["metric"], baseline.rows["run_id"])) == {"images/s": a_first, "mAP": a_first}
    assert find_baseline(tmp_path, "last", current_run_id=b).run_ids == [a_first]  # none of its own: another's
    assert main(["report", str(tmp_path), "--compare", "last"]) == 1
    assert capsys.readouterr().out.count("| REGRESSED |") == 2


def test_a_subset_metric_is_compared_at_its_rules_tolerance():
    """'mAP on 64 images' is the rule's mAP measured on fewer images: the same tolerance."""
    thresholds = load_thresholds(ROOT / "thresholds.yaml")
    rows = [{**acc_row(name, 0.40), "model": "rtmdet-nano-synthetic", "precision": "fp16"}
            for name in ("mAP", subset_metric("mAP", 64))]
    tolerances = accuracy_tolerances(thresholds, frame(rows))
    assert set(tolerances.values()) == {0.01} and len(tolerances) == 2
    assert full_set_metric(subset_metric("mAP50", 64)) == "mAP50" and full_set_metric("mAP") == "mAP"


def test_a_baseline_of_several_runs_takes_its_provenance_from_the_latest(tmp_path):
    """Images/s only measured on machine B long ago, mAP on this machine A since: the baseline's
    driver is A's, not B's (a 'driver 470 → 550' change would be invented)."""
    from rtmbench.report import provenance

    def stored(hours, cpu, driver, rows):
        info = RunInfo.new(device="cpu", versions={"machine.cpu": cpu, "driver": driver},
                           now=T0 + dt.timedelta(hours=hours))
        return write_run(tmp_path, info, rows).stem.removeprefix("run-")

    stored(1, "B", "470", [perf_row(noisy_rounds(1))])
    stored(2, "A", "550", [acc_row("mAP", 0.40)])
    current = stored(3, "A", "550", [acc_row("mAP", 0.40), perf_row(noisy_rounds(3))])
    assert provenance(find_baseline(tmp_path, "last", current_run_id=current).rows)["driver"] == "550"


def test_a_path_or_prefix_baseline_is_never_the_current_run(tmp_path):
    """``--compare-to results/`` names the folder the current run is stored in: its latest other run."""
    first, current = (write_run(tmp_path, run_info(h), [acc_row("mAP", 0.4)]).stem.removeprefix("run-")
                      for h in (1, 1.5))
    assert baseline_runs(tmp_path, str(tmp_path), current_run_id=current) == [first]
    prefix = os.path.commonprefix([first, current])
    assert baseline_runs(tmp_path, prefix, current_run_id=current) == [first]
    with pytest.raises(NoBaseline, match="no run in it but the current one"):
        find_baseline(tmp_path, str(tmp_path / f"run-{current}.csv"), current_run_id=current)


def test_cli_report_calls_no_regression_against_another_machine_unless_asked(tmp_path, capsys):
    write_run(tmp_path, machine_run(1, cores=64), [perf_row(noisy_rounds(1))])
    write_run(tmp_path, machine_run(2, cores=16), [perf_row(noisy_rounds(2, scale=1.3))])
    assert main(["report", str(tmp_path), "--compare", "last"]) == 0
    out = capsys.readouterr().out
    assert "the baseline ran on another machine (cores: 64 → 16)" in out
    assert f"| {ACROSS_MACHINES} |" in out and "| REGRESSED |" not in out
    assert main(["report", str(tmp_path), "--compare", "last", "--compare-across-machines"]) == 1
    out = capsys.readouterr().out
    assert "| REGRESSED |" in out and "[other machine: cores: 64 → 16]" in out and "another machine (" not in out


# ------------------------------------------------------------------ CLI


def test_cli_report_exit_codes(tmp_path, capsys):
    write_run(tmp_path, run_info(1), [acc_row("mAP", 0.40), perf_row(noisy_rounds(1))])
    assert main(["report", str(tmp_path), "--compare", "last"]) == 0  # only one run: a first run, as the gate says
    assert "no baseline (first run): no run before" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--compare", "r0"]) == 2  # a baseline named that is not there
    assert "baseline 'r0': no run id or path matches" in capsys.readouterr().err
    write_run(tmp_path, run_info(2), [acc_row("mAP", 0.40), perf_row(noisy_rounds(2))])
    md = tmp_path / "out" / "summary.md"
    assert main(["report", str(tmp_path), "--compare", "last", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "| model | backend |" in out and "comparison with the baseline (2 ok)" in out
    assert md.read_text() in out
    write_run(tmp_path, run_info(3), [acc_row("mAP", 0.38), perf_row(noisy_rounds(3))])
    assert main(["report", str(tmp_path), "--compare", "last"]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such results file or folder" in capsys.readouterr().err


def test_cli_report_takes_tolerances_from_thresholds_yaml_here_as_the_gate_does(tmp_path, monkeypatch, capsys):
    """A drop of 0.010 mAP: within thresholds.yaml's 0.02 (the gate's), beyond the bare default 0.005."""
    results = tmp_path / "results"
    write_run(results, run_info(1), [acc_row("mAP", 0.400)])
    write_run(results, run_info(2), [acc_row("mAP", 0.390)])
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(results), "--compare", "last"]) == 1  # no thresholds.yaml here
    assert "fell 0.0100 > tolerance 0.0050" in capsys.readouterr().out
    (tmp_path / "thresholds.yaml").write_text(THRESHOLDS)
    assert main(["report", str(results), "--compare", "last"]) == 0
    assert "within tolerance 0.0200" in capsys.readouterr().out
    assert main(["report", str(results), "--compare", "last", "--thresholds", "missing.yaml"]) == 2
    assert "missing.yaml: cannot read thresholds file" in capsys.readouterr().err


def test_unreadable_files_are_named_and_passed_over_only_when_asked(tmp_path, capsys):
    from rtmbench.errors import RtmbenchError
    from rtmbench.results import load_readable_results

    good = write_run(tmp_path, run_info(1), [acc_row("mAP", 0.40)])
    not_a_number = tmp_path / "run-2-not-a-number.csv"
    not_a_number.write_text(good.read_text().replace(",0.4,", ",zero point four,"))
    assert ",zero point four," in not_a_number.read_text()  # the premise: a value that is no number
    with pytest.raises(RtmbenchError, match=f"^{not_a_number}: not a results file \\(a value of the wrong type"):
        load_results(tmp_path)
    frame, unreadable = load_readable_results(tmp_path)
    assert frame["run_id"].tolist() == [good.stem.removeprefix("run-")]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{not_a_number}: ")
    baseline = find_baseline(tmp_path, "last", current_run_id="99999999", skip_unreadable=True)
    assert baseline.run_ids == [good.stem.removeprefix("run-")] and baseline.unreadable == unreadable


def test_cli_report_passes_over_unreadable_files_unless_none_is_readable(tmp_path, capsys):
    runs_ = [write_run(tmp_path, run_info(hours), [acc_row("mAP", 0.40)]) for hours in (1, 2)]
    torn = tmp_path / "run-3-torn.csv"
    torn.write_bytes(b"run_id,time,value\n\x00\xff\xfe torn write")
    no_columns = tmp_path / "run-4-no-columns.csv"
    no_columns.write_text("a,b\n1,2\n")
    assert main(["report", str(tmp_path), "--compare", "last"]) == 0
    out, err = capsys.readouterr()
    assert "comparison with the baseline (1 ok)" in out
    torn_line, no_columns_line, tolerances = err.splitlines()  # one line per file, naming it and the problem
    assert tolerances.startswith("rtmbench: accuracy tolerance")
    assert torn_line.startswith(f"rtmbench: warning: passed over {torn}: not a readable results file (")
    assert no_columns_line == f"rtmbench: warning: passed over {no_columns}: not a results file (no column " \
        + ", ".join(COLUMNS) + ")"
    for path in runs_:
        path.unlink()
    assert main(["report", str(tmp_path)]) == 2  # bad input, not "regressed"
    assert capsys.readouterr().err.startswith(f"rtmbench: error: {torn}: not a readable results file (")


def test_last_on_a_new_or_empty_folder_is_no_baseline(tmp_path):
    for folder in (tmp_path / "new", tmp_path):
        with pytest.raises(NoBaseline, match="no run before"):
            find_baseline(folder, "last", skip_unreadable=True)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_results_files_take_the_users_umask(tmp_path, umask, mode):
    """A results folder shared between users and machines needs files others can read."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        path = write_run(tmp_path, run_info(), [acc_row("mAP", 0.4)])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_file_rewritten_keeps_its_mode_and_a_symlink_its_link(tmp_path):
    """``report --markdown`` into a group-writable file, or through a link into a published folder."""
    import stat

    from rtmbench.fsutil import write_bytes_atomic

    published = tmp_path / "published" / "summary.md"
    published.parent.mkdir()
    published.write_text("old")
    published.chmod(0o664)
    link = tmp_path / "summary.md"
    link.symlink_to(published)
    write_bytes_atomic(link, b"new")
    assert link.is_symlink() and published.read_text() == "new"
    assert stat.S_IMODE(published.stat().st_mode) == 0o664


@pytest.mark.parametrize("option, value, expected", [("--alpha", "0", "0 is not between 0 and 1"),
                                                     ("--perf-drop", "-0.05", "-0.05 is not between 0 and 1"),
                                                     ("--perf-drop", "nan", "nan is not between 0 and 1"),
                                                     ("--alpha", "1%", "'1%' is not a number")])
def test_cli_report_refuses_a_fraction_out_of_range(tmp_path, capsys, option, value, expected):
    write_run(tmp_path, run_info(1), [acc_row("mAP", 0.40)])
    with pytest.raises(SystemExit) as exited:
        main(["report", str(tmp_path), "--compare", "last", option, value])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"rtmbench report: error: argument {option}: {expected} "
                                       "(see rtmbench report --help)\n")
