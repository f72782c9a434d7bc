"""Build and load llmaas's native CPU kernels (csrc/kernels.cpp) once, cached on disk.

Owns the compile step: the extension is compiled with torch's cpp_extension on first use (about a minute on two
cores) into `$LLMAAS_CACHE/kernels/<hash>` (default `~/.cache/llmaas`), keyed by everything the build depends on (see
build_inputs), so later starts load it in well under a second, and says so on stderr whenever it compiles. Ignores how
the kernels are used; callers that cannot get them fall back to the dense PyTorch path, which is always available.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from llmaas.errors import KernelBuildError
from llmaas.paths import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
# Headers the source includes (xxHash 0.8.4, BSD-2-Clause, vendored unchanged: the chunk checksums' own algorithm).
HEADERS = (Path(__file__).with_name("csrc") / "third_party" / "xxhash.h",)
# -fopenmp compiles at::parallel_for's inline OpenMP region; nothing extra is linked, so it binds to the libgomp
# that torch already loaded (two OpenMP runtimes would fight over the two cores).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# The vector units the engine's paths care about, as /proc/cpuinfo names them (shown by `llmaas info`).
NAMED_CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                      "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> dict[str, bool]:
    """Which of NAMED_CPU_FEATURES this CPU has."""
    flags = _cpu_flags()
    return {f: f in flags for f in NAMED_CPU_FEATURES}


def build_inputs() -> dict[str, str]:
    """What a build depends on. torch's cpp_extension writes build.ninja from the torch installation's include and
    library directories, the Python headers, the compiler and the source's absolute path, and ninja rebuilds
    everything when that file changes: two environments sharing one build directory (same torch version, another
    install) rebuilt it on every start, silently (~35 s). So each installation, Python ABI, compiler, machine and
    checkout gets its own directory."""
    return {
        "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "headers": ",".join(hashlib.sha256(h.read_bytes()).hexdigest() for h in HEADERS),
        "source_path": str(SOURCE),  # as build.ninja names it
        "cflags": " ".join(CFLAGS),
        "torch_version": torch.__version__,
        "torch_dir": str(Path(torch.__file__).resolve().parent),
        "python_include": sysconfig.get_path("include", scheme="posix_prefix") or "",
        "python_abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag or "",
        "cxx": os.environ.get("CXX", "c++"),  # the compiler torch's cpp_extension runs
        "ninja": ninja_path() or "",
        "machine": platform.machine(),
    }


def ninja_path() -> str | None:
    """The ninja that builds and checks the kernels: the one installed beside this Python (ninja is one of the
    project's dependencies), else the first on PATH. Fixed, because two ninjas (pip's 1.13 in the virtual environment,
    a system 1.11 found when the environment is not activated) record a build's command differently, and each then
    rebuilt what the other had built (~30 s at every start that alternated, met here)."""
    beside = Path(sys.executable).parent / "ninja"
    return str(beside) if beside.exists() else shutil.which("ninja")


def build_name() -> str:
    """The extension's name, which is also its build directory's: a hash of build_inputs()."""
    digest = hashlib.sha256(json.dumps(build_inputs(), sort_keys=True).encode()).hexdigest()
    return f"llmaas_kernels_{digest[:12]}"


def _is_up_to_date(build_dir: Path) -> bool:
    """Whether ninja would build nothing (it compares the outputs' times with those of the source and the torch
    headers it recorded), so that load() only imports. Any doubt counts as out of date: a needless message beats a
    silent minute."""
    ninja = ninja_path()
    if ninja is None:  # load() fails and says so
        return False
    try:
        dry = subprocess.run([ninja, "-n", "-C", str(build_dir)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no ninja: load() fails and says so
        return False
    return dry.returncode == 0 and "no work to do" in dry.stdout


@functools.cache
def load_kernels() -> ModuleType:
    """The compiled kernel module; raises KernelBuildError (with the reason) if this machine cannot build it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelBuildError(f"native kernels need x86-64 with AVX2; this is {platform.machine()}")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise KernelBuildError(f"native kernels need CPU features {missing}, which this CPU lacks")
    name = build_name()
    build_dir = cache_dir() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _builder_lock(build_dir):
        return _build_and_import(name, build_dir)


@contextlib.contextmanager
def _builder_lock(build_dir: Path) -> Iterator[None]:
    """One builder per build directory at a time, by an OS lock that dies with its process. torch's own baton is a
    plain `lock` file that a killed build (Ctrl-C during the first start's compile) leaves behind, after which every
    later start waited for it forever, silently (met here). Under this lock no other builder can be running, so a
    baton found here is such a leftover and is removed."""
    with open(build_dir / "llmaas.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"llmaas: waiting for another process that is building the native kernels in {build_dir}...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        baton = build_dir / "lock"
        if baton.exists():
            print(f"llmaas: removing {baton}, left by a kernel build that was interrupted", file=sys.stderr,
                  flush=True)
            baton.unlink(missing_ok=True)
        yield  # the OS releases the lock when the file closes or the process dies


@contextlib.contextmanager
def _path_first(directory: str | None) -> Iterator[None]:
    """PATH with `directory` first, for the duration (None: unchanged)."""
    old = os.environ.get("PATH", "")
    if directory is not None:
        os.environ["PATH"] = directory + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build_and_import(name: str, build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    if not (build_dir / f"{name}.so").exists():
        print(f"llmaas: compiling native kernels into {build_dir} (once per source and torch installation; about a "
              "minute on two cores)...", file=sys.stderr, flush=True)
    elif not _is_up_to_date(build_dir):
        print(f"llmaas: rebuilding native kernels in {build_dir}: the source or a torch header is newer than the "
              "build (about a minute on two cores)...", file=sys.stderr, flush=True)
    ninja = ninja_path()
    try:
        with _path_first(None if ninja is None else str(Path(ninja).parent)):  # cpp_extension runs `ninja`
            return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                                      build_directory=str(build_dir), verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:  # compiler missing, build failure, bad .so
        raise KernelBuildError(
            f"could not build llmaas's native kernels ({exc}); install a C++ compiler (g++) and ninja, or run "
            "with the dense PyTorch path"
        ) from exc
