"""Keep freed tensor memory inside the process (glibc `mallopt`), so training steps stop page-faulting.

PyTorch's CPU tensors come from malloc. With glibc's defaults every step's large activations are
returned to the operating system when freed and page-faulted back in on the next step; where page
faults are expensive (virtual machines, sandboxes) that costs more than the arithmetic of the
elementwise layers. Raising the trim threshold and padding the heap makes the freed memory reusable.
What that gains, model by model and on which machine: docs/training.md, "Memory allocator"
(`python -m benchmarks.allocator` measures it again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_done = False


def keep_freed_memory(top_pad: int = 512 << 20) -> bool:
    """Tune glibc malloc for training: serve every block from the heap (no per-block mmap, which
    glibc otherwise uses for anything above 32 MiB, i.e. most activations), never trim the heap,
    and grow it `top_pad` bytes at a time. Freed activations are then reused by the next step
    instead of being unmapped and page-faulted back. Returns whether it applied (False off
    Linux/glibc). Safe to call more than once."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, top_pad), (M_MMAP_MAX, 0)))
    _done = ok
    return ok
