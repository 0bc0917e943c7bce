"""Iluvatar IxRT: the TensorRT-compatible SDK of the IXUCA SDK, importable as ``tensorrt`` or ``ixrt``.

Built like the Iluvatar model zoo's ``build_engine.py``: plugins loaded first, an
EXPLICIT_BATCH network, ``BuilderFlag.FP16``; here with one optimization profile (``Dims``) for
batches 1…``batch``. IxRT versions differ in their run API — older ones have the binding API
(``execute_v2`` on binding pointers), newer ones TensorRT 10's tensor API — so the engine uses the
binding API when the deserialized engine has ``num_bindings``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from pathlib import Path

import numpy as np

from ..hostinfo import gpu_kernel_drivers
from . import _trt_common as common
from .base import Backend, BackendUnavailable, Engine, ModelSource

INSTALL_HINT = ("IxRT ships as a wheel with the Iluvatar IXUCA (CoreX) SDK; not on PyPI. Device memory "
                "needs cuda-python<13 or Iluvatar's cuda-python wheel")


def _ixrt():
    """The IxRT module: ``tensorrt`` first, then ``ixrt`` (as the zoo does), if it is IxRT's."""
    for name in ("tensorrt", "ixrt"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if common.is_ixrt(module):
            return module
    raise BackendUnavailable(f"IxRT is not installed (no tensorrt or ixrt module with "
                             f"{common.IXRT_PLUGIN}); {INSTALL_HINT}")


@functools.cache
def _with_plugins(trt):
    """``trt`` after loading IxRT's plugin library and registering its plugins (once)."""
    ctypes.CDLL(str(Path(trt.__file__).parent / common.IXRT_PLUGIN))
    trt.init_libnvinfer_plugins(common.logger(trt), "")
    return trt


class BindingApiEngine(common.DeviceEngine):
    """Older IxRT: numbered bindings, synchronous ``execute_v2`` on their device pointers."""

    io_api = "binding"

    def _io_tensors(self) -> list[common.IoTensor]:
        engine, trt = self.engine, self.trt
        tensors = []
        for index in range(engine.num_bindings):
            is_input = engine.binding_is_input(index)
            shape = tuple(engine.get_binding_shape(index))
            if is_input and -1 in shape:
                shape = tuple(engine.get_profile_shape(0, index)[2])
            dtype = np.dtype(trt.nptype(engine.get_binding_dtype(index)))
            tensors.append(common.IoTensor(engine.get_binding_name(index), index, is_input, dtype,
                                           shape if is_input else ()))
        return tensors

    def _set_input_shape(self, shape):
        if self.context.set_binding_shape(self.input.index, tuple(shape)) is False:
            raise ValueError(f"engine rejected input shape {tuple(shape)}")

    def _shape(self, tensor):
        return tuple(self.context.get_binding_shape(tensor.index))

    def _execute(self):
        if self.context.execute_v2([tensor.address for tensor in self.tensors]) is False:
            raise RuntimeError("execute_v2 failed")


class IxRTBackend(Backend):
    name = "ixrt"
    build_modules = ("rtmbench.backends._trt_common",)
    precisions = ("fp32", "fp16")
    artifact_suffix = ".engine"
    install_hint = INSTALL_HINT

    @classmethod
    def sdk_version(cls) -> str:
        version = _ixrt().__version__
        common.cuda_runtime(INSTALL_HINT)
        return version

    def device(self) -> str:
        return common.cuda_device()["name"]

    def build_key(self, precision: str, batch: int) -> dict:
        return {**super().build_key(precision, batch), "driver": common.cuda_device()["driver"], **gpu_kernel_drivers()}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        trt = _with_plugins(_ixrt())
        self.check_precision(precision)
        explicit_batch = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        out.write_bytes(common.build_serialized(trt, source.onnx, precision, batch, explicit_batch,
                                                dims=trt.Dims))

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        trt = _with_plugins(_ixrt())
        sdk_runtime, engine = common.deserialize(trt, artifact.read_bytes())
        api = BindingApiEngine if hasattr(engine, "num_bindings") else common.TensorApiEngine
        return api(trt, sdk_runtime, engine, precision, common.cuda_runtime(INSTALL_HINT))
