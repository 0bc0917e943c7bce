"""Backend registry: names → backend classes, imported lazily so no SDK is needed to list them.

Third-party backends register through the ``rtmbench.backends`` entry-point group
(``name = "package.module:BackendClass"``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import RtmbenchError
from .base import Backend, BackendUnavailable, Engine, ModelSource

BUILTIN_BACKENDS = {
    "onnxruntime": "rtmbench.backends.ort:OnnxRuntimeBackend",
    "openvino": "rtmbench.backends.ov:OpenVinoBackend",
    "torch": "rtmbench.backends.torch_ref:TorchBackend",
    "torch-cuda": "rtmbench.backends.torch_cuda:TorchCudaBackend",
    "torch-cuda-compile": "rtmbench.backends.torch_cuda:TorchCudaCompiledBackend",
    "tensorrt": "rtmbench.backends.trt:TensorRTBackend",
    "ixrt": "rtmbench.backends.ixrt:IxRTBackend",
    "igie": "rtmbench.backends.igie:IgieBackend",
}


def backend_names() -> list[str]:
    plugins = [ep.name for ep in entry_points(group="rtmbench.backends")]
    return list(BUILTIN_BACKENDS) + [n for n in plugins if n not in BUILTIN_BACKENDS]


def get_backend(name: str) -> Backend:
    """An instance of the backend called ``name`` (its SDK is not imported yet)."""
    target = BUILTIN_BACKENDS.get(name)
    if target is None:
        plugins = {ep.name: ep.value for ep in entry_points(group="rtmbench.backends")}
        target = plugins.get(name)
    if target is None:
        raise RtmbenchError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)()


__all__ = ["Backend", "BackendUnavailable", "Engine", "ModelSource", "BUILTIN_BACKENDS",
           "backend_names", "get_backend"]
