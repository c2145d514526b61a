"""Freed host memory kept for the next step: the engine's CPU tensors are remade every step.

glibc's malloc gives blocks of 128 KiB and more back to the kernel when they are freed (it maps
them on their own, or trims the top of the heap), so each step's new KV cache, activations and
logits arrive as fresh pages that fault in on first touch. On the embedded model (CPU, fp32, 32
rows decoding) that was 15-20% of the engine's time. `keep_freed_host_memory` tells malloc to map
only blocks over 32 MiB on their own and to trim the heap only beyond 1 GiB free at its top: a
freed block is then reused by the next step at once. The process keeps its peak memory instead
of returning it, which a serving replica, whose peak recurs, would only ask for again.

The setting is process-wide, so the process's owner calls it (the replica, a benchmark), not the
engine. Where the C library is not glibc (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_host_memory() -> bool:
    """Keep freed host memory in this process for reuse (glibc); True if the C library took the setting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its malloc keeps or returns memory its own way
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                TRIM_THRESHOLD_BYTES))
