"""The machine line every benchmark prints: CPU model, cores, load, Python and the libraries that matter."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_line(**versions: str) -> str:
    """`machine: CPU, N cores (M usable), load a/b/c; Python x, lib y, ..., OS release`."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    libs = "".join(f", {name} {version}" for name, version in versions.items())
    return (
        f"machine: {model}, {os.cpu_count()} cores ({usable} usable), load {load}; "
        f"Python {platform.python_version()}{libs}; {platform.system()} {platform.release()}"
    )
