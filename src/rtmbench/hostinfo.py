"""Facts about this machine that results are keyed and reported by."""

from __future__ import annotations

import functools
import platform


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
