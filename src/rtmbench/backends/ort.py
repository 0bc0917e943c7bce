"""ONNX Runtime: CPU here (CUDA / TensorRT execution providers when onnxruntime-gpu is installed).

FP32 runs the ONNX as is. FP16 converts weights and activations to float16 with float32 inputs
and outputs kept; ops listed in ``FP16_KEEP_FP32_OPS`` stay in float32. The artifact is the
graph ORT optimized for this machine (``optimized_model_filepath``), loaded without re-optimizing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Backend, BackendUnavailable, Engine, ModelSource

FP16_KEEP_FP32_OPS: tuple[str, ...] = ()


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); "
                                 f"{OnnxRuntimeBackend.install_hint}") from None
    return onnxruntime


def _providers(ort) -> list[str]:
    preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in preferred if p in ort.get_available_providers()]


def _session_options(ort, optimize: bool, save_to: Path | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def convert_fp16(onnx_path: Path, keep_fp32_ops: tuple[str, ...] = FP16_KEEP_FP32_OPS):
    """Float16 copy of an ONNX model with float32 I/O; ``keep_fp32_ops`` op types stay float32, as
    do those of ORT's own list (ops with no float16 kernel: TopK, Range, NonMaxSuppression, …)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(onnx_path))
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops])


class OnnxRuntimeEngine(Engine):
    def __init__(self, session, precision: str):
        super().__init__(precision)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    @property
    def computes_on_host_cores(self) -> bool:
        return self.session.get_providers()[0] == "CPUExecutionProvider"

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: batch})))

    def describe(self) -> dict:
        options = self.session.get_session_options()
        return {**super().describe(), "providers": self.session.get_providers(),
                "intra_op_threads": options.intra_op_num_threads}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "fp16")
    artifact_suffix = ".ort.onnx"
    install_hint = "pip install onnxruntime (or onnxruntime-gpu for CUDA/TensorRT providers)"

    @classmethod
    def sdk_version(cls) -> str:
        return _ort().__version__

    def build_key(self, precision: str, batch: int) -> dict:
        # The graph is batch-agnostic (dynamic batch), so one artifact serves every batch size.
        return {**super().build_key(precision, 0), "providers": _providers(_ort()),
                "fp16_keep_fp32_ops": list(FP16_KEEP_FP32_OPS) if precision == "fp16" else []}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        ort = _ort()
        self.check_precision(precision)
        model = source.onnx.read_bytes() if precision == "fp32" else convert_fp16(source.onnx).SerializeToString()
        # not TensorRT's provider: ORT cannot save a graph of its compiled nodes; it compiles them at load
        providers = [p for p in _providers(ort) if p != "TensorrtExecutionProvider"]
        ort.InferenceSession(model, _session_options(ort, optimize=True, save_to=out), providers=providers)

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        ort = _ort()
        session = ort.InferenceSession(str(artifact), _session_options(ort, optimize=False),
                                       providers=_providers(ort))
        return OnnxRuntimeEngine(session, precision)
