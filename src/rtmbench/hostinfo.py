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
