"""The engine interface every backend implements, after Polygraphy's runners.

A :class:`Backend` builds an engine artifact from a model source (the ONNX file, or for the
PyTorch reference the checkpoint) and loads it as an :class:`Engine`. Engines take and return
host NumPy arrays; ``infer_compute`` reruns the last input already resident on the device, the
vendors' "compute" timing definition.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import RtmbenchError
from ..model import ModelSpec


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a backend builds from: the model spec, its checkpoint and its exported ONNX file."""

    spec: ModelSpec
    weights: Path | None
    onnx: Path | None


class BackendUnavailable(RuntimeError):
    """The backend's SDK cannot be imported here; the message says how to install it."""


class Engine(abc.ABC):
    """A loaded engine for one precision. Use as a context manager or call :meth:`close`.

    ``postprocess_device``: a torch device that can postprocess this engine's outputs when
    numba is not installed (a GPU engine's own), or None. ``computes_on_host_cores``: the engine's
    work runs on the host CPU, whose cores the detection loop's helper threads then yield to it.
    """

    postprocess_device: str | None = None
    computes_on_host_cores: bool = False

    def __init__(self, precision: str):
        self.precision = precision
        self._last_input: np.ndarray | None = None
        self._latest: dict[str, np.ndarray] | None = None  # host outputs of the latest call, if kept
        self._spare_batches: dict[tuple[int, ...], list[np.ndarray]] = {}  # by shape, from recycle_batch

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (float32[B, 3, H, W], host) and return host outputs by name."""

    def new_batch(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialized float32 host buffer for one input batch, in the memory this engine
        reads fastest (a GPU engine: pinned, copied to the device with no staging copy): one
        handed back by :meth:`recycle_batch`, else a new one. Allocating costs: the kernel
        zeroes a new buffer's pages as they are first written (39 MB: 3 ms here, 88 ms in
        memory this VM had not used before), and pinning 39 MB took 15-19 ms on the H200's
        host; new buffers are written once as they are allocated, so that this is paid in
        :meth:`reserve_batches`, before a clock starts, not at their first use."""
        try:
            return self._spare_batches[tuple(shape)].pop()
        except (KeyError, IndexError):
            return self._allocate_batch(tuple(shape))

    def recycle_batch(self, batch: np.ndarray) -> None:
        """Hand back a buffer from :meth:`new_batch` that nothing reads any more, for reuse."""
        self._spare_batches.setdefault(batch.shape, []).append(batch)

    def reserve_batches(self, shape: tuple[int, ...], count: int) -> None:
        """Have ``count`` buffers of ``shape`` ready for :meth:`new_batch`, allocating the missing
        ones now (before a clock starts, not inside it)."""
        for batch in [self.new_batch(shape) for _ in range(count)]:
            self.recycle_batch(batch)

    def _allocate_batch(self, shape: tuple[int, ...]) -> np.ndarray:
        batch = np.empty(shape, np.float32)
        batch.fill(0)  # its page faults now (np.zeros would defer them to the first write)
        return batch

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """End to end: host batch in, host outputs out (any device copies included)."""
        self._last_input = np.ascontiguousarray(batch, dtype=np.float32)
        self._latest = self._run(self._last_input)
        return self._latest

    def infer_compute(self) -> None:
        """Rerun the last :meth:`infer` input with inputs and outputs left on the device."""
        if self._last_input is None:
            raise RuntimeError("infer_compute() needs one infer() call first to stage its input")
        self._latest = None
        self._run_compute()

    def _run_compute(self) -> None:
        """The engine call alone. CPU engines read the host input in place, so this is
        ``_run``; device backends override it to skip the copies."""
        self._latest = self._run(self._last_input)

    def last_outputs(self) -> dict[str, np.ndarray]:
        """Host outputs of the latest call (:meth:`infer` or :meth:`infer_compute`): what the
        perf gate checks after timing. Device backends read their output buffers back; one that
        does not runs the staged input once more end to end."""
        if self._latest is None:
            self._latest = self._run(self._last_input)
        return self._latest

    def describe(self) -> dict:
        """Precision actually used and engine details; backends add their own keys."""
        return {"precision": self.precision}

    def close(self) -> None:
        """Release the engine's resources (subclasses call this too)."""
        self._spare_batches.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend(abc.ABC):
    """Builds and loads engines of one inference SDK. Subclasses import the SDK lazily."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    artifact_suffix: ClassVar[str | None] = ".engine"  # None: nothing to build or cache
    runs_onnx: ClassVar[bool] = True  # False: the engine is made from the weights, never from an ONNX file
    build_modules: ClassVar[tuple[str, ...]] = ()  # besides the backend's own module, those whose code builds it
    install_hint: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def sdk_version(cls) -> str:
        """The SDK's version; raises :class:`BackendUnavailable` when it cannot be imported."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, version) when usable here, else (False, why not and how to fix it)."""
        try:
            return True, cls.sdk_version()
        except BackendUnavailable as exc:
            return False, str(exc)

    def supported_precisions(self) -> tuple[str, ...]:
        """The precisions this machine runs (a subset of ``precisions``, e.g. by CPU features)."""
        return self.precisions

    def unsupported_reason(self, precision: str) -> str | None:
        """Why ``precision`` cannot run here (None when it can). A configuration that names no
        device raises instead: that is an error to fix, not a case to skip."""
        if precision not in self.precisions:
            return f"backend {self.name} supports precisions {', '.join(self.precisions)}, not {precision!r}"
        here = self.supported_precisions()
        if precision not in here:
            return f"backend {self.name} cannot run {precision} on {self.device()} (runs {', '.join(here)} here)"
        return None

    def check_precision(self, precision: str) -> None:
        if (why := self.unsupported_reason(precision)) is not None:
            raise RtmbenchError(why)

    def device(self) -> str:
        """Human-readable device name the engines run on."""
        from ..hostinfo import cpu_name

        return cpu_name()

    def build_key(self, precision: str, batch: int) -> dict:
        """Everything besides the model that the artifact depends on (hashed into the cache key),
        the source of the code that builds it included."""
        from ..cache import source_digest

        return {"backend": self.name, "version": self.sdk_version(), "device": self.device(),
                "precision": precision, "batch": batch,
                "code": source_digest(type(self).__module__, *self.build_modules)}

    def build(self, source: ModelSource, precision: str, batch: int, out: Path) -> None:
        """Write the engine artifact to ``out`` (backends with ``artifact_suffix`` set)."""
        raise NotImplementedError(f"backend {self.name} has no build step")

    @abc.abstractmethod
    def load(self, source: ModelSource, artifact: Path | None, precision: str, batch: int) -> Engine:
        """Load an engine from ``artifact`` (or from ``source`` when nothing is built)."""

    def describe(self) -> dict:
        return {"backend": self.name, "version": self.sdk_version(), "device": self.device()}
