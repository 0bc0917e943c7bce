"""OpenVINO on the CPU: FP32, and BF16 / FP16 where the CPU runs them natively.

The precision is OpenVINO's ``INFERENCE_PRECISION_HINT`` (f32 / bf16 / f16). The CPU plugin
silently falls back to f32 for a hint the CPU lacks, so the precision is checked against
``OPTIMIZATION_CAPABILITIES`` before building and read back from the compiled model after loading.

The artifact is the compiled model (``export_model``), loaded with ``import_model``. Its input
is ``[-1, 3, H, W]``: one artifact serves every batch size. ``PERFORMANCE_HINT`` is LATENCY —
one stream over all cores, so each synchronous batch call is spread over the cores inside every
layer. THROUGHPUT's several streams only pay off with several infer requests in flight, which
would mean splitting each batch over an AsyncInferQueue.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from ..errors import RtmbenchError
from .base import Backend, BackendUnavailable, Engine, ModelSource

DEVICE = "CPU"
PERFORMANCE_HINT = "LATENCY"
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # our name → INFERENCE_PRECISION_HINT
_CAPABILITIES = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}  # → OPTIMIZATION_CAPABILITIES


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc}); {OpenVinoBackend.install_hint}") from None
    return openvino


@functools.cache
def _core():
    return _openvino().Core()


def _config(precision: str) -> dict:
    """Compile and import properties (import_model does not restore them from the blob)."""
    return {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": PERFORMANCE_HINT}


class OpenVinoEngine(Engine):
    computes_on_host_cores = True

    def __init__(self, compiled, precision: str):
        super().__init__(precision)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in compiled.outputs]

    @property
    def inference_precision(self) -> str:
        """The precision the compiled model runs (f32 / bf16 / f16), read back from OpenVINO."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # share_inputs: ``batch`` is already contiguous float32; the outputs are copies.
        results = self.request.infer({0: batch}, share_inputs=True)
        return {name: results[i] for i, name in enumerate(self.output_names)}

    def describe(self) -> dict:
        compiled = self.compiled
        return {**super().describe(), "inference_precision": self.inference_precision,
                "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
                "streams": int(compiled.get_property("NUM_STREAMS")),
                "threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}


class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = ("fp32", "bf16", "fp16")
    artifact_suffix = ".ov.blob"
    install_hint = "pip install openvino"

    @classmethod
    def sdk_version(cls) -> str:
        return _openvino().__version__

    def device(self) -> str:
        return _core().get_property(DEVICE, "FULL_DEVICE_NAME")

    def supported_precisions(self) -> tuple[str, ...]:
        """The precisions this CPU runs natively (its OPTIMIZATION_CAPABILITIES): for any other
        hint OpenVINO would silently run f32."""
        capabilities = _core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
        return tuple(p for p in self.precisions if _CAPABILITIES[p] in capabilities)

    def build_key(self, precision: str, batch: int) -> dict:
        # Dynamic batch: one artifact serves every batch size.
        return {**super().build_key(precision, 0), "config": _config(precision)}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        self.check_precision(precision)
        ov = _openvino()
        model = _core().read_model(str(source.onnx))
        height, width = source.spec.input_size
        model.reshape({0: ov.PartialShape([-1, 3, height, width])})
        stream = io.BytesIO()
        _core().compile_model(model, DEVICE, _config(precision)).export_model(stream)
        out.write_bytes(stream.getvalue())

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        self.check_precision(precision)
        compiled = _core().import_model(artifact.read_bytes(), DEVICE, _config(precision))
        engine = OpenVinoEngine(compiled, precision)
        if engine.inference_precision != _HINTS[precision]:
            raise RtmbenchError(f"{artifact}: asked OpenVINO for {_HINTS[precision]}, "
                               f"the compiled model runs {engine.inference_precision}")
        return engine
