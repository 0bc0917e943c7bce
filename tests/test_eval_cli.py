"""`rtmbench eval` end to end on a generated dataset: engines agree, metrics re-score exactly."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtmbench.cli import standard_json
from rtmbench.data.synthetic import generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=11, num_images=40, split="val", progress=False)
    return root


@pytest.fixture(scope="module")
def evaluations(generated, reference, run_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    reports = {}
    for backend, decode_in in (("onnxruntime", "threads"), ("torch", "processes")):
        run_cli("eval", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint,
                "--data-root", generated, "--backend", backend, "--batch-size", 16, "--decode-in", decode_in,
                "--json", out / f"{backend}.json", "--dets-out", out / f"{backend}-dets.json",
                "--cache-dir", out / "cache")
        reports[backend] = (json.loads((out / f"{backend}.json").read_text()), out / f"{backend}-dets.json")
    return reports


def test_report_has_the_contract_keys(evaluations):
    report, _ = evaluations["onnxruntime"]
    assert {"mAP", "mAP50", "mAP75", "mAP_small", "AR100"} <= set(report["metrics"])
    assert report["dataset"]["images"] == 40 and len(report["dataset"]["annotation_sha256"]) == 64
    assert report["model"] == "rtmdet-nano-person" and report["backend"] == "onnxruntime"
    assert report["versions"]["onnxruntime"] and report["images_per_s"]["whole_loop"] > 0
    wall = report["dataset"]["images"] / report["images_per_s"]["whole_loop"]
    assert 0 <= report["engine_waited_s"]["for_decode"] + report["engine_waited_s"]["for_postprocess"] <= wall
    assert 0 <= sum(report["batcher_s"].values()) <= wall


def test_metrics_equal_pycocotools_on_the_results_file(evaluations, generated):
    report, dets = evaluations["onnxruntime"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(generated / "annotations" / "person_keypoints_val2017.json"))
        coco_eval = COCOeval(gt, gt.loadRes(str(dets)), "bbox")
        coco_eval.params.catIds = [1]
        coco_eval.params.maxDets = [100, 300, 1000]  # as mmdet's CocoMetric sets them
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert report["metrics"]["mAP"] == pytest.approx(coco_eval.stats[0], abs=1e-6)
    assert report["metrics"]["mAP50"] == pytest.approx(coco_eval.stats[1], abs=1e-6)
    assert len(json.loads(dets.read_text())) > 0


def test_onnxruntime_and_torch_agree(evaluations):
    ort, torch_ = evaluations["onnxruntime"][0]["metrics"], evaluations["torch"][0]["metrics"]
    for metric in ("mAP", "mAP50", "mAP75"):
        assert ort[metric] == pytest.approx(torch_[metric], abs=1e-3), metric


def test_eval_errors_are_one_line(run_cli, tmp_path, reference):
    result = run_cli("eval", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint,
                     "--data-root", tmp_path / "nowhere", "--json", tmp_path / "r.json",
                     "--cache-dir", tmp_path / "cache", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "dataset root not found" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("keep_bytes", "decode_in"), [(200, "threads"), (0, "processes")],
                         ids=["truncated", "empty-decoded-in-processes"])
def test_corrupt_image_is_counted_and_scored_empty_or_fails(tmp_path, reference, run_cli, keep_bytes, decode_in):
    root = tmp_path / "data"
    generate(root, seed=3, num_images=4, split="val", progress=False)
    victim = root / "images" / "val2017" / "000000000002.jpg"
    victim.write_bytes(victim.read_bytes()[:keep_bytes])
    common = ["eval", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint, "--data-root", root,
              "--batch-size", 4, "--cache-dir", tmp_path / "cache", "--decode-in", decode_in]
    warned = run_cli(*common, "--json", tmp_path / "warn.json", "--dets-out", tmp_path / "dets.json")
    assert "on 4 images (1 corrupt, scored empty)," in warned.stdout  # the summary line says it too
    report = json.loads((tmp_path / "warn.json").read_text())
    assert report["corrupt_images"] == [str(victim)] and report["dataset"]["images"] == 4
    assert all(r["image_id"] != 2 for r in json.loads((tmp_path / "dets.json").read_text()))
    failed = run_cli(*common, "--corrupt", "fail", "--json", tmp_path / "fail.json", check=False)
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0
    assert failed.stderr.startswith(f"rtmbench: error: {victim}: cannot decode image")
    assert not (tmp_path / "fail.json").exists()


def test_json_reports_are_standard_json_with_nan_as_null():
    """eval's metrics are NaN where the ground truth has nothing in a size range; bench's GFLOP/s
    where a model's GFLOP are unknown: JSON has no NaN, and jq or a browser refuse the file."""
    text = standard_json({"metrics": {"mAP_small": float("nan"), "mAP": 0.5}, "figures": [float("inf"), 1]})
    assert json.loads(text, parse_constant=pytest.fail) == {"metrics": {"mAP_small": None, "mAP": 0.5},
                                                            "figures": [None, 1]}


def test_faster_coco_eval_gives_pycocotools_numbers(evaluations, generated):
    from rtmbench.evaluate import METRIC_NAMES, coco_metrics

    _, dets = evaluations["onnxruntime"]
    rows = json.loads(dets.read_text())
    ann = generated / "annotations" / "person_keypoints_val2017.json"
    slow, fast = (coco_metrics(ann, rows, [1], evaluator) for evaluator in ("pycocotools", "faster-coco-eval"))
    for name in METRIC_NAMES:
        assert fast[name] == pytest.approx(slow[name], abs=1e-4, nan_ok=True), name


@pytest.mark.parametrize("command, option, value", [
    ("eval", "--batch-size", "0"), ("eval", "--batch-size", "-3"), ("eval", "--max-images", "0"),
    ("eval", "--max-images", "-5"), ("eval", "--workers", "0"), ("bench", "--batch-size", "0"),
    ("bench", "--rounds", "0"), ("build", "--batch-size", "-3"), ("predict", "--batch-size", "0"),
    ("make-data", "--num-images", "0"), ("bench", "--rounds", "two"),
])
def test_degenerate_numbers_are_refused_before_any_work(tmp_path, capsys, command, option, value):
    from rtmbench.cli import main

    cache = ["--cache-dir", tmp_path / "cache"]
    required = {"eval": ["--model", "rtmdet-nano-person", "--data-root", tmp_path, "--json", tmp_path / "r.json", *cache],
                "bench": ["--model", "rtmdet-nano-person", "--json", tmp_path / "r.json", *cache],
                "build": ["--model", "rtmdet-nano-person", *cache],
                "predict": ["--model", "rtmdet-nano-person", "--out", tmp_path / "d.json", tmp_path / "a.jpg", *cache],
                "make-data": ["--out", tmp_path / "data"]}[command]
    with pytest.raises(SystemExit) as exited:
        main([command, *map(str, required), option, value])
    assert exited.value.code == 2
    expected = f"{value!r} is not a whole number" if value == "two" else f"{value} is not ≥ 1"
    assert capsys.readouterr().err == (f"rtmbench {command}: error: argument {option}: {expected} "
                                       f"(see rtmbench {command} --help)\n")  # one line, no usage block
    assert list(tmp_path.iterdir()) == []


def test_annotation_file_without_images_is_refused(tmp_path, capsys, reference):
    from rtmbench.cli import main

    root = tmp_path / "data"
    generate(root, seed=3, num_images=2, split="val", progress=False)
    annotations = root / "annotations" / "person_keypoints_val2017.json"
    annotations.write_text(json.dumps({**json.loads(annotations.read_text()), "images": [], "annotations": []}))
    status = main(["eval", "--model", "rtmdet-nano-person", "--weights", str(reference.checkpoint),
                   "--data-root", str(root), "--json", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache")])
    assert status == 2
    assert capsys.readouterr().err == f"rtmbench: error: {annotations}: lists no images (nothing to evaluate)\n"
    assert not (tmp_path / "r.json").exists()


def test_weights_from_a_missing_thresholds_file_name_it(tmp_path, capsys, monkeypatch):
    from rtmbench.cli import main

    monkeypatch.chdir(tmp_path)  # no thresholds.yaml here
    assert main(["build", "--model", "rtmdet-nano-synthetic", "--cache-dir", "cache"]) == 2
    assert capsys.readouterr().err == ("rtmbench: error: no weights known for model rtmdet-nano-synthetic: "
                                       "thresholds.yaml not found (run from the project folder, or pass "
                                       "--thresholds FILE or --weights PATH|URL)\n")


def test_unknown_backend_is_one_line(tmp_path, capsys, reference):
    from rtmbench.cli import main

    status = main(["build", "--model", "rtmdet-nano-person", "--weights", str(reference.checkpoint),
                   "--backend", "tensorrtt", "--cache-dir", str(tmp_path / "cache")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("rtmbench: error: unknown backend 'tensorrtt'; known: onnxruntime") and err.count("\n") == 1


@pytest.mark.parametrize("command, option, where, expected", [
    ("bench", "--json", "/proc/rtmbench-test.json", "/proc/rtmbench-test.json: cannot be written (No such file"),
    ("eval", "--json", "a-file/r.json", "a-file/r.json: cannot be written ({tmp}/a-file is not a folder)"),
    ("eval", "--dets-out", "{tmp}", "{tmp}: is a folder, not a file"),
    ("report", "--html", "a-file/report.html", "a-file/report.html: cannot be written ({tmp}/a-file is not a folder)"),
    ("make-data", "--out", "a-file", "a-file: is a file, not a folder"),
    ("make-data", "--out", "a-file/data", "a-file/data: cannot be written ({tmp}/a-file is not a folder)"),
])
def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command, option, where, expected):
    from rtmbench.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("a file")
    args = {"bench": ["--model", "rtmdet-nano-person", "--json", "ok.json", "--cache-dir", "cache"],
            "eval": ["--model", "rtmdet-nano-person", "--data-root", ".", "--json", "ok.json", "--cache-dir", "cache"],
            "report": ["results"], "make-data": []}[command]
    with pytest.raises(SystemExit) as exited:
        main([command, *args, option, where.format(tmp=tmp_path)])
    assert exited.value.code == 2
    [last] = capsys.readouterr().err.splitlines()
    assert last.startswith(f"rtmbench {command}: error: argument {option}: ") and expected.format(tmp=tmp_path) in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no cache, no probe, no partial file


def test_make_data_into_a_folder_with_files_is_refused(tmp_path, capsys):
    """A 10-image set written over a 500-image one would list 10 and leave 490 beside them."""
    from rtmbench.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "old.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        main(["make-data", "--out", str(tmp_path / "data"), "--num-images", "2"])
    assert exited.value.code == 2 and "data: is not empty (give a new or empty folder)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["old.jpg"]


def test_bench_sizes_its_rounds_for_validity_and_says_when_it_is_invalid(tmp_path, reference, run_cli):
    """By default enough rounds for the validity minimums; with --rounds too few, the JSON says
    INVALID and why, and no percentile is made up from too few samples."""
    common = ["bench", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint, "--batch-size", 1,
              "--cache-dir", tmp_path / "cache", "--min-seconds", 0.3, "--min-rounds", 12]
    run_cli(*common, "--json", tmp_path / "valid.json")
    valid = json.loads((tmp_path / "valid.json").read_text())
    assert valid["valid"] and valid["validity"] == {"min_rounds": 12, "min_seconds": 0.3}
    for definition in ("compute", "end_to_end"):
        figures = valid[definition]
        assert figures["invalid"] is None and figures["rounds"] >= 12 and figures["timed_seconds"] >= 0.3
        assert figures["latency_ms_p50"] > 0 and valid[f"images_per_s_{definition}"] > 0
    short = run_cli(*common, "--rounds", 3, "--json", tmp_path / "short.json", check=False)
    assert short.returncode == 1  # written, and a CI job sees it is no figure
    invalid = json.loads((tmp_path / "short.json").read_text())
    assert not invalid["valid"] and invalid["compute"]["rounds"] == 3
    assert invalid["compute"]["invalid"].startswith("3 timed rounds < 12")
    assert invalid["end_to_end"]["latency_ms_p90"] is None
    assert "INVALID, not a valid measurement: compute: 3 timed rounds < 12" in short.stdout


def test_bench_takes_the_gates_validity_rules_from_the_thresholds_file(tmp_path, reference, run_cli):
    """Without --min-*, bench counts a measurement as the perf gate does: the model's
    perf_validity in --thresholds."""
    text = (Path(__file__).parents[1] / "thresholds.yaml").read_text()
    assert "  rtmdet-nano-person:\n" in text
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text(text.replace("  rtmdet-nano-person:\n", "  rtmdet-nano-person:\n"
                                       "    perf_validity: {min_rounds: 7, min_seconds: 0.2}\n", 1))
    run_cli("bench", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint, "--batch-size", 1,
            "--cache-dir", tmp_path / "cache", "--thresholds", thresholds, "--min-seconds", 0.1,
            "--json", tmp_path / "bench.json")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["validity"] == {"min_rounds": 7, "min_seconds": 0.1}  # the file's, the option over it
