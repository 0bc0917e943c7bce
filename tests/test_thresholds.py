"""thresholds.yaml: the shipped file validates; malformed files fail with file, line and key."""

from __future__ import annotations

import textwrap

import pytest

from conftest import ROOT
from rtmbench.errors import RtmbenchError
from rtmbench.thresholds import load_thresholds

VALID = """\
schema_version: 1
models:
  m:
    weights: {path: w.pth, sha256: 0123abcd}
    dataset: {kind: synthetic, seed: 3, num_images: 10}
    accuracy:
      - backends: [onnx*]
        precision: fp16
        mAP50: {expected: 0.9, tolerance: 0.02}
        max_drop: {mAP: 0.01}
    perf:
      - device: "*"
        backend: onnxruntime
        precision: fp32
        ratio_to: {backend: torch, precision: fp32, min_ratio: 2.5}
      - device: "AMD EPYC*"
        backend: onnxruntime
        precision: fp32
        images_per_s: 150
"""


def write(tmp_path, text):
    path = tmp_path / "thresholds.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_thresholds_validate():
    thresholds = load_thresholds(ROOT / "thresholds.yaml")
    rule = thresholds.perf_rule("rtmdet-nano-person", "igie", "fp16", 32, "Iluvatar MR-V100")
    assert rule.images_per_s == 2627.15 and rule.definition == "compute"
    fp16 = thresholds.accuracy_rule("rtmdet-nano-person", "igie", "fp16")
    assert (fp16.mAP50.expected, fp16.mAP.expected) == (0.619, 0.403)
    url, sha = thresholds.weights_location("rtmdet-nano-person")
    assert url.endswith("-05d8511e.pth") and sha == "05d8511e"


def test_rule_lookup(tmp_path):
    thresholds = load_thresholds(write(tmp_path, VALID))
    assert thresholds.accuracy_rule("m", "onnxruntime", "fp16").mAP50.minimum == pytest.approx(0.88)
    assert thresholds.accuracy_rule("m", "openvino", "fp16") is None
    assert thresholds.perf_rule("m", "onnxruntime", "fp32", 32, "AMD EPYC 9R14").images_per_s == 150
    assert thresholds.perf_rule("m", "onnxruntime", "fp32", 32, "Intel Xeon").ratio_to.min_ratio == 2.5
    assert thresholds.perf_rule("m", "onnxruntime", "fp32", 8, "Intel Xeon") is None
    assert thresholds.weights_location("m")[0] == str(tmp_path / "w.pth")


def test_the_most_specific_device_rule_wins_in_any_order(tmp_path):
    blocks = [f"""
      - device: "{device}"
        backend: onnxruntime
        precision: fp32
        images_per_s: {100 + i}""" for i, device in enumerate(("NVIDIA H200", "NVIDIA H*", "NVIDIA*", "*"))]
    for order in (blocks, blocks[::-1]):
        thresholds = load_thresholds(write(tmp_path, VALID.split("    perf:")[0] + "    perf:" + "".join(order) + "\n"))
        pick = {device: thresholds.perf_rule("m", "onnxruntime", "fp32", 32, device).images_per_s
                for device in ("NVIDIA H200", "NVIDIA H100", "NVIDIA A100", "AMD EPYC")}
        assert pick == {"NVIDIA H200": 100, "NVIDIA H100": 101, "NVIDIA A100": 102, "AMD EPYC": 103}


@pytest.mark.parametrize("old, new, expected", [
    ("precision: fp16", "precison: fp16", r":8: models\.m\.accuracy\.0\.precison: Extra inputs are not permitted \(and 1 more\)"),
    ("        mAP50: {expected: 0.9, tolerance: 0.02}", "        mAP50: {expected: high, tolerance: 0.02}",
     r":9: models\.m\.accuracy\.0\.mAP50\.expected: Input should be a valid number"),
    ("sha256: 0123abcd", "sha256: xyz", r":4: models\.m\.weights\.sha256: String should match pattern"),
    ("        images_per_s: 150", "        images_per_s: 150\n        ratio_to: {backend: torch, precision: fp32, min_ratio: 2}",
     r":16: models\.m\.perf\.1: Value error, give exactly one of images_per_s and ratio_to"),
    ("schema_version: 1", "schema_version: 2", r":1: schema_version: Input should be 1"),
    ("ratio_to: {backend: torch, precision: fp32, min_ratio: 2.5}",
     "ratio_to: {backend: torch, precision: fp32, min_ratio: 2.5}\n        tolerance: 0.1",
     r":12: models\.m\.perf\.0: Value error, tolerance is a fraction of images_per_s"),
    ("    dataset: {kind: synthetic", "    dataset: {kind: [synthetic", r":5: not valid YAML"),
    ("    dataset: {kind: synthetic, seed: 3, num_images: 10}",
     "    dataset: {kind: synthetic, seed: 3, num_images: 10}\n    dataset: {kind: coco}",
     r":6: not valid YAML \(duplicate key 'dataset' \(first on line 5\)\)"),
    ("        mAP50: {expected: 0.9, tolerance: 0.02}", "        mAP50: {expected: 0.9, tolerance: 0.02, expected: 0.5}",
     r":9: not valid YAML \(duplicate key 'expected' \(first on line 9\)\)"),
    ("    weights: {path: w.pth, sha256: 0123abcd}", "    ? [weights, w]\n    : {path: w.pth, sha256: 0123abcd}",
     r":4: not valid YAML \(a list or mapping cannot be a key\)"),
    ("seed: 3", "seed: 2026-11-31",  # YAML reads it as a date
     r":5: not valid YAML \('2026-11-31' is not a valid timestamp \(day is out of range for month\)\)"),
    ("num_images: 10", "num_images: !!int ten", r":5: not valid YAML \('ten' is not a valid int \("),
    ("num_images: 10", "num_images: !!set [10]", r"\.yaml: not valid YAML \(TypeError: "),
    ("num_images: 10", "num_images: " + "[" * 5000 + "]" * 5000, r"\.yaml: not valid YAML \(nested too deeply\)"),
])
def test_malformed_file_is_one_line_with_line_and_key(tmp_path, old, new, expected):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(RtmbenchError, match=expected) as info:
        load_thresholds(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


@pytest.mark.parametrize("bad, expected", [
    (b"caf\xe9", r":5: not UTF-8 text \(byte 0xe9\)"),  # saved as Latin-1
    (b"\x00", r":5: not valid YAML \(control character U\+0000 is not allowed\)"),
])
def test_bad_bytes_are_one_line_with_the_line(tmp_path, bad, expected):
    path = tmp_path / "thresholds.yaml"
    path.write_bytes(VALID.encode().replace(b"kind: synthetic", b"kind: " + bad))
    with pytest.raises(RtmbenchError, match=expected) as info:
        load_thresholds(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"], ids=["empty", "comment", "document-marker"])
def test_an_empty_file_says_so(tmp_path, text):
    path = tmp_path / "thresholds.yaml"
    path.write_text(text)
    with pytest.raises(RtmbenchError) as info:
        load_thresholds(path)
    assert str(info.value) == f"{path}: empty (a thresholds file holds schema_version: 1 and models:)"


def test_unknown_model_and_missing_file(tmp_path):
    thresholds = load_thresholds(write(tmp_path, VALID))
    with pytest.raises(RtmbenchError, match="no entry for model 'x'"):
        thresholds.model("x")
    with pytest.raises(RtmbenchError, match="cannot read thresholds file"):
        load_thresholds(tmp_path / "nope.yaml")


def test_merge_keys_may_still_override():
    """Only a key written twice is refused; one overriding a key merged in with ``<<`` is not."""
    import yaml

    from rtmbench.thresholds import _UniqueKeyLoader

    text = "base: &base {precision: fp16, backends: [igie]}\nrule: {<<: *base, precision: fp32}\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader)["rule"] == {"precision": "fp32", "backends": ["igie"]}
