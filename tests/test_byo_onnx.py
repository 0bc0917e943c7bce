"""Bring your own ONNX (``--onnx FILE``): another exporter's names and output order are matched to
the six head maps and normalized; what cannot be matched is one clear error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from rtmbench.artifacts import open_engine
from rtmbench.cache import ArtifactCache
from rtmbench.errors import RtmbenchError
from rtmbench.export import export_onnx
from rtmbench.model import OUTPUT_NAMES
from rtmbench.onnx_io import match_head_outputs

# mmdeploy-style: meaningless names, cls and bbox interleaved per level.
FOREIGN = {"cls_score_0": "output", "bbox_pred_0": "861", "cls_score_1": "862",
           "bbox_pred_1": "873", "cls_score_2": "874", "bbox_pred_2": "885"}
INTERLEAVED = ("cls_score_0", "bbox_pred_0", "cls_score_1", "bbox_pred_1", "cls_score_2", "bbox_pred_2")


@pytest.fixture(scope="module")
def ours(tmp_path_factory, reference_model):
    path = tmp_path_factory.mktemp("byo") / "ours.onnx"
    export_onnx(reference_model, path)
    return path


def variant(source, out, renames=None, order=None, drop=(), extra=(), input_dims=None):
    """A copy of ``source`` with tensors renamed, graph outputs reordered (``order``: their
    original names), some dropped, ``extra`` outputs added as Identity copies of existing ones
    (new name → source name, after renaming) and the input's dims replaced."""
    model = onnx.load(str(source))
    graph, renames = model.graph, renames or {}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)
    outputs = {o.name: onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output}
    del graph.output[:]
    for name in order or outputs:
        if name not in drop:
            outputs[name].name = renames.get(name, name)
            graph.output.append(outputs[name])
    for new, old in extra:
        graph.node.append(onnx.helper.make_node("Identity", [old], [new]))
        graph.output.append(onnx.helper.make_tensor_value_info(new, onnx.TensorProto.FLOAT, None))
    graph.input[0].name = renames.get(graph.input[0].name, graph.input[0].name)
    for dim, value in zip(graph.input[0].type.tensor_type.shape.dim, input_dims or ()):
        if value is not None:
            dim.dim_value = value
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def foreign(ours, tmp_path_factory):
    """Input ``images``, outputs renamed and interleaved, and an unrelated inner tensor that
    happens to be called ``bbox_pred_0`` (so it has to be moved aside)."""
    model = onnx.load(str(ours))
    inner = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    return variant(ours, tmp_path_factory.mktemp("byo") / "rtmdet_opt.onnx",
                   renames={**FOREIGN, "input": "images", inner: "bbox_pred_0"}, order=INTERLEAVED)


def test_foreign_outputs_are_matched_by_shape(foreign, nano_spec):
    assert [o.name for o in onnx.load(str(foreign)).graph.output] == [FOREIGN[n] for n in INTERLEAVED]
    assert match_head_outputs(foreign, nano_spec) == FOREIGN


def test_our_names_are_matched_by_name_in_any_order(ours, nano_spec, tmp_path):
    shuffled = variant(ours, tmp_path / "shuffled.onnx", order=list(reversed(OUTPUT_NAMES)),
                       extra=[("extra", "bbox_pred_2")])
    assert match_head_outputs(shuffled, nano_spec) == {name: name for name in OUTPUT_NAMES}
    handle = open_engine(nano_spec, None, "onnxruntime", "fp32", 1, ArtifactCache(tmp_path / "cache"),
                         onnx=shuffled)
    handle.engine.close()
    graph = onnx.load(str(handle.onnx)).graph
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)  # reordered, the extra one dropped


def test_a_model_with_external_data_is_keyed_by_that_data_too(ours, nano_spec, tmp_path):
    """Weights saved beside the graph (model.onnx.data): new weights there, with the .onnx file's
    bytes unchanged, are a new normalized model, not the stale one."""
    from rtmbench.artifacts import normalized_onnx

    path = tmp_path / "split" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(onnx.load(str(ours)), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    cache = ArtifactCache(tmp_path / "cache")
    first = normalized_onnx(nano_spec, path, cache)
    graph_bytes, data = path.read_bytes(), path.with_name("model.onnx.data")
    data.write_bytes(data.read_bytes()[::-1])  # other weights, the same size
    assert path.read_bytes() == graph_bytes
    second = normalized_onnx(nano_spec, path, cache)
    assert second != first and cache.built == [first, second]
    assert normalized_onnx(nano_spec, path, cache) == second and len(cache.built) == 2


def test_open_engine_on_foreign_onnx_equals_ours(ours, foreign, nano_spec, reference, tmp_path):
    cache = ArtifactCache(tmp_path)
    batch = reference.golden["inputs"][:2]
    outputs = {}
    for name, path in (("ours", ours), ("foreign", foreign)):
        with open_engine(nano_spec, None, "onnxruntime", "fp32", 2, cache, onnx=path).engine as engine:
            outputs[name] = engine.infer(batch)
    assert list(outputs["foreign"]) == list(OUTPUT_NAMES)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(outputs["foreign"][name], outputs["ours"][name], err_msg=name)

    normalized = open_engine(nano_spec, None, "onnxruntime", "fp32", 2, cache, onnx=foreign)
    normalized.engine.close()
    graph = onnx.load(str(normalized.onnx)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == list(OUTPUT_NAMES)
    assert cache.built.count(normalized.path) == 1  # the second open reused the normalized copy and engine
    assert [o.name for o in onnx.load(str(foreign)).graph.output] == [FOREIGN[n] for n in INTERLEAVED]


def test_predict_with_foreign_onnx_gives_our_detections(ours, foreign, reference, run_cli, tmp_path):
    rows = {}
    for name, path in (("ours", ours), ("foreign", foreign)):
        out = tmp_path / f"{name}.json"
        run_cli("predict", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint,
                "--backend", "onnxruntime", "--onnx", path, *reference.image_paths, "--out", out,
                "--cache-dir", tmp_path / "cache")
        rows[name] = json.loads(out.read_text())
    assert rows["ours"] and rows["foreign"] == rows["ours"]


def test_missing_output_is_one_clear_error(ours, nano_spec, tmp_path, run_cli, reference):
    missing = variant(ours, tmp_path / "missing.onnx", renames=FOREIGN, drop={"bbox_pred_2"})
    with pytest.raises(RtmbenchError) as excinfo:
        match_head_outputs(missing, nano_spec)
    message = str(excinfo.value)
    assert message.startswith(f"{missing}: cannot match its outputs")
    assert "bbox_pred_2 [1, 4, 10, 10]" in message and "'873' [1, 4, 20, 20]" in message
    assert "'885'" not in message

    result = run_cli("predict", "--model", "rtmdet-nano-person", "--weights", reference.checkpoint,
                     "--onnx", missing, reference.image_paths[0], "--out", tmp_path / "dets.json",
                     "--cache-dir", tmp_path / "cache", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"rtmbench: error: {message}"]
    assert not (tmp_path / "dets.json").exists()


def test_ambiguous_outputs_are_an_error(ours, nano_spec, tmp_path):
    twice = variant(ours, tmp_path / "twice.onnx", renames=FOREIGN, extra=[("copy", "862")])
    with pytest.raises(RtmbenchError, match="unambiguously.*'862' \\[1, 1, 20, 20\\].*'copy' \\[1, 1, 20, 20\\]"):
        match_head_outputs(twice, nano_spec)


@pytest.mark.parametrize("dims", [(None, None, 640, 640), (None, 1, None, None)], ids=["size", "channels"])
def test_wrong_input_is_an_error(ours, nano_spec, tmp_path, dims):
    wrong = variant(ours, tmp_path / "wrong.onnx", input_dims=dims)
    found = f"'input' float32[batch, {dims[1] or 3}, {dims[2] or 320}, {dims[3] or 320}]"
    with pytest.raises(RtmbenchError) as excinfo:
        open_engine(nano_spec, None, "onnxruntime", "fp32", 1, ArtifactCache(tmp_path / "cache"), onnx=wrong)
    assert str(excinfo.value) == (f"{wrong}: model rtmdet-nano-person needs one input "
                                  f"float32[N, 3, 320, 320], found {found}")


def test_a_fixed_batch_other_than_the_runs_is_one_line(ours, nano_spec, tmp_path):
    fixed = variant(ours, tmp_path / "batch4.onnx", input_dims=(4, None, None, None))
    cache = ArtifactCache(tmp_path / "cache")
    with open_engine(nano_spec, None, "onnxruntime", "fp32", 4, cache, onnx=fixed).engine as engine:
        assert engine.infer(np.zeros((4, 3, 320, 320), np.float32))["cls_score_0"].shape[0] == 4
    with pytest.raises(RtmbenchError) as excinfo:
        open_engine(nano_spec, None, "onnxruntime", "fp32", 2, cache, onnx=fixed)
    assert str(excinfo.value) == (f"{fixed}: its input has a fixed batch of 4, not 2: run it with --batch-size 4, "
                                  f"or export it with a dynamic batch")


def test_onnx_given_to_a_backend_that_runs_the_weights_is_refused(ours, nano_spec, reference, tmp_path):
    with pytest.raises(RtmbenchError, match=r"^backend torch runs the PyTorch model from the weights, not an ONNX "
                                             r"file: --onnx .*ours\.onnx applies"):
        open_engine(nano_spec, reference.checkpoint, "torch", "fp32", 1, ArtifactCache(tmp_path / "cache"), onnx=ours)


def test_external_data_of_a_constant_nodes_tensor_is_found_too(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from rtmbench.onnx_io import external_data_locations

    constant = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(64, np.float32)))
    graph = helper.make_graph([constant, helper.make_node("Add", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    path = tmp_path / "constant.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0, convert_attribute=True)
    assert external_data_locations(path) == ["weights.bin"]
