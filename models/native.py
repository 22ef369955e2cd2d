"""The zoo's C kernels (`models/csrc/*.c`): compiled on first use, loaded with ctypes.

One shared library holds them all: `cc -O3 -march=native -fopenmp` builds it (about two seconds)
into `$POINTWISE_ZOO_CACHE` (default `~/.cache/pointwise-zoo`), named by a hash of the sources,
the flags, the compiler and this CPU, so a changed source or another machine gets its own build.
It links libgomp by soname, which resolves to the OpenMP runtime PyTorch has already loaded: the
kernels and PyTorch's own ops share one thread pool. Where the build cannot happen (no compiler,
not Linux) `lib()` returns None after one warning, and every caller runs PyTorch's layers instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["lib", "ptr", "SOURCES"]

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
HEADERS = sorted((Path(__file__).with_name("csrc")).glob("*.h"))  # included by the sources: part of the build's hash
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_lib: ctypes.CDLL | None = None
_load_failed: str | None = None
_load_lock = threading.Lock()


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [p.name.encode() + b"\0" + p.read_bytes() for p in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()]))
    cache = Path(os.environ.get("POINTWISE_ZOO_CACHE") or Path.home() / ".cache" / "pointwise-zoo")
    target = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # compile aside, then rename: safe with concurrent processes
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed:\n{result.stderr.strip()[-2000:]}")
            os.replace(built, target)
    return target


def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None (once warned) where they cannot be built here."""
    global _lib, _load_failed
    if _lib is not None or _load_failed is not None:
        return _lib
    with _load_lock:
        if _lib is not None or _load_failed is not None:
            return _lib
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        try:
            if not sys.platform.startswith("linux"):
                # elsewhere PyTorch's OpenMP runtime is not the libgomp the compiler links
                raise RuntimeError(f"only built on Linux (this is {sys.platform})")
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            loaded = ctypes.CDLL(str(_compile(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _load_failed = str(err)
            warnings.warn(
                f"pointwise-zoo: the zoo's C training kernels (fused batch norm + activation, depthwise conv) are "
                f"unavailable ({err}); training uses PyTorch's layers (same results, slower on CPU). Set "
                "POINTWISE_ZOO_PLAIN_KERNELS=1 to choose that path and silence this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _lib = loaded
    return _lib


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """A tensor's data pointer, as the kernels take it."""
    return ctypes.c_void_p(t.data_ptr())
