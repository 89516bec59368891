"""The machine facts every benchmark prints next to its numbers."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
from pathlib import Path

import chromadb

import sharded_chroma


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "unknown"


def machine_info(**extra: str) -> dict[str, str]:
    """CPU model, cores, memory, versions and the load average now, plus ``extra``."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    memory = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if match:
            memory = f"{int(match.group(1)) / 2**20:.1f} GiB"
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": model,
        "cores": f"{os.cpu_count()} (usable {usable})",
        "memory": memory,
        "python": platform.python_version(),
        "chromadb": chromadb.__version__,
        "sharded_chroma": sharded_chroma.__version__,
        **extra,
        "platform": platform.platform(),
        "load average at start": load_average(),
    }
