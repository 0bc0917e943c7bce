"""ONNX export + simplification, run by ONNX Runtime against the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rtmbench.fidelity import match_rate, output_errors
from rtmbench.model import OUTPUT_NAMES
from rtmbench.postprocess import Detections


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference, run_cli):
    out = tmp_path_factory.mktemp("export") / "nano.onnx"
    result = run_cli("export", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint, "--out", out)
    assert "simplifier: onnxsim" in result.stdout
    return out


def test_exported_graph_is_valid_with_named_dynamic_io(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 13


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_onnxruntime_matches_torch(exported, reference_model, batch):
    rng = np.random.default_rng(batch)
    inputs = rng.normal(0, 1.2, (batch, 3, 320, 320)).astype(np.float32)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    actual = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"input": inputs})))
    with torch.inference_mode():
        expected = {n: o.numpy() for n, o in zip(OUTPUT_NAMES, reference_model(torch.from_numpy(inputs)))}
    errors = output_errors(actual, expected)
    assert max(errors.values()) <= 1e-3, errors


def test_predict_image_ids_are_file_stems_numbers_where_coco_names_them_and_never_twice(tmp_path, run_cli):
    from rtmbench.cli import _image_ids

    assert _image_ids(["a/000000000139.jpg", "b/cat.png"]) == [(139, Path("a/000000000139.jpg")),
                                                              ("cat", Path("b/cat.png"))]
    result = run_cli("predict", "--model", "rtmdet-nano-person", "a/x.jpg", "b/x.png", "--out", tmp_path / "d.json",
                     check=False)
    assert result.returncode == 2 and not (tmp_path / "d.json").exists()
    assert result.stderr == ("rtmbench: error: a/x.jpg and b/x.png would both be image 'x' in the results (the "
                             "file name without its suffix): rename one, or predict them apart\n")


def test_predict_keeps_what_scores_above_its_threshold(tmp_path, reference, run_cli):
    common = ("predict", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint, "--backend",
              "onnxruntime", reference.image_paths[0], "--cache-dir", tmp_path / "cache")
    run_cli(*common, "--out", tmp_path / "all.json")
    every = json.loads((tmp_path / "all.json").read_text())
    scores = sorted({row["score"] for row in every})
    threshold = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2  # between two scores, not on one
    run_cli(*common, "--out", tmp_path / "confident.json", "--score-thr", threshold)
    confident = json.loads((tmp_path / "confident.json").read_text())
    assert confident == [row for row in every if row["score"] > threshold] and 0 < len(confident) < len(every)


def test_predict_cli_onnxruntime_matches_mmdet(tmp_path, reference, run_cli):
    out, raw = tmp_path / "dets.json", tmp_path / "raw.npz"
    run_cli("predict", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint,
            "--backend", "onnxruntime", *reference.image_paths, "--out", out, "--raw-out", raw,
            "--cache-dir", tmp_path / "cache")
    rows = json.loads(out.read_text())
    with np.load(raw) as raw_arrays:
        assert sorted(raw_arrays) == sorted(["inputs", *OUTPUT_NAMES])
        assert np.abs(raw_arrays["inputs"] - reference.golden["inputs"]).max() <= 1e-3
    for path, golden in zip(reference.image_paths, reference.detections()):
        mine = [r for r in rows if r["image_id"] == path.stem]
        assert all(r["category_id"] == 1 for r in mine)
        boxes = np.array([r["bbox"] for r in mine], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        dets = Detections(boxes, np.array([r["score"] for r in mine], np.float32), np.zeros(len(mine), np.int64))
        assert match_rate(dets, golden, min_iou=0.99, max_score_diff=1e-3) >= 0.99, path.name


@pytest.mark.parametrize("onnxsim_fails, why", [
    ("raises", "onnxsim failed (the check run crashed)"),
    ("not ok", "onnxsim could not validate its simplification"),
    ("missing", "onnxsim is not installed"),
])
@pytest.mark.parametrize("has_onnxslim", [True, False], ids=["onnxslim", "no-onnxslim"])
def test_a_failed_onnxsim_falls_back_to_onnxslim_and_says_why(monkeypatch, caplog, onnxsim_fails, why, has_onnxslim):
    import re
    import sys
    import types

    from rtmbench import export

    def simplify(model):
        if onnxsim_fails == "raises":
            raise RuntimeError("the check run crashed\nmore")
        return model, False

    fake_onnxsim = types.SimpleNamespace(simplify=simplify, __version__="0.0")
    monkeypatch.setitem(sys.modules, "onnxsim", None if onnxsim_fails == "missing" else fake_onnxsim)
    fake_onnxslim = types.SimpleNamespace(slim=lambda model: "slimmed", __version__="9.9")
    monkeypatch.setitem(sys.modules, "onnxslim", fake_onnxslim if has_onnxslim else None)
    if has_onnxslim:
        assert export.simplify("graph") == ("slimmed", "onnxslim 9.9")
        tried = [] if onnxsim_fails == "missing" else [f"{why}; trying onnxslim"]
        assert [r.getMessage() for r in caplog.records if r.name == "rtmbench.export"] == tried
    else:
        expected = f"{why} and onnxslim is not installed: the ONNX model is not simplified"
        with pytest.warns(UserWarning, match=f"^{re.escape(expected)}$"):
            assert export.simplify("graph") == ("graph", "none")
