"""Keep large freed blocks in the process heap (glibc only).

Every kernel call allocates its outputs and caches afresh (pure functions). glibc's
malloc serves blocks above its mmap threshold (128 KiB at start, raised on the fly up to
32 MiB as mmapped blocks are freed) with a fresh ``mmap``, and returns them to the kernel
on ``free``. Each call then page-faults and zero-fills every page of its new arrays again:
on the lstm_seq training step (about 8 MB of gates, states and gradients) that was 7 ms of
a 19 ms step, and whether a process got the slow path depended on its allocation history.

``keep_large_blocks()`` sets the mmap threshold to glibc's maximum (32 MiB) and the heap
trim threshold to 256 MiB with ``mallopt``, so freed blocks are reused by the next call
instead of unmapped. The cost is memory: up to 256 MiB of freed heap stays with the
process. fastbp calls it once at import. Set ``FASTBP_MALLOC=default`` to leave malloc as
it is; fastbp also leaves it alone when ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` is set in the environment (the user has chosen).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1          # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20      # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD = 256 << 20

state = "not applied"          # shown by ``fastbp info``


def keep_large_blocks() -> str:
    """Apply the two ``mallopt`` settings once; returns a short description of the outcome."""
    global state
    if os.environ.get("FASTBP_MALLOC", "").lower() == "default":
        state = "left as is (FASTBP_MALLOC=default)"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        state = "left as is (MALLOC_*_THRESHOLD_ set)"
    else:
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
            libc.gnu_get_libc_version      # glibc only: other libcs differ in mallopt
        except (OSError, AttributeError):
            state = "left as is (not glibc)"
            return state
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        state = ("mmap threshold 32 MiB, trim threshold 256 MiB" if ok
                 else "mallopt refused the settings")
    return state
