"""PyTorch on an NVIDIA GPU: the model in FP32 / FP16 / BF16, BatchNorms folded into the convs,
channels_last, replayed as a CUDA graph.

The GPU engine that runs wherever PyTorch sees an NVIDIA GPU, with no vendor SDK. The CPU
``torch`` backend stays the FP32 reference; here FP32 means FP32: TF32 is switched off for cuDNN
convolutions and matmuls (with it on, head maps move by 15 % of their range on the ill-conditioned
mmdet reference checkpoint).

- compute (``infer_compute``): replay of the captured graph on the device-resident input,
  synchronized, so a wall-clock timer measures the GPU's work;
- end to end (``infer``): a host float32 batch copied in (straight from pinned memory when it
  comes from ``new_batch``, else staged through a pinned buffer), the replay, the outputs copied
  back through pinned memory.

``torch-cuda-compile`` adds a build step: ``torch.compile`` (mode ``COMPILE_MODE``) whose Inductor
cache lives in rtmbench's cache under a key of torch, CUDA, driver and GPU; the compile time is
reported in ``describe()``, never timed as throughput.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from ..errors import RtmbenchError
from ..hostinfo import driver_version, gpu_kernel_drivers
from .base import Backend, BackendUnavailable, Engine, ModelSource

log = logging.getLogger(__name__)

DEVICE_ENV = "RTMBENCH_CUDA_DEVICE"  # which GPU (index), default 0
COMPILE_MODE = "default"  # + the engine's own CUDA graph around it = mode "reduce-overhead"
GRAPH_WARMUP_CALLS = 3
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"torch is not installed ({exc}); {TorchCudaBackend.install_hint}") from None
    return torch


def cuda_unavailable_reason(torch) -> str | None:
    """Why this torch cannot run on an NVIDIA GPU here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA); {TorchCudaBackend.install_hint}"
    if not torch.cuda.is_available():
        return f"no NVIDIA GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def device_index(count: int, env: dict | None = None) -> int:
    """The GPU to use: ``$RTMBENCH_CUDA_DEVICE`` (an index below ``count``), default 0."""
    raw = (os.environ if env is None else env).get(DEVICE_ENV, "0")
    try:
        index = int(raw)
    except ValueError:
        raise RtmbenchError(f"{DEVICE_ENV}={raw!r}: not a GPU index") from None
    if not 0 <= index < count:
        raise RtmbenchError(f"{DEVICE_ENV}={index}: no such GPU (this machine has {count})")
    return index


@functools.cache
def platform(index: int) -> dict:
    """What a driver-upgrade gate compares: GPU name, driver, CUDA runtime, cuDNN, torch."""
    torch = _torch()
    cudnn = torch.backends.cudnn.version()
    return {"gpu": torch.cuda.get_device_name(index), "driver": driver_version(),
            "cuda_runtime": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
            "torch": str(torch.__version__)}


def set_fp32_math(torch, precision: str) -> None:
    """FP32 engines compute in true FP32: TF32 off for cuDNN and matmul (process-wide)."""
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class TorchCudaEngine(Engine):
    """One precision on one GPU; a CUDA graph per batch size, captured on first use."""

    def __init__(self, model, precision: str, device: str):
        super().__init__(precision)
        torch = self._torch = _torch()
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)  # graph capture and replay use the current device's streams
        self.dtype = getattr(torch, _DTYPES[precision])
        set_fp32_math(torch, precision)
        torch.backends.cudnn.benchmark = True
        from ..model.blocks import fuse_batchnorms

        self.model = fuse_batchnorms(model.eval()).to(self.device, self.dtype, memory_format=torch.channels_last)
        self.compile_seconds: float | None = None  # set by the compiled backend's build
        self.postprocess_device = str(self.device)
        self._graphs: dict[tuple, tuple] = {}  # input shape → graph, its buffers, output shapes
        self._pinned = weakref.WeakValueDictionary()  # address → pinned tensor of a batch buffer, while in use
        self._current = None

    def _capture(self, shape: tuple):
        """Graph of model(static input) writing all six outputs, as float32, into one flat
        buffer: one copy back to the host per batch."""
        torch = self._torch
        static_in = torch.zeros(shape, dtype=self.dtype, device=self.device).contiguous(
            memory_format=torch.channels_last)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_CALLS):  # cuDNN autotuning and allocations happen outside the graph
                outputs = self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        output_shapes = [tuple(out.shape) for out in outputs]
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = torch.cat([out.float().reshape(shape[0], -1) for out in self.model(static_in)], dim=1)
        host_in = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        host_out = torch.empty(static_out.shape, dtype=torch.float32, pin_memory=True)
        return graph, static_in, static_out, host_in, host_out, output_shapes

    def _graph_for(self, shape: tuple):
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(shape)
        return self._graphs[shape]

    def warm_up(self, shape: tuple) -> None:
        """Autotune cuDNN and capture the graph for ``shape`` now, so that the first batch of a
        timed loop does not pay for it (seconds, on the first call of each shape)."""
        self._graph_for(shape)

    def _allocate_batch(self, shape: tuple[int, ...]) -> np.ndarray:
        """Pinned host memory."""
        array = self._torch.empty(shape, dtype=self._torch.float32, pin_memory=True).numpy()
        self._pinned[array.ctypes.data] = array.base  # the tensor the array (and its views) keep alive
        return array

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        graph, static_in, _, host_in, *_ = self._current = self._graph_for(batch.shape)
        source = self._pinned.get(batch.ctypes.data)
        if source is None or tuple(source.shape) != batch.shape:
            host_in.numpy()[...] = batch  # pageable memory: staged through pinned memory
            source = host_in
        static_in.copy_(source.to(self.device, non_blocking=True))
        graph.replay()
        return self._outputs_to_host()  # synchronizes: the source buffer is free again

    def _outputs_to_host(self) -> dict[str, np.ndarray]:
        """The current graph's outputs, copied back in one transfer and split by name."""
        from ..model import OUTPUT_NAMES

        _, _, static_out, _, host_out, output_shapes = self._current
        host_out.copy_(static_out, non_blocking=True)
        self._torch.cuda.current_stream(self.device).synchronize()
        flat = host_out.numpy()
        outputs, offset = {}, 0
        for name, out_shape in zip(OUTPUT_NAMES, output_shapes):
            size = int(np.prod(out_shape[1:]))
            # Copies: the caller may still read these while the next batch runs.
            outputs[name] = flat[:, offset:offset + size].reshape(out_shape).copy()
            offset += size
        return outputs

    def _run_compute(self) -> None:
        self._current[0].replay()
        self._torch.cuda.current_stream(self.device).synchronize()

    def last_outputs(self) -> dict[str, np.ndarray]:
        return self._outputs_to_host()  # what the latest replay left in the graph's buffer

    def describe(self) -> dict:
        torch = self._torch
        return {**super().describe(), "platform": platform(self.device.index), "gpu_index": self.device.index,
                "gpu_uuid": f"GPU-{torch.cuda.get_device_properties(self.device).uuid}",  # NVML's name for it
                "cuda_graph": True,
                "channels_last": True, "batchnorm_folded": True,
                # the flag is process-wide: fp32 engines turn it off, and fp16/bf16 convolutions never use TF32
                "tf32": bool(torch.backends.cudnn.allow_tf32) if self.precision == "fp32" else None,
                "compile_seconds": self.compile_seconds}

    def close(self) -> None:
        super().close()
        self._graphs.clear()
        self._current = None


@contextlib.contextmanager
def compile_caches_in(directory: Path):
    """Inductor's and Triton's on-disk caches in ``directory`` while the block runs, as they were
    after. Both are set: torch derives Triton's from Inductor's only the first time it needs it."""
    names = {"TORCHINDUCTOR_CACHE_DIR": directory, "TRITON_CACHE_DIR": directory / "triton"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(path) for name, path in names.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    precisions = ("fp32", "fp16", "bf16")
    artifact_suffix = None
    runs_onnx = False
    install_hint = ("needs an NVIDIA GPU and a CUDA build of torch (pip install torch from the "
                    "PyTorch CUDA index; this project pins the CPU build for CI)")

    @classmethod
    def sdk_version(cls) -> str:
        torch = _torch()
        if (why := cuda_unavailable_reason(torch)) is not None:
            raise BackendUnavailable(why)
        return str(torch.__version__)

    def _device(self) -> str:
        return f"cuda:{device_index(_torch().cuda.device_count())}"

    def supported_precisions(self) -> tuple[str, ...]:
        torch = _torch()
        with torch.cuda.device(torch.device(self._device())):
            bf16 = torch.cuda.is_bf16_supported()
        return tuple(p for p in self.precisions if p != "bf16" or bf16)

    def device(self) -> str:
        return platform(_torch().device(self._device()).index)["gpu"]

    def build_key(self, precision: str, batch: int) -> dict:
        index = _torch().device(self._device()).index
        # the kernel module's version too, as the vendor backends' keys: NVML's may be missing
        return {**super().build_key(precision, batch), **platform(index), **gpu_kernel_drivers()}

    def _model(self, source: ModelSource):
        from ..checkpoint import load_weights
        from ..model import RTMDet

        model = RTMDet(source.spec)
        if source.weights is not None:
            load_weights(model, source.weights)
        return model

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        self.check_precision(precision)
        engine = TorchCudaEngine(self._model(source), precision, self._device())
        engine.warm_up((batch, 3, *source.spec.input_size))
        return engine


class TorchCudaCompiledBackend(TorchCudaBackend):
    """``torch.compile`` inside the CUDA graph. The artifact is Inductor's cache directory."""

    name = "torch-cuda-compile"
    artifact_suffix = ".inductor"
    _built: tuple | None = None  # (precision, batch, engine) compiled by build() in this process

    def build_key(self, precision: str, batch: int) -> dict:
        return {**super().build_key(precision, batch), "compile_mode": COMPILE_MODE}

    def _compiled_engine(self, source: ModelSource, precision: str, batch: int, cache_dir: Path) -> TorchCudaEngine:
        torch = _torch()
        model = self._model(source)
        start = time.perf_counter()
        engine = TorchCudaEngine(model, precision, self._device())
        with compile_caches_in(cache_dir):
            engine.model = torch.compile(engine.model, mode=COMPILE_MODE, dynamic=False)
            engine.infer(np.zeros((batch, 3, *source.spec.input_size), np.float32))  # compiles and captures
        engine.compile_seconds = time.perf_counter() - start
        return engine

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        self.check_precision(precision)
        out.mkdir()
        engine = self._compiled_engine(source, precision, batch, out)
        (out / "build.json").write_text(json.dumps({"compile_seconds": engine.compile_seconds}))
        self._built = (precision, batch, engine)

    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        self.check_precision(precision)
        built, self._built = self._built, None
        if built is not None and built[:2] == (precision, batch):
            return built[2]  # just compiled by build(): no second compile
        if artifact is None:
            raise RtmbenchError(f"backend {self.name} needs its build step (the Inductor cache)")
        # compiled from a copy: Inductor writes into the cache it reads, and the artifact must stay as built
        with tempfile.TemporaryDirectory(prefix="rtmbench-inductor-") as scratch:
            engine = self._compiled_engine(source, precision, batch,
                                           shutil.copytree(artifact, Path(scratch) / artifact.name))
        log.info("%s %s: compiled from the cache in %.1f s (first build: %s s)", self.name, precision,
                 engine.compile_seconds, json.loads((artifact / "build.json").read_text())["compile_seconds"])
        return engine
