"""What TensorRT and IxRT (Iluvatar's TensorRT-compatible SDK) share: CUDA memory through
cuda-python, the ONNX → serialized-engine build, and the engine over device buffers.

Device buffers are allocated once for the largest batch the engine accepts; ``infer`` copies the
host batch in and the outputs out synchronously, ``infer_compute`` reruns only the engine on the
input left on the device. The copies use the runtime API's ``cudaMemcpy`` where the Iluvatar zoo
uses the driver's ``cuMemcpyHtoD/DtoH``: the same synchronous copy, but the driver API needs a
current context in the calling thread, which the runtime API sets up by itself.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from .base import BackendUnavailable, Engine

CUDA_PYTHON_HINT = "pip install cuda-python"
IXRT_PLUGIN = Path("lib") / "libixrt_plugin.so"  # relative to the SDK's python module


def cuda_runtime(hint: str = CUDA_PYTHON_HINT):
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.x)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise BackendUnavailable(f"cuda-python is not installed ({exc}); {hint}") from None
    return runtime


def cuda_call(result):
    """Unwrap a cuda-python ``(error, value…)`` tuple, raising on a non-zero error code."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error!r}")
    return values[0] if len(values) == 1 else tuple(values) or None


def cuda_device() -> dict:
    """Name of device 0 and the CUDA driver version (part of every engine's cache key)."""
    runtime = cuda_runtime()
    props = cuda_call(runtime.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "driver": cuda_call(runtime.cudaDriverGetVersion())}


def is_ixrt(module) -> bool:
    """True when a TensorRT-compatible module is IxRT's (it ships the IxRT plugin library)."""
    return (Path(module.__file__).parent / IXRT_PLUGIN).is_file()


@functools.cache
def logger(trt):
    """One WARNING logger per SDK module, alive as long as the builders and runtimes using it."""
    return trt.Logger(trt.Logger.WARNING)


def build_serialized(trt, onnx: Path, precision: str, batch: int, network_flags: int,
                     dims=tuple, workspace: int | None = None) -> bytes:
    """Parse ``onnx`` and build a serialized engine whose input batch may be 1…``batch``.

    The input's dim 0 is made dynamic (-1) after parsing, with one optimization profile
    min (1, …), opt = max (batch, …). ``dims`` wraps shapes (``trt.Dims`` for IxRT).
    """
    builder = trt.Builder(logger(trt))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger(trt))
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"the ONNX parser failed: {errors}")  # (the caller names the file)
    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 is true FP32, as torch-cuda's (README)
        config.clear_flag(trt.BuilderFlag.TF32)
    tensor = network.get_input(0)
    item_shape = tuple(tensor.shape)[1:]
    tensor.shape = dims([-1, *item_shape])
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, dims([1, *item_shape]), dims([batch, *item_shape]),
                      dims([batch, *item_shape]))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("the SDK built no engine (its log above says why)")
    return bytes(plan)


def deserialize(trt, plan: bytes):
    """(runtime, engine): the runtime is kept as long as its engine."""
    runtime = trt.Runtime(logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("the SDK could not deserialize the engine (built by another SDK version?)")
    return runtime, engine


@dataclasses.dataclass
class IoTensor:
    """One engine input or output: binding index, dtype, largest shape and device address."""

    name: str
    index: int
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...] = ()
    address: int = 0


class DeviceEngine(Engine):
    """A deserialized engine over device buffers sized for its largest batch.

    Owns the SDK runtime, engine, execution context and buffers; subclasses speak one I/O API.
    Calls whose result is checked with ``is False`` may return None in some IxRT versions.
    """

    io_api: str

    def __init__(self, trt, sdk_runtime, cuda_engine, precision: str, cudart):
        super().__init__(precision)
        self.trt, self.sdk_runtime, self.engine, self.cudart = trt, sdk_runtime, cuda_engine, cudart
        self.tensors: list[IoTensor] = []
        self.context = None
        try:
            self.context = cuda_engine.create_execution_context()
            self.tensors = self._io_tensors()
            inputs = [t for t in self.tensors if t.is_input]
            if len(inputs) != 1:
                raise ValueError(f"expected an engine with one input, got {[t.name for t in inputs]}")
            self.input, self.outputs = inputs[0], [t for t in self.tensors if not t.is_input]
            self._set_input_shape(self.input.max_shape)
            for tensor in self.tensors:
                tensor.max_shape = tensor.max_shape or self._shape(tensor)
                nbytes = math.prod(tensor.max_shape) * tensor.dtype.itemsize
                tensor.address = cuda_call(cudart.cudaMalloc(nbytes))
                self._bind(tensor)
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _io_tensors(self) -> list[IoTensor]:
        """The engine's I/O tensors, inputs with ``max_shape`` (the profile's max) set."""

    @abc.abstractmethod
    def _set_input_shape(self, shape: tuple[int, ...]) -> None: ...

    @abc.abstractmethod
    def _shape(self, tensor: IoTensor) -> tuple[int, ...]:
        """The tensor's shape for the input shape last set."""

    def _bind(self, tensor: IoTensor) -> None:
        """Tell the context where ``tensor`` lives (APIs that bind at execute time do nothing)."""

    @abc.abstractmethod
    def _execute(self) -> None:
        """Run the engine on the device buffers and wait for it."""

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        limit = self.input.max_shape
        if batch.shape[1:] != limit[1:] or not 1 <= batch.shape[0] <= limit[0]:
            raise ValueError(f"engine input {self.input.name} takes batches of 1…{limit[0]} "
                             f"× {limit[1:]}, got {batch.shape}")
        cudart, batch = self.cudart, batch.astype(self.input.dtype, copy=False)
        self._set_input_shape(batch.shape)
        cuda_call(cudart.cudaMemcpy(self.input.address, batch.ctypes.data, batch.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        self._execute()
        outputs = {}
        for tensor in self.outputs:
            host = np.empty(self._shape(tensor), tensor.dtype)
            cuda_call(cudart.cudaMemcpy(host.ctypes.data, tensor.address, host.nbytes,
                                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            outputs[tensor.name] = host.astype(np.float32, copy=False)
        return outputs

    def _run_compute(self) -> None:
        """The engine alone on the last :meth:`infer` input, still on the device."""
        self._execute()

    def describe(self) -> dict:
        return {**super().describe(), "io_api": self.io_api, "max_batch": self.input.max_shape[0]}

    def close(self) -> None:
        super().close()
        for tensor in self.tensors:
            if tensor.address:
                cuda_call(self.cudart.cudaFree(tensor.address))
                tensor.address = 0
        self.context = self.engine = self.sdk_runtime = None


class TensorApiEngine(DeviceEngine):
    """TensorRT 10's tensor API (also newer IxRT): named tensors, ``execute_async_v3`` on a stream."""

    io_api = "tensor"

    def __init__(self, trt, sdk_runtime, cuda_engine, precision: str, cudart):
        self.stream = cuda_call(cudart.cudaStreamCreate())
        super().__init__(trt, sdk_runtime, cuda_engine, precision, cudart)

    def _io_tensors(self) -> list[IoTensor]:
        engine, trt = self.engine, self.trt
        tensors = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(engine.get_tensor_shape(name))
            if is_input and -1 in shape:
                shape = tuple(engine.get_tensor_profile_shape(name, 0)[2])
            tensors.append(IoTensor(name, index, is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                                    shape if is_input else ()))
        return tensors

    def _set_input_shape(self, shape):
        if self.context.set_input_shape(self.input.name, tuple(shape)) is False:
            raise ValueError(f"engine rejected input shape {tuple(shape)}")

    def _shape(self, tensor):
        return tuple(self.context.get_tensor_shape(tensor.name))

    def _bind(self, tensor):
        self.context.set_tensor_address(tensor.name, tensor.address)

    def _execute(self):
        if self.context.execute_async_v3(int(self.stream)) is False:
            raise RuntimeError("execute_async_v3 failed")
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        super().close()
        if self.stream is not None:
            cuda_call(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None
