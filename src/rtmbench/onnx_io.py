"""Bring your own ONNX: match another exporter's graph to ours and write a normalized copy.

Ours (export.py): input ``input`` float32[N, 3, H, W]; outputs ``OUTPUT_NAMES`` in that order,
``cls_score_i`` float32[N, C, H/s, W/s] and ``bbox_pred_i`` float32[N, 4, H/s, W/s], s = strides[i].
Other exporters (mmdeploy, …) name and order the same six maps differently (``output``, ``861``, …,
cls and bbox interleaved): they are matched by name when the graph uses ours, else by the shapes
one run on a batch of zeros produces, and renamed so that every backend sees our names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import RtmbenchError, first_line
from .export import INPUT_NAME
from .model import OUTPUT_NAMES, ModelSpec


def head_shapes(spec: ModelSpec, batch: int) -> dict[str, tuple[int, ...]]:
    """Our output name → its shape for a batch of ``batch`` images of ``spec.input_size``."""
    height, width = spec.input_size
    shapes = {}
    for level, stride in enumerate(spec.strides):
        size = (-(-height // stride), -(-width // stride))  # ceil: stride-2 convs with padding
        shapes[f"cls_score_{level}"] = (batch, spec.num_classes, *size)
        shapes[f"bbox_pred_{level}"] = (batch, 4, *size)
    return {name: shapes[name] for name in OUTPUT_NAMES}


def _load(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf decode errors and missing external data come in many types
        reason = first_line(exc)
        raise RtmbenchError(f"{path}: not a readable ONNX model ({reason})") from None


def external_data_locations(path: Path) -> list[str]:
    """Where the model's external tensors are stored (saved with ``save_as_external_data``:
    ``model.onnx.data``, relative to the model's folder), once each: part of the model, though
    not of ``path``'s bytes."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = _tensors(_load(Path(path), load_external_data=False).graph)
    return list(dict.fromkeys(ExternalDataInfo(t).location for t in tensors if uses_external_data(t)))


def _tensors(graph: onnx.GraphProto):
    """The graph's initializers and the tensors in its nodes' attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def _format(elem_type: int, dims) -> str:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name if elem_type else "?"
    return f"{dtype}[{', '.join(map(str, dims))}]"


def check_input(model: onnx.ModelProto, path: Path, spec: ModelSpec) -> tuple[str, int]:
    """The graph's one image input and the batch to probe it with (its static batch, else 1).

    It must be float32[N, 3, H, W] with (H, W) = ``spec.input_size``; symbolic dims pass.
    """
    height, width = spec.input_size
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    found = ", ".join(f"{i.name!r} " + _format(i.type.tensor_type.elem_type,
                                               [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                                                for d in i.type.tensor_type.shape.dim]) for i in inputs)
    problem = f"{path}: model {spec.name} needs one input float32[N, 3, {height}, {width}], found {found or 'none'}"
    if len(inputs) != 1:
        raise RtmbenchError(problem)
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if (tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4
            or any(d is not None and d != e for d, e in zip(dims[1:], (3, height, width)))):
        raise RtmbenchError(problem)
    return inputs[0].name, dims[0] or 1


def fixed_batch(path: Path) -> int | None:
    """The batch a normalized graph (:func:`normalize_onnx`) fixes for its input, None if symbolic."""
    model = onnx.load(str(path), load_external_data=False)
    dim = next(i for i in model.graph.input if i.name == INPUT_NAME).type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def _run_shapes(path: Path, input_name: str, batch: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Output name → shape, from one ONNX Runtime run on zeros."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, {input_name: np.zeros((batch, 3, *spec.input_size), np.float32)})
    except Exception as exc:  # ORT raises its own types for unsupported ops and failed runs
        reason = first_line(exc)
        raise RtmbenchError(f"{path}: ONNX Runtime cannot run it to read its output shapes: {reason}") from None
    return {name: tuple(np.shape(value)) for name, value in zip(names, outputs)}


def match_head_outputs(onnx_path: str | Path, spec: ModelSpec) -> dict[str, str]:
    """Our output name → the graph's, for the six head maps: by name when the graph uses ours,
    else by shape (each of ours must match exactly one output). Raises :class:`RtmbenchError`
    naming the file and the outputs found when that fails."""
    path = Path(onnx_path)
    input_name, batch = check_input(_load(path), path, spec)
    found = _run_shapes(path, input_name, batch, spec)
    expected = head_shapes(spec, batch)
    if set(OUTPUT_NAMES) <= set(found):
        mapping = {name: name for name in OUTPUT_NAMES}
    else:
        candidates = {ours: [theirs for theirs, shape in found.items() if shape == expected[ours]]
                      for ours in OUTPUT_NAMES}
        mapping = {ours: names[0] for ours, names in candidates.items() if len(names) == 1}
    if len(set(mapping.values())) < len(OUTPUT_NAMES) or any(found[t] != expected[o] for o, t in mapping.items()):
        shape = lambda dims: f"[{', '.join(map(str, dims))}]"  # noqa: E731
        raise RtmbenchError(
            f"{path}: cannot match its outputs to the head maps of {spec.name} by name or by shape "
            f"(unambiguously); expected {', '.join(f'{n} {shape(s)}' for n, s in expected.items())}; "
            f"found {', '.join(f'{n!r} {shape(s)}' for n, s in found.items()) or 'no outputs'}")
    return mapping


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` and its subgraphs, all at once (swaps work)."""
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                _rename(sub, renames)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = renames.get(value.name, value.name)


def normalize_onnx(onnx_path: str | Path, spec: ModelSpec, out: str | Path) -> dict[str, str]:
    """Write ``onnx_path`` to ``out`` with input ``input`` and outputs ``OUTPUT_NAMES`` in order
    (other outputs dropped); returns :func:`match_head_outputs`' mapping."""
    path = Path(onnx_path)
    mapping = match_head_outputs(path, spec)
    model = _load(path)
    input_name, _ = check_input(model, path, spec)
    renames = {theirs: ours for ours, theirs in mapping.items()} | {input_name: INPUT_NAME}
    renames = {old: new for old, new in renames.items() if old != new}
    graph = model.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {v.name for v in (*graph.input, *graph.initializer)}
    for name in set(renames.values()) & (taken - set(renames)):  # an unrelated tensor has one of our names
        aside = name
        while aside in taken:
            aside += "_"
        renames[name] = aside
    _rename(graph, renames)
    outputs = {o.name: o for o in graph.output}
    ordered = [onnx.ValueInfoProto.FromString(outputs[name].SerializeToString()) for name in OUTPUT_NAMES]
    del graph.output[:]
    graph.output.extend(ordered)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return mapping
