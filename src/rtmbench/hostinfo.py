"""Facts about this machine that results are keyed and reported by."""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path


@functools.cache
def cpu_name() -> str:
    """The CPU model name (e.g. 'AMD EPYC 9R14 96-Core Processor'), or the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that change results (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("rtmbench", "torch", "numpy", "opencv-python-headless", "onnx", "onnxsim", "onnxruntime",
             "onnxruntime-gpu", "openvino", "pycocotools", "faster-coco-eval")
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


FINGERPRINT_PREFIX = "machine."  # versions keys that identify the machine, not its software
BENIGN_CLOCK_REASONS = {"gpu_idle", "applications_clocks_setting", "display_clock_setting"}
CLOCK_REASONS = {  # NVML's clocks-event (throttle) reason bits
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def _nvml(nvml=None):
    """An initialized NVML module (nvidia-ml-py's ``pynvml``; ``nvml`` replaces it in tests), or
    None where there is none. The caller shuts it down."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …: no NVIDIA driver here
        return None
    return nvml


@contextlib.contextmanager
def nvml_session(nvml=None):
    """NVML initialized for the ``with`` block, or None where there is none."""
    nvml = _nvml(nvml)
    try:
        yield nvml
    finally:
        if nvml is not None:
            nvml.nvmlShutdown()


def nvml_text(value) -> str:
    """NVML strings are bytes in older nvidia-ml-py releases, str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_version(nvml=None) -> str | None:
    """The NVIDIA driver version from NVML (nvidia-ml-py), or None where there is no driver."""
    with nvml_session(nvml) as nvml:
        return None if nvml is None else _driver_version(nvml)


def _driver_version(nvml) -> str:
    return nvml_text(nvml.nvmlSystemGetDriverVersion())


GPU_KERNEL_MODULES = ("nvidia", "iluvatar")  # the GPU drivers' Linux kernel modules: NVIDIA's, Iluvatar CoreX's
SYS_MODULE = Path("/sys/module")


def gpu_kernel_drivers() -> dict[str, str]:
    """{``kernel_driver.<module>``: version} of the GPU drivers loaded here, as Linux shows every
    module that declares a version: what a driver upgrade changes, whichever SDK (an Iluvatar
    machine has no NVML to ask). Empty where none is loaded."""
    versions = {}
    for module in GPU_KERNEL_MODULES:
        with contextlib.suppress(OSError):
            versions[f"kernel_driver.{module}"] = (SYS_MODULE / module / "version").read_text().strip()
    return versions


def machine_fingerprint(nvml=None) -> dict[str, object]:
    """What identifies this machine in a results row (keys start with ``machine.``): CPU model,
    cores this process may use, memory, and per NVIDIA GPU its name, power limit, application
    clocks and persistence mode. Driver and CUDA versions are software, keyed ``driver``,
    ``cuda_driver`` and ``kernel_driver.*``: a driver upgrade on the same machine is what a
    comparison is for."""
    import os

    fingerprint: dict[str, object] = {
        f"{FINGERPRINT_PREFIX}cpu": cpu_name(), f"{FINGERPRINT_PREFIX}cores": len(os.sched_getaffinity(0)),
        f"{FINGERPRINT_PREFIX}memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        **gpu_kernel_drivers()}
    with nvml_session(nvml) as nvml:
        if nvml is None:
            return fingerprint
        fingerprint["driver"] = _driver_version(nvml)
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        fingerprint["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(nvml.nvmlDeviceGetCount()):
            gpu = nvml.nvmlDeviceGetHandleByIndex(index)
            key = f"{FINGERPRINT_PREFIX}gpu{index}"
            fingerprint[key] = nvml_text(nvml.nvmlDeviceGetName(gpu))
            power_limit = _unless_unsupported(nvml, nvml.nvmlDeviceGetPowerManagementLimit, gpu)
            fingerprint[f"{key}.power_limit_w"] = power_limit / 1000 if power_limit is not None else None
            fingerprint[f"{key}.app_clock_sm_mhz"] = _unless_unsupported(
                nvml, nvml.nvmlDeviceGetApplicationsClock, gpu, nvml.NVML_CLOCK_SM)
            persistence = _unless_unsupported(nvml, nvml.nvmlDeviceGetPersistenceMode, gpu)
            fingerprint[f"{key}.persistence"] = bool(persistence) if persistence is not None else None
    return fingerprint


def _unless_unsupported(nvml, query, *args):
    """``query(*args)``, or None where this GPU or platform does not answer it (NVML's "Not
    Supported": application clocks on GeForce cards, persistence mode under WSL); other NVML
    errors (a GPU lost) are raised."""
    try:
        return query(*args)
    except nvml.NVMLError_NotSupported:
        return None


def fingerprint_changes(before: dict, after: dict) -> list[str]:
    """The machine fields (``machine.*``) that differ between two runs' versions."""
    keys = sorted(k for k in {*before, *after} if k.startswith(FINGERPRINT_PREFIX))
    return [f"{k.removeprefix(FINGERPRINT_PREFIX)}: {before.get(k)} → {after.get(k)}"
            for k in keys if before.get(k) != after.get(k)]


class GpuTelemetry:
    """SM clock, temperature and clock-event (throttle) reasons of one GPU, sampled every
    ``interval`` seconds by a background thread while the ``with`` block runs (NVML)."""

    def __init__(self, nvml=None, uuid: str = "", interval: float = 0.05):
        self.nvml, self.uuid, self.interval = nvml, uuid, interval
        self.samples: list[tuple[int, int, int]] = []  # (SM MHz, °C, reason bits)
        self.error: str | None = None  # why sampling stopped early
        self._stop = None
        self._thread = None

    def __enter__(self) -> GpuTelemetry:
        import threading

        if self.nvml is None:
            return self
        nvml = self.nvml
        # Renamed "clocks event reasons" in newer NVML; the old name stays as an alias for a while.
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self._stop = threading.Event()

        def sample() -> None:
            try:
                gpu = nvml.nvmlDeviceGetHandleByUUID(self.uuid.encode())
                while True:
                    self.samples.append((nvml.nvmlDeviceGetClockInfo(gpu, nvml.NVML_CLOCK_SM),
                                         nvml.nvmlDeviceGetTemperature(gpu, nvml.NVML_TEMPERATURE_GPU),
                                         reasons(gpu)))
                    if self._stop.wait(self.interval):
                        return
            except Exception as exc:  # telemetry is a witness, never a reason for a perf case to error
                self.error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=sample, name="rtmbench-gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.nvml.nvmlShutdown()

    @property
    def reasons(self) -> list[str]:
        bits = 0
        for *_, reasons in self.samples:
            bits |= reasons
        return [name for bit, name in CLOCK_REASONS.items() if bits & bit]

    @property
    def throttled(self) -> list[str]:
        """Clock-event reasons seen that slow the GPU down (not idle or a clock setting)."""
        return [r for r in self.reasons if r not in BENIGN_CLOCK_REASONS]

    def verdict_note(self) -> str | None:
        """What a perf verdict's detail says of the GPU while timed: the throttling seen, or that it
        could not be watched; None when nothing slowed it, or for an engine on no GPU."""
        if self.throttled:
            return f"throttled while timed: {', '.join(self.throttled)}"
        if self.error is not None:
            watched = f"after {len(self.samples)} samples" if self.samples else "throttling not checked"
            return f"GPU telemetry failed ({self.error}): {watched}"
        return None

    def summary(self) -> dict | None:
        if not self.samples:
            return None if self.error is None else {"error": self.error}
        clocks = sorted(s[0] for s in self.samples)
        return {"samples": len(self.samples), "error": self.error, "sm_clock_mhz_min": clocks[0],
                "sm_clock_mhz_median": clocks[len(clocks) // 2], "sm_clock_mhz_max": clocks[-1],
                "temperature_c_max": max(s[1] for s in self.samples), "clock_event_reasons": self.reasons}


def gpu_telemetry(engine_description: dict, nvml=None) -> GpuTelemetry:
    """Telemetry of the GPU an engine runs on, found by the UUID its ``describe()`` names in
    ``gpu_uuid`` (CUDA's device index is NVML's only without CUDA_VISIBLE_DEVICES and with the
    same ordering); an engine on no GPU, or a machine without NVML, gets one that samples nothing
    (and a MIG slice, whose NVML UUID starts with MIG-, or a GPU engine where NVML is missing, one
    whose ``error`` says so)."""
    if "gpu_uuid" not in engine_description:
        return GpuTelemetry(None)
    telemetry = GpuTelemetry(_nvml(nvml), engine_description["gpu_uuid"])
    if telemetry.nvml is None:
        telemetry.error = "no NVML here (pip install nvidia-ml-py; it needs the NVIDIA driver)"
    return telemetry
