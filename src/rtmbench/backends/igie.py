"""IGIE, Iluvatar's TVM fork: the engine behind the Iluvatar model zoo's RTMDet figures.

Built like the zoo: Relay's ONNX frontend with a fixed input shape and frozen params,
``relay.build(..., precision=...)`` (a vendor argument) for the Iluvatar target, and
``export_library`` to a ``.so``; run with ``graph_executor``. One engine per batch size: ``infer``
takes exactly the built batch (``rtmbench.runner`` pads the last batch). ``infer_compute`` is the
zoo's ``time_evaluator("run")`` without the evaluator: ``run()`` on the input already set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..hostinfo import gpu_kernel_drivers
from .base import Backend, BackendUnavailable, Engine, ModelSource

INSTALL_HINT = ("IGIE (Iluvatar's TVM fork) ships with the Iluvatar IXUCA (CoreX) SDK; not on PyPI "
                "(apache-tvm is not IGIE)")
TARGET_MODEL = "MR"
TARGET_OPTIONS = "-libs=cudnn,cublas,ixinfer"


def _tvm():
    try:
        import tvm
    except ImportError as exc:
        raise BackendUnavailable(f"tvm is not installed ({exc}); {INSTALL_HINT}") from None
    if not hasattr(tvm.target, "iluvatar"):
        raise BackendUnavailable(f"tvm {tvm.__version__} ({tvm.__file__}) is not IGIE: it has no "
                                 f"tvm.target.iluvatar; {INSTALL_HINT}")
    return tvm


def _target(tvm):
    return tvm.target.iluvatar(model=TARGET_MODEL, options=TARGET_OPTIONS)


def _device(tvm):
    return tvm.device(_target(tvm).kind.name, 0)


def _io_names(graph) -> tuple[str, list[str]]:
    """(input name, output names in graph order) of an ONNX graph with one input."""
    weights = {init.name for init in graph.initializer}
    (input_name,) = [i.name for i in graph.input if i.name not in weights]
    return input_name, [o.name for o in graph.output]


class IgieEngine(Engine):
    def __init__(self, tvm, module, device, input_name: str, output_names: list[str],
                 input_shape: tuple[int, ...], precision: str):
        super().__init__(precision)
        self.tvm, self.module, self.device = tvm, module, device
        self.input_name, self.output_names, self.input_shape = input_name, output_names, input_shape

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.shape != self.input_shape:
            raise ValueError(f"this IGIE engine takes exactly {self.input_shape} (one engine per batch "
                             f"size; pad the batch), got {batch.shape}")
        self.module.set_input(self.input_name, self.tvm.nd.array(batch, self.device))
        self.module.run()
        return {name: self.module.get_output(i).asnumpy().astype(np.float32, copy=False)
                for i, name in enumerate(self.output_names)}

    def _run_compute(self) -> None:
        """``run()`` on the input the last :meth:`infer` left on the device, then wait for it."""
        self.module.run()
        self.device.sync()

    def describe(self) -> dict:
        return {**super().describe(), "input_shape": list(self.input_shape),
                "target": f"iluvatar -model={TARGET_MODEL} {TARGET_OPTIONS}"}

    def close(self) -> None:
        super().close()
        self.module = None


class IgieBackend(Backend):
    name = "igie"
    precisions = ("fp32", "fp16")
    artifact_suffix = ".so"  # tvm.runtime.load_module picks the loader by this suffix
    install_hint = INSTALL_HINT

    @classmethod
    def sdk_version(cls) -> str:
        return _tvm().__version__

    def device(self) -> str:
        device = _device(_tvm())
        return str(device.device_name or device)

    def build_key(self, precision: str, batch: int) -> dict:
        return {**super().build_key(precision, batch), **gpu_kernel_drivers(), "target_options": TARGET_OPTIONS}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        import onnx

        tvm = _tvm()
        from tvm import relay

        self.check_precision(precision)
        model = onnx.load(str(source.onnx))
        input_name, _ = _io_names(model.graph)
        shape = {input_name: (batch, 3, *source.spec.input_size)}
        mod, params = relay.frontend.from_onnx(model, shape=shape, freeze_params=True)
        lib = relay.build(mod, target=_target(tvm), params=params, precision=precision)
        lib.export_library(str(out))

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        import onnx

        tvm = _tvm()
        from tvm.contrib import graph_executor

        device = _device(tvm)
        module = graph_executor.GraphModule(tvm.runtime.load_module(str(artifact))["default"](device))
        input_name, output_names = _io_names(onnx.load(str(source.onnx), load_external_data=False).graph)
        return IgieEngine(tvm, module, device, input_name, output_names,
                          (batch, 3, *source.spec.input_size), precision)
