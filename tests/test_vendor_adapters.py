"""The TensorRT, IxRT and IGIE adapters against small fakes of their SDKs (none runs here).

The fakes record the calls the adapters make, so these tests pin down what VENDOR-APIS.md says
each adapter must do: the build flags and optimization profile, IxRT's plugin loading and its
binding-API / tensor-API choice, IGIE's fixed input shape and ``precision`` argument. Fake device
memory is host memory, so a fake engine really computes and the copies in and out are checked.
"""

from __future__ import annotations

import ctypes
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rtmbench import hostinfo
from rtmbench.backends import ModelSource, get_backend
from rtmbench.model import OUTPUT_NAMES

ITEM_SHAPE = (3, 4, 4)  # one image of the fake TensorRT network
OUTPUT_ITEM_SHAPES = {"sum": (1,), "corner": (3,)}
IO_NAMES = ["input", *OUTPUT_ITEM_SHAPES]
MAX_BATCH = 4


class Fake:
    """Unknown methods record ``(owner.method, args, kwargs)`` in ``calls`` and return
    ``returns[method]`` (called with the arguments when it is a function)."""

    def __init__(self, calls: list, owner: str, **returns):
        self._calls, self._owner, self._returns = calls, owner, returns

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def record(*args, **kwargs):
            self._calls.append((f"{self._owner}.{method}", args, kwargs))
            value = self._returns.get(method)
            return value(*args, **kwargs) if isinstance(value, types.FunctionType) else value

        return record


def called(calls: list, name: str) -> list[tuple]:
    """Arguments ``(args, kwargs)`` of every recorded call of ``name``."""
    return [(args, kwargs) for call, args, kwargs in calls if call == name]


# --- cuda-python -----------------------------------------------------------------------------

class FakeCudart:
    """cuda-python's runtime API over host memory: device pointers are host addresses."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")

    def __init__(self, calls: list):
        self.calls, self.buffers = calls, {}

    def cudaMalloc(self, nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaFree(self, address):
        del self.buffers[address]
        return (0,)

    def cudaMemcpy(self, dst, src, nbytes, kind):
        self.calls.append(("memcpy", (kind,), {}))
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=b"Fake GPU\x00\x00")

    def cudaDriverGetVersion(self):
        return 0, 12040


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def cudart(monkeypatch, calls) -> FakeCudart:
    fake = FakeCudart(calls)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=None))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=fake))
    return fake


# --- TensorRT / IxRT ------------------------------------------------------------------------

def _shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, *(ITEM_SHAPE if name == "input" else OUTPUT_ITEM_SHAPES[name]))


def _device_array(address: int, shape) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * math.prod(shape)).from_address(address)).reshape(shape)


def network_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """What the fake network computes."""
    return {"sum": x.sum(axis=(1, 2, 3))[:, None], "corner": x[:, :, 0, 0]}


class FakeEngine:
    """A tensor-API engine of the fake network for batches 1…MAX_BATCH."""

    num_io_tensors = len(IO_NAMES)

    def __init__(self, calls: list):
        self.calls = calls

    def get_tensor_name(self, index):
        return IO_NAMES[index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def get_tensor_shape(self, name):
        return _shape(name, -1)

    def get_tensor_profile_shape(self, name, profile):
        return [_shape(name, 1), _shape(name, MAX_BATCH), _shape(name, MAX_BATCH)]

    def create_execution_context(self):
        return FakeContext(self.calls)


class FakeBindingEngine(FakeEngine):
    """An older IxRT engine: the binding API besides the tensor API (the adapter must pick it)."""

    num_bindings = len(IO_NAMES)

    def binding_is_input(self, index):
        return index == 0

    def get_binding_name(self, index):
        return IO_NAMES[index]

    def get_binding_dtype(self, index):
        return "FLOAT"

    def get_binding_shape(self, index):
        return _shape(IO_NAMES[index], -1)

    def get_profile_shape(self, profile, index):
        return self.get_tensor_profile_shape(IO_NAMES[index], profile)


class FakeContext:
    """Runs the fake network on fake device memory, recording the calls that drive it."""

    def __init__(self, calls: list):
        self.calls, self.batch, self.addresses = calls, None, {}

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", (name, shape), {}))
        self.batch = shape[0]
        return True

    def set_binding_shape(self, index, shape):
        self.calls.append(("set_binding_shape", (index, shape), {}))
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return _shape(name, self.batch)

    def get_binding_shape(self, index):
        return _shape(IO_NAMES[index], self.batch)

    def set_tensor_address(self, name, address):
        self.calls.append(("set_tensor_address", (name,), {}))
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3", (stream,), {}))
        self._compute(self.addresses)
        return True

    def execute_v2(self, bindings):
        self.calls.append(("execute_v2", (), {}))
        self._compute(dict(zip(IO_NAMES, bindings)))
        return True

    def _compute(self, addresses):
        x = _device_array(addresses["input"], _shape("input", self.batch))
        for name, value in network_outputs(x).items():
            _device_array(addresses[name], value.shape)[...] = value


class Dims(tuple):
    """``trt.Dims`` (a distinct type, so the tests see where the adapter used it)."""


def make_trt(calls: list, root, engine: FakeEngine, ixrt: bool) -> types.ModuleType:
    """A fake TensorRT-compatible module; an IxRT one sits beside ``lib/libixrt_plugin.so``."""
    package = root / ("ixrt" if ixrt else "tensorrt")
    (package / "lib").mkdir(parents=True)
    if ixrt:
        (package / "lib" / "libixrt_plugin.so").touch()
    trt = types.ModuleType("tensorrt")
    trt.__file__, trt.__version__ = str(package / "__init__.py"), "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": "WARNING", "__init__": lambda self, level: None})
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.Dims = Dims
    trt.nptype = lambda dtype: np.float32
    trt.network_input = SimpleNamespace(name="input", shape=(32, *ITEM_SHAPE))  # a fixed-batch ONNX
    network = Fake(calls, "network", get_input=trt.network_input)
    builder = Fake(calls, "builder", create_network=network, create_builder_config=Fake(calls, "config"),
                   create_optimization_profile=Fake(calls, "profile"), build_serialized_network=b"plan")
    trt.Builder = lambda logger: builder
    trt.OnnxParser = lambda network, logger: Fake(calls, "parser", parse_from_file=True)
    trt.Runtime = lambda logger: Fake(calls, "runtime", deserialize_cuda_engine=engine)
    trt.init_libnvinfer_plugins = lambda logger, namespace: calls.append(("init_plugins", (namespace,), {}))
    return trt


@pytest.fixture
def source(nano_spec, tmp_path) -> ModelSource:
    return ModelSource(nano_spec, None, tmp_path / "model.onnx")


def _check_round_trip(engine, calls: list, copy_calls: list[str], execute: str) -> None:
    """infer on 2 images: shape set, copies and execute in order, outputs right; then
    infer_compute runs the engine alone; an oversized batch is refused before any copy."""
    x = np.random.default_rng(0).normal(size=(2, *ITEM_SHAPE)).astype(np.float32)
    del calls[:]
    outputs = engine.infer(x)
    assert [call for call, *_ in calls] == copy_calls
    for name, value in network_outputs(x).items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-6)
    del calls[:]
    engine.infer_compute()
    assert [call for call, *_ in calls] == [execute]
    with pytest.raises(ValueError, match=f"1…{MAX_BATCH}"):
        engine.infer(np.zeros((MAX_BATCH + 1, *ITEM_SHAPE), np.float32))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_makes_batch_dynamic_with_a_profile(precision, calls, source, tmp_path, monkeypatch):
    trt = make_trt(calls, tmp_path, FakeEngine(calls), ixrt=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = tmp_path / "model.engine"
    get_backend("tensorrt").build(source, precision, 32, out)
    assert out.read_bytes() == b"plan"
    assert called(calls, "builder.create_network") == [((0,), {})]
    assert called(calls, "parser.parse_from_file") == [((str(source.onnx),), {})]
    assert called(calls, "config.set_memory_pool_limit") == [(("WORKSPACE", 1 << 30), {})]
    assert called(calls, "config.set_flag") == ([(("FP16",), {})] if precision == "fp16" else [])
    assert called(calls, "config.clear_flag") == ([(("TF32",), {})] if precision == "fp32" else [])  # on by default
    assert trt.network_input.shape == (-1, *ITEM_SHAPE)
    (args, _), = called(calls, "profile.set_shape")
    assert args == ("input", (1, *ITEM_SHAPE), (32, *ITEM_SHAPE), (32, *ITEM_SHAPE))
    order = [call for call, *_ in calls]
    assert order.index("config.add_optimization_profile") < order.index("builder.build_serialized_network")


def test_tensorrt_11_without_weakly_typed_fp16_skips_fp16_with_the_reason(calls, tmp_path, monkeypatch):
    trt = make_trt(calls, tmp_path, FakeEngine(calls), ixrt=False)
    trt.__version__, trt.BuilderFlag = "11.0.0", SimpleNamespace(TF32="TF32")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    backend = get_backend("tensorrt")
    assert backend.unsupported_reason("fp16").startswith("TensorRT 11.0.0 has no weakly typed FP16 (BuilderFlag.FP16")
    assert backend.unsupported_reason("fp32") is None


def test_a_failed_tensorrt_build_leaves_naming_the_onnx_to_its_caller(calls, source, tmp_path, monkeypatch):
    """open_engine says '<onnx>: building the tensorrt fp16 engine failed: <this>': the file once."""
    trt = make_trt(calls, tmp_path, FakeEngine(calls), ixrt=False)
    trt.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: False, num_errors=1,
                                                             get_error=lambda i: "unsupported op Foo")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(RuntimeError, match="^the ONNX parser failed: unsupported op Foo$"):
        get_backend("tensorrt").build(source, "fp16", 32, tmp_path / "model.engine")


def test_tensorrt_engine_uses_the_tensor_api_and_frees_its_buffers(calls, cudart, source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(calls, tmp_path, FakeEngine(calls), ixrt=False))
    (tmp_path / "model.engine").write_bytes(b"plan")
    engine = get_backend("tensorrt").load(source, tmp_path / "model.engine", "fp16", 32)
    assert called(calls, "runtime.deserialize_cuda_engine") == [((b"plan",), {})]
    assert ("set_input_shape", ("input", (MAX_BATCH, *ITEM_SHAPE)), {}) in calls  # buffers sized for the max
    assert len(cudart.buffers) == len(IO_NAMES)
    _check_round_trip(engine, calls, ["set_input_shape", "memcpy", "execute_async_v3", "memcpy", "memcpy"],
                      "execute_async_v3")
    assert engine.describe() == {"precision": "fp16", "io_api": "tensor", "max_batch": MAX_BATCH}
    engine.close()
    assert cudart.buffers == {}


@pytest.mark.parametrize("engine_type, api, execute", [(FakeBindingEngine, "binding", "execute_v2"),
                                                       (FakeEngine, "tensor", "execute_async_v3")])
def test_ixrt_loads_plugins_and_picks_its_io_api(engine_type, api, execute, calls, cudart, source,
                                                 tmp_path, monkeypatch):
    trt = make_trt(calls, tmp_path, engine_type(calls), ixrt=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # the IxRT wheel installs `tensorrt` and `ixrt`
    monkeypatch.setattr(ctypes, "CDLL", lambda path: calls.append(("CDLL", (path,), {})))
    backend = get_backend("ixrt")
    backend.build(source, "fp16", 32, tmp_path / "model.engine")
    plugin = str(tmp_path / "ixrt" / "lib" / "libixrt_plugin.so")
    assert calls[:2] == [("CDLL", (plugin,), {}), ("init_plugins", ("",), {})]
    assert called(calls, "builder.create_network") == [((1 << 0,), {})]  # 1 << EXPLICIT_BATCH
    assert called(calls, "config.set_flag") == [(("FP16",), {})]
    (args, _), = called(calls, "profile.set_shape")
    assert [type(dims) for dims in args[1:]] == [Dims] * 3
    assert args[1:] == ((1, *ITEM_SHAPE), (32, *ITEM_SHAPE), (32, *ITEM_SHAPE))

    engine = backend.load(source, tmp_path / "model.engine", "fp16", 32)
    set_shape = "set_binding_shape" if api == "binding" else "set_input_shape"
    _check_round_trip(engine, calls, [set_shape, "memcpy", execute, "memcpy", "memcpy"], execute)
    assert engine.describe()["io_api"] == api
    engine.close()
    assert cudart.buffers == {}


def test_ixrt_and_tensorrt_tell_the_two_sdks_apart(calls, cudart, tmp_path, monkeypatch):
    ixrt = make_trt(calls, tmp_path, FakeEngine(calls), ixrt=True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "ixrt", ixrt)
    assert get_backend("ixrt").available() == (True, "10.3.0")  # found as `ixrt`
    monkeypatch.setitem(sys.modules, "tensorrt", ixrt)
    ok, why = get_backend("tensorrt").available()
    assert not ok and "ixrt backend" in why
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(calls, tmp_path, FakeEngine(calls), ixrt=False))
    monkeypatch.setitem(sys.modules, "ixrt", None)
    assert get_backend("tensorrt").available() == (True, "10.3.0")
    ok, why = get_backend("ixrt").available()
    assert not ok and "IXUCA" in why


# --- IGIE (TVM) -------------------------------------------------------------------------------

@pytest.fixture
def tvm(calls, monkeypatch) -> types.ModuleType:
    """A fake IGIE ``tvm``; its graph module returns output ``i`` filled with ``i``."""
    target = SimpleNamespace(kind=SimpleNamespace(name="iluvatar"))
    device = Fake(calls, "device")
    device.device_name = "Iluvatar MR-V100"
    graph = Fake(calls, "module", get_output=lambda i: SimpleNamespace(
        asnumpy=lambda: np.full((32, 1), i, np.float32)))
    tvm = types.ModuleType("tvm")
    tvm.__version__, tvm.__file__ = "0.12.dev0", "/sdk/tvm/__init__.py"
    tvm.target = Fake(calls, "target", iluvatar=target)
    tvm.device = lambda kind, index: device
    tvm.nd = SimpleNamespace(array=lambda array, dev: ("ndarray", array.shape))
    tvm.relay = Fake(calls, "relay", build=Fake(calls, "lib"))
    tvm.relay.frontend = Fake(calls, "frontend", from_onnx=("mod", "params"))
    tvm.runtime = Fake(calls, "runtime", load_module={"default": lambda dev: "factory"})
    graph_executor = Fake(calls, "graph_executor", GraphModule=graph)
    tvm.contrib = SimpleNamespace(graph_executor=graph_executor)
    for name, module in {"tvm": tvm, "tvm.relay": tvm.relay, "tvm.contrib": tvm.contrib,
                         "tvm.contrib.graph_executor": graph_executor}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return tvm


@pytest.fixture
def onnx_source(nano_spec, tmp_path) -> ModelSource:
    """A tiny ONNX with RTMDet's input and output names (IGIE reads them from the file)."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], [name]) for name in OUTPUT_NAMES], "io",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 320, 320])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in OUTPUT_NAMES])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return ModelSource(nano_spec, None, path)


def test_igie_builds_for_a_fixed_shape_in_fp16(tvm, calls, onnx_source, tmp_path):
    out = tmp_path / "model.so"
    get_backend("igie").build(onnx_source, "fp16", 32, out)
    (_, kwargs), = called(calls, "frontend.from_onnx")
    assert kwargs == {"shape": {"input": (32, 3, 320, 320)}, "freeze_params": True}
    assert called(calls, "target.iluvatar") == [((), {"model": "MR", "options": "-libs=cudnn,cublas,ixinfer"})]
    (args, kwargs), = called(calls, "relay.build")
    assert args == ("mod",) and kwargs == {"target": tvm.target.iluvatar(), "params": "params", "precision": "fp16"}
    assert called(calls, "lib.export_library") == [((str(out),), {})]


def test_igie_engine_runs_the_graph_module(tvm, calls, onnx_source, tmp_path):
    engine = get_backend("igie").load(onnx_source, tmp_path / "model.so", "fp16", 32)
    assert called(calls, "runtime.load_module") == [((str(tmp_path / "model.so"),), {})]
    assert called(calls, "graph_executor.GraphModule") == [(("factory",), {})]
    del calls[:]
    outputs = engine.infer(np.zeros((32, 3, 320, 320), np.float32))
    assert [call for call, *_ in calls] == ["module.set_input", "module.run"] + ["module.get_output"] * 6
    assert called(calls, "module.set_input") == [(("input", ("ndarray", (32, 3, 320, 320))), {})]
    assert list(outputs) == list(OUTPUT_NAMES)
    assert [int(outputs[name][0, 0]) for name in OUTPUT_NAMES] == list(range(6))  # ONNX output order
    del calls[:]
    engine.infer_compute()
    assert [call for call, *_ in calls] == ["module.run", "device.sync"]
    with pytest.raises(ValueError, match="one engine per batch size"):
        engine.infer(np.zeros((7, 3, 320, 320), np.float32))


# --- engine cache keys ------------------------------------------------------------------------

def test_a_gpu_driver_upgrade_rebuilds_every_vendor_engine(calls, cudart, tvm, tmp_path, monkeypatch):
    """The kernel module's version, as Linux shows it, is in each key: Iluvatar has no NVML, and
    TensorRT's cudaDriverGetVersion is the CUDA API level, the same across driver releases."""
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(calls, tmp_path / "nv", FakeEngine(calls), ixrt=False))
    monkeypatch.setitem(sys.modules, "ixrt", make_trt(calls, tmp_path / "ix", FakeEngine(calls), ixrt=True))
    monkeypatch.setattr(hostinfo, "SYS_MODULE", tmp_path / "sys-module")

    def keys_with(versions: dict[str, str]) -> list[dict]:
        for module, version in versions.items():
            (tmp_path / "sys-module" / module).mkdir(parents=True, exist_ok=True)
            (tmp_path / "sys-module" / module / "version").write_text(version + "\n")
        return [get_backend(name).build_key("fp16", 32) for name in ("tensorrt", "ixrt", "igie")]

    before = keys_with({"nvidia": "580.95.05", "iluvatar": "4.3.0"})
    assert all(key["kernel_driver.nvidia"] == "580.95.05" and key["kernel_driver.iluvatar"] == "4.3.0"
               for key in before)
    after = keys_with({"nvidia": "580.105.08", "iluvatar": "4.3.8"})
    assert all(old != new for old, new in zip(before, after))
    assert hostinfo.machine_fingerprint()["kernel_driver.iluvatar"] == "4.3.8"  # results say so too


def test_onnxruntime_saves_its_optimized_graph_without_tensorrts_provider(nano_spec, tmp_path, monkeypatch):
    """ORT cannot save a graph of TensorRT-compiled nodes; the provider compiles them at load."""
    import onnxruntime

    sessions = []
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda model, options, providers: sessions.append(providers))
    source = ModelSource(nano_spec, None, tmp_path / "model.onnx")
    source.onnx.write_bytes(b"graph")
    get_backend("onnxruntime").build(source, "fp32", 32, tmp_path / "model.ort.onnx")
    assert sessions == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
