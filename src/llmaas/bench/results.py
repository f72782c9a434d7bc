"""What every benchmark writes beside its figures: the machine they were measured on, and the JSON file itself.

Owns the machine record (the CPU as /proc/cpuinfo names it, with family/model and SIMD flags, since CPUs of one kind
of machine differ) and writing a result as indented JSON, announcing the path. Ignores what the results mean.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    """What the numbers were measured on: the CPU as /proc/cpuinfo names it (family/model tell the generation)."""
    import torch

    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    simd = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
    return {"cpu": info.get("model name", platform.processor()), "cpu_family": info.get("cpu family"),
            "cpu_model": info.get("model"), "cpu_mhz": info.get("cpu MHz"), "simd": simd, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def write_json(result: dict, path: Path, indent: int = 2) -> None:
    """The result as JSON at `path` (its folder made if need be), and a line saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {path}")
