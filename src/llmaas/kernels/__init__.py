"""Build and load llmaas's native CPU kernels (csrc/kernels.cpp) once, cached on disk.

Owns the compile step: the extension is compiled with torch's cpp_extension on first use (about a minute on two
cores) into `$LLMAAS_CACHE/kernels/<hash>` (default `~/.cache/llmaas`), keyed by the source, the flags and the torch
version, so later starts load it in well under a second. Ignores how the kernels are used; callers that cannot get
them fall back to the dense PyTorch path, which is always available.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from llmaas.errors import KernelBuildError

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
# -fopenmp compiles at::parallel_for's inline OpenMP region; nothing extra is linked, so it binds to the libgomp
# that torch already loaded (two OpenMP runtimes would fight over the two cores).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


def cache_dir() -> Path:
    """Root of llmaas's rebuildable caches (kernels, profiles); `$LLMAAS_CACHE` overrides it."""
    if "LLMAAS_CACHE" in os.environ:
        return Path(os.environ["LLMAAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmaas"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def load_kernels() -> ModuleType:
    """The compiled kernel module; raises KernelBuildError (with the reason) if this machine cannot build it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelBuildError(f"native kernels need x86-64 with AVX2; this is {platform.machine()}")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise KernelBuildError(f"native kernels need CPU features {missing}, which this CPU lacks")
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode())
    name = f"llmaas_kernels_{digest.hexdigest()[:12]}"
    build_dir = cache_dir() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        print(f"llmaas: compiling native kernels once into {build_dir} (about a minute)...", file=sys.stderr,
              flush=True)
    try:
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                                  build_directory=str(build_dir), verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:  # compiler missing, build failure, bad .so
        raise KernelBuildError(
            f"could not build llmaas's native kernels ({exc}); install a C++ compiler (g++) and ninja, or run "
            "with the dense PyTorch path"
        ) from exc
