"""NVIDIA TensorRT 10 (tensor API): ONNX → serialized engine, run with ``execute_async_v3``.

FP16 is weakly typed (``BuilderFlag.FP16``, what ``trtexec --fp16`` does): TensorRT may keep a
layer in FP32 where that is faster. The flag is deprecated since 10.12 and gone in 11, where an
FP16 engine needs a strongly typed network from an FP16 ONNX. Engines take batches of
1…``batch`` (one optimization profile, tuned for ``batch``).
"""

from __future__ import annotations

from pathlib import Path

from ..hostinfo import gpu_kernel_drivers
from . import _trt_common as common
from .base import Backend, BackendUnavailable, Engine, ModelSource

WORKSPACE_BYTES = 1 << 30


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt is not installed ({exc}); {TensorRTBackend.install_hint}") from None
    if common.is_ixrt(tensorrt):
        raise BackendUnavailable(f"the tensorrt module here is Iluvatar IxRT ({tensorrt.__file__}); "
                                 f"use the ixrt backend")
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {tensorrt.__version__} is too old: this backend uses the "
                                 f"TensorRT 10 tensor API; {TensorRTBackend.install_hint}")
    return tensorrt


class TensorRTBackend(Backend):
    name = "tensorrt"
    build_modules = ("rtmbench.backends._trt_common",)
    precisions = ("fp32", "fp16")
    artifact_suffix = ".engine"
    install_hint = ("pip install tensorrt-cu12 'cuda-python<13' for CUDA 12, or pip install tensorrt "
                    "cuda-python for CUDA 13 (TensorRT ≥ 10.16); needs an NVIDIA GPU")

    @classmethod
    def sdk_version(cls) -> str:
        version = _tensorrt().__version__
        common.cuda_runtime(cls.install_hint)
        return version

    def device(self) -> str:
        return common.cuda_device()["name"]

    def unsupported_reason(self, precision: str) -> str | None:
        trt = _tensorrt() if precision == "fp16" else None  # (called once the SDK is known to be there)
        if trt is not None and not hasattr(trt.BuilderFlag, "FP16"):
            return (f"TensorRT {trt.__version__} has no weakly typed FP16 (BuilderFlag.FP16, gone in 11): an "
                    f"FP16 engine there needs a strongly typed network from an FP16 ONNX, not built here yet")
        return super().unsupported_reason(precision)

    def build_key(self, precision: str, batch: int) -> dict:
        return {**super().build_key(precision, batch), "driver": common.cuda_device()["driver"],
                **gpu_kernel_drivers(), "workspace": WORKSPACE_BYTES}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        trt = _tensorrt()
        self.check_precision(precision)
        # EXPLICIT_BATCH is implicit (and its flag deprecated) since TensorRT 10.0.
        out.write_bytes(common.build_serialized(trt, source.onnx, precision, batch, network_flags=0,
                                                workspace=WORKSPACE_BYTES))

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        trt = _tensorrt()
        sdk_runtime, engine = common.deserialize(trt, artifact.read_bytes())
        return common.TensorApiEngine(trt, sdk_runtime, engine, precision, common.cuda_runtime())
